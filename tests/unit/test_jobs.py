"""Job bundles: one definition per shipped job, settings blocks in both configs, checked overrides, export."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

import fedesm
from fedesm.cli import main
from fedesm.errors import FedesmError
from fedesm.settings import JobSettings
from fedesm.launch.jobs import (CLIENT_CONFIG, CONFIG_EXTENSIONS, JOBS, META, SERVER_CONFIG, VERSION_KEY, export_job,
                                job_settings, jobs_root, list_jobs, read_job_settings, render_job)

REPO = Path(__file__).resolve().parents[2]


def test_three_jobs_with_the_papers_settings():
    assert list_jobs() == ["esm2_cyclic", "esm2_fra_lora", "esm2_fra_lora_skew_dp"]
    s = job_settings("esm2_fra_lora")
    assert s.model.arch == "esm2_t12_35M_UR50D" and s.lora.r == 16 and s.training.rounds == 30
    assert s.federation.strategy == "fra" and s.training.steps_per_round == 5000 and s.training.max_len == 1000
    assert job_settings("esm2_fra_lora_skew_dp").training.grad_noise_std == 1e-4
    # every shipped job's configs carry every setting, block.field by block.field: none can lack what another
    # has (the cyclic job once lacked DP keys)
    every = {f"{block}.{f.name}" for block, cls in JobSettings.BLOCKS.items() for f in dataclasses.fields(cls)}
    carried = {(n, cfg): {f"{block}.{name}" for block in JobSettings.BLOCKS
                          for name in json.loads((jobs_root() / n / cfg).read_text()).get(block, {})}
               for n in list_jobs() for cfg in (SERVER_CONFIG, CLIENT_CONFIG)}
    assert len(every) > 40 and carried == {key: every for key in carried}


@pytest.mark.parametrize("job", sorted(JOBS))
def test_the_jobs_folder_is_the_rendering_of_the_definitions(job):
    """jobs/ is written by `fedesm job render`; a hand edit there (or a definition changed without
    re-rendering) fails here."""
    for rel, content in render_job(JOBS[job]).items():
        assert json.loads((jobs_root() / job / rel).read_text()) == content, (job, rel)
    assert read_job_settings(jobs_root() / job) == JOBS[job].settings


@pytest.mark.parametrize("job", sorted(JOBS))
def test_every_var_reference_resolves_and_numbers_follow_the_blocks(job):
    """Each "{name}" in a component's args names a top-level block of the same file; NVFLARE's own
    numbers (rounds, minimum sites) are the blocks' values."""
    import re

    files = render_job(JOBS[job])
    for cfg in (SERVER_CONFIG, CLIENT_CONFIG):
        text = json.dumps(files[cfg])
        refs = set(re.findall(r'"\{(\w+)\}"', text))
        assert refs and refs <= set(files[cfg]), (cfg, refs - set(files[cfg]))
    flow = files[SERVER_CONFIG]["workflows"][0]["args"]
    s = JOBS[job].settings
    assert flow["num_rounds"] == s.training.rounds
    assert files[META]["min_clients"] == s.federation.min_clients == flow.get("min_clients", s.federation.min_clients)


def test_export_applies_overrides_in_every_place_and_carries_configuration_only(tmp_path):
    dest = export_job("esm2_fra_lora", tmp_path, ["training.rounds=3", "strategy=fra-ef", "lr=0.002",
                                                  "federation.min_clients=1"])
    server = json.loads((dest / SERVER_CONFIG).read_text())
    client = json.loads((dest / CLIENT_CONFIG).read_text())
    for cfg in (server, client):
        assert cfg["training"]["rounds"] == 3 and cfg["federation"]["strategy"] == "fra-ef"
        assert cfg["training"]["lr"] == 0.002 and cfg["federation"]["min_clients"] == 1
    assert server["workflows"][0]["args"]["num_rounds"] == 3 and server["workflows"][0]["args"]["min_clients"] == 1
    assert json.loads((dest / META).read_text())["min_clients"] == 1
    assert read_job_settings(dest).training.lr == 0.002
    # configuration only: sites run the fedesm they installed; the bundle says which version wrote it
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()) == sorted(
        [META, SERVER_CONFIG, CLIENT_CONFIG])
    assert json.loads((dest / META).read_text())[VERSION_KEY] == fedesm.__version__
    # NVFLARE's own job validation accepts it, and its config resolution hands the blocks to our components
    from nvflare.fuel.utils.config_factory import ConfigFactory

    assert ConfigFactory.load_config(str(dest / SERVER_CONFIG)) is not None


