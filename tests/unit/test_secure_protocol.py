"""A whole secure round with kits from real NVFLARE provisioning: signed keys, two masked passes, the global
model FRA-LoRA gives; swapped keys refused naming the site; a site lost between the passes never yields a sum."""

import datetime
import shutil

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from scipy import stats

from fedesm.aggregation import AggregationState, aggregate
from fedesm.errors import FedesmError
from fedesm.secure import keys, masking
from fedesm.secure.rounds import (SiteRound, bases_bytes, context, pass_context, plan_bytes, run_round,
                                  site_weights)
from fedesm.secure.sketch import SketchPlan, site_pass1

from tests.secure_parts import SITES, make_kits


def _kits(root, name):
    return make_kits(root, name, SITES)


@pytest.fixture(scope="module")
def kits(tmp_path_factory):
    return _kits(tmp_path_factory.mktemp("secure_kits"), "fedesm")


@pytest.fixture(scope="module")
def other_kits(tmp_path_factory):
    """Another project's kits: the same site names under another root CA."""
    return _kits(tmp_path_factory.mktemp("other_kits"), "intruder")


def _startup(kits, site):
    return kits / site / "startup"


def _state(rng, r, layers=2, d=24, dtype=np.float32):
    st = {}
    for i in range(layers):
        for m in ("query", "key", "value"):
            st[f"base_model.model.esm.encoder.layer.{i}.attention.self.{m}.lora_A.weight"] = \
                (rng.standard_normal((r, d)) * 0.1).astype(dtype)
            st[f"base_model.model.esm.encoder.layer.{i}.attention.self.{m}.lora_B.weight"] = \
                (rng.standard_normal((d, r)) * 0.1).astype(dtype)
    st["base_model.model.classifier.modules_to_save.default.weight"] = rng.standard_normal((2, d)).astype(dtype)
    return st


@pytest.mark.parametrize("n_sites", [2, 3])
@pytest.mark.parametrize("strategy", ["fra", "fra-ef"])
def test_secure_rounds_give_the_fra_global_model(kits, n_sites, strategy):
    rng = np.random.default_rng(n_sites)
    names = SITES[:n_sites]
    weights = dict(zip(names, [1.0, 2.0, 3.0]))
    ref_state, sec_state = AggregationState(), AggregationState()
    g_ref = g_sec = _state(rng, 4)
    for rnd in range(3):
        states = {s: _state(rng, 4) for s in names}
        g_ref = aggregate([states[s] for s in names], [weights[s] for s in names], strategy, rank=4,
                          state=ref_state, global_state=g_ref)
        g_sec = run_round({s: (states[s], _startup(kits, s)) for s in names}, weights, g_sec, job_id="job-1",
                          round_num=rnd, seed=1000 + rnd, strategy=strategy, rank=4, state=sec_state)
        for k in g_ref:
            assert g_sec[k].dtype == g_ref[k].dtype
            np.testing.assert_allclose(g_sec[k], g_ref[k], atol=1e-5, err_msg=f"round {rnd}: {k}")
    if strategy == "fra-ef":
        assert sec_state.rounds == 3 and set(sec_state.residuals) == set(ref_state.residuals) != set()


def test_a_server_lr_step_matches_fra(kits):
    rng = np.random.default_rng(5)
    names = SITES[:2]
    g = _state(rng, 4, dtype=np.float64)
    states = {s: _state(rng, 4, dtype=np.float64) for s in names}
    ref = aggregate([states[s] for s in names], [1, 1], "fra", rank=4, global_state=g, server_lr=0.5)
    sec = run_round({s: (states[s], _startup(kits, s)) for s in names}, {s: 1 for s in names}, g, job_id="j",
                    round_num=0, seed=3, strategy="fra", rank=4, server_lr=0.5)
    for k in ref:
        np.testing.assert_allclose(sec[k], ref[k], atol=1e-6)


def _round_parts(kits, names, job="job-1", rnd=0):
    w = site_weights({s: 1.0 for s in names})
    return {s: SiteRound(s, _startup(kits, s), job, rnd, w[s]) for s in names}


def test_every_message_the_server_sees_reveals_no_site_factors(kits):
    """What the server receives: signed public keys and masked words; each masked word stream is uniform and
    uncorrelated with the site's own term (which is far from uniform)."""
    rng = np.random.default_rng(8)
    parts = _round_parts(kits, SITES)
    for p in parts.values():
        p.agree({s: q.signed_key for s, q in parts.items()})
    states = {s: _state(rng, 8, layers=4, d=160) for s in SITES}
    plan = SketchPlan.for_model(1, states["site-1"], 24)
    for s in SITES:
        msg = parts[s].pass1(states[s], plan)
        words = msg.words[1:]
        terms = site_pass1(states[s], parts[s].weight, plan)
        own = masking.flatten(terms, masking.layout_of(terms))
        assert stats.chisquare(np.bincount((words >> np.uint64(56)).astype(np.int64), minlength=256)).pvalue > 1e-4
        assert stats.kstest(words.astype(np.float64) / 2.0**64, "uniform").pvalue > 1e-4
        assert abs(np.corrcoef(masking.decode(words), own)[0, 1]) < 0.02
        assert stats.kstest(masking.encode(own, 3).astype(np.float64) / 2.0**64, "uniform").pvalue < 1e-10


