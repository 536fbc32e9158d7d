"""Privacy against the orchestrator, end to end in `nvflare simulator` on a tiny random-init ESM-2:

* noise the job's seed does not decide: the same job run twice gives other contributions at every site with
  gradient noise on, bit-identical ones with it off;
* the outbound filter: a job whose executor adds a backbone weight to one site's results; the result is
  refused, the server logs why, nothing of it reaches the aggregator, the job ends with the other site;
* the site's own DP policy: a site refusing a job below its minimum noise, a site stopping at its epsilon
  budget, the job completing with the third site (min_clients 1).

`nvflare simulator` 2.9 applies the workspace's privacy scope where its server receives results (its
simulated clients get none, see fedesm.flare.privacy); a provisioned site applies it before sending
(tests/integration/test_production.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from fedesm import results
from fedesm.tables import read_table

pytestmark = pytest.mark.slow

TINY = {"model.arch": "esm2_t2_tiny", "lora.r": 4, "training.max_len": 120, "training.batch_size": 4,
        "training.seed": 3}


def _network_data(root: Path, n_sites: int) -> tuple[Path, Path]:
    """Synthetic split over `n_sites`, a tiny checkpoint, one site config for all of them."""
    from fedesm.data.split import split_records, write_split
    from fedesm.data.synth import synth_records
    from fedesm.model.checkpoint import make_random_checkpoint
    from fedesm.site_config import write_site_config

    records = synth_records(n=60 * n_sites, n_families=8, pos_rate=0.1, min_len=60, max_len=120, seed=1)
    write_split(split_records(records, "iid", n_sites, seed=1, site_val_frac=0.15), root / "data")
    ckpt = make_random_checkpoint("esm2_t2_tiny", root / "esm2_t2_tiny.pt")
    return ckpt, write_site_config(root / "site.yaml", ckpt, root / "data")


def _site_privacy(cfg: Path, privacy: dict) -> None:
    """Each site's own `privacy:` block, as a site config's per-site override."""
    raw = yaml.safe_load(cfg.read_text())
    raw["sites"] = {site: {"privacy": p} for site, p in privacy.items()}
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))


def _run(root: Path, name: str, ckpt: Path, cfg: Path, n_sites: int, overrides: dict, probe: bool = True,
         edit=None) -> tuple[Path, Path]:
    from fedesm.launch.jobs import export_job
    from fedesm.launch.simulate import run_simulator
    from tests.integration.flare_probe import add_probes

    job = export_job("esm2_fra_lora", root / name / "jobs", {**TINY, "model.backbone": str(ckpt), **overrides})
    if probe:
        add_probes(job, root / name / "probe")
    if edit:
        edit(job)
    out = run_simulator(job, root / name / "ws", n_clients=n_sites, site_config=cfg, timeout=900)
    return out, root / name / "probe"


def _received(probe: Path, site: str, rnd: int = 0) -> dict:
    from tests.integration.flare_probe import load

    return load(probe / f"received_{site}_round{rnd:03d}.npz")[0]


def test_same_job_seed_twice_noise_differs_at_every_site_and_without_noise_runs_are_bit_identical(tmp_path):
    ckpt, cfg = _network_data(tmp_path, 2)
    job = {"training.rounds": 1, "training.steps_per_round": 4}
    arms = {"noisy_a": 0.01, "noisy_b": 0.01, "plain_a": 0.0, "plain_b": 0.0}
    runs = {a: _run(tmp_path, a, ckpt, cfg, 2, {**job, "training.grad_noise_std": std}) for a, std in arms.items()}
    for site in ("site-1", "site-2"):
        a, b = _received(runs["noisy_a"][1], site), _received(runs["noisy_b"][1], site)
        assert a.keys() == b.keys() and len(a) == 14
        assert all(not np.array_equal(a[k], b[k]) for k in a), site  # every tensor: another noise draw
        c, d = _received(runs["plain_a"][1], site), _received(runs["plain_b"][1], site)
        assert all(np.array_equal(c[k], d[k]) for k in c), site
    from fedesm.model.cards import read_adapter_state

    plain = [read_adapter_state(results.round_dir(results.output_dir(runs[r][0]), 1)) for r in ("plain_a", "plain_b")]
    assert all(np.array_equal(plain[0][k].numpy(), plain[1][k].numpy()) for k in plain[0])
    rows = read_table(results.output_dir(runs["noisy_a"][0]) / results.METRICS)
    assert {r["site"]: r.get("noise_reproducible") for r in rows if r["round"] == 1 and r["site"] != "server"} == {
        "site-1": 0.0, "site-2": 0.0}
    assert "site-1: privacy noise from OS entropy (secret, fresh for this run)" in (
        tmp_path / "noisy_a" / "ws.log").read_text()


def test_a_result_carrying_a_backbone_weight_is_refused_and_the_job_goes_on_with_the_other_site(tmp_path):
    from tests.integration.leaky_executor import BACKBONE_WEIGHT

    ckpt, cfg = _network_data(tmp_path, 2)

    def leaky(job: Path):
        shutil.copy(Path(__file__).with_name("leaky_executor.py"), job / "app" / "custom" / "leaky_executor.py")
        path = job / "app" / "config" / "config_fed_client.json"
        config = json.loads(path.read_text())
        executor = config["executors"][0]["executor"]
        executor["path"] = "leaky_executor.LeakyExecutor"
        executor["args"]["leak_site"] = "site-1"
        path.write_text(json.dumps(config, indent=2))

    out, probe = _run(tmp_path, "leak", ckpt, cfg, 2, {"training.rounds": 2, "training.steps_per_round": 3,
                                                        "federation.min_clients": 1}, edit=leaky)
    log = (tmp_path / "leak" / "ws.log").read_text()
    reason = ("site privacy policy: refused to send 1 tensor(s) that are neither LoRA factors nor the head, e.g. "
              f"{BACKBONE_WEIGHT!r}; only the job's LoRA factors, head and metrics leave")
    for rnd in (0, 1):
        assert f"site-1 sent nothing for task train (round {rnd}; TASK_RESULT_FILTER_ERROR): {reason}" in log
        assert f"round {rnd}: fra of 1 sites, weights by uniform: site-2=1.000" in log
    assert "accepted contribution from site-1" not in log
    # nothing of site-1's results reached the workflow's filters, the aggregator or the persisted rounds
    assert sorted(p.name for p in probe.glob("received_*")) == ["received_site-2_round000.npz",
                                                                "received_site-2_round001.npz"]
    res = results.output_dir(out)
    assert set(json.loads((res / results.PAYLOAD_MANIFEST).read_text())) == {"site-2"}
    rows = {(r["round"], r["site"]): r for r in read_table(res / results.METRICS)}
    assert rows[1, "site-1"]["withheld"] == rows[2, "site-1"]["withheld"] == reason
    assert "sent_parameters" not in rows[1, "site-1"] and rows[1, "site-2"]["sent_parameters"] > 0
    from fedesm.model.cards import read_adapter_state

    assert BACKBONE_WEIGHT not in read_adapter_state(results.round_dir(res, 2))


def test_sites_enforce_their_own_dp_policy_and_the_job_completes_with_the_others(tmp_path):
    """site-1 asks for more noise than the job uses (refuses it), site-2's epsilon budget lasts one round,
    site-3 has no policy: three rounds complete with min_clients 1; epsilon per site per round in the table."""
    from fedesm.data.validate import load_dataset
    from fedesm.training.privacy.accountant import compute_epsilon

    steps, sigma = 5, 1.0
    root = tmp_path

    def q(site):  # DP-SGD's sample rate at a site: batch size over its training set
        return 4 / len(load_dataset(root / "data" / site / "train.fa"))

    ckpt, cfg = _network_data(root, 3)
    # site-2's budget: between what one and two rounds spend there
    one, two = (compute_epsilon(sigma, q("site-2"), k * steps, 1e-5) for k in (1, 2))
    budget = round((one + two) / 2, 3)
    _site_privacy(cfg, {"site-1": {"min_noise_multiplier": 1.5}, "site-2": {"target_epsilon": budget}})
    out, _ = _run(root, "dp", ckpt, cfg, 3, {"training.rounds": 3, "training.steps_per_round": steps,
                                             "training.dp_noise_multiplier": sigma, "training.dp_max_grad_norm": 1.0,
                                             "training.class_weights": "1,4",
                                             "federation.min_clients": 1}, probe=False)
    log = (root / "dp" / "ws.log").read_text()
    refusal = ("site privacy policy: refusing the job: the job's training.dp_noise_multiplier 1 is below this "
               "site's privacy.min_noise_multiplier 1.5")
    for rnd in range(3):
        assert f"site-1 sent nothing for task train (round {rnd}; EMPTY_RESULT): {refusal}" in log
    assert f"site-2: epsilon budget {budget:g} at delta 1e-05 covers 1 of 3 rounds" in log
    for rnd in (1, 2):
        assert (f"site-2 sent nothing for task train (round {rnd}; EMPTY_RESULT): round {rnd}: epsilon budget: the "
                f"next round would spend epsilon {two:.3f} > this site's privacy.target_epsilon {budget:g}") in log
    assert "round 0: fra of 2 sites" in log and "round 1: fra of 1 sites" in log and "round 2: fra of 1 sites" in log
    res = results.output_dir(out)
    assert (res / "rounds" / "round_003" / "adapter_model.safetensors").is_file()  # all three rounds aggregated
    rows = {(r["round"], r["site"]): r for r in read_table(res / results.METRICS)}
    assert rows[1, "site-2"]["epsilon"] == pytest.approx(one, rel=1e-9)
    assert rows[1, "site-2"]["epsilon_budget"] == budget and rows[1, "site-2"]["dp_steps"] == steps
    assert all(rows[r, "site-2"]["withheld"].startswith(f"round {r - 1}: epsilon budget") for r in (2, 3))
    assert all("epsilon" not in rows[r, "site-2"] for r in (2, 3))  # spent nothing more
    eps3 = [rows[r, "site-3"]["epsilon"] for r in (1, 2, 3)]
    assert eps3 == pytest.approx([compute_epsilon(sigma, q("site-3"), steps * r, 1e-5) for r in (1, 2, 3)], rel=1e-9)
    assert all(rows[r, "site-1"]["withheld"] == refusal and "epsilon" not in rows[r, "site-1"] for r in (1, 2, 3))
