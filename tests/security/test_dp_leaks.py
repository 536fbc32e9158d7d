"""DP-SGD accounts for everything that leaves a site (issue 21): no metric that reveals the secret Poisson batches,
no class weights computed from the private data, no non-finite DP setting, an accountant bounded in work.

Attack-shaped: a DP job's round goes through the real executor and the site's own outbound filter with a real
NVFLARE FLContext/Shareable, and what would reach the server (the reply and the streamed metrics) is inspected.
"""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import yaml

from nvflare.apis.dxo import from_shareable
from nvflare.apis.fl_constant import ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.signal import Signal
from nvflare.apis.workspace import Workspace
from nvflare.app_common.app_constant import AppConstants

from fedesm.data.records import Record
from fedesm.errors import FedesmError
from fedesm.flare.executor import EsmLoraExecutor
from fedesm.flare.payload import METRICS_KEY, SITE_KEY, make_weights_shareable, withheld_reason
from fedesm.flare.privacy import AdaptersOnlyFilter
from fedesm.launch.jobs import export_job
from fedesm.model.adapters import build_lora_model
from fedesm.model.backbone import load_backbone
from fedesm.settings import JobSettings, SettingError, SitePrivacySettings, TrainConfig
from fedesm.site_run import SiteRun, site_training
from fedesm.training.privacy import accountant
from fedesm.training.privacy.policy import refusal
from fedesm.training.privacy.randomness import NoiseSource
from fedesm.evaluation.release import DP_RELEASABLE
from fedesm.training.trainer import LocalTrainer

JOB_ID = "d9c0ffee-job"
SITE = "site-1"
DP = {"model.arch": "esm2_t2_tiny", "lora.r": 4, "training.max_len": 96, "training.steps_per_round": 3,
      "training.batch_size": 4, "training.dp_noise_multiplier": 1.0, "training.dp_max_grad_norm": 1.0,
      "training.class_weights": "1,4"}
# what the executor measures every round and a DP site must not send: each reveals the secret batches
BATCH_NUMBERS = ("train_seconds", "residues_per_second", "task_seconds", "train_loss", "residues", "samples")


class _Engine:
    """The site's workspace (read by the filter) and an analytics sender that records what it would stream."""

    def __init__(self, workspace: Workspace):
        self.workspace, self.streamed = workspace, {}

    def get_workspace(self) -> Workspace:
        return self.workspace

    def get_component(self, name):
        return self if name == "analytic_sender" else None

    def add(self, tag, value, data_type, global_step):  # AnalyticsSender.add: what goes to the server
        self.streamed[tag] = value


def _site_ctx(tmp_path, overrides) -> FLContext:
    """A site's FLContext for a deployed job: the exported bundle's app where NVFLARE puts it."""
    job = export_job("esm2_fra_lora", tmp_path / "export", overrides)
    root = tmp_path / "site_ws"
    shutil.copytree(job / "app", root / JOB_ID / f"app_{SITE}")
    for kit_folder in ("startup", "local"):
        (root / kit_folder).mkdir()
    ctx = FLContext()
    ctx.set_prop(ReservedKey.ENGINE, _Engine(Workspace(str(root), site_name=SITE)), private=True, sticky=False)
    ctx.set_prop(ReservedKey.RUN_NUM, JOB_ID, private=True, sticky=False)
    ctx.set_prop(ReservedKey.IDENTITY_NAME, SITE, private=True, sticky=False)
    return ctx


def _executor(checkpoint, records, overrides) -> EsmLoraExecutor:
    """The site's executor with its SiteRun built as `SiteRun.set_up` builds it, noise from a fixed seed."""
    settings = JobSettings().with_overrides(overrides)
    executor = EsmLoraExecutor(**settings.to_dict())
    backbone = load_backbone(str(checkpoint))
    trainer = LocalTrainer(build_lora_model(backbone, settings.lora), backbone.alphabet, records[0],
                           site_training(settings, SITE, num_rounds=2, device="cpu"),
                           noise=NoiseSource.from_seed(5, label=SITE))  # the same Poisson draws each run
    executor.run = SiteRun(settings, SITE, trainer, records[0], records[1])
    return executor


def _result(executor, meta):
    """A result as the executor makes one: the site's exchanged state with `meta`, at the job's transfer dtype."""
    return make_weights_shareable(executor.run.exchanged_state(), meta, executor.settings.federation.transfer_dtype)


def _round(executor, ctx):
    task = _result(executor, {})
    task.set_header(AppConstants.CURRENT_ROUND, 0)
    task.set_header(AppConstants.NUM_ROUNDS, 2)
    return executor.execute(AppConstants.TASK_TRAIN, task, ctx, Signal())


