"""Secure FRA-LoRA against plain FRA-LoRA: bytes per round per site, and the seconds of the maths on this CPU.

Shapes only (no model): an ESM-2 size adapts q, k, v in every layer (d x d, LoRA rank r, the job's 16) and
has a d -> 2 token head. Per site and round:

* plain: up, the site's factors (float32: r (d_in + d_out) per matrix) and head; down, the global factors
  and head (the same size).
* secure: up, its signed key (32-byte X25519 key, RSA-2048 signature, kit certificate ~1.3 kB), pass 1
  (d_out x s words of 8 bytes, or 4 with 32-bit mask words, per matrix, the head, one check word) and
  pass 2 (s x d_in words); down, every roster site's signed key, the bases Q (d_out x s float64) and the
  global factors and head as in plain. s = min(d, K r + 8) (``fedesm.secure.sketch.sketch_width``).

Seconds (``--time``; 8M and 35M by default): one whole round's maths in one process, the K sites' parts
one after another (fedesm.secure.rounds.run_round, kits from a throwaway CA, key agreement included)
against ``aggregation.aggregate(..., "fra")``, interleaved, median of ``--reps``; both arms on ``--threads``
BLAS/torch threads (1 by default: on a shared machine more threads made a 320 x 72 QR 100x slower).
``site part/K`` is the secure total / K (about one site's share; the server's part is small), ``max |diff|``
the largest |secure - plain| over the global model. The masks dominate: each site draws 2 (K - 1) AES-CTR
streams of the pass sizes.

``run`` (the ``secure`` section of ``make bench``) times the same round part by part (``timed_round``: each
site's key, agreement and two masked messages; the server's two unmasked sums, bases and re-factoring),
with 64-bit and 32-bit mask words (``masking`` ``word_bits``; 32-bit at the default bound 64 and at 4),
and counts the bytes of the messages it made.

    python bench/secure_bytes.py [--sites 2 4 8] [--rank 16] [--time 320 480] [--reps 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from fedesm.aggregation import _like, aggregate
from fedesm.keys import lora_pairs
from fedesm.secure import masking
from fedesm.secure.sketch import ServerSketch, SketchPlan, site_pass1, site_pass2, sketch_width

# ESM-2 hidden size -> (architecture, layers); q, k, v adapted in each layer
MODELS = {320: ("esm2_t6_8M_UR50D", 6), 480: ("esm2_t12_35M_UR50D", 12), 1280: ("esm2_t33_650M_UR50D", 33)}
KEY_BYTES = 32 + 256 + 1300  # X25519 key, RSA-2048 signature, PEM certificate (an upper estimate)
HEAD = 2


def plain_bytes(d: int, layers: int, r: int) -> dict[str, int]:
    factors = 3 * layers * r * (d + d) * 4 + (HEAD * d + HEAD) * 4
    return {"up": factors, "down": factors}


def secure_bytes(d: int, layers: int, r: int, k: int, word_bits: int = 64) -> dict[str, int]:
    """Bytes per site and round of secure FRA (``word_bits``: the masked messages' word size; the bases Q the
    server sends back stay float64)."""
    s, word = sketch_width(k * r, d, d), word_bits // 8
    head = (HEAD * d + HEAD) * word
    pass1 = 3 * layers * d * s * word + head + word
    pass2 = 3 * layers * s * d * word + word
    bases = 3 * layers * d * s * 8
    global_model = plain_bytes(d, layers, r)["down"]
    return {"up": KEY_BYTES + pass1 + pass2, "down": k * KEY_BYTES + bases + global_model, "s": s}


def _mib(n: int) -> str:
    return f"{n / 2**20:8.2f}"


def byte_table(sites: list[int], r: int) -> list[str]:
    lines = [f"bytes per round per site (MiB), LoRA r={r} on q,k,v, float32 factors; ratio = secure / plain "
             "(32b: masked messages in 32-bit words)",
             f"{'model':<20} {'K':>3} {'s':>4} {'plain up':>9} {'plain dn':>9} {'sec up':>9} {'sec dn':>9} "
             f"{'up x':>6} {'total x':>8} {'up 32b':>9} {'x 32b':>6}"]
    for d, (arch, layers) in MODELS.items():
        for k in sites:
            p, q = plain_bytes(d, layers, r), secure_bytes(d, layers, r, k)
            q32 = secure_bytes(d, layers, r, k, word_bits=32)
            lines.append(f"{arch:<20} {k:>3} {q['s']:>4} {_mib(p['up'])} {_mib(p['down'])} {_mib(q['up'])} "
                         f"{_mib(q['down'])} {q['up'] / p['up']:6.1f} "
                         f"{(q['up'] + q['down']) / (p['up'] + p['down']):8.1f} {_mib(q32['up']):>9} "
                         f"{q32['up'] / p['up']:6.1f}")
    return lines


def _kits(root: Path, names: list[str]) -> dict[str, Path]:
    """Startup folders like NVFLARE's (client.key, client.crt, rootCA.pem) from a throwaway CA: the bench
    times the maths, and nvflare provision would add seconds that are not part of a round."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench-ca")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(ca_key, hashes.SHA256()))
    out = {}
    for i, name in enumerate(names):
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                .issuer_name(ca_name).public_key(key.public_key()).serial_number(i + 2).not_valid_before(now)
                .not_valid_after(now + datetime.timedelta(days=1)).sign(ca_key, hashes.SHA256()))
        d = root / name / "startup"
        d.mkdir(parents=True)
        (d / "client.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.TraditionalOpenSSL,
                                                         serialization.NoEncryption()))
        (d / "client.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (d / "rootCA.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        out[name] = d
    return out


def _state(rng, d: int, layers: int, r: int) -> dict[str, np.ndarray]:
    st = {}
    for i in range(layers):
        for m in ("q_proj", "k_proj", "v_proj"):
            p = f"base_model.model.esm.layers.{i}.self_attn.{m}"
            st[p + ".lora_A.weight"] = (rng.standard_normal((r, d)) * 0.02).astype(np.float32)
            st[p + ".lora_B.weight"] = (rng.standard_normal((d, r)) * 0.02).astype(np.float32)
    st["base_model.model.classifier.weight"] = rng.standard_normal((HEAD, d)).astype(np.float32)
    st["base_model.model.classifier.bias"] = np.zeros(HEAD, dtype=np.float32)
    return st


def time_table(dims: list[int], sites: list[int], r: int, reps: int) -> list[str]:
    from fedesm.secure.rounds import run_round

    lines = [f"seconds of one round's maths on this CPU (median of {reps}, {torch.get_num_threads()} thread(s); "
             "secure: all K sites' parts + the server's, key agreement included, in one process)",
             f"{'model':<20} {'K':>3} {'plain':>8} {'secure':>8} {'ratio':>7} "
             f"{'site part/K':>11} {'max |diff|':>11}"]
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        kits = _kits(Path(tmp), [f"site-{i}" for i in range(1, max(sites) + 1)])
        for d in dims:
            arch, layers = MODELS[d]
            for k in sites:
                names = [f"site-{i}" for i in range(1, k + 1)]
                states = {n: _state(rng, d, layers, r) for n in names}
                plain_t, secure_t, diff = [], [], 0.0
                for rep in range(reps):
                    t0 = time.perf_counter()
                    ref = aggregate([states[n] for n in names], [1.0] * k, "fra", rank=r)
                    plain_t.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    sec = run_round({n: (states[n], kits[n]) for n in names}, {n: 1.0 for n in names}, states[names[0]],
                                    job_id="bench", round_num=rep, seed=rep, rank=r)
                    secure_t.append(time.perf_counter() - t0)
                    diff = max(diff, max(float(np.max(np.abs(sec[x] - ref[x]))) for x in ref))
                p, s = statistics.median(plain_t), statistics.median(secure_t)
                lines.append(f"{arch:<20} {k:>3} {p:8.3f} {s:8.3f} {s / p:7.1f} {s / k:11.3f} {diff:11.2e}")
    return lines


def timed_round(states: dict, kits: dict, *, round_num: int, seed: int, rank: int, word_bits: int = 64,
                bound: float | None = None, job_id: str = "bench") -> dict:
    """One secure FRA round (equal weights, server_lr 1) played part by part as ``rounds.run_round`` plays it,
    each part timed where it runs: a site's key pair and signature, key agreement, pass-1 and pass-2 messages
    (``site_s``, per site); the server's two unmasked sums, bases and re-factoring (``server_s``). Returns the
    global state, the seconds and the bytes of the messages each site sent (key + two masked messages)."""
    from fedesm.secure.rounds import SiteRound, pass_context, pass_layouts, plan_bytes, bases_bytes, site_weights

    roster = sorted(states)
    w = site_weights({n: 1.0 for n in roster})
    global_state = states[roster[0]]
    site_s = dict.fromkeys(roster, 0.0)
    sent = dict.fromkeys(roster, 0)

    def at_site(name, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        site_s[name] += time.perf_counter() - t0
        return out

    parts = {n: at_site(n, SiteRound, n, Path(kits[n]), job_id, round_num, w[n]) for n in roster}
    keys = {n: p.signed_key for n, p in parts.items()}
    for n in roster:
        at_site(n, parts[n].agree, keys)
        sent[n] += len(keys[n].public) + len(keys[n].signature) + len(keys[n].certificate)
    pairs = lora_pairs(list(global_state))
    plan = SketchPlan.for_model(seed, global_state, len(roster) * rank)
    layout1, layout2 = pass_layouts(global_state, plan)

    def message(name, terms_fn, state, arg, step, sent_for):
        terms = terms_fn(state, w[name], arg)
        ctx = pass_context(job_id, round_num, step, roster, sent_for)
        return masking.mask(masking.flatten(terms, masking.layout_of(terms)), name, parts[name].secrets, ctx,
                            word_bits=word_bits, bound=bound)

    server_s = 0.0
    ctx1 = plan_bytes(plan)
    msgs1 = [at_site(n, message, n, site_pass1, states[n], plan, "pass1", ctx1) for n in roster]
    t0 = time.perf_counter()
    server = ServerSketch(plan, {}, scale=1.0)
    first = masking.unflatten(masking.unmask_sum(msgs1, roster, pass_context(job_id, round_num, "pass1", roster, ctx1),
                                                 word_bits=word_bits, bound=bound), layout1)
    bases = server.bases({name: first[name] for name in pairs})
    ctx2 = bases_bytes(bases)
    server_s += time.perf_counter() - t0
    msgs2 = [at_site(n, message, n, site_pass2, states[n], bases, "pass2", ctx2) for n in roster]
    t0 = time.perf_counter()
    second = masking.unflatten(masking.unmask_sum(msgs2, roster, pass_context(job_id, round_num, "pass2", roster,
                                                                              ctx2), word_bits=word_bits, bound=bound),
                              layout2)
    floor = masking.noise_floor(len(roster), max(int(np.prod(x)) for _, x in layout2), word_bits, bound)
    factors = server.finish({name: second[name] for name in pairs}, rank, None, residual_cap=len(roster) * rank,
                            noise_floor=floor)
    out = {}
    for name, (a_key, b_key) in pairs.items():
        out[a_key] = _like(factors[name][0], global_state[a_key])
        out[b_key] = _like(factors[name][1], global_state[b_key])
    for k, _shape in layout1[len(pairs):]:
        out[k] = _like(first[k], global_state[k])
    server_s += time.perf_counter() - t0
    for m in msgs1 + msgs2:
        sent[m.site] += m.words.nbytes
    return {"state": {k: out[k] for k in global_state}, "site_s": site_s, "server_s": server_s, "sent": sent}


def update_rel_diff(state: dict, ref: dict) -> float:
    """The largest max |B A - B_ref A_ref| / max |B_ref A_ref| over the LoRA pairs: the difference in the update
    the model applies. Factors alone can differ far more where two singular values of the merged update are
    close (random factors: a 1% gap at the cut), as the truncation then picks a rotated pair of directions."""
    worst = 0.0
    for a_key, b_key in lora_pairs(list(ref)).values():
        got = np.asarray(state[b_key], np.float64) @ np.asarray(state[a_key], np.float64)
        want = np.asarray(ref[b_key], np.float64) @ np.asarray(ref[a_key], np.float64)
        worst = max(worst, float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30)))
    return worst


