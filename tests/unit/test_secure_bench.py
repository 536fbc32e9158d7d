"""bench/secure_bytes.py counts the bytes the secure messages really have (no timing asserted)."""

import sys
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import secure_bytes  # noqa: E402

from fedesm.secure.rounds import SiteRound, site_weights  # noqa: E402
from fedesm.secure.sketch import SketchPlan  # noqa: E402


def test_counted_bytes_are_the_messages_bytes(tmp_path):
    d, layers, r, k = 40, 2, 4, 3
    names = [f"site-{i}" for i in range(1, k + 1)]
    kits = secure_bytes._kits(tmp_path, names)
    rng = np.random.default_rng(0)
    states = {n: secure_bytes._state(rng, d, layers, r) for n in names}
    w = site_weights({n: 1.0 for n in names})
    parts = {n: SiteRound(n, kits[n], "bench", 0, w[n]) for n in names}
    for p in parts.values():
        p.agree({n: q.signed_key for n, q in parts.items()})
    plan = SketchPlan.for_model(0, states[names[0]], k * r)
    first = parts[names[0]].pass1(states[names[0]], plan)
    bases = {n: np.linalg.qr(rng.standard_normal((d, s)))[0] for n, s in plan.widths.items()}
    second = parts[names[0]].pass2(states[names[0]], bases)
    key = parts[names[0]].signed_key
    counted = secure_bytes.secure_bytes(d, layers, r, k)
    assert counted["s"] == next(iter(plan.widths.values()))
    message_bytes = first.words.nbytes + second.words.nbytes
    key_bytes = len(key.public) + len(key.signature) + len(key.certificate)
    assert counted["up"] - secure_bytes.KEY_BYTES == message_bytes
    assert 0.5 * secure_bytes.KEY_BYTES < key_bytes <= secure_bytes.KEY_BYTES  # counted generously
    plain = secure_bytes.plain_bytes(d, layers, r)["up"]
    assert plain == sum(v.nbytes for v in states[names[0]].values())