def _agree_with(parts, swapped):
    keys_seen = {s: q.signed_key for s, q in parts.items()}
    keys_seen.update(swapped)
    with pytest.raises(FedesmError) as err:
        parts["site-2"].agree(keys_seen)
    return str(err.value)


def test_a_key_signed_by_another_sites_kit_is_refused_naming_the_site(kits):
    parts = _round_parts(kits, SITES)
    _, public = keys.new_key_pair()  # the server's own key, passed off as site-1's
    forged = keys.sign_public_key("site-1", context("job-1", 0, "keys"), public, _startup(kits, "site-3"))
    msg = _agree_with(parts, {"site-1": forged})
    assert "'site-1'" in msg and "site-3" in msg and "refused" in msg


def test_a_key_signed_by_nobody_or_the_server_is_refused(kits, tmp_path):
    parts = _round_parts(kits, SITES)
    _, public = keys.new_key_pair()
    genuine = parts["site-1"].signed_key
    unsigned = keys.SignedKey("site-1", genuine.context, public, genuine.signature, genuine.certificate)
    assert "not signed by 'site-1'" in _agree_with(parts, {"site-1": unsigned})
    server_startup = tmp_path / "server_as_site"  # the server's own kit key and certificate, chained to the root
    server_startup.mkdir()
    shutil.copy(kits / "localhost" / "startup" / "server.key", server_startup / keys.KIT_KEY)
    shutil.copy(kits / "localhost" / "startup" / "server.crt", server_startup / keys.KIT_CERT)
    by_server = keys.sign_public_key("site-1", genuine.context, public, server_startup)
    assert "kit of ['localhost']" in _agree_with(parts, {"site-1": by_server})


def test_a_key_from_another_project_or_a_self_made_certificate_is_refused(kits, other_kits):
    parts = _round_parts(kits, SITES)
    _, public = keys.new_key_pair()
    ctx = context("job-1", 0, "keys")
    foreign = keys.sign_public_key("site-1", ctx, public, _startup(other_kits, "site-1"))
    assert "root CA did not issue" in _agree_with(parts, {"site-1": foreign})
    # a certificate made up on the spot, self-signed, naming site-1
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "site-1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM)
    made_up = keys.SignedKey("site-1", ctx, public, key.sign(keys._signed_bytes("site-1", ctx, public), keys._PSS,
                                                             hashes.SHA256()), pem)
    assert "root CA did not issue" in _agree_with(parts, {"site-1": made_up})


def test_a_key_from_another_round_is_refused(kits):
    old = _round_parts(kits, SITES, rnd=0)
    parts = _round_parts(kits, SITES, rnd=1)
    assert "not this round" in _agree_with(parts, {"site-1": old["site-1"].signed_key})


def _through_pass1(kits, states, rnd):
    parts = _round_parts(kits, SITES, rnd=rnd)
    for p in parts.values():
        p.agree({s: q.signed_key for s, q in parts.items()})
    plan = SketchPlan.for_model(rnd, states["site-1"], 12 + 2)
    first = [parts[s].pass1(states[s], plan) for s in SITES]
    masking.unmask_sum(first, SITES, pass_context("job-1", rnd, "pass1", SITES, plan_bytes(plan)))  # complete
    rng = np.random.default_rng(rnd)
    bases = {n: np.linalg.qr(rng.standard_normal((24, plan.widths[n])))[0] for n in plan.widths}
    return parts, bases


def test_a_site_lost_between_the_passes_never_yields_a_sum_and_the_round_reruns(kits):
    rng = np.random.default_rng(9)
    states = {s: _state(rng, 4) for s in SITES}
    parts, bases = _through_pass1(kits, states, 4)
    second = [parts[s].pass2(states[s], bases) for s in SITES[:2]]  # site-3 is lost
    ctx = pass_context("job-1", 4, "pass2", SITES, bases_bytes(bases))
    with pytest.raises(FedesmError, match=r"missing \['site-3'\].*never used"):
        masking.unmask_sum(second, SITES, ctx)
    with pytest.raises(FedesmError, match="masks did not cancel"):
        masking.unmask_sum(second, SITES[:2], ctx)
    # the rerun: the sites left, having trained again (a site never resends one update under another roster:
    # the two sums would differ by the lost site's term), fresh keys and masks; FRA's result for those sites
    retrained = {s: _state(rng, 4) for s in SITES[:2]}
    left = {s: (retrained[s], _startup(kits, s)) for s in SITES[:2]}
    rerun = run_round(left, {s: 1.0 for s in left}, states["site-1"], job_id="job-1", round_num=4, seed=44, rank=4)
    ref = aggregate(list(retrained.values()), [1, 1], "fra", rank=4)
    for k in ref:
        np.testing.assert_allclose(rerun[k], ref[k], atol=1e-5)