MASKS = ((64, None), (32, None), (32, 4.0))  # (word_bits, bound): 64-bit, 32-bit at BOUND_32, 32-bit at bound 4


def mask_label(word_bits: int, bound: float | None) -> str:
    return f"{word_bits}-bit" + ("" if bound is None else f", bound {bound:g}")


def run(dims=(320, 480, 1280), sites=(2, 4, 8), rank: int = 16, reps: int = 3, masks=MASKS,
        reps_by_dim: dict | None = None, models: dict | None = None, echo=print) -> list[dict]:
    """Rows of the ``secure`` section: per (shape, K, mask words) the bytes per site per round (counted, and the
    messages' own bytes), what the server receives, and the seconds of the site and server parts against
    ``aggregate(..., "fra")``, interleaved, medians of ``reps`` (``reps_by_dim[d]`` where given). ``masks``:
    (word_bits, bound) pairs (``masking``; bound None: its default). ``models``: hidden size -> (name, layers),
    ``MODELS`` by default (tests pass tiny shapes)."""
    models = models or MODELS
    masks = tuple((int(wb), None if bound is None else float(bound)) for wb, bound in masks)
    rows = []
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        kits = _kits(Path(tmp), [f"site-{i}" for i in range(1, max(sites) + 1)])
        for d in dims:
            arch, layers = models[d]
            n_reps = (reps_by_dim or {}).get(d, reps)
            for k in sites:
                names = [f"site-{i}" for i in range(1, k + 1)]
                states = {n: _state(rng, d, layers, rank) for n in names}
                load = [round(x, 2) for x in os.getloadavg()]
                plain_t = []
                arms = {m: {"site": [], "site_max": [], "server": [], "diff": 0.0, "update_diff": 0.0, "sent": 0}
                        for m in masks}
                for rep in range(n_reps):
                    t0 = time.perf_counter()
                    ref = aggregate([states[n] for n in names], [1.0] * k, "fra", rank=rank)
                    plain_t.append(time.perf_counter() - t0)
                    for m in (masks if rep % 2 == 0 else tuple(reversed(masks))):
                        res = timed_round(states, kits, round_num=rep, seed=rep, rank=rank, word_bits=m[0],
                                          bound=m[1])
                        a = arms[m]
                        a["site"].append(statistics.mean(res["site_s"].values()))
                        a["site_max"].append(max(res["site_s"].values()))
                        a["server"].append(res["server_s"])
                        a["diff"] = max(a["diff"], max(float(np.max(np.abs(res["state"][x] - ref[x]))) for x in ref))
                        a["update_diff"] = max(a["update_diff"], update_rel_diff(res["state"], ref))
                        a["sent"] = max(res["sent"].values())
                plain = statistics.median(plain_t)
                pb = plain_bytes(d, layers, rank)
                for wb, bound in masks:
                    a, sb = arms[(wb, bound)], secure_bytes(d, layers, rank, k, wb)
                    site, server = statistics.median(a["site"]), statistics.median(a["server"])
                    row = {"arch": arch, "d": d, "layers": layers, "sites": k, "rank": rank, "word_bits": wb,
                           "bound": bound, "fraction_bits": masking.fraction_bits(k, wb, bound),
                           "sketch_width": sb["s"], "reps": n_reps, "load_average": load,
                           "plain_up_bytes": pb["up"], "plain_down_bytes": pb["down"],
                           "secure_up_bytes": sb["up"], "secure_down_bytes": sb["down"],
                           "secure_up_measured_bytes": a["sent"],
                           "server_receives_plain_bytes": k * pb["up"], "server_receives_secure_bytes": k * sb["up"],
                           "up_ratio": sb["up"] / pb["up"],
                           "round_bytes_ratio": (sb["up"] + sb["down"]) / (pb["up"] + pb["down"]),
                           "plain_s": plain, "plain_all_s": plain_t,
                           "secure_site_s": site, "secure_site_max_s": statistics.median(a["site_max"]),
                           "secure_server_s": server, "secure_site_all_s": a["site"],
                           "secure_server_all_s": a["server"],
                           "secure_total_s": k * site + server,
                           "site_over_plain": site / plain, "server_over_plain": server / plain,
                           "total_over_plain": (k * site + server) / plain,
                           "max_abs_diff": a["diff"], "max_update_rel_diff": a["update_diff"]}
                    rows.append(row)
                    echo(f"   {arch} K={k} {mask_label(wb, bound)}: up {sb['up'] / 2**20:.2f} MiB "
                         f"({row['up_ratio']:.1f}x plain), "
                         f"site {site:.3f}s, server {server:.3f}s, plain {plain:.3f}s, max |diff| {a['diff']:.1e}, "
                         f"update rel diff {a['update_diff']:.1e}")
    return rows


