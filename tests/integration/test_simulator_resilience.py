"""Long runs that survive, in the real `nvflare simulator` on a tiny random-init ESM-2 (synthetic data):

* the simulator is killed (SIGKILL) during round 3 of 4, and a second job resumes from the saved
  round_002: it runs rounds 3 and 4 only, and its table and folders continue the first run's;
* one of three sites sends its update scaled by 1e3 (round 1) and sign-flipped at 30x (round 2): the
  aggregator rejects it, aggregates the other two, and the global model scores as without that site;
* a site whose train file is empty, or whose val set has no binding residue, says so at job start.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from fedesm.tables import SERVER_ROW, read_table

pytestmark = pytest.mark.slow

SMALL = {"model.arch": "esm2_t2_tiny", "lora.r": 4, "training.steps_per_round": 20, "training.max_len": 200}


def prepare(tmp: Path, n_sites: int, seed: int = 3):
    from fedesm.data.split import split_records, write_split
    from fedesm.data.synth import synth_records
    from fedesm.model.checkpoint import make_random_checkpoint
    from fedesm.site_config import write_site_config

    records = synth_records(n=100 * n_sites, n_families=10, pos_rate=0.1, min_len=60, max_len=200, seed=seed)
    write_split(split_records(records, "iid", n_sites, seed=seed, site_val_frac=0.15), tmp / "data", overwrite=True)
    ckpt = make_random_checkpoint("esm2_t2_tiny", tmp / "esm2_t2_tiny.pt")
    return ckpt, write_site_config(tmp / "site.yaml", ckpt, tmp / "data")


def job(tmp: Path, name: str, ckpt: Path, **settings) -> Path:
    from fedesm.launch.jobs import export_job

    # with fedesm in app/custom: these runs call `nvflare simulator` directly (no site policy in the workspace),
    # and the bad-site job adds its own filter module there
    return export_job("esm2_fra_lora", tmp / "jobs", {**SMALL, "model.backbone": str(ckpt), **settings}, job_name=name,
                      include_package=True)


def rows_by_key(rows):
    return {(r["round"], r["site"]): r for r in rows}


def test_killed_during_round_3_and_resumed_from_round_2(tmp_path):
    from fedesm.launch.simulate import nvflare_command, run_simulator

    ckpt, site_cfg = prepare(tmp_path, 2)
    first = job(tmp_path, "first", ckpt, **{"training.rounds": 4, "federation.strategy": "fra-ef"})
    ws = tmp_path / "ws_first"
    out = ws / "server" / "simulate_job" / "fedesm"
    env = dict(os.environ, FEDESM_SITE_CONFIG=str(site_cfg))
    t0 = time.monotonic()
    with (tmp_path / "first.log").open("w") as log:
        proc = subprocess.Popen(nvflare_command() + ["simulator", str(first), "-w", str(ws), "-n", "2", "-t", "2"],
                                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            while not (out / "rounds" / "round_002").is_dir():
                assert proc.poll() is None, "the simulator ended before round 2 was saved"
                assert time.monotonic() - t0 < 600
                time.sleep(0.2)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # a crash: no END_RUN, nothing flushed
            proc.wait()
    crashed_at = time.monotonic() - t0
    assert not (out / "rounds" / "round_003").exists()
    old_rows = read_table(out / "metrics.jsonl")

    second = job(tmp_path, "second", ckpt, **{"training.rounds": 4, "federation.strategy": "fra-ef",
                                              "federation.resume_from": str(out / "rounds" / "round_002")})
    t1 = time.monotonic()
    result = run_simulator(second, tmp_path / "ws_second", n_clients=2, site_config=site_cfg, timeout=600)
    resumed_seconds = time.monotonic() - t1
    new = result / "fedesm"
    log = (tmp_path / "ws_second.log").read_text()
    assert "resumed after 2 rounds: running rounds 3 to 4" in log
    assert "Round 2 started." in log and "Round 3 started." in log and "Round 1 started." not in log
    assert "joining at round 3: learning-rate schedule moved to step 40" in log

    rows = read_table(new / "metrics.jsonl")
    keys = [(r["round"], r["site"]) for r in rows]
    assert len(keys) == len(set(keys))  # no duplicate round
    for rnd in (1, 2, 3, 4):  # no gap: every round has both sites' local metrics and the server's time
        assert {s for (r, s) in keys if r == rnd} == {"site-1", "site-2", SERVER_ROW}, rnd
        for site in ("site-1", "site-2"):
            assert rows_by_key(rows)[rnd, site].get("f1") is not None
    # nothing of rounds 1-2 lost: every value the first run recorded is in the second run's table
    new_rows = rows_by_key(rows)
    for (rnd, site), old in rows_by_key(old_rows).items():
        if rnd <= 2:
            for k, v in old.items():
                expected = pytest.approx(v, rel=1e-6, abs=1e-9) if isinstance(v, float) else v
                assert new_rows[rnd, site].get(k) == expected, (rnd, site, k)
    # rounds 0-2 came from the first run, 3-4 were trained here; the final adapters moved on from round 2
    assert sorted(p.name for p in (new / "rounds").iterdir()) == [f"round_{i:03d}" for i in range(5)]
    from safetensors.numpy import load_file

    r2 = load_file(str(out / "rounds" / "round_002" / "adapter_model.safetensors"))
    last = load_file(str(new / "last" / "adapter_model.safetensors"))
    assert set(r2) == set(last)
    assert max(float(np.abs(last[k] - r2[k]).max()) for k in r2) > 1e-4
    assert json.loads((new / "last" / "fedesm_model.json").read_text())["extra"]["rounds"] == 4
    assert (new / "best" / "adapter_model.safetensors").is_file()
    assert json.loads((new / "rounds" / "round_004" / "fedesm_resume.json").read_text())["ef_residual"]
    print(f"\nkilled {crashed_at:.1f}s into the first run (after round 2 was saved); the resumed run took "
          f"{resumed_seconds:.1f}s for rounds 3-4")


BAD_SITE_FILTER = '''
"""A test double of a diverged or malicious site: its update (trained model minus the global model it
received) scaled by a factor per round before it is sent. Only for tests: never in a shipped job."""
from nvflare.apis.dxo import from_shareable
from nvflare.apis.filter import Filter
from nvflare.app_common.app_constant import AppConstants

_RECEIVED = {}


class RememberGlobal(Filter):
    def process(self, shareable, fl_ctx):
        _RECEIVED[fl_ctx.get_identity_name()] = dict(from_shareable(shareable).data)
        return shareable


class ScaleUpdate(Filter):
    def __init__(self, site, factors):
        super().__init__()
        self.site, self.factors = site, list(factors)

    def process(self, shareable, fl_ctx):
        me = fl_ctx.get_identity_name()
        rnd = shareable.get_header(AppConstants.CURRENT_ROUND)
        if me != self.site or rnd is None or rnd >= len(self.factors):
            return shareable
        dxo = from_shareable(shareable)
        glob, f = _RECEIVED[me], self.factors[rnd]
        dxo.data = {k: (glob[k] + f * (v - glob[k])).astype(v.dtype) for k, v in dxo.data.items()}
        self.log_info(fl_ctx, f"{me}: update of round {rnd} scaled by {f:g}")
        return dxo.update_shareable(shareable)
'''


def with_bad_site(job_dir: Path, site: str, factors) -> Path:
    (job_dir / "app" / "custom" / "bad_site.py").write_text(BAD_SITE_FILTER)
    cfg_path = job_dir / "app" / "config" / "config_fed_client.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["task_data_filters"] = [{"tasks": ["train"], "filters": [{"path": "bad_site.RememberGlobal", "args": {}}]}]
    cfg["task_result_filters"] = [{"tasks": ["train"], "filters": [
        {"path": "bad_site.ScaleUpdate", "args": {"site": site, "factors": list(factors)}}]}]
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return job_dir


def final_global_auprc(rows, rnd, sites=("site-1", "site-2")) -> float:
    return float(np.mean([rows_by_key(rows)[rnd, s]["global_auprc"] for s in sites]))


def test_a_site_sending_scaled_or_sign_flipped_updates_is_rejected(tmp_path):
    from fedesm.launch.simulate import run_simulator

    ckpt, site_cfg = prepare(tmp_path, 3)
    rounds = {"training.rounds": 2}
    clean = run_simulator(job(tmp_path, "two", ckpt, **rounds), tmp_path / "ws_two", n_clients=2,
                          site_config=site_cfg, timeout=600, clients=["site-1", "site-2"])
    attacked_job = with_bad_site(job(tmp_path, "three", ckpt, **rounds), "site-3", [1e3, -30.0])
    attacked = run_simulator(attacked_job, tmp_path / "ws_three", n_clients=3, site_config=site_cfg, timeout=600)
    log = (tmp_path / "ws_three.log").read_text()
    assert "site-3: update of round 0 scaled by 1000" in log and "update of round 1 scaled by -30" in log
    rows = read_table(attacked / "fedesm" / "metrics.jsonl")
    by = rows_by_key(rows)
    for rnd in (1, 2):
        assert "the median of the other sites'" in by[rnd, "site-3"]["rejected"], rnd
        assert "rejected" not in by[rnd, "site-1"] and "rejected" not in by[rnd, "site-2"]
        assert by[rnd, "site-3"]["update_norm"] > 10 * by[rnd, "site-1"]["update_norm"]
        assert f"round {rnd - 1}: rejected the update of site-3" in log
        assert f"round {rnd - 1}: fra of 2 sites" in log
    clean_rows = read_table(clean / "fedesm" / "metrics.jsonl")
    with_bad, without = final_global_auprc(rows, 2), final_global_auprc(clean_rows, 2)
    print(f"\nfinal global val AUPRC (sites 1-2): {with_bad:.4f} with the rejected site, {without:.4f} without it")
    assert abs(with_bad - without) < 0.02  # the same two updates were averaged: only float noise differs
    # honest sites in the clean run: their update norms are close (the ratio the default bound of 10 leaves room for)
    ratios = [r["update_norm_ratio"] for r in clean_rows if r.get("update_norm_ratio") is not None]
    assert ratios and max(ratios) < 3


def test_a_site_with_unusable_data_says_so_at_job_start(tmp_path):
    import yaml

    from fedesm.errors import FedesmError
    from fedesm.launch.simulate import run_simulator

    ckpt, site_cfg = prepare(tmp_path, 2)
    (tmp_path / "empty.fa").write_text("")
    (tmp_path / "negative.fa").write_text(">n1\nACDEFGHIKL\n0000000000\n>n2\nMNPQRSTVWY\n0000000000\n")
    cfg = yaml.safe_load(site_cfg.read_text())
    cfg["allowed_prefixes"].append(str(tmp_path))
    cfg["sites"] = {"site-1": {"data": {"train": str(tmp_path / "empty.fa")}},
                    "site-2": {"data": {"val": str(tmp_path / "negative.fa")}}}
    site_cfg.write_text(yaml.safe_dump(cfg))
    with pytest.raises(FedesmError, match="simulator failed"):
        # min_clients 1: the first site's failure does not end the job before the second site has spoken
        run_simulator(job(tmp_path, "bad-data", ckpt, **{"training.rounds": 2, "federation.min_clients": 1}),
                      tmp_path / "ws", n_clients=2, site_config=site_cfg, timeout=300)
    log = (tmp_path / "ws.log").read_text()
    assert f"site-1: no records in {tmp_path / 'empty.fa'} (the file is empty)" in log
    assert f"site-2: no binding residues in {tmp_path / 'negative.fa'}: all 2 records are labelled 0 only" in log
    # the server hears the same line (the reply carries it, no data): the submitter sees it in the server's log
    assert (f"site-1 sent nothing for task train (round 0; EXECUTION_EXCEPTION): no records in "
            f"{tmp_path / 'empty.fa'} (the file is empty)") in log
    assert "round_001" not in "".join(str(p) for p in (tmp_path / "ws").rglob("round_*"))  # no round ran