def test_with_code_bundle_carries_the_package_but_nothing_nvflare_parses_as_config(tmp_path):
    """`--with-code` (simulator/POC networks that allow BYOC): fedesm in app/custom, but none of the files
    `nvflare job submit` would try to parse as job configuration (the presets YAML broke it)."""
    from nvflare.fuel.utils.config import ConfigFormat

    dest = export_job("esm2_fra_lora", tmp_path, include_package=True)
    custom = dest / "app" / "custom"
    assert (custom / "fedesm" / "flare" / "executor.py").is_file()
    assert not list(custom.rglob("__pycache__"))
    assert set(ConfigFormat.extensions()) <= set(CONFIG_EXTENSIONS)
    assert [p for p in custom.rglob("*") if p.name.endswith(CONFIG_EXTENSIONS)] == []
    assert list((REPO / "custom" / "fedesm").rglob("*.yaml"))  # there were some to leave out
    # re-exported code-free, a with-code bundle loses its app/custom
    again = export_job(dest, tmp_path / "again")
    assert not (again / "app" / "custom").exists() and (again / CLIENT_CONFIG).is_file()


def test_a_job_folder_exports_through_the_same_settings(tmp_path):
    """A job folder (here one exported before) is read back, overridden and re-synced the same way."""
    first = export_job("esm2_cyclic", tmp_path / "a", ["training.rounds=2"], include_package=False)
    second = export_job(first, tmp_path / "b", ["lora.r=4"], include_package=False)
    s = read_job_settings(second)
    assert s.training.rounds == 2 and s.lora.r == 4
    assert json.loads((second / SERVER_CONFIG).read_text())["workflows"][0]["args"]["num_rounds"] == 2


@pytest.mark.parametrize("override, message", [
    (["num_round=3"], "unknown job setting 'num_round'"),
    (["training.lr_=3"], "unknown training setting 'lr_'"),
    (["lora.r=0"], "lora.r: the LoRA rank must be a positive integer"),
    (["training.lr=-1"], "training.lr: the learning rate must be > 0"),
    (["strategy=fedavg"], "federation.strategy: 'fedavg' is not one of fra, fra-ef, fedit, ffa"),
    (["federation.strategy=ffa"], "set training.freeze_lora_a: true"),
])
def test_bad_overrides_are_refused_and_nothing_written(tmp_path, override, message):
    with pytest.raises(FedesmError, match=message.replace("(", r"\(").replace(")", r"\)")):
        export_job("esm2_fra_lora", tmp_path, override)
    assert list(tmp_path.iterdir()) == []


def test_a_folder_whose_configs_disagree_is_refused(tmp_path):
    dest = export_job("esm2_fra_lora", tmp_path, include_package=False)
    client = json.loads((dest / CLIENT_CONFIG).read_text())
    client["lora"]["r"] = 4
    (dest / CLIENT_CONFIG).write_text(json.dumps(client))
    with pytest.raises(FedesmError, match="carry different settings"):
        read_job_settings(dest)


def test_job_cli(tmp_path, capsys):
    assert main(["job", "export", "esm2_cyclic", "--out", str(tmp_path), "--set", "training.rounds=2"]) == 0
    assert json.loads((tmp_path / "esm2_cyclic" / SERVER_CONFIG).read_text())["training"]["rounds"] == 2
    capsys.readouterr()
    assert main(["job", "show", "esm2_fra_lora_skew_dp"]) == 0
    assert json.loads(capsys.readouterr().out)["training"]["grad_noise_std"] == 1e-4
    assert main(["job", "export", "nope", "--out", str(tmp_path)]) == 2
    assert "not a job folder" in capsys.readouterr().err
    assert main(["job", "export", "esm2_cyclic", "--out", str(tmp_path), "--set", "lora.r=0"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "fedesm: error: lora.r: the LoRA rank must be a positive integer, got 0"]