def test_bases_sent_to_one_site_alone_make_the_sum_fail(kits):
    """A server that sends site-1 other bases (zero for the others would isolate site-1's term) gets a sum whose
    masks do not cancel, even if it relabels the contexts."""
    rng = np.random.default_rng(10)
    states = {s: _state(rng, 4) for s in SITES}
    parts, bases = _through_pass1(kits, states, 5)
    zero = {n: np.zeros_like(q) for n, q in bases.items()}
    second = [parts["site-1"].pass2(states["site-1"], bases)] + [parts[s].pass2(states[s], zero) for s in SITES[1:]]
    ctx = pass_context("job-1", 5, "pass2", SITES, bases_bytes(bases))
    with pytest.raises(FedesmError, match="context"):
        masking.unmask_sum(second, SITES, ctx)
    relabelled = [masking.MaskedMessage(m.site, ctx, m.words) for m in second]
    with pytest.raises(FedesmError, match="masks did not cancel"):
        masking.unmask_sum(relabelled, SITES, ctx)
    honest = [parts[s].pass2(states[s], bases) for s in SITES]
    assert masking.unmask_sum(honest, SITES, ctx).size == sum(q.size for q in bases.values())  # accepted


@pytest.mark.parametrize("strategy", ["fedit", "ffa"])
@pytest.mark.parametrize("server_lr", [1.0, 0.6])
def test_fedit_and_ffa_are_one_masked_sum_equal_to_the_plain_average(kits, strategy, server_lr):
    rng = np.random.default_rng(21)
    g = _state(rng, 4)
    states = {s: _state(rng, 4) for s in SITES}
    if strategy == "ffa":  # sites train only B: their A is the global one
        for st in states.values():
            st.update({k: v.copy() for k, v in g.items() if k.endswith("lora_A.weight")})
    weights = {"site-1": 1.0, "site-2": 3.0, "site-3": 2.0}
    ref = aggregate([states[s] for s in SITES], [weights[s] for s in SITES], strategy, global_state=g,
                    server_lr=server_lr)
    sec = run_round({s: (states[s], _startup(kits, s)) for s in SITES}, weights, g, job_id="j", round_num=0, seed=0,
                    strategy=strategy, server_lr=server_lr)
    assert list(sec) == list(ref)
    for k in ref:
        assert sec[k].dtype == ref[k].dtype
        np.testing.assert_allclose(sec[k], ref[k], atol=1e-5, err_msg=k)  # float32 factors


def test_strategies_without_a_secure_path_are_refused_in_one_line(kits):
    with pytest.raises(FedesmError, match="supports fra, fra-ef, fedit, ffa, not 'fedavg'"):
        run_round({}, {}, {}, job_id="j", round_num=0, seed=0, strategy="fedavg")


def test_a_roster_below_the_jobs_minimum_is_refused(kits):
    """A server that tells a site it is alone (no masks: its message would be its terms in the clear), or any
    roster below min_clients, is refused before anything is masked."""
    parts = _round_parts(kits, SITES)
    with pytest.raises(FedesmError, match=r"roster of 1 site\(s\).*refused"):
        parts["site-1"].agree({"site-1": parts["site-1"].signed_key})
    strict = SiteRound("site-1", _startup(kits, "site-1"), "job-1", 0, 0.5, min_sites=3)
    with pytest.raises(FedesmError, match="needs at least 3"):
        strict.agree({"site-1": strict.signed_key, "site-2": parts["site-2"].signed_key})


@pytest.mark.parametrize("strategy", ["fra", "fedit"])
def test_a_site_whose_state_lists_its_tensors_in_another_order_sums_the_same(kits, strategy):
    """The flat messages follow one order every party derives (names sorted), not the order of a state dict:
    in NVFLARE the global model comes from the persistor and a site's state from PEFT, in different orders."""
    rng = np.random.default_rng(11)
    names = SITES[:2]
    g = _state(rng, 4)
    states = {s: _state(rng, 4) for s in names}
    ref = aggregate([states[s] for s in names], [1, 1], strategy, rank=4, global_state=g)
    shuffled = {s: dict(reversed(list(st.items()))) for s, st in states.items()}
    sec = run_round({s: (shuffled[s], _startup(kits, s)) for s in names}, {s: 1 for s in names}, g, job_id="j",
                    round_num=0, seed=3, strategy=strategy, rank=4)
    for k in ref:
        np.testing.assert_allclose(sec[k], ref[k], atol=1e-5, err_msg=k)  # float32 factors
