"""Kits from real NVFLARE provisioning for the secure-aggregation tests: each site's startup/ holds the
client.key, client.crt and rootCA.pem its keys are signed with and checked against."""

import yaml

from fedesm.launch.network import DEFAULT_PROJECT_FILE, provision, render_project

SITES = ["site-1", "site-2", "site-3"]


def make_kits(root, name="fedesm", sites=SITES, fl_port=18102):
    """Provision a project `name` with `sites` under `root`; returns the provisioned workspace (one kit per
    participant, `<ws>/<site>/startup`)."""
    project = yaml.safe_load(DEFAULT_PROJECT_FILE.read_text())
    project["name"] = name
    project["participants"] = [p for p in project["participants"] if p["type"] == "server"] + [
        {"name": s, "type": "client", "org": f"org{i}"} for i, s in enumerate(sites, start=1)]
    root.mkdir(parents=True, exist_ok=True)
    src = root / "src.yml"
    src.write_text(yaml.safe_dump(project))
    return provision(render_project(src, root / "project.yml", server_name="localhost", fl_port=fl_port), root / "ws")