def format_table(rows: list[dict]) -> str:
    head = ["model", "K", "mask words", "s", "plain up MiB", "secure up MiB", "up x", "round bytes x",
            "server receives MiB (plain / secure)", "plain s", "site s", "server s", "site / plain",
            "server / plain", "all sites + server / plain", "max abs diff", "update rel diff", "reps"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for x in rows:
        cells = [x["arch"], x["sites"], mask_label(x["word_bits"], x.get("bound")), x["sketch_width"],
                 f"{x['plain_up_bytes'] / 2**20:.2f}", f"{x['secure_up_bytes'] / 2**20:.2f}",
                 f"**{x['up_ratio']:.1f}x**", f"{x['round_bytes_ratio']:.1f}x",
                 f"{x['server_receives_plain_bytes'] / 2**20:.1f} / {x['server_receives_secure_bytes'] / 2**20:.1f}",
                 f"{x['plain_s']:.3f}", f"{x['secure_site_s']:.3f}", f"{x['secure_server_s']:.3f}",
                 f"**{x['site_over_plain']:.1f}x**", f"{x['server_over_plain']:.1f}x",
                 f"{x['total_over_plain']:.1f}x", f"{x['max_abs_diff']:.1e}", f"{x['max_update_rel_diff']:.1e}",
                 x["reps"]]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sites", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank (the shipped jobs' lora.r)")
    ap.add_argument("--time", type=int, nargs="*", default=[320, 480], choices=sorted(MODELS),
                    help="hidden sizes to time (none: bytes only)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="BLAS and torch threads for both arms")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)
    print("\n".join(byte_table(args.sites, args.rank)))
    if args.time:
        print()
        print("\n".join(time_table(args.time, args.sites, args.rank, args.reps)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
