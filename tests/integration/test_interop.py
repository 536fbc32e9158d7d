"""Real `nvflare simulator` runs for meeting users where they are: sites of different LoRA ranks (4 under a
job's 16), the per-round metrics in a real MLflow server on loopback, and a mixed federation where one site
holds a Hugging Face checkpoint and the other the fair-esm file of the same weights."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from fedesm.tables import read_table

pytestmark = pytest.mark.slow

JOB_RANK, SMALL_RANK = 16, 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on loopback with a SQLite backend in tmp; stopped after the module."""
    pytest.importorskip("mlflow")
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    log = (root / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                             "--default-artifact-root", str(root / "artifacts"), "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(root / 'server.log').read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError("mlflow server did not start in 90 s")
        yield uri
    finally:
        import os
        import signal

        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def _data(tmp_path: Path, seed: int = 1) -> Path:
    from fedesm.data.split import split_records, write_split
    from fedesm.data.synth import synth_records

    records = synth_records(n=160, n_families=8, pos_rate=0.1, min_len=60, max_len=160, seed=seed)
    write_split(split_records(records, "iid", 2, seed=seed, site_val_frac=0.15), tmp_path / "data")
    return tmp_path / "data"


def _site_config(path: Path, backbone, data: Path, per_site: dict) -> Path:
    from fedesm.site_config import write_site_config

    write_site_config(path, backbone, data)
    cfg = yaml.safe_load(path.read_text())
    cfg["sites"] = per_site
    for extra in per_site.values():  # folders a site's own backbone lives in are on its allow-list
        b = extra.get("backbone")
        if b and Path(b).exists():
            cfg["allowed_prefixes"].append(str(Path(b).resolve().parent))
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def rank_run(tmp_path_factory, mlflow_server):
    """site-1 trains at rank 4, site-2 at the job's rank 16; metrics also go to the MLflow server."""
    from fedesm.launch.jobs import export_job
    from fedesm.launch.simulate import run_simulator
    from fedesm.model.checkpoint import make_random_checkpoint
    from tests.integration.flare_probe import add_probes

    tmp = tmp_path_factory.mktemp("ranks")
    data = _data(tmp)
    ckpt = make_random_checkpoint("esm2_t2_tiny", tmp / "esm2_t2_tiny.pt")
    cfg = _site_config(tmp / "site.yaml", ckpt, data, {"site-1": {"lora_r": SMALL_RANK}})
    job = export_job("esm2_fra_lora", tmp / "jobs", {
        "model.arch": "esm2_t2_tiny", "model.backbone": str(ckpt), "lora.r": JOB_RANK, "training.rounds": 2,
        "training.steps_per_round": 10, "training.batch_size": 4, "training.max_len": 160,
        "federation.mlflow": True, "federation.mlflow_tracking_uri": mlflow_server,
        "federation.mlflow_experiment": "fedesm-test-ranks"})
    add_probes(job, tmp / "probe")
    result = run_simulator(job, tmp / "ws", n_clients=2, site_config=cfg, timeout=600)
    return result, tmp / "probe", tmp / "ws.log"


def _lora_a(weights: dict) -> dict:
    return {k: v for k, v in weights.items() if k.endswith("lora_A.weight")}


def test_sites_of_ranks_4_and_16_train_together(rank_run):
    """What each site sends has its own rank; every site receives the server's rank-16 global model (site-1
    truncates it to rank 4 itself); the persisted global model is rank 16 and is FRA-LoRA of the mixed ranks."""
    from fedesm import results
    from fedesm.aggregation import aggregate
    from fedesm.model.cards import read_adapter_state
    from tests.integration.flare_probe import load

    result, probe, log = rank_run
    out = results.output_dir(result)
    for rnd in (0, 1):
        got = {s: load(probe / f"received_{s}_round{rnd:03d}.npz") for s in ("site-1", "site-2")}
        for site, rank in (("site-1", SMALL_RANK), ("site-2", JOB_RANK)):
            a = _lora_a(got[site][0])
            assert a and {v.shape[0] for v in a.values()} == {rank}, (site, rnd)
            sent = _lora_a(load(probe / f"sent_to_{site}_round{rnd:03d}.npz")[0])
            assert {v.shape[0] for v in sent.values()} == {JOB_RANK}  # the global model travels at the job's rank
        persisted = {k: v.numpy() for k, v in read_adapter_state(results.round_dir(out, rnd + 1)).items()}
        assert {v.shape[0] for v in _lora_a(persisted).values()} == {JOB_RANK}
        expected = aggregate([got[s][0] for s in ("site-1", "site-2")],
                             [1.0, 1.0], "fra", rank=JOB_RANK)  # weigh_by uniform
        _same_model(persisted, expected, atol=1e-6)  # the server stacks sites in arrival order
    text = log.read_text()
    assert f"LoRA rank {SMALL_RANK} (job: {JOB_RANK})" in text


def test_bytes_sent_scale_with_each_sites_rank(rank_run):
    from fedesm import results

    result, _, _ = rank_run
    rows = read_table(results.output_dir(result) / results.METRICS)
    sent = {(r["round"], r["site"]): r["sent_bytes"] for r in rows if "sent_bytes" in r}
    params = {(r["round"], r["site"]): r["sent_parameters"] for r in rows if "sent_parameters" in r}
    # esm2_t2_tiny: 2 layers x 3 matrices x r x (64 + 64) LoRA parameters, + the 130-parameter head
    for rnd in (1, 2):
        assert params[(rnd, "site-1")] == 6 * SMALL_RANK * 128 + 130
        assert params[(rnd, "site-2")] == 6 * JOB_RANK * 128 + 130
        assert sent[(rnd, "site-1")] < 0.35 * sent[(rnd, "site-2")]
    (result / "bytes_by_rank.json").write_text(json.dumps({"site-1 (r=4)": sent[(1, "site-1")],
                                                          "site-2 (r=16)": sent[(1, "site-2")]}))


def test_per_round_metrics_in_a_real_mlflow_server(rank_run, mlflow_server):
    """The metrics sites stream each round reach the MLflow server: one run per site, the table's values at the
    table's steps."""
    from mlflow.tracking import MlflowClient

    from fedesm import results

    result, _, _ = rank_run
    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("fedesm-test-ranks")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    by_site = {r.info.run_name.split("-")[0] + "-" + r.info.run_name.split("-")[1]: r for r in runs}
    assert {"site-1", "site-2"} <= set(by_site)
    rows = read_table(results.output_dir(result) / results.METRICS)
    for site in ("site-1", "site-2"):
        run = by_site[site]
        assert run.data.tags["fedesm.lora_r"] == str(JOB_RANK) and run.data.tags["fedesm.strategy"] == "fra"
        for metric in ("train_loss", "auprc", "global_auprc"):
            history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, metric)}
            table = {r["round"]: r[metric] for r in rows if r["site"] == site and metric in r}
            assert history and table, (site, metric)
            assert set(history) == set(table), (site, metric)
            for step, value in table.items():
                assert history[step] == pytest.approx(value, rel=1e-6), (site, metric, step)


