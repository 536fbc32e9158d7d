"""A site's part in a job without NVFLARE (`fedesm.site_run`): set-up from a site config, a round's metrics,
a resume's schedule and accounting, the site's LoRA rank, the epsilon budget, an aborted round."""

from __future__ import annotations

import math

import pytest
import torch

from fedesm.data.readers import write_records
from fedesm.launch.jobs import JOBS
from fedesm.model.adapters import build_lora_model, get_exchanged_state
from fedesm.model.backbone import load_backbone
from fedesm.ranks import state_rank
from fedesm.settings import LoraSettings, SitePrivacySettings
from fedesm.site_config import write_site_config
from fedesm.site_run import SiteRun, site_training
from fedesm.training.trainer import LocalTrainer, lr_factor
from tests.site_parts import DP, EVAL, ROUND_KEYS, SMALL, site_run

class Lines:
    """A SiteLog that keeps its lines."""

    def __init__(self):
        self.lines = []

    def info(self, msg):
        self.lines.append(("info", msg))

    def warning(self, msg):
        self.lines.append(("warning", msg))


def test_two_sites_with_the_same_job_seed_draw_different_batches(tiny_checkpoint, synth_data):
    job = JOBS["esm2_fra_lora"].settings.with_overrides({"training.seed": 7, "training.batch_size": 4,
                                                        "training.max_len": 96})
    one, two = (site_training(job, s, num_rounds=3, device="cpu") for s in ("site-1", "site-2"))
    assert one.seed != two.seed and one.seed == site_training(job, "site-1", 3, "cpu").seed  # reproducible
    assert one.rounds == 3 and one.replace(seed=7) == two.replace(seed=7)  # nothing else differs
    data = synth_data[0]  # the SAME records at both sites: only the streams differ

    def batches(cfg):
        backbone = load_backbone(str(tiny_checkpoint))
        trainer = LocalTrainer(build_lora_model(backbone, LoraSettings(r=4)), backbone.alphabet, data, cfg)
        return [trainer.sampler.next_batch()[0] for _ in range(3)]

    b1, b2 = batches(one), batches(two)
    assert not all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(b1, b2))
    assert all(torch.equal(x, y) for x, y in zip(b1, batches(one)))  # same site, same job seed: same batches


def test_set_up_reads_the_site_config_and_says_what_it_built(tmp_path, tiny_checkpoint, synth_data, monkeypatch):
    for name, records in (("train", synth_data[0][:40]), ("val", synth_data[1][:12])):
        (tmp_path / "data" / "site-1").mkdir(parents=True, exist_ok=True)
        write_records(records, tmp_path / "data" / "site-1" / f"{name}.fa")
    monkeypatch.setenv("FEDESM_SITE_CONFIG", str(write_site_config(tmp_path / "site.yaml", tiny_checkpoint,
                                                                   tmp_path / "data", device="cpu")))
    job = JOBS["esm2_fra_lora"].settings.with_overrides(SMALL)
    log = Lines()
    run = SiteRun.set_up(job, "site-1", str(tmp_path / "ws"), num_rounds=3, log=log)
    assert (len(run.train_records), len(run.val_records), run.test_records) == (40, 12, None)
    assert run.trainer.config == site_training(job, "site-1", 3, "cpu", SitePrivacySettings())
    assert run.lora == job.lora and run.budget is None and run.noise_reproducible is None
    assert run.backbone_identity["source"] == tiny_checkpoint.name and run.last_round == 3
    from fedesm.model.backbone import identity, load_backbone

    # the digest of the weights as loaded, before LoRA wraps them: what `predict` computes from the same file
    assert run.backbone_identity["sha256"] == identity(load_backbone(str(tiny_checkpoint)))["sha256"]
    assert log.lines[-1] == ("info", f"site-1: 40 training, 12 validation sequences; backbone {tiny_checkpoint} on "
                                     f"cpu; LoRA rank 4; site config {tmp_path / 'site.yaml'}")


def test_a_round_reports_the_executors_metrics_and_keeps_the_model(tiny_checkpoint, synth_data):
    run = site_run(tiny_checkpoint, synth_data)
    sent = get_exchanged_state(run.trainer.model)
    result = run.train_round(0, {k: v.clone() for k, v in sent.items()})
    assert not result.aborted and result.rounds_before == 0 and run.rounds_done == 1
    assert set(result.metrics) == ROUND_KEYS
    assert result.metrics["steps"] == result.stats.steps == 2 and run.trainer.global_step == 2
    assert result.metrics["lr"] == run.trainer.lr
    assert result.summary("site-1").startswith(f"site-1 round 0: loss {result.stats.loss:.4f}, val AUPRC ")
    trained = run.exchanged_state()
    assert any(not torch.equal(trained[k], sent[k]) for k in sent)  # it trained
    scored = run.validate(sent)  # scoring another model leaves the site's own in place
    assert set(scored) == EVAL and all(torch.equal(run.exchanged_state()[k], trained[k]) for k in trained)
    assert scored["auprc"] == pytest.approx(result.metrics["global_auprc"])  # the same model, scored the same way