def test_a_dp_round_sends_nothing_about_its_secret_batches(tmp_path, tiny_checkpoint, synth_data):
    """The executor's real round under DP-SGD, through the site's filter: the reply and the streamed metrics hold
    evaluation, schedule and accounting only; no loss, seconds, throughput or counts of the Poisson batches."""
    ctx = _site_ctx(tmp_path, DP)
    executor = _executor(tiny_checkpoint, synth_data, DP)
    trained = []
    trainer = executor.run.trainer
    train_steps = trainer.train_steps
    trainer.train_steps = lambda *a, **k: trained.append(train_steps(*a, **k)) or trained[-1]
    out = AdaptersOnlyFilter().process(_round(executor, ctx), ctx)
    assert out.get_return_code(ReturnCode.OK) == ReturnCode.OK, withheld_reason(out)
    assert trained[0].residues > 0 and trained[0].seconds > 0  # there was something to leak
    sent = from_shareable(out).meta[METRICS_KEY]
    streamed = ctx.get_engine().streamed
    for leaving in (sent, streamed):
        assert set(leaving) <= DP_RELEASABLE and not set(leaving) & set(BATCH_NUMBERS)
        assert not any(v == trained[0].residues or v == trained[0].samples for k, v in leaving.items()
                       if k not in ("steps", "dp_steps"))
    assert sent["epsilon"] == trainer.gradients.epsilon() and sent["dp_steps"] == 3
    assert {"auprc", "f1", "global_auprc", "steps", "lr"} <= set(sent)


@pytest.mark.parametrize("metric", BATCH_NUMBERS + ("anything_else",))
def test_the_sites_filter_refuses_a_dp_result_with_batch_numbers(tmp_path, tiny_checkpoint, synth_data, metric):
    """Whatever made the result carry them (a job, another executor): the site's own filter lets none of it out."""
    ctx = _site_ctx(tmp_path, DP)
    executor = _executor(tiny_checkpoint, synth_data, DP)
    reply = _result(executor, {METRICS_KEY: {"auprc": 0.3, metric: 1234.0}, SITE_KEY: SITE})
    out = AdaptersOnlyFilter().process(reply, ctx)
    assert out.get_return_code() == ReturnCode.TASK_RESULT_FILTER_ERROR
    assert set(out) == {"__headers__"}  # no tensor, no meta, no metric travels
    reason = withheld_reason(out)
    assert f"metrics {metric!r} of a DP-SGD job" in reason and "1234" not in reason and "\n" not in reason


def test_without_dp_the_same_metrics_pass(tmp_path, tiny_checkpoint, synth_data):
    """The closed list is DP's: a job without DP-SGD (no secret batches) still reports its throughput."""
    plain = {k: v for k, v in DP.items() if not k.startswith("training.dp_")}
    ctx = _site_ctx(tmp_path, plain)
    reply = _result(_executor(tiny_checkpoint, synth_data, plain),
                    {METRICS_KEY: {"train_seconds": 2.0, "residues_per_second": 400.0}, SITE_KEY: SITE})
    assert AdaptersOnlyFilter().process(reply, ctx) is reply


def _with_positive_rate(records, rate, seed):
    rng = np.random.default_rng(seed)
    return [Record(r.id, r.sequence, (rng.random(len(r)) < rate).astype(np.uint8)) for r in records]


@pytest.mark.parametrize("mode", ["sqrt", "balanced"])
def test_class_weights_from_the_private_data_are_refused_under_dp(mode):
    with pytest.raises(SettingError) as e:
        TrainConfig(dp_noise_multiplier=1.0, class_weights=mode)
    assert str(e.value).startswith(f"training.class_weights: {mode} is computed from the private training set")
    assert "\n" not in str(e.value)
    with pytest.raises(SettingError, match="training.class_weights"):  # as a job's config carries it
        JobSettings.from_dict({"training": {"dp_noise_multiplier": 1.0}})  # the default is sqrt
    # a training object that skipped the settings' checks: the site's policy refuses it all the same
    dp = TrainConfig(dp_noise_multiplier=1.0, class_weights=None)
    object.__setattr__(dp, "class_weights", mode)
    assert "training.class_weights" in refusal(dp, SitePrivacySettings())


def test_dp_class_weights_do_not_move_with_the_private_positive_rate(tiny_checkpoint, synth_data):
    """The loss a DP site trains with is the same whatever share of its residues is positive."""
    cfg = TrainConfig(device="cpu", max_len=96, batch_size=4, dp_noise_multiplier=1.0, class_weights="1,4")
    weights = []
    for rate in (0.02, 0.4):
        records = _with_positive_rate(synth_data[0], rate, seed=1)
        backbone = load_backbone(str(tiny_checkpoint))
        trainer = LocalTrainer(build_lora_model(backbone, JobSettings().lora), backbone.alphabet, records, cfg)
        weights.append(trainer.loss_weight.tolist())
    assert weights == [[1.0, 4.0], [1.0, 4.0]]
    assert TrainConfig(dp_noise_multiplier=1.0, class_weights="none").class_weights is None


NON_FINITE = [(name, value) for name in ("dp_noise_multiplier", "dp_max_grad_norm", "dp_delta")
              for value in (math.inf, math.nan)]