def test_a_hugging_face_site_and_a_fair_esm_site_train_like_two_fair_esm_sites(tmp_path):
    """site-1 holds an HF folder (a random EsmForMaskedLM saved with transformers), site-2 the fair-esm file of
    the same weights: the global model equals a run where both sites hold the fair-esm file."""
    import torch
    from transformers import EsmConfig, EsmForMaskedLM

    from fedesm import results
    from fedesm.launch.jobs import export_job
    from fedesm.launch.simulate import run_simulator
    from fedesm.model.backbone import load_backbone
    from fedesm.model.cards import read_adapter_state
    from fedesm.model.checkpoint import save_esm2_checkpoint

    torch.manual_seed(3)
    hf = EsmForMaskedLM(EsmConfig(vocab_size=33, mask_token_id=32, pad_token_id=1, hidden_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                                  max_position_embeddings=1026, position_embedding_type="rotary",
                                  layer_norm_eps=1e-5, token_dropout=True, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, architectures=["EsmForMaskedLM"]))
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.02 * torch.randn_like(p))
    hf_dir = tmp_path / "hf_model"
    hf.save_pretrained(hf_dir)
    pt = save_esm2_checkpoint(load_backbone(str(hf_dir)).model, tmp_path / "ckpt" / "esm2_t2_from_hf.pt")
    data = _data(tmp_path, seed=2)
    overrides = {"model.arch": "esm2_t2_tiny", "lora.r": 4, "training.rounds": 2, "training.steps_per_round": 8,
                 "training.batch_size": 4, "training.max_len": 160}
    finals = {}
    for arm, site1 in (("mixed", str(hf_dir)), ("fair_esm", str(pt))):
        cfg = _site_config(tmp_path / f"{arm}.yaml", pt, data, {"site-1": {"backbone": site1}})
        job = export_job("esm2_fra_lora", tmp_path / f"jobs_{arm}", overrides)
        result = run_simulator(job, tmp_path / f"ws_{arm}", n_clients=2, site_config=cfg, timeout=600)
        finals[arm] = {k: v.numpy() for k, v in read_adapter_state(results.output_dir(result) / results.LAST).items()}
        if arm == "mixed":
            assert f"backbone {hf_dir}" in (tmp_path / f"ws_{arm}.log").read_text()
    assert set(finals["mixed"]) == set(finals["fair_esm"])
    worst = _same_model(finals["mixed"], finals["fair_esm"], atol=1e-6)
    print(f"mixed HF + fair-esm vs both fair-esm: max difference of the global model {worst:.3g}")
    b_keys = [k for k in finals["fair_esm"] if k.endswith("lora_B.weight")]
    assert all(np.abs(finals["fair_esm"][k]).max() > 0 for k in b_keys)  # trained: not two zero initialisations


