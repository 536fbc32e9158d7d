"""Secure aggregation through fedesm's NVFLARE parts, in one process: real executors (each with its SiteRun and
its kit from real provisioning), the real aggregator, real FLContext and Shareables, and a loopback relay in
place of the workflow's tasks (`fedesm.flare.workflows.ScatterAndGather.exchange / retrain`, which the
simulator tests drive for real). Every message the server receives is kept and checked."""

from __future__ import annotations

import numpy as np
import pytest
from nvflare.apis.dxo import DataKind, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import AppConstants

from fedesm.aggregation import AggregationState, aggregate
from fedesm.flare.aggregator import FraLoraAggregator
from fedesm.flare.executor import EsmLoraExecutor
from fedesm.flare.payload import make_weights_shareable, read_weights_shareable, to_numpy_dict
from fedesm.flare.privacy import ExpectedResult, result_problem
from tests.secure_parts import SITES, make_kits
from tests.server_parts import Engine, engine_context
from tests.site_parts import site_run

SECURE = {"federation.secure_aggregation": True, "federation.max_update_ratio": 0.0,
          "federation.clip_update_ratio": 0.0, "federation.min_clients": 2}


@pytest.fixture(scope="module")
def kits(tmp_path_factory):
    return make_kits(tmp_path_factory.mktemp("flare_kits"))


class _SiteEngine:
    def fire_event(self, event_type, fl_ctx):
        pass

    def get_component(self, name):
        return None


class Loopback:
    """The sites behind the server: each task goes to a site's executor, its reply through that site's outbound
    check (`result_problem` against the job: what the site's filter enforces), then to the server, which keeps
    every message it received. `drop` names (site, step) pairs whose reply never arrives (a lost site)."""

    def __init__(self, runs, job_id="job-7"):
        self.runs = runs
        self.executors, self.ctx = {}, {}
        for site, run in runs.items():
            ex = EsmLoraExecutor(**run.settings.to_dict())
            ex.run = run
            ctx = FLContext()
            ctx.set_prop(ReservedKey.ENGINE, _SiteEngine(), private=True, sticky=False)
            ctx.set_prop(ReservedKey.IDENTITY_NAME, site, private=False, sticky=False)
            ctx.set_prop(ReservedKey.RUN_NUM, job_id, private=False, sticky=False)
            self.executors[site], self.ctx[site] = ex, ctx
        self.received: list[tuple[str, str, Shareable]] = []
        self.drop: set = set()
        self.aggregator = None
        self.server_ctx = None
        self.global_state = None
        self.retrained: list[list[str]] = []

    def _send(self, site, task_name, task) -> Shareable | None:
        reply = self.executors[site].execute(task_name, task, self.ctx[site], Signal())
        expected = ExpectedResult.for_job(self.runs[site].settings, site)
        assert result_problem(reply, expected) is None, result_problem(reply, expected)
        step = task_name.replace("secure_", "") if task_name != "train" else "keys"
        if (site, step) in self.drop:
            return None
        reply.set_peer_props({ReservedKey.IDENTITY_NAME: site})
        self.received.append((site, task_name, reply))
        return reply

    def train(self, sites, round_):
        for site in sites:
            task = make_weights_shareable(self.global_state, {})
            task.set_header(AppConstants.CURRENT_ROUND, round_)
            task.set_header(AppConstants.NUM_ROUNDS, 6)
            reply = self._send(site, "train", task)
            if reply is not None:
                reply.add_cookie(AppConstants.CONTRIBUTION_ROUND, round_)
                assert self.aggregator.accept(reply, self.server_ctx)

    # the workflow's relay
    def exchange(self, task_name, data, sites, timeout, fl_ctx):
        from nvflare.apis.dxo import DXO

        out = {}
        for site in sites:
            task = DXO(data_kind=DataKind.COLLECTION, data=data).to_shareable()
            task.set_header(AppConstants.CURRENT_ROUND, fl_ctx.get_prop(AppConstants.CURRENT_ROUND))
            reply = self._send(site, task_name, task)
            if reply is not None:
                out[site] = reply
        return out

    def retrain(self, sites, fl_ctx):
        self.retrained.append(list(sites))
        self.train(sites, fl_ctx.get_prop(AppConstants.CURRENT_ROUND))


