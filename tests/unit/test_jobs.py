"""Job bundles: valid NVFLARE configs, overrides in one place, self-contained export."""

from __future__ import annotations

import json

import pytest

from fedesm.cli import main
from fedesm.errors import FedesmError
from fedesm.jobs import export_job, job_values, jobs_root, list_jobs


def test_three_jobs_with_plain_config_values():
    assert list_jobs() == ["esm2_cyclic", "esm2_fra_lora", "esm2_fra_lora_skew_dp"]
    values = job_values(jobs_root() / "esm2_fra_lora")
    server, client = values["config_fed_server.json"], values["config_fed_client.json"]
    assert server["arch"] == "esm2_t12_35M_UR50D" and server["lora_r"] == 16 and server["num_rounds"] == 30
    assert server["strategy"] == "fra" and client["steps_per_round"] == 5000 and client["max_len"] == 1000
    assert job_values(jobs_root() / "esm2_fra_lora_skew_dp")["config_fed_client.json"]["grad_noise_std"] == 1e-4


@pytest.mark.parametrize("job", ["esm2_fra_lora", "esm2_fra_lora_skew_dp", "esm2_cyclic"])
def test_every_var_reference_resolves(job):
    """Each "{name}" in a component's args names a top-level value of the same file."""
    import re

    for cfg in ("config_fed_server.json", "config_fed_client.json"):
        text = (jobs_root() / job / "app" / "config" / cfg).read_text()
        data = json.loads(text)
        refs = set(re.findall(r'"\{(\w+)\}"', text))
        assert refs and refs <= set(data), (cfg, refs - set(data))


def test_export_applies_overrides_and_carries_the_package(tmp_path):
    dest = export_job("esm2_fra_lora", tmp_path, {"num_rounds": 3, "strategy": "fra-ef", "lr": 0.002,
                                                  "min_clients": 1})
    server = json.loads((dest / "app/config/config_fed_server.json").read_text())
    client = json.loads((dest / "app/config/config_fed_client.json").read_text())
    assert server["num_rounds"] == 3 and server["strategy"] == "fra-ef" and client["lr"] == 0.002
    assert json.loads((dest / "meta.json").read_text())["min_clients"] == 1
    assert (dest / "app/custom/fedesm/flare/executor.py").is_file()
    assert not list((dest / "app/custom").rglob("__pycache__"))
    # NVFLARE's own job validation accepts it
    from nvflare.fuel.utils.config_factory import ConfigFactory

    assert ConfigFactory.load_config(str(dest / "app/config/config_fed_server.json")) is not None


def test_unknown_override_is_refused_and_nothing_written(tmp_path):
    with pytest.raises(FedesmError, match="unknown job setting"):
        export_job("esm2_fra_lora", tmp_path, {"num_round": 3})
    assert list(tmp_path.iterdir()) == []


def test_job_cli(tmp_path, capsys):
    assert main(["job", "export", "esm2_cyclic", "--out", str(tmp_path), "--set", "num_rounds=2"]) == 0
    assert json.loads((tmp_path / "esm2_cyclic/app/config/config_fed_server.json").read_text())["num_rounds"] == 2
    assert main(["job", "export", "nope", "--out", str(tmp_path)]) == 2
    assert "not a job folder" in capsys.readouterr().err
