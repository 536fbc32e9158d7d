"""The ESM-2 shapes fedesm knows, and a fresh fair-esm ESM2 module of one of them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from fedesm.errors import FedesmError


@dataclass(frozen=True)
class EsmArchitecture:
    """Shape of an ESM-2 encoder, as in fair-esm's checkpoint cfg."""

    layers: int
    embed_dim: int
    heads: int
    on_hub: bool = True  # published by fair-esm (a pretrained checkpoint exists)


ARCHITECTURES: dict[str, EsmArchitecture] = {
    "esm2_t6_8M_UR50D": EsmArchitecture(6, 320, 20),
    "esm2_t12_35M_UR50D": EsmArchitecture(12, 480, 20),
    "esm2_t30_150M_UR50D": EsmArchitecture(30, 640, 20),
    "esm2_t33_650M_UR50D": EsmArchitecture(33, 1280, 20),
    "esm2_t36_3B_UR50D": EsmArchitecture(36, 2560, 40),
    "esm2_t48_15B_UR50D": EsmArchitecture(48, 5120, 40),
    # Tiny configurations for tests and the CPU demo; random init only.
    "esm2_t2_tiny": EsmArchitecture(2, 64, 4, on_hub=False),
    "esm2_t4_small": EsmArchitecture(4, 128, 8, on_hub=False),
}


def get_architecture(name: str) -> EsmArchitecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise FedesmError(f"unknown ESM-2 architecture {name!r}; choose one of {', '.join(ARCHITECTURES)}") from None


def architecture_of(esm2) -> EsmArchitecture:
    """The named architecture with the module's shape, or an unnamed one."""
    for spec in ARCHITECTURES.values():
        if (spec.layers, spec.embed_dim, spec.heads) == (esm2.num_layers, esm2.embed_dim, esm2.attention_heads):
            return spec
    return EsmArchitecture(esm2.num_layers, esm2.embed_dim, esm2.attention_heads, on_hub=False)


def architecture_label(arch: EsmArchitecture) -> str:
    """The architecture's name, or its shape when it has none (`6 layers x 320`)."""
    for name, spec in ARCHITECTURES.items():
        if (spec.layers, spec.embed_dim, spec.heads) == (arch.layers, arch.embed_dim, arch.heads):
            return name
    return f"an unnamed ESM-2 ({arch.layers} layers x {arch.embed_dim}, {arch.heads} heads)"


def esm_alphabet():
    import esm

    return esm.data.Alphabet.from_architecture("ESM-1b")


def new_esm2(arch: EsmArchitecture, seed: Optional[int] = 0, device=None):
    """A fresh fair-esm ESM2 module; seeded so every site building `random:NAME` gets the same weights."""
    import torch
    from esm.model.esm2 import ESM2

    alphabet = esm_alphabet()
    if device == "meta":
        with torch.device("meta"):
            return ESM2(arch.layers, arch.embed_dim, arch.heads, alphabet, token_dropout=True), alphabet
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model = ESM2(arch.layers, arch.embed_dim, arch.heads, alphabet, token_dropout=True)
    return model, alphabet
