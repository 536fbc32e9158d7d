"""fedesm's jobs as NVFLARE 2.9 recipes: `FraLoraRecipe(...)`, then `recipe.execute(SimEnv(...))`, `PocEnv`, `ProdEnv`.

A recipe here is a shipped job (`fedesm.launch.jobs.JOBS`, by default `esm2_fra_lora`) with its
`JobSettings`, so the recipe path and the JSON bundles are one definition: the job a recipe deploys is
exactly what `fedesm job export` writes from the same settings (a test compares them). NVFLARE's
execution environments only ever call two methods of a recipe's job, `simulator_run` (SimEnv) and
`export_job` (PocEnv and ProdEnv export to a folder and submit it), so `FedesmJob` renders the bundle
there, configuration only (as the shipped site policy requires), and never builds components from
Python objects.

    from nvflare.recipe import SimEnv
    from fedesm.launch.recipe import FraLoraRecipe

    recipe = FraLoraRecipe(num_rounds=3, min_clients=2, overrides={"model.arch": "esm2_t6_8M_UR50D",
                                                                     "training.steps_per_round": 200})
    run = recipe.execute(SimEnv(num_clients=2, workspace_root="/tmp/fedesm_sim"),)
    print(run.get_result())

Sites find their data through their own site config (`fedesm.site_config`); in the simulator every
site shares one file, given as `site_config=` or FEDESM_SITE_CONFIG.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from nvflare.job_config.api import FedJob
from nvflare.recipe.spec import Recipe

from fedesm.errors import FedesmError
from fedesm.launch.jobs import JOBS, JobTemplate, export_job
from fedesm.settings import JobSettings

Overrides = Optional[Union[Mapping[str, Any], Sequence[str]]]


class FedesmJob(FedJob):
    """A FedJob whose configuration is a shipped fedesm job rendered from its settings (see module doc)."""

    def __init__(self, template: JobTemplate, settings: JobSettings, name: str, site_config=None,
                 include_package: bool = False):
        super().__init__(name=name, min_clients=settings.federation.min_clients)
        self.template = template
        self.settings = settings
        self.site_config = site_config
        self.include_package = include_package

    def export_job(self, job_root: str) -> None:
        export_job(self.template.name, job_root, settings=self.settings, job_name=self.name,
                   include_package=self.include_package)

    def simulator_run(self, workspace: str, n_clients: Optional[int] = None, clients: Optional[list] = None,
                      threads: Optional[int] = None, gpu: Optional[str] = None, log_config: Optional[str] = None):
        """Render the job and run `nvflare simulator` on it (fedesm's runner: rounds reported as they finish,
        the simulator's output in `<workspace>.log`); returns 0 or 1, as NVFLARE's SimEnv expects."""
        from fedesm.launch.simulate import run_simulator

        if gpu or log_config:
            raise FedesmError("FraLoraRecipe in SimEnv: gpu_config and log_config are not supported; set the "
                              "device in the site config (device: cuda:N)")
        site_config = self.site_config or os.environ.get("FEDESM_SITE_CONFIG")
        n = len(clients) if clients else int(n_clients or self.settings.federation.min_clients)
        with tempfile.TemporaryDirectory() as root:
            self.export_job(root)
            try:
                result = run_simulator(Path(root) / self.name, workspace, n_clients=n, threads=threads,
                                       site_config=site_config, clients=list(clients) if clients else None,
                                       on_round=lambda r, rows: print(f"fedesm: round {r} done ({len(rows)} sites)"))
            except FedesmError as e:
                print(f"fedesm: {e}")
                return 1
        print(f"fedesm: results in {result}")
        return 0


class FraLoraRecipe(Recipe):
    def __init__(self, *, name: Optional[str] = None, job: str = "esm2_fra_lora",
                 settings: Optional[JobSettings] = None, overrides: Overrides = None,
                 min_clients: Optional[int] = None, num_rounds: Optional[int] = None, site_config=None,
                 include_package: bool = False):
        """Federated LoRA fine-tuning of ESM-2 with FRA-LoRA, as an NVFLARE recipe.

        Args:
            name: the job's name (default: the shipped job's).
            job: a shipped fedesm job: esm2_fra_lora (default), esm2_fra_lora_skew_dp or esm2_cyclic.
            settings: the job's settings (`fedesm.settings.JobSettings`; default: the shipped job's).
            overrides: settings changes, as `fedesm job export --set` takes them: {"training.lr": 0.002,
                "lora.r": 8} or ["training.lr=0.002"]; checked, one-line errors.
            min_clients, num_rounds: NVFLARE's names for federation.min_clients and training.rounds.
            site_config: the site configuration every simulated site reads (SimEnv only; default
                FEDESM_SITE_CONFIG); real sites read their own.
            include_package: also put the fedesm package in the job's app/custom (a bring-your-own-code job,
                for a network whose policy grants BYOC; fedesm's shipped site policy refuses it). Default:
                configuration only, run by the fedesm each participant installed.
        """
        if job not in JOBS:
            raise FedesmError(f"unknown fedesm job {job!r}; known: {', '.join(sorted(JOBS))}")
        template = JOBS[job]
        base = settings or template.settings
        named = {}
        if min_clients is not None:
            named["federation.min_clients"] = min_clients
        if num_rounds is not None:
            named["training.rounds"] = num_rounds
        final = base.with_overrides(overrides).with_overrides(named)
        self.settings = final
        self.template = template
        super().__init__(FedesmJob(template, final, name or template.name, site_config=site_config,
                                   include_package=include_package))

    @property
    def min_clients(self) -> int:
        return self.settings.federation.min_clients

    @property
    def num_rounds(self) -> int:
        return self.settings.training.rounds
