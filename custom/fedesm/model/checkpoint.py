"""fair-esm's checkpoint format: a `cfg.model` Namespace and an encoder-prefixed state dict.

Written by `save_esm2_checkpoint` (with the `<stem>-contact-regression.pt` file fair-esm's local
loader insists on), read by `read_checkpoint` + `build_from_checkpoint`; torch's safe unpickling
is kept, with only fair-esm's Namespace allowed.
"""

from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path
from typing import Optional

import torch

from fedesm.errors import FedesmError
from fedesm.fileio import atomic_path
from fedesm.architectures import get_architecture, new_esm2


def checkpoint_dict(esm2) -> dict:
    """fair-esm's on-disk layout: cfg.model Namespace + encoder-prefixed state dict."""
    cfg = argparse.Namespace(
        encoder_layers=esm2.num_layers,
        encoder_embed_dim=esm2.embed_dim,
        encoder_attention_heads=esm2.attention_heads,
        token_dropout=esm2.token_dropout,
    )
    state = {}
    for name, tensor in esm2.state_dict().items():
        if name.startswith("contact_head.regression"):
            continue  # lives in the separate -contact-regression.pt file, as in fair-esm
        prefix = "encoder." if name.startswith("lm_head") else "encoder.sentence_encoder."
        state[prefix + name] = tensor.detach().cpu().clone()
    return {"cfg": {"model": cfg}, "model": state}


def save_esm2_checkpoint(esm2, out_path, extra: Optional[dict] = None) -> Path:
    """Write `esm2` in fair-esm's format, plus `<stem>-contact-regression.pt` beside it.

    The file loads with `esm.pretrained.load_model_and_alphabet_local`, which requires the stem
    to start with ``esm2`` and the regression file to exist.
    """
    out_path = Path(out_path)
    if not out_path.name.startswith("esm2"):
        raise FedesmError(f"{out_path}: fair-esm requires ESM-2 checkpoint file names to start with 'esm2'")
    if out_path.suffix != ".pt":
        raise FedesmError(f"{out_path}: checkpoint file name must end with .pt")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    data = checkpoint_dict(esm2)
    if extra:
        data.update(extra)
    regression = {
        "model": {
            "contact_head.regression.weight": esm2.contact_head.regression.weight.detach().cpu().clone(),
            "contact_head.regression.bias": esm2.contact_head.regression.bias.detach().cpu().clone(),
        }
    }
    regression_path = out_path.with_name(out_path.stem + "-contact-regression.pt")
    for path, obj in ((out_path, data), (regression_path, regression)):
        with atomic_path(path) as tmp:
            torch.save(obj, tmp)
    return out_path


def make_random_checkpoint(arch_name: str, out_path, seed: int = 0) -> Path:
    """A random-init ESM-2 checkpoint in fair-esm's own format (tests and demos; no pretrained weights)."""
    esm2, _ = new_esm2(get_architecture(arch_name), seed=seed)
    return save_esm2_checkpoint(esm2, out_path)


def read_checkpoint(path) -> dict:
    """torch>=2.6 loads weights_only by default, which refuses fair-esm's Namespace: allow just that."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError and friends
        if os.environ.get("FEDESM_TRUST_CHECKPOINTS") == "1":
            return torch.load(path, map_location="cpu", weights_only=False)
        raise FedesmError(
            f"{path}: cannot load as a fair-esm checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "set FEDESM_TRUST_CHECKPOINTS=1 to allow full unpickling of a checkpoint you trust"
        ) from None


def refuse_tensor_mismatch(origin, missing, unexpected, mismatched=(), shown: int = 3) -> None:
    """One line listing the first few tensors a checkpoint lacks, does not expect, or holds in another shape,
    and refusing it: a partial checkpoint would otherwise run on random values where its weights are missing."""
    missing, unexpected, mismatched = sorted(missing), sorted(unexpected), sorted(mismatched)
    if not (missing or unexpected or mismatched):
        return
    parts = []
    for count, what, names in ((len(missing), "lacks", missing), (len(unexpected), "has unexpected", unexpected),
                               (len(mismatched), "has in another shape", mismatched)):
        if count:
            more = f", ... {count - shown} more" if count > shown else ""
            parts.append(f"{what} {count} tensor{'s' if count > 1 else ''} ({', '.join(map(str, names[:shown]))}{more})")
    raise FedesmError(f"{origin}: does not match its ESM-2 architecture: {'; '.join(parts)}; refusing to fill "
                      "missing weights with random values")


def build_from_checkpoint(name: str, data: dict, origin: str):
    """(ESM2 module, alphabet) from checkpoint data; one-line errors for what is not an ESM-2 checkpoint."""
    import esm

    if not isinstance(data, dict) or "model" not in data or "cfg" not in data:
        raise FedesmError(f"{origin}: not a fair-esm checkpoint (expected keys 'cfg' and 'model')")
    try:
        cfg = data["cfg"]["model"]
        for attr in ("encoder_layers", "encoder_embed_dim", "encoder_attention_heads"):
            getattr(cfg, attr)
        layers, dim, heads = (int(getattr(cfg, a)) for a in ("encoder_layers", "encoder_embed_dim",
                                                              "encoder_attention_heads"))
        if not (0 < layers <= 1024 and 0 < dim <= 65536 and 0 < heads <= dim and dim % heads == 0):
            raise ValueError
    except Exception:
        raise FedesmError(f"{origin}: not an ESM-2 checkpoint (cfg.model lacks encoder_layers/embed_dim/heads, "
                          "or they make no ESM-2)") from None
    if not isinstance(data["model"], dict) or not all(isinstance(v, torch.Tensor) for v in data["model"].values()):
        raise FedesmError(f"{origin}: not a fair-esm checkpoint ('model' is not a mapping of tensors)")
    if not hasattr(cfg, "token_dropout"):
        cfg = argparse.Namespace(**{**vars(cfg), "token_dropout": True}) if isinstance(cfg, argparse.Namespace) else cfg
    _check_tensor_names(cfg, data["model"], origin)
    data = {"cfg": {"model": cfg}, "model": data["model"]}
    # fair-esm picks the ESM-2 code path by name; fedesm only loads ESM-2.
    name = name if name.startswith("esm2") else "esm2_" + name
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Regression weights not found")
            model, alphabet = esm.pretrained.load_model_and_alphabet_core(name, data, regression_data=None)
    except (RuntimeError, AttributeError, TypeError, ValueError) as e:
        raise FedesmError(f"{origin}: state dict does not match its cfg: {str(e).splitlines()[-1][:300]}") from None
    return model, alphabet


def _check_tensor_names(cfg, state: dict, origin) -> None:
    """The checkpoint's tensors against the ESM-2 its cfg describes (built on the meta device: no memory)."""
    import re

    from fedesm.architectures import EsmArchitecture

    expected = new_esm2(EsmArchitecture(int(cfg.encoder_layers), int(cfg.encoder_embed_dim),
                                        int(cfg.encoder_attention_heads), on_hub=False), device="meta")[0].state_dict()
    prefix = re.compile(r"^(encoder\.sentence_encoder\.|encoder\.)")  # fair-esm's own renaming
    found = {prefix.sub("", k): v for k, v in state.items()}
    optional = {"contact_head.regression.weight", "contact_head.regression.bias"}  # a file of their own
    missing = set(expected) - set(found) - optional
    unexpected = set(found) - set(expected)
    mismatched = {k for k in set(found) & set(expected) if tuple(found[k].shape) != tuple(expected[k].shape)}
    refuse_tensor_mismatch(origin, missing, unexpected, mismatched)