def _network(kits, tiny_checkpoint, synth_data, sites, strategy="fra", overrides=None):
    over = {**SECURE, "federation.strategy": strategy, **(overrides or {})}
    if strategy == "ffa":
        over["training.freeze_lora_a"] = True
    runs = {}
    for i, s in enumerate(sites):
        data = (synth_data[0][i * 60:(i + 1) * 60], synth_data[1])
        runs[s] = site_run(tiny_checkpoint, data, over, site=s)
        runs[s].kit_dir = str(kits / s / "startup")
    net = Loopback(runs)
    first = runs[sites[0]]
    net.aggregator = FraLoraAggregator(lora=first.settings.lora, federation=first.settings.federation)
    net.aggregator.relay = net
    net.global_state = to_numpy_dict(first.exchanged_state())
    return net


def _round(net, round_, sites):
    engine = Engine()
    net.server_ctx = ctx = engine_context(engine, round_=round_, global_weights=net.global_state)
    ctx.set_prop(ReservedKey.RUN_NUM, "job-7", private=False, sticky=False)
    net.aggregator.reset(ctx)
    net.train(sites, round_)
    out = from_shareable(net.aggregator.aggregate(ctx))
    return out, engine


def _plain(net, sites, strategy, state=None, global_state=None):
    states = [to_numpy_dict(net.runs[s].exchanged_state()) for s in sites]
    return aggregate(states, [1.0] * len(sites), strategy, rank=4, state=state, global_state=global_state)


@pytest.mark.parametrize("sites, strategy", [(SITES[:2], "fra-ef"), (SITES, "fra"), (SITES[:2], "fedit"),
                                             (SITES, "ffa")])
def test_secure_rounds_through_the_flare_parts_give_the_plain_global_model(kits, tiny_checkpoint, synth_data,
                                                                           sites, strategy):
    net = _network(kits, tiny_checkpoint, synth_data, sites, strategy)
    ref_state = AggregationState()
    for round_ in range(2):
        out, engine = _round(net, round_, sites)
        ref = _plain(net, sites, strategy, ref_state, net.global_state)
        assert set(out.data) == set(ref) and out.meta["aggregated_sites"] == sites
        for k in ref:
            np.testing.assert_allclose(out.data[k], ref[k], atol=1e-5, err_msg=f"round {round_}: {k}")
        net.global_state = out.data
    assert not [e for e, _ in engine.events if e == EventType.FATAL_SYSTEM_ERROR]
    # what the server received: per site and round a key message, then masked words; never a float array
    steps = {"fra": ["train", "secure_pass1", "secure_pass2"], "fra-ef": ["train", "secure_pass1", "secure_pass2"],
             "fedit": ["train", "secure_sum"], "ffa": ["train", "secure_sum"]}[strategy]
    assert [t for s, t, _ in net.received if s == sites[0]] == steps * 2
    for site, task, reply in net.received:
        dxo = from_shareable(reply)
        assert dxo.data_kind == DataKind.COLLECTION
        assert all(v.dtype in (np.uint8, np.uint64) for v in dxo.data.values()), (site, task)
    if strategy.startswith("fra"):
        assert set(net.aggregator.ef_state.residuals) == set(ref_state.residuals) or strategy == "fra"


def test_a_plain_weights_reply_is_refused_by_the_site_and_the_server_in_a_secure_job(kits, tiny_checkpoint,
                                                                                    synth_data):
    net = _network(kits, tiny_checkpoint, synth_data, SITES[:2])
    run = net.runs["site-1"]
    clear = make_weights_shareable(run.exchanged_state(), {})
    assert "in the clear" in result_problem(clear, ExpectedResult.for_job(run.settings, "site-1"))
    ctx = engine_context(Engine(), round_=0, global_weights=net.global_state)
    clear.set_peer_props({ReservedKey.IDENTITY_NAME: "site-1"})
    clear.add_cookie(AppConstants.CONTRIBUTION_ROUND, 0)
    assert not net.aggregator.accept(clear, ctx)
    assert "not a secure-aggregation key" in net.aggregator.last_reject_reason


def test_a_site_lost_between_the_passes_reruns_the_round_with_the_others(kits, tiny_checkpoint, synth_data):
    net = _network(kits, tiny_checkpoint, synth_data, SITES)
    net.drop = {("site-3", "pass2")}
    out, engine = _round(net, 0, SITES)
    assert net.retrained == [["site-1", "site-2"]]  # the others train again: new keys, new masks
    assert out.meta["aggregated_sites"] == ["site-1", "site-2"]
    ref = _plain(net, ["site-1", "site-2"], "fra", global_state=net.global_state)  # their retrained states
    for k in ref:
        np.testing.assert_allclose(out.data[k], ref[k], atol=1e-5)
    assert not [e for e, _ in engine.events if e == EventType.FATAL_SYSTEM_ERROR]
    # a site never masks twice for one trained state: asked again without training, it refuses
    with pytest.raises(Exception):
        net.runs["site-1"].secure_first({}, None)


