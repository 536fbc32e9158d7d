"""Plumbing of `make bench` on the smallest sizes: the numbers are not timed, only the wiring is checked."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import bench_comm  # noqa: E402
import bench_overhead  # noqa: E402
import bench_throughput  # noqa: E402
import run_bench  # noqa: E402

TINY = dict(batch_size=2, min_len=40, max_len=50, n_records=8, steps=1, reps=2, warmup=1)


def test_throughput_loops_train_the_same_parameters_on_the_same_batches():
    row = bench_throughput.compare(bench_throughput.ThroughputSettings(arch="esm2_t2_tiny", **TINY))
    assert row["trainable_ours"] == row["trainable_plain"] > 0
    assert len(row["ours_residues_per_s"]) == len(row["plain_residues_per_s"]) == 2
    assert row["ratio"] == pytest.approx(row["ours_median"] / row["plain_median"])
    assert row["ok"] == (row["ratio"] >= bench_throughput.MIN_RATIO)
    assert len(row["ours_cpu_residues_per_s"]) == 2 and row["cpu_time_ratio"] > 0
    assert 40 <= row["residues_per_batch_mean"] / row["batch_size"] <= 50
    assert "memory" not in row  # CPU: no peak-memory figures


def test_plain_loop_only_trains_lora_and_head():
    from fedesm.model.backbone import load_backbone
    from fedesm.settings import LoraSettings

    loop = bench_throughput.PlainLoop(load_backbone("random:esm2_t2_tiny").model, LoraSettings(r=4), 1e-3, 0.0,
                                      torch.device("cpu"))
    names = [n for n, p in loop.model.named_parameters() if p.requires_grad]
    assert names and all(".lora_" in n or ".classifier." in n for n in names)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_cuda_rows_are_skipped_without_a_gpu():
    rows = bench_throughput.run([], cuda_archs=["esm2_t2_tiny"])
    assert rows == [{"arch": "esm2_t2_tiny", "device": "cuda", "skipped": "no CUDA device"}]
    assert "skipped" in bench_throughput.format_table(rows)


def test_payload_sizes_computed_match_serialized():
    from fedesm.model.adapters import parameter_report
    from fedesm.settings import LoraSettings

    row = bench_comm.payload_row("esm2_t2_tiny", lora_r=4, measure_full_max_params=1e9)
    for dtype in ("float32", "float16"):
        full = row["full"][dtype]
        assert full["how"] == "measured" and full["predicted"] == full["measured"]
    assert row["lora_parameters"] == parameter_report("esm2_t2_tiny", LoraSettings(r=4))["trainable"]
    assert row["lora_sent_fp32"] > 4 * row["lora_parameters"]
    assert 0.5 < row["lora_sent_fp16"] / (row["lora_sent_fp32"] / 2) < 1.5
    assert row["full_sent_fp32"] > 4 * row["full_parameters"]
    assert row["ratio_sent_fp32"] == pytest.approx(row["lora_sent_fp32"] / row["full_sent_fp32"])
    computed = bench_comm.payload_row("esm2_t2_tiny", lora_r=4, measure_full_max_params=0)
    assert computed["full"]["float32"]["how"].startswith("computed")
    assert computed["full_sent_fp32"] == row["full_sent_fp32"]


def _rows():
    return [
        {"round": 0, "site": "site-1", "global_f1": 0.1}, {"round": 0, "site": "site-2", "global_f1": 0.2},
        {"round": 1, "site": "server", "round_seconds": 10.0},
        {"round": 1, "site": "site-1", "train_seconds": 4.0, "task_seconds": 5.0, "sent_bytes": 100},
        {"round": 1, "site": "site-2", "train_seconds": 3.0, "task_seconds": 6.0, "sent_bytes": 100},
        {"round": 2, "site": "server", "round_seconds": 5.0},
        {"round": 2, "site": "site-1", "train_seconds": 3.0, "task_seconds": 4.0, "global_f1": 0.5},
        {"round": 2, "site": "site-2", "train_seconds": 2.0, "task_seconds": 3.5, "global_f1": 0.7},
    ]


def test_round_split_uses_slowest_site_and_leaves_out_round_one():
    rounds = bench_overhead.split_rounds(_rows())
    assert [r["round"] for r in rounds] == [1, 2]
    r1, r2 = rounds
    assert (r1["train_seconds"], r1["site_eval_seconds"], r1["orchestration_seconds"]) == (4.0, 2.0, 4.0)
    assert (r2["train_seconds"], r2["site_eval_seconds"], r2["orchestration_seconds"]) == (3.0, 1.0, 1.0)
    s = bench_overhead.overhead_summary(rounds)
    assert s["rounds_used"] == [2] and s["orchestration_seconds"] == 1.0 and s["train_fraction"] == 0.6
    assert s["first_round_orchestration_seconds"] == 4.0


LOG = """\
2026-11-25 13:19:27,116 - INFO - Round 1 started.
2026-11-25 13:19:32,173 - INFO - Contribution from site-2 ACCEPTED by the aggregator at round 1.
2026-11-25 13:19:32,870 - INFO - Contribution from site-1 ACCEPTED by the aggregator at round 1.
2026-11-25 13:19:33,122 - INFO - Start aggregation.
2026-11-25 13:19:33,130 - INFO - End aggregation.
2026-11-25 13:19:33,130 - INFO - Start persist model on server.
2026-11-25 13:19:33,140 - INFO - End persist model on server.
2026-11-25 13:19:33,142 - INFO - Round 1 finished.
2026-11-25 13:19:33,385 - INFO - Round 2 started.
2026-11-25 13:19:34,000 - INFO - Start aggregation.
"""


def test_log_phases_split_orchestration(tmp_path):
    log = tmp_path / "simulator.log"
    log.write_text(LOG)
    phases = bench_overhead.log_phases(log)
    assert list(phases) == [2]  # log round 1 is the table's round 2; the unfinished round 2 is left out
    assert phases[2]["aggregation_seconds"] == pytest.approx(0.008, abs=1e-6)
    assert phases[2]["persist_seconds"] == pytest.approx(0.010, abs=1e-6)
    assert phases[2]["result_wait_seconds"] == pytest.approx(0.252, abs=1e-6)
    rounds = bench_overhead.split_rounds(_rows(), phases)
    assert rounds[1]["dispatch_transport_seconds"] == pytest.approx(1.0 - 0.008 - 0.010 - 0.252)
    assert "aggregation_seconds" not in rounds[0]
    assert bench_overhead.log_phases(tmp_path / "missing.log") == {}


def test_fp16_comparison_reports_difference_and_noise():
    def fake(f1, sent):
        return {"settings": {"arch": "a", "rounds": 2, "steps_per_round": 3, "sites": 2}, "global_f1_round0": 0.1,
                "global_f1_final": f1, "global_auprc_final": f1 + 0.05, "sent_bytes": {"site-1": sent, "site-2": sent}}

    c = bench_comm.fp16_comparison(fake(0.70, 1000), fake(0.69, 600), fake(0.72, 1000))
    assert c["f1_difference"] == pytest.approx(-0.01) and c["seed_noise"] == pytest.approx(0.02)
    assert c["within_noise"] is True and c["sent_bytes_ratio"] == 0.6
    assert c["auprc_difference"] == pytest.approx(-0.01)
    assert bench_comm.fp16_comparison(fake(0.70, 1000), fake(0.60, 600), fake(0.71, 1000))["within_noise"] is False
    assert "difference -0.0100" in bench_comm.format_fp16(c)


def test_run_all_writes_a_document_with_tables(tmp_path):
    sizes = {
        "throughput": {"cpu_rows": [{"arch": "esm2_t2_tiny", "threads": 1}], "cuda_archs": ["esm2_t2_tiny"],
                       "settings": dict(TINY), "cuda_settings": {}},
        "aggregation": {"sizes": (480,), "sites": (2,), "models": (320,), "reps": 2, "model_reps": 1, "threads": 1},
        "attention": {"cpu_rows": [{"arch": "esm2_t2_tiny", "length": 40, "reps": 1, "threads": 1, "memory": False}],
                      "cuda_rows": [{"arch": "esm2_t2_tiny", "length": 40}]},
        "comm": {"archs": ["esm2_t2_tiny"], "measure_full_max_params": 1e9},
    }
    threads = torch.get_num_threads()
    doc = run_bench.run_all(["comm", "throughput", "aggregation", "attention"], sizes=sizes, work_dir=tmp_path,
                            echo=lambda *a: None)
    assert torch.get_num_threads() == threads  # a row's own thread count does not leak
    assert doc["sections"] == ["throughput", "attention", "aggregation", "comm"]
    assert set(doc["results"]) == {"throughput", "attention", "aggregation", "comm"}
    assert doc["machine"]["torch"] == torch.__version__ and doc["machine"]["cpu_count"] >= 1
    agg = doc["results"]["aggregation"]
    assert agg["rows"][0]["speedup"] > 0 and agg["rows"][0]["peer_over_ours"] > 0
    assert agg["rows"][0]["rel_max_diff"] < 1e-4 and agg["rows"][0]["peer_rel_max_diff"] < 1e-4
    assert agg["models"][0]["arch"] == "esm2_t6_8M_UR50D" and agg["models"][0]["n_matrices"] == 18
    assert agg["models"][0]["ours_vs_peer_rel_diff"] < 1e-4  # both merge the same model to the same update
    assert agg["models"][0]["dense_s"] > 0 and agg["models"][0]["cpu_s"]["ours"] > 0  # d=320: dense timed too
    json.dumps(doc)  # serializable as written to results.json
    md = run_bench.to_markdown(doc)
    for title in ("## 1. Local training throughput", "## 1b. Fused vs stock attention", "## 2. FRA-LoRA aggregation",
                  "## 3. Communication", "Whole model"):
        assert title in md
    assert "| esm2_t2_tiny |" in md
    lines = run_bench.summary_lines(doc)
    assert any(line.startswith("throughput esm2_t2_tiny (cpu, 1 thread(s)): ours/plain =") for line in lines)
    assert doc["results"]["throughput"]["rows"][0]["threads"] == 1
    assert any(line.startswith("comm esm2_t2_tiny:") for line in lines)
    assert any(line.startswith("attention esm2_t2_tiny cpu 40 residues: fused") for line in lines)
    if not torch.cuda.is_available():
        assert doc["results"]["attention"]["rows"][-1]["skipped"] == "no CUDA device"


def test_markdown_of_simulator_sections():
    from dataclasses import asdict

    rounds = bench_overhead.split_rounds(_rows())
    sim = {"settings": asdict(bench_overhead.SimSettings(arch="esm2_t2_tiny", lora_r=4)), "global_f1_round0": 0.1,
           "global_f1_final": 0.6, "global_auprc_final": 0.65, "sent_bytes": {"site-1": 100, "site-2": 100},
           "rounds": rounds, "split": bench_overhead.overhead_summary(rounds)}
    fp16 = {**sim, "global_f1_final": 0.61, "sent_bytes": {"site-1": 60, "site-2": 60}}
    comm_row = bench_comm.payload_row("esm2_t2_tiny", lora_r=4, measure_full_max_params=1e9)
    doc = {"quick": True, "machine": run_bench.machine_info(), "load_average_end": [], "total_seconds": 1.0,
           "results": {"comm": {"rows": [comm_row], "measure_full_max_params": 1e9},
                       "fp16": {"comparison": bench_comm.fp16_comparison(sim, fp16)},
                       "overhead": {"runs": [sim]}}}
    md = run_bench.to_markdown(doc)
    assert "## 3b. float16 transfer" in md and "| float16 | 0.6100 | +0.0100 |" in md
    assert "## 4. Orchestration overhead" in md and "| esm2_t2_tiny | 2 | 5.00 | 3.00 | 1.00 | 1.00 |" in md
    assert "each site sent 100 bytes per round" in md  # cross-check against the run's own sent_bytes
    lines = run_bench.summary_lines(doc)
    assert any("orchestration 1.00s (20.0%)" in line for line in lines)


def test_results_are_written_atomically(tmp_path):
    target = tmp_path / "r.json"
    run_bench._write_atomic(target, "{}\n")
    assert target.read_text() == "{}\n"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would make it, not mkstemp's 0600


def test_attention_rows_compare_fused_with_stock_on_the_same_batch():
    import bench_attention

    row = bench_attention.compare(bench_attention.AttentionSettings(
        arch="esm2_t2_tiny", length=60, reps=2, threads=1, arms=("stock", "fused", "fused+ckpt")))
    assert row["arms"] == ["stock", "fused", "fused+ckpt"] and row["tokens_per_batch"] == 2 * 62
    assert row["residues_per_batch"] == 60 + 45  # the second chain is 75% long: padded
    assert row["max_abs_logit_diff_vs_stock"] < 1e-5  # same weights, only the kernel differs
    assert set(row["ratio_vs_stock"]) == {"fused", "fused+ckpt"} and all(v > 0 for v in row["ratio_vs_stock"].values())
    assert all(row["memory"][arm]["peak_above_resident_mib"] >= 0 for arm in row["arms"])  # CPU: child processes
    assert "fused+ckpt" in bench_attention.format_table([row])


def test_merge_keeps_other_sections_and_says_when_each_was_measured():
    def doc(date, sections, value):
        machine = {"date": date, "git_commit": "abc", "torch_threads": 1, "cuda": None,
                   "load_average_start": [1.0], "host_cpu": "cpu", "cpu_count": 2, "memory_gib": 1,
                   "platform": "p", "python": "3", "torch": "t", "nvflare": "n", "peft": "p", "fair_esm": "f"}
        return {"quick": False, "sections": sections, "machine": machine, "total_seconds": 5.0,
                "load_average_end": [1.0],
                "results": {s: {"rows": [], "value": value} for s in sections}}

    merged = run_bench.merge_documents(doc("2026-01-01", ["throughput", "comm"], 1), doc("2026-02-02", ["comm"], 2))
    assert merged["sections"] == ["throughput", "comm"]
    assert merged["results"]["throughput"]["value"] == 1 and merged["results"]["comm"]["value"] == 2
    assert merged["section_runs"]["throughput"]["date"] == "2026-01-01"
    assert merged["section_runs"]["comm"]["date"] == "2026-02-02"
    header = run_bench.to_markdown({**merged, "results": {}})  # the header only: these results are stand-ins
    assert "section comm re-measured on 2026-02-02" in header and "section throughput re-measured" not in header


def test_peer_rows_run_both_loops_on_the_same_gpsite_batches(tmp_path):
    """The Hugging Face sdpa + PEFT peer beside the site loop: same batches, same trainable shapes, a ratio."""
    import bench_peer
    from fedesm.model.backbone import load_backbone

    backbone = load_backbone("random:esm2_t2_tiny")
    peer = bench_peer.HFPeer(backbone.model, 4, 1e-3)
    assert peer.model.base_model.model.config._attn_implementation == "sdpa"
    names = [n for n, p in peer.model.named_parameters() if p.requires_grad]
    assert names and all(".lora_" in n or "classifier" in n for n in names)
    sizes = {"peer": {"rows": [("esm2_t2_tiny", ((60, 2),))], "reps": 1}}
    doc = run_bench.run_all(["peer"], sizes=sizes, work_dir=tmp_path, echo=lambda *a: None)
    (row,) = doc["results"]["peer"]["rows"]
    assert row["crop"] == 60 and row["batch_size"] == 2 and 0 <= row["padding_share"] < 1
    assert row["ratio"] == pytest.approx(row["fedesm_median"] / row["peer_median"]) and row["ratio"] > 0
    assert 0 < row["residues_per_batch_mean"] <= 120
    assert "## 1a. Site training vs the Hugging Face peer" in run_bench.to_markdown(doc)
    assert any(line.startswith("peer esm2_t2_tiny crop 60 batch 2: fedesm/HF =") for line in run_bench.summary_lines(doc))


def test_eval_section_scores_the_test_split_with_both_code_bases(tmp_path):
    """`make bench` section eval: this tree and a commit's code (here the last commit: the same code, so the
    same probabilities) each score the first test chains in their own worker; passes alternate, a row per arch."""
    import bench_eval

    sizes = {"eval": {"archs": ["esm2_t2_tiny"], "reps": 2, "chains": 4, "baseline": "HEAD"}}
    doc = run_bench.run_all(["eval"], sizes=sizes, work_dir=tmp_path, echo=lambda *a: None)
    (row,) = doc["results"]["eval"]["rows"]
    assert row["chains"] == 4 and row["baseline"] == "HEAD" and row["attention"]["current"] == "packed"
    assert len(row["pass_cpu_s"]["baseline"]) == len(row["pass_cpu_s"]["current"]) == 2
    assert row["max_abs_prob_diff"] == 0.0  # the same code on the same weights, one thread
    per_round = bench_eval.PASSES_PER_ROUND
    assert row["round_cpu_s"]["current"] == pytest.approx(per_round["current"] * row["pass_median_s"]["current"],
                                                          abs=0.01)
    assert row["ok"] == (row["round_ratio"] >= 2.0)
    assert "## 1c. Scoring the demo's test split" in run_bench.to_markdown(doc)
    assert any(line.startswith("eval esm2_t2_tiny (demo test split)") for line in run_bench.summary_lines(doc))


def test_cuda_packed_script_runs_its_rows_on_cpu_and_skips_what_cannot_run(tmp_path, monkeypatch):
    """bench/cuda_packed.py (the GPU rows) on the CPU with the tiny model: every arm measured, the JSON
    written to $OUT, packed agreeing with fused; an unknown architecture is a skipped row, not a crash."""
    import cuda_packed
    from fedesm.data.validate import load_dataset

    monkeypatch.setenv("OUT", str(tmp_path))
    assert cuda_packed.default_out() == tmp_path / "cuda_packed.json"
    records = load_dataset("gpsite:ATP")[:40]
    doc = cuda_packed.run(["esm2_t2_tiny", "esm2_nonexistent"], device="cpu", precision="fp32", batch_size=2,
                          crop=80, warmup=1, steps=1, out=cuda_packed.default_out(), records=records,
                          echo=lambda *a: None)
    written = json.loads((tmp_path / "cuda_packed.json").read_text())
    assert [r["arm"] for r in written["rows"] if r["arch"] == "esm2_t2_tiny"] == list(cuda_packed.ARMS)
    tiny = [r for r in doc["rows"] if r["arch"] == "esm2_t2_tiny"]
    assert all(r["residues_per_second"] > 0 and "skipped" not in r for r in tiny)
    assert tiny[0]["speed_vs_stock"] > 0 and tiny[0]["speed_vs_hf"] > 0
    assert doc["agreement"]["esm2_t2_tiny"]["max_abs_diff_packed_vs_fused"] < 1e-4
    (bad,) = [r for r in doc["rows"] if r["arch"] == "esm2_nonexistent"]
    assert bad["skipped"].startswith("backbone:")
