"""FRA-LoRA fine-tuning of ESM-2 as an NVFLARE 2.9 recipe, in the simulator.

    FEDESM_SITE_CONFIG=site.yaml python examples/fra_lora_recipe.py            # run it
    python examples/fra_lora_recipe.py --export --export-dir jobs_out         # or write the job bundle

site.yaml says where each site's data and backbone are (see fedesm.site_config; `fedesm demo` writes one). The
site's backbone must have the job's architecture, esm2_t2_tiny here (`backbone: random:esm2_t2_tiny`, or the
checkpoint `fedesm demo` writes); for another backbone set FEDESM_ARCH to its architecture
(`FEDESM_ARCH=esm2_t6_8M_UR50D`). A site whose backbone is another architecture refuses the job in one line.
The same recipe runs on a POC or production network: `recipe.execute(PocEnv(num_clients=2))`,
`recipe.execute(ProdEnv(startup_kit_location=...))`.
"""

import os

from nvflare.recipe import SimEnv

from fedesm.launch.recipe import FraLoraRecipe

arch = os.environ.get("FEDESM_ARCH", "esm2_t2_tiny")  # the sites' backbone architecture
recipe = FraLoraRecipe(num_rounds=2, min_clients=2, overrides={
    "model.arch": arch, "model.backbone": f"random:{arch}", "lora.r": 4,
    "training.steps_per_round": 20, "training.batch_size": 4, "training.max_len": 200})
run = recipe.execute(SimEnv(num_clients=2, workspace_root=os.environ.get("FEDESM_SIM_ROOT", "/tmp/fedesm_sim")))
print("result:", run.get_result())
