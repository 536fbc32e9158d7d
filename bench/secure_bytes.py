"""Secure FRA-LoRA against plain FRA-LoRA: bytes per round per site, and the seconds of the maths on this CPU.

Shapes only (no model): an ESM-2 size adapts q, k, v in every layer (d x d, LoRA rank r, the job's 16) and
has a d -> 2 token head. Per site and round:

* plain: up, the site's factors (float32: r (d_in + d_out) per matrix) and head; down, the global factors
  and head (the same size).
* secure: up, its signed key (32-byte X25519 key, RSA-2048 signature, kit certificate ~1.3 kB), pass 1
  (d_out x s words of 8 bytes per matrix, the head, one check word) and pass 2 (s x d_in words); down,
  every roster site's signed key, the bases Q (d_out x s float64) and the global factors and head as in
  plain. s = min(d, K r + 8) (``fedesm.secure.sketch.sketch_width``).

Seconds (``--time``; 8M and 35M by default): one whole round's maths in one process, the K sites' parts
one after another (fedesm.secure.rounds.run_round, kits from a throwaway CA, key agreement included)
against ``aggregation.aggregate(..., "fra")``, interleaved, median of ``--reps``; both arms on ``--threads``
BLAS/torch threads (1 by default: on a shared machine more threads made a 320 x 72 QR 100x slower).
``site part/K`` is the secure total / K (about one site's share; the server's part is small), ``max |diff|``
the largest |secure - plain| over the global model. The masks dominate: each site draws 2 (K - 1) AES-CTR
streams of the pass sizes.

    python bench/secure_bytes.py [--sites 2 4 8] [--rank 16] [--time 320 480] [--reps 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from fedesm.aggregation import aggregate
from fedesm.secure.sketch import sketch_width

# ESM-2 hidden size -> (architecture, layers); q, k, v adapted in each layer
MODELS = {320: ("esm2_t6_8M_UR50D", 6), 480: ("esm2_t12_35M_UR50D", 12), 1280: ("esm2_t33_650M_UR50D", 33)}
KEY_BYTES = 32 + 256 + 1300  # X25519 key, RSA-2048 signature, PEM certificate (an upper estimate)
HEAD = 2


def plain_bytes(d: int, layers: int, r: int) -> dict[str, int]:
    factors = 3 * layers * r * (d + d) * 4 + (HEAD * d + HEAD) * 4
    return {"up": factors, "down": factors}


def secure_bytes(d: int, layers: int, r: int, k: int) -> dict[str, int]:
    s = sketch_width(k * r, d, d)
    head = (HEAD * d + HEAD) * 8
    pass1 = 3 * layers * d * s * 8 + head + 8
    pass2 = 3 * layers * s * d * 8 + 8
    bases = 3 * layers * d * s * 8
    global_model = plain_bytes(d, layers, r)["down"]
    return {"up": KEY_BYTES + pass1 + pass2, "down": k * KEY_BYTES + bases + global_model, "s": s}


def _mib(n: int) -> str:
    return f"{n / 2**20:8.2f}"


def byte_table(sites: list[int], r: int) -> list[str]:
    lines = [f"bytes per round per site (MiB), LoRA r={r} on q,k,v, float32 factors; ratio = secure / plain",
             f"{'model':<20} {'K':>3} {'s':>4} {'plain up':>9} {'plain dn':>9} {'sec up':>9} {'sec dn':>9} "
             f"{'up x':>6} {'total x':>8}"]
    for d, (arch, layers) in MODELS.items():
        for k in sites:
            p, q = plain_bytes(d, layers, r), secure_bytes(d, layers, r, k)
            lines.append(f"{arch:<20} {k:>3} {q['s']:>4} {_mib(p['up'])} {_mib(p['down'])} {_mib(q['up'])} "
                         f"{_mib(q['down'])} {q['up'] / p['up']:6.1f} "
                         f"{(q['up'] + q['down']) / (p['up'] + p['down']):8.1f}")
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