def test_a_site_lost_below_min_clients_ends_the_job_with_the_reason_and_no_model(kits, tiny_checkpoint, synth_data):
    net = _network(kits, tiny_checkpoint, synth_data, SITES[:2])
    net.drop = {("site-2", "pass1")}
    out, engine = _round(net, 0, SITES[:2])
    assert out.data == {}  # nothing to persist: the workflow stops on the panic
    panics = [d for e, d in engine.events if e == EventType.FATAL_SYSTEM_ERROR]
    assert len(panics) == 1 and "lost site-2 between the secure passes; 1 site(s) left (site-1), a secure sum needs 2" in panics[0]
    assert net.retrained == []


def test_a_server_that_sends_one_site_another_plan_gets_no_sum(kits, tiny_checkpoint, synth_data):
    """The plan is bound into the masks: a site sent another plan (to single it out) masks for another
    context, the masks do not cancel, the sum is refused and the round runs again until the job ends."""
    net = _network(kits, tiny_checkpoint, synth_data, SITES[:2])
    real = net.exchange

    def tampering(task_name, data, sites, timeout, fl_ctx):
        if task_name != "secure_pass1":
            return real(task_name, data, sites, timeout, fl_ctx)
        out = real(task_name, data, sites[:1], timeout, fl_ctx)
        other = dict(data)
        other["plan/seed"] = data["plan/seed"] + 1
        out.update(real(task_name, other, sites[1:], timeout, fl_ctx))
        return out

    net.exchange = tampering
    out, engine = _round(net, 0, SITES[:2])
    assert out.data == {}
    panics = [d for e, d in engine.events if e == EventType.FATAL_SYSTEM_ERROR]
    assert len(panics) == 1 and "secure sum failed 3 times" in panics[0]


def test_every_masked_message_the_server_receives_looks_uniform(kits, tiny_checkpoint, synth_data):
    from scipy import stats

    net = _network(kits, tiny_checkpoint, synth_data, SITES[:2])
    _round(net, 0, SITES[:2])
    passes = [(s, t, from_shareable(r).data["words"]) for s, t, r in net.received if t.startswith("secure_")]
    assert len(passes) == 4
    own = to_numpy_dict(net.runs["site-1"].exchanged_state())
    for site, task, words in passes:
        top = np.bincount((words[1:] >> np.uint64(56)).astype(np.int64), minlength=256)
        assert stats.chisquare(top).pvalue > 1e-4, (site, task)
        assert stats.kstest(words[1:].astype(np.float64) / 2.0**64, "uniform").pvalue > 1e-4, (site, task)
    sent = b"".join(w.tobytes() for _, _, w in passes)
    for v in own.values():  # no site tensor, nor any 16-byte run of one, in what arrived
        assert np.asarray(v, np.float32).tobytes()[:16] not in sent


def test_a_public_key_the_server_swapped_is_refused_by_every_peer_and_no_sum_is_made(kits, tiny_checkpoint,
                                                                                   synth_data, caplog):
    import logging

    from fedesm.secure import keys as secure_keys
    from fedesm.secure import wire
    from fedesm.secure.rounds import context

    net = _network(kits, tiny_checkpoint, synth_data, SITES)
    real = net.exchange

    def swapping(task_name, data, sites, timeout, fl_ctx):
        if task_name == "secure_pass1":  # the server's own key passed off as site-1's, signed by site-3's kit
            _, public = secure_keys.new_key_pair()
            forged = secure_keys.sign_public_key("site-1", context("job-7", 0, "keys"), public,
                                                 kits / "site-3" / "startup")
            data = {**data, **wire.key_to_arrays(forged, "key/site-1/")}
        return real(task_name, data, sites, timeout, fl_ctx)

    net.exchange = swapping
    with caplog.at_level(logging.ERROR):
        out, engine = _round(net, 0, SITES)
    assert out.data == {}
    refusals = [r.getMessage() for r in caplog.records if "public key for site 'site-1'" in r.getMessage()]
    assert refusals and all("not signed by 'site-1'" in m or "kit of ['site-3']" in m for m in refusals)
    assert [e for e, _ in engine.events if e == EventType.FATAL_SYSTEM_ERROR]
    assert not [t for _, t, _ in net.received if t == "secure_pass2"]  # no pass ever completed
