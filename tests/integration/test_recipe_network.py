"""FraLoraRecipe on a real provisioned network (mutual TLS on loopback) through NVFLARE's ProdEnv: the recipe's
job is submitted with the admin's startup kit, runs at both sites, and its result comes back."""

from __future__ import annotations

import pytest

from tests.integration.test_network import (FEDESM_ROUNDS, _check_fedesm_result, both_sites,  # noqa: F401
                                            network, prepare_fedesm_sites)

pytestmark = pytest.mark.slow


def test_recipe_runs_on_a_provisioned_network_through_prod_env(both_sites, tmp_path):  # noqa: F811
    import shutil
    from pathlib import Path

    from nvflare.recipe import ProdEnv

    from fedesm.launch.recipe import FraLoraRecipe

    net = both_sites
    ckpt = prepare_fedesm_sites(tmp_path, net)
    recipe = FraLoraRecipe(name="fra-lora-recipe", num_rounds=FEDESM_ROUNDS, min_clients=2, overrides={
        "model.arch": "esm2_t2_tiny", "model.backbone": str(ckpt), "training.steps_per_round": 20, "lora.r": 4,
        "training.max_len": 200}, include_package=True)  # this network keeps NVFLARE's default policy (BYOC)
    run = recipe.execute(ProdEnv(startup_kit_location=str(net.admin_kit), username=net.state.admin,
                                 login_timeout=10.0))
    result = run.get_result(timeout=600)
    assert result and Path(result).is_dir(), result
    _check_fedesm_result(Path(result))
    assert run.get_status() == "FINISHED:COMPLETED"
    shutil.rmtree(result)  # out of the admin's download folder
