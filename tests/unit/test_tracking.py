"""The new settings of issue 14: MLflow tracking (federation.mlflow*) and a site's own LoRA rank (site config
lora_r): their checks, and what they put in a job."""

from __future__ import annotations

import json

import pytest

from fedesm.errors import FedesmError
from fedesm.launch.jobs import JOBS, SERVER_CONFIG, export_job, render_job
from fedesm.settings import FederationSettings, SettingError
from fedesm.site_config import load_site_config


def test_mlflow_settings_defaults_and_checks():
    f = FederationSettings()
    assert (f.mlflow, f.mlflow_tracking_uri, f.mlflow_experiment) == (False, None, "fedesm")
    on = FederationSettings.from_dict({"mlflow": "yes", "mlflow_tracking_uri": "http://127.0.0.1:5000"})
    assert on.mlflow is True and on.mlflow_tracking_uri == "http://127.0.0.1:5000"
    with pytest.raises(SettingError, match="federation.mlflow_tracking_uri: is set but federation.mlflow is off"):
        FederationSettings(mlflow_tracking_uri="http://127.0.0.1:5000")
    with pytest.raises(SettingError, match="federation.mlflow_experiment: needs a name"):
        FederationSettings(mlflow=True, mlflow_experiment=" ")


@pytest.mark.parametrize("job", sorted(JOBS))
def test_the_mlflow_receiver_is_in_a_job_exactly_when_switched_on(job, tmp_path):
    def component_ids(files):
        return [c["id"] for c in files[SERVER_CONFIG]["components"]]

    template = JOBS[job]
    assert "mlflow_receiver" not in component_ids(render_job(template))
    on = template.settings.with_overrides({"federation.mlflow": True, "mlflow_experiment": "binding"})
    files = render_job(template, on)
    receiver = [c for c in files[SERVER_CONFIG]["components"] if c["id"] == "mlflow_receiver"]
    assert receiver == [{"id": "mlflow_receiver", "path": "fedesm.flare.mlflow_receiver.FedesmMLflowReceiver",
                         "args": {"model": "{model}", "lora": "{lora}", "federation": "{federation}"}}]
    assert files[SERVER_CONFIG]["federation"]["mlflow_experiment"] == "binding"
    # exporting an exported folder with mlflow off again removes it; on twice keeps one
    out = export_job(job, tmp_path, {"federation.mlflow": True}, include_package=False)
    again = export_job(out, tmp_path / "again", {"federation.mlflow": True}, include_package=False)
    ids = [c["id"] for c in json.loads((again / SERVER_CONFIG).read_text())["components"]]
    assert ids.count("mlflow_receiver") == 1
    off = export_job(out, tmp_path / "off", {"federation.mlflow": False}, include_package=False)
    assert "mlflow_receiver" not in [c["id"] for c in json.loads((off / SERVER_CONFIG).read_text())["components"]]


def test_receiver_takes_the_uri_from_the_job_then_the_servers_environment(monkeypatch):
    pytest.importorskip("mlflow")
    from fedesm.flare.mlflow_receiver import FedesmMLflowReceiver

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    r = FedesmMLflowReceiver(lora={"r": 8}, federation={"mlflow": True, "mlflow_experiment": "x"})
    assert r.tracking_uri == "http://127.0.0.1:5999"
    assert r.kw_args["experiment_name"] == "x" and r.kw_args["run_tags"]["fedesm.lora_r"] == "8"
    r = FedesmMLflowReceiver(federation={"mlflow": True, "mlflow_tracking_uri": "sqlite:////tmp/m.db"})
    assert r.tracking_uri == "sqlite:////tmp/m.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert FedesmMLflowReceiver(federation={"mlflow": True}).tracking_uri is None  # NVFLARE's default: result dir


def test_site_lora_r_in_the_site_config(tmp_path):
    cfg = tmp_path / "site.yaml"
    cfg.write_text("data:\n  train: /d/{site}/t.fa\n  val: /d/{site}/v.fa\nsites:\n  site-1: {lora_r: 4}\n")
    assert load_site_config("site-1", cfg).lora_r == 4
    assert load_site_config("site-2", cfg).lora_r is None
    for bad in ("0", "four", "true", "2.5"):
        cfg.write_text(f"lora_r: {bad}\ndata: {{train: /t.fa, val: /v.fa}}\n")
        with pytest.raises(FedesmError, match="lora_r must be a positive integer"):
            load_site_config("site-1", cfg)
