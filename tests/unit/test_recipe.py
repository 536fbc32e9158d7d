"""FraLoraRecipe builds the same job as the JSON bundles from the same settings."""

from __future__ import annotations

import json

import pytest

from fedesm.errors import FedesmError
from fedesm.launch.jobs import CONFIG_FILES, JOBS, META, export_job
from fedesm.launch.recipe import FraLoraRecipe


def _bundle(root):
    files = {rel: json.loads((root / rel).read_text()) for rel in (META, *CONFIG_FILES)}
    custom = sorted(str(p.relative_to(root)) for p in (root / "app").rglob("custom/**/*.py"))
    return files, custom


@pytest.mark.parametrize("job", sorted(JOBS))
def test_recipe_exports_the_job_that_fedesm_job_export_writes(job, tmp_path):
    overrides = {"lora.r": 8, "training.lr": 0.002, "federation.mlflow": True}
    recipe = FraLoraRecipe(job=job, overrides=overrides, num_rounds=4, min_clients=3)
    assert (recipe.name, recipe.num_rounds, recipe.min_clients) == (job, 4, 3)
    recipe.export(str(tmp_path / "recipe"))
    settings = JOBS[job].settings.with_overrides({**overrides, "training.rounds": 4, "federation.min_clients": 3})
    export_job(job, tmp_path / "bundle", settings=settings)
    ours, ours_custom = _bundle(tmp_path / "recipe" / job)
    theirs, theirs_custom = _bundle(tmp_path / "bundle" / job)
    assert ours == theirs and ours_custom == theirs_custom == []  # configuration only, as the site policy wants
    server = ours["app/config/config_fed_server.json"]
    assert server["lora"]["r"] == 8 and server["workflows"][0]["args"]["num_rounds"] == 4
    assert ours[META]["min_clients"] == 3


def test_recipe_name_and_bad_settings():
    assert FraLoraRecipe(name="binding_sites").name == "binding_sites"
    with pytest.raises(FedesmError, match="unknown fedesm job"):
        FraLoraRecipe(job="fedavg")
    with pytest.raises(FedesmError, match="lora.r: the LoRA rank must be a positive integer"):
        FraLoraRecipe(overrides={"lora.r": 0})
    with pytest.raises(FedesmError, match="training.rounds: must be a positive integer"):
        FraLoraRecipe(num_rounds=0)


def test_a_recipe_for_a_byoc_network_carries_the_package(tmp_path):
    FraLoraRecipe(include_package=True).export(str(tmp_path))
    assert "app/custom/fedesm/settings.py" in _bundle(tmp_path / "esm2_fra_lora")[1]
