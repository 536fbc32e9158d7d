"""FRA-LoRA fine-tuning of ESM-2 as an NVFLARE 2.9 recipe, in the simulator.

    FEDESM_SITE_CONFIG=site.yaml python examples/fra_lora_recipe.py            # run it
    python examples/fra_lora_recipe.py --export --export-dir jobs_out         # or write the job bundle

site.yaml says where each site's data and backbone are (see fedesm.site_config; `fedesm demo` writes one).
The same recipe runs on a POC or production network: `recipe.execute(PocEnv(num_clients=2))`,
`recipe.execute(ProdEnv(startup_kit_location=...))`.
"""

import os

from nvflare.recipe import SimEnv

from fedesm.launch.recipe import FraLoraRecipe

recipe = FraLoraRecipe(num_rounds=2, min_clients=2, overrides={
    "model.arch": "esm2_t2_tiny", "model.backbone": "random:esm2_t2_tiny", "lora.r": 4,
    "training.steps_per_round": 20, "training.batch_size": 4, "training.max_len": 200})
run = recipe.execute(SimEnv(num_clients=2, workspace_root=os.environ.get("FEDESM_SIM_ROOT", "/tmp/fedesm_sim")))
print("result:", run.get_result())