@pytest.mark.parametrize("name,value", NON_FINITE)
def test_non_finite_dp_settings_are_refused_in_one_line(name, value):
    with pytest.raises(SettingError) as e:
        TrainConfig(class_weights=None, **{"dp_noise_multiplier": 1.0, name: value})
    assert str(e.value).startswith(f"training.{name}: ") and "\n" not in str(e.value)
    text = yaml.safe_load(f"training: {{{name}: {'.inf' if value == math.inf else '.nan'}, class_weights: none}}")
    with pytest.raises(SettingError, match=f"training.{name}"):  # as a job's YAML spells it
        JobSettings.from_dict(text)
    # past the settings (an object built around their checks), the site's policy refuses before any data is read
    training = TrainConfig(dp_noise_multiplier=1.0, class_weights=None)
    object.__setattr__(training, name, value)
    for policy in (SitePrivacySettings(), SitePrivacySettings(require_dp=True, min_noise_multiplier=0.5)):
        why = refusal(training, policy)
        assert why == f"the job's training.{name} {value!r} is not a finite number"


@pytest.mark.parametrize("name", ["min_noise_multiplier", "max_grad_norm", "target_epsilon", "target_delta"])
@pytest.mark.parametrize("value", [math.inf, math.nan])
def test_a_sites_own_policy_with_non_finite_numbers_is_refused(name, value):
    """nan passes every comparison: a nan minimum would have let any noise through (and require no DP)."""
    with pytest.raises(SettingError) as e:
        SitePrivacySettings(**{name: value})
    assert str(e.value) == f"privacy.{name}: must be a finite number, got {value}"


def test_the_accountant_is_bounded_in_work_for_any_input(monkeypatch):
    """Every input returns or is refused, within bounded work per RDP order (series terms counted, not timed):
    a fractional order costs at most MAX_SERIES_TERMS terms to check that Opacus' series ends, then at most
    as many in Opacus' series; an integer order costs order + 1 terms."""
    from scipy import special

    terms = [0]
    binom = special.binom

    def counted(*args):
        terms[0] += int(np.broadcast(*args).size)  # the check asks for all its terms in one call
        return binom(*args)

    monkeypatch.setattr(special, "binom", counted)
    fractional = sum(not float(a).is_integer() for a in accountant.DEFAULT_ORDERS)
    integer = sum(int(a) + 1 for a in accountant.DEFAULT_ORDERS if float(a).is_integer())
    bound = 2 * fractional * accountant.MAX_SERIES_TERMS + integer
    answered = 0
    for q in (1e-12, 1e-4, 0.5, 1 - 1e-9):
        for sigma in (1e-9, 1e-3, 0.5, 30.0, 1e6):
            for steps in (1, 10 ** 12):
                terms[0] = 0
                eps = accountant.compute_epsilon(sigma, q, steps, 1e-5)
                assert eps >= 0 and not math.isnan(eps) and terms[0] <= bound
                answered += 1
    assert answered == 40
    # q = 1/2 with large noise: the series would run for tens of thousands of terms; the check sees it would not
    # end within the bound, Opacus' series is not entered, and the unsampled Gaussian's RDP, an upper bound, stands in
    terms[0] = 0
    assert accountant.rdp_sampled_gaussian(0.5, 30.0, 1.5) == 1.5 / (2 * 30.0 ** 2)
    assert terms[0] == accountant.MAX_SERIES_TERMS
    assert 0 < accountant.rdp_sampled_gaussian(0.01, 1.0, 1.5) < 1.5 / 2  # converged: below that bound
    for sigma, q, steps, delta in [(math.inf, 0.01, 10, 1e-5), (math.nan, 0.01, 10, 1e-5), (1.0, math.nan, 10, 1e-5),
                                   (1.0, 1.5, 10, 1e-5), (1.0, 0.01, 10 ** 400, 1e-5), (1.0, 0.01, -1, 1e-5),
                                   (1.0, 0.01, 10, math.nan)]:
        terms[0] = 0
        with pytest.raises(accountant.AccountingError) as e:
            accountant.compute_epsilon(sigma, q, steps, delta)
        assert terms[0] == 0 and "\n" not in str(e.value)  # refused before any work
    acc = accountant.RDPAccountant()
    with pytest.raises(FedesmError, match="noise multiplier inf"):
        acc.step(math.inf, 0.01)
    with pytest.raises(FedesmError, match="target epsilon nan"):
        accountant.noise_multiplier_for(math.nan, 1e-5, 0.01, 100)
    assert acc.steps == 0


def test_the_bounds_leave_the_accountants_numbers_unchanged():
    """Realistic DP-SGD parameters converge long before the bound: the same epsilon as Opacus' accountant."""
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    for sigma, q, steps in [(1.0, 8 / 204, 300), (0.7, 0.01, 5000), (2.0, 0.2, 50)]:
        rdp = compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=list(accountant.DEFAULT_ORDERS))
        eps, _ = get_privacy_spent(orders=list(accountant.DEFAULT_ORDERS), rdp=rdp, delta=1e-5)
        assert accountant.compute_epsilon(sigma, q, steps, 1e-5) == pytest.approx(eps, rel=1e-9)