def test_an_aborted_round_reports_nothing(tiny_checkpoint, synth_data):
    run = site_run(tiny_checkpoint, synth_data)
    result = run.train_round(2, run.exchanged_state(), should_abort=lambda: True)
    assert result.aborted and result.stats.steps == 0 and result.metrics == {} and run.rounds_done == 0


def test_a_resumed_dp_site_seeks_the_schedule_and_counts_the_rounds_before(tiny_checkpoint, synth_data):
    """Joining at round 3 of a DP-SGD job: schedule at step 3 x N and the accountant at 3 x N steps, not at
    zero, so the site's epsilon budget covers what the earlier rounds spent on its data."""
    from fedesm.training.privacy.accountant import compute_epsilon

    run = site_run(tiny_checkpoint, synth_data, DP)
    cfg = run.trainer.config
    assert run.trainer.dp_steps == 0 and run.dp
    log = Lines()
    state = run.exchanged_state()
    assert run.train_round(3, state, should_abort=lambda: True, log=log).aborted  # joined, then stopped at once
    assert run.trainer.global_step == 6 and run.trainer.dp_steps == 6
    warmup = min(500, int(0.05 * cfg.rounds * cfg.steps_per_round))
    assert run.trainer.lr == pytest.approx(cfg.lr * lr_factor(cfg, cfg.rounds * cfg.steps_per_round, warmup)(6))
    assert run.trainer.lr < cfg.lr  # past the schedule's peak, not warming up again
    g = run.trainer.gradients
    assert abs(g.epsilon() - compute_epsilon(1.0, g.sample_rate, 6, 1e-5)) < 1e-9
    assert log.lines == [("info", f"site-1: joining at round 4: learning-rate schedule moved to step 6 "
                                  f"(lr {run.trainer.lr:.3g}); DP-SGD accounted for the 6 earlier steps")]
    result = run.train_round(3, state, log=log)  # the task again: the same position, nothing counted twice
    assert result.metrics["dp_steps"] == 6 + result.stats.steps == 8 and run.trainer.global_step == 8
    assert run.train_round(4, run.exchanged_state(), log=log).metrics["dp_steps"] == 10  # a trained site: no seek
    assert len(log.lines) == 2


@pytest.mark.parametrize("current_round", [0, None])
def test_a_first_round_zero_or_unnumbered_does_not_seek(tiny_checkpoint, synth_data, current_round):
    run, log = site_run(tiny_checkpoint, synth_data), Lines()
    run.train_round(current_round, run.exchanged_state(), should_abort=lambda: True, log=log)
    assert log.lines == [] and run.trainer.global_step == 0 and run.trainer.lr == run.trainer.config.lr  # 12 steps: no warm-up


def test_the_global_state_is_cut_to_the_sites_rank(tiny_checkpoint, synth_data):
    """A site at rank 2 in a rank-4 job gets the best rank-2 factors of each product; its own rank as sent."""
    job_run, site = site_run(tiny_checkpoint, synth_data), site_run(tiny_checkpoint, synth_data, site_rank=2)
    full = job_run.exchanged_state()
    b, a = next((full[k.replace("lora_A", "lora_B")], full[k]) for k in full if "lora_A" in k)
    torch.nn.init.normal_(b)  # a product of rank 4 to cut
    cut = site.at_site_rank(full)
    assert state_rank(full) == 4 and state_rank(cut) == 2
    kb, ka = next((k.replace("lora_A", "lora_B"), k) for k in full if "lora_A" in k)
    s = torch.linalg.svdvals((b @ a).double())
    err = torch.linalg.matrix_norm((cut[kb] @ cut[ka] - b @ a).double())
    assert float(err) == pytest.approx(float(s[2:].square().sum().sqrt()), rel=1e-4)  # Eckart-Young: optimal
    own = site.exchanged_state()
    assert site.at_site_rank(own) is own
    site.train_round(0, full)  # the rank-4 state loads into the rank-2 model
    assert state_rank(site.exchanged_state()) == 2


def test_a_spent_epsilon_budget_withholds_the_round(tiny_checkpoint, synth_data):
    run = site_run(tiny_checkpoint, synth_data, DP, privacy=SitePrivacySettings(target_epsilon=0.5))
    assert run.budget is not None and run.budget.target == 0.5
    reason = run.start_round(3, 6)
    after = run.budget.epsilon_after(2)
    assert after > 0.5 and reason == (f"round 3: epsilon budget: the next round would spend epsilon {after:.3f} > "
                                      f"this site's privacy.target_epsilon 0.5 (delta 1e-05; spent 0.000); "
                                      f"not contributing any more")
    generous = site_run(tiny_checkpoint, synth_data, DP, privacy=SitePrivacySettings(target_epsilon=1e6))
    assert generous.start_round(0, 6) is None
    result = generous.train_round(0, generous.exchanged_state())
    assert result.metrics["epsilon_budget"] == 1e6 and "train_loss" not in result.metrics  # DP: a closed list
    assert math.isfinite(result.metrics["epsilon"])
