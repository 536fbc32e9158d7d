"""Where privacy noise comes from: a cryptographically secure generator keyed from OS entropy.

The noise that protects a site's data (the paper's gradient noise, DP-SGD's Gaussian noise and its
Poisson sampling) must be unknown to everyone else. Drawing it from a generator seeded with the
job's seed would let whoever wrote the job (and the orchestrator, who holds it) regenerate every
draw and subtract it. So `NoiseSource.secret()` keys AES-256 in counter mode (a CSPRNG, the
construction of NIST SP 800-90A's CTR_DRBG and of the torchcsprng generator Opacus' secure_mode
uses) with 32 bytes from the operating system (`secrets.token_bytes`): fresh for every source,
hence per site and per run, and never written anywhere.

`NoiseSource.from_seed` is for debugging only: the same key derivation from a seed the site picks
in its own config (`privacy.debug_noise_seed`), so a run repeats exactly; `reproducible` says so,
and the executor logs it and writes it into the metrics.

Gaussians come from the keystream by Box-Muller in float64 (53-bit uniforms, so tails reach 8.5
sigma), computed on the device of the tensors they are added to. Independent sub-streams
(`stream(name)`: noise vs sampling) have keys derived by HMAC-SHA256.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
from typing import Optional, Sequence

import numpy as np
import torch

KEY_BYTES = 32
_TWO_POW_53 = 2.0 ** -53
_DOMAIN = b"fedesm privacy noise v1"


class NoiseSource:
    """Uniform and Gaussian draws from AES-256-CTR; build one with `secret()` (or `from_seed` to debug)."""

    def __init__(self, key: bytes, reproducible: bool, description: str):
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        if len(key) != KEY_BYTES:
            raise ValueError(f"a noise key has {KEY_BYTES} bytes, got {len(key)}")
        self._key = key
        self.reproducible = bool(reproducible)
        self.description = description
        self._cipher = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()

    @classmethod
    def secret(cls) -> "NoiseSource":
        """A source nobody else can reproduce: its key is 32 fresh bytes of OS entropy, kept in memory only."""
        return cls(secrets.token_bytes(KEY_BYTES), reproducible=False, description="secret (OS entropy)")

    @classmethod
    def from_seed(cls, seed: int, label: str = "") -> "NoiseSource":
        """Debugging only: a source that repeats for the same (seed, label). Whoever knows both can remove the noise."""
        key = hashlib.sha256(_DOMAIN + b"\0" + f"{int(seed)}/{label}".encode()).digest()
        return cls(key, reproducible=True, description=f"REPRODUCIBLE from seed {int(seed)} ({label or 'no label'})")

    def stream(self, name: str) -> "NoiseSource":
        """An independent source for one use (e.g. 'dpsgd-noise', 'poisson'), reproducible iff this one is."""
        key = hmac.new(self._key, name.encode(), hashlib.sha256).digest()
        return NoiseSource(key, self.reproducible, f"{self.description}/{name}")

    def __repr__(self) -> str:  # never the key
        return f"NoiseSource({self.description})"

    # --------------------------------------------------------------------------------- draws

    def random_bytes(self, n: int) -> bytes:
        return self._cipher.update(bytes(n))

    def _words(self, n: int) -> torch.Tensor:
        """n uniform 64-bit words as an int64 tensor (CPU)."""
        return torch.frombuffer(bytearray(self.random_bytes(8 * n)), dtype=torch.int64) if n else torch.zeros(
            0, dtype=torch.int64)

    def _unit(self, n: int, device=None) -> torch.Tensor:
        """n float64 uniforms in [0, 1) with 53 random bits each, on `device`."""
        words = self._words(n)
        if device is not None:
            words = words.to(device)
        # the top 53 bits of each word (>> on int64 is arithmetic: mask the sign-extended bits away)
        return ((words >> 11) & ((1 << 53) - 1)).to(torch.float64).mul_(_TWO_POW_53)

    def uniform(self, n: int) -> np.ndarray:
        """n float64 uniforms in [0, 1) (numpy, for the sampler)."""
        return self._unit(n).numpy()

    def normal(self, n: int, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """n independent N(0, 1) draws (Box-Muller in float64 on `device`), returned as `dtype`."""
        if n <= 0:
            return torch.zeros(0, device=device, dtype=dtype)
        half = (n + 1) // 2
        u = self._unit(2 * half, device)
        radius = torch.sqrt(-2.0 * torch.log1p(-u[:half]))  # 1 - u in (0, 1]: log is finite
        angle = u[half:].mul_(2 * math.pi)
        z = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])
        return z[:n].to(dtype)

    def normal_like(self, tensors: Sequence[torch.Tensor], std: float,
                    device: Optional[torch.device] = None) -> list[torch.Tensor]:
        """One N(0, std^2) tensor per tensor in `tensors` (same shapes), from a single draw (float32)."""
        sizes = [t.numel() for t in tensors]
        if not sizes:
            return []
        dev = device if device is not None else tensors[0].device
        flat = self.normal(sum(sizes), device=dev).mul_(std)
        return [chunk.view(t.shape) for chunk, t in zip(torch.split(flat, sizes), tensors)]