def _same_model(a: dict, b: dict, atol: float) -> float:
    """Equal as models: the LoRA products B A (the factors themselves are fixed only up to an r x r gauge, and
    the server's arrival order can flip singular-vector signs) and every other tensor. Returns the largest
    difference."""
    assert set(a) == set(b)
    worst = 0.0
    for k, v in b.items():
        if k.endswith("lora_A.weight"):
            kb = k.replace("lora_A", "lora_B")
            x, y = a[kb].astype(np.float64) @ a[k], b[kb].astype(np.float64) @ v
        elif ".lora_" not in k:
            x, y = a[k].astype(np.float64), v.astype(np.float64)
        else:
            continue
        np.testing.assert_allclose(x, y, rtol=0, atol=atol, err_msg=k)
        worst = max(worst, float(np.abs(x - y).max()))
    return worst


def test_the_recipe_example_runs_in_the_simulator(tmp_path):
    """examples/fra_lora_recipe.py, as a user runs it: FraLoraRecipe + SimEnv, 2 sites x 2 rounds; then its
    --export writes the bundle `fedesm job export` writes from the same settings."""
    from fedesm import results
    from fedesm.launch.jobs import export_job, read_job_settings
    from fedesm.site_config import write_site_config

    script = Path(__file__).resolve().parents[2] / "examples" / "fra_lora_recipe.py"
    cfg = write_site_config(tmp_path / "site.yaml", "random:esm2_t2_tiny", _data(tmp_path, seed=4))
    env = {**__import__("os").environ, "FEDESM_SITE_CONFIG": str(cfg), "FEDESM_SIM_ROOT": str(tmp_path / "sim")}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "fedesm: round 2 done (2 sites)" in done.stdout
    result = tmp_path / "sim" / "esm2_fra_lora" / "server" / "simulate_job"
    out = results.output_dir(result)
    rows = read_table(out / results.METRICS)
    assert {(r["round"], r["site"]) for r in rows if r.get("train_loss") is not None} == {
        (1, "site-1"), (1, "site-2"), (2, "site-1"), (2, "site-2")}
    assert (out / results.LAST / "adapter_model.safetensors").is_file()

    done = subprocess.run([sys.executable, str(script), "--export", "--export-dir", str(tmp_path / "exported")],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    exported = read_job_settings(tmp_path / "exported" / "esm2_fra_lora")
    assert (exported.model.arch, exported.lora.r, exported.training.rounds) == ("esm2_t2_tiny", 4, 2)
    export_job("esm2_fra_lora", tmp_path / "bundle", settings=exported)
    for rel in ("meta.json", "app/config/config_fed_server.json", "app/config/config_fed_client.json"):
        assert json.loads((tmp_path / "exported" / "esm2_fra_lora" / rel).read_text()) == \
            json.loads((tmp_path / "bundle" / "esm2_fra_lora" / rel).read_text()), rel
