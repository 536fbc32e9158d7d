"""Load an ESM-2 encoder from wherever a site keeps it.

Sources (`load_backbone`):
  * ``esm2_t12_35M_UR50D``        a fair-esm hub name, downloaded when online (model weights only,
                                  never the contact-regression file, which fedesm does not use)
  * ``/path/esm2_x.pt``           a local checkpoint in fair-esm's format (air-gapped sites)
  * ``s3://bucket/key.pt``        a checkpoint fetched with boto3 into a local cache
  * ``random:esm2_t6_8M_UR50D``   a named architecture with a seeded random init (tests, demos)
  * ``/path/hf_folder``           a Hugging Face ESM-2 folder as `save_pretrained` writes it (config.json +
                                  model.safetensors or pytorch_model.bin), mapped exactly (`model.hf`)
  * ``hf:facebook/esm2_t12_35M_UR50D``  a Hugging Face hub id, downloaded when online

A model card records which backbone a model was trained on (`identity`): the architecture, the source
(local paths made absolute) and a digest of the weights, so `fedesm predict` can tell the same backbone
from another one of the same shape.
"""

from __future__ import annotations

import argparse
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from fedesm.errors import FedesmError
from fedesm.architectures import (ARCHITECTURES, EsmArchitecture, architecture_label, architecture_of,
                                        get_architecture, new_esm2)
from fedesm.model.checkpoint import build_from_checkpoint, read_checkpoint

HUB_URL = "https://dl.fbaipublicfiles.com/fair-esm/models/{name}.pt"


@dataclass
class Backbone:
    """A loaded ESM-2 encoder and where it came from (recorded in saved model cards)."""

    model: nn.Module
    alphabet: object
    source: str
    arch: EsmArchitecture


def load_backbone(source: str, cache_dir=None, policy=None, endpoint_url=None) -> Backbone:
    """Load an ESM-2 encoder from a hub name, a local .pt, an s3:// URI or `random:ARCH` (see module doc)."""
    source = str(source)
    if source.startswith("random:"):
        arch_name = source.split(":", 1)[1]
        esm2, alphabet = new_esm2(get_architecture(arch_name), seed=RANDOM_SEED)
        return Backbone(esm2, alphabet, source, get_architecture(arch_name))

    if source.startswith("s3://"):
        from fedesm import storage

        cache = Path(cache_dir or Path.home() / ".cache" / "fedesm")
        if policy is None:  # a command the user typed: exactly what they named
            policy = storage.AccessPolicy.exactly(source, source="the backbone named on the command line")
        local = storage.fetch(source, cache, policy, endpoint_url=endpoint_url)
        return _load_local(local, origin=source)

    from fedesm.model.hf import is_hf_source

    path = Path(source).expanduser()
    if is_hf_source(source):
        if policy is not None and not source.startswith("hf:"):
            policy.check(str(path))
        return _load_hf(source, cache_dir)
    if path.suffix == ".pt" or path.exists():
        if policy is not None:
            policy.check(str(path))
        if not path.is_file():
            hint = " (a folder: a Hugging Face model folder needs config.json)" if path.is_dir() else ""
            raise FedesmError(f"{source}: checkpoint file not found{hint}")
        return _load_local(path, origin=source)

    if source in ARCHITECTURES and not ARCHITECTURES[source].on_hub:
        raise FedesmError(f"{source} has no published weights; use 'random:{source}' for a random init")
    if source in ARCHITECTURES:
        return _load_hub(source)
    raise FedesmError(
        f"{source!r} is not a checkpoint file, a Hugging Face folder or hf:ID, an s3:// URI, 'random:ARCH' or a "
        "fair-esm model name "
        f"({', '.join(n for n, a in ARCHITECTURES.items() if a.on_hub)})"
    )


RANDOM_SEED = 0  # the seed of every `random:ARCH` backbone (the same weights at every site)


def weights_digest(model: nn.Module) -> str:
    """sha256 over the encoder's parameters and buffers (names, dtypes, shapes, bytes), in name order; not the
    contact head, which fedesm never loads (fair-esm initialises it at random)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if name.startswith("contact_head."):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def recorded_source(source: str) -> str:
    """A source as a model card records it: local paths absolute, names and URIs as given."""
    source = str(source)
    if source.startswith(("random:", "hf:", "s3://")) or source in ARCHITECTURES:
        return source
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


def identity(backbone: Backbone, shared: bool = False) -> dict:
    """What a model card records of the backbone: architecture, where it came from, digest of its weights.

    `shared`: what a site sends its server: hub names, hf: ids and random:ARCH as they are, a local path or
    an s3:// URI by its file name only (a site's storage layout stays with the site)."""
    source = recorded_source(backbone.source)
    if shared and not (source.startswith(("random:", "hf:")) or source in ARCHITECTURES):
        source = Path(source.rstrip("/")).name
    out = {"arch": architecture_label(backbone.arch), "source": source, "sha256": weights_digest(backbone.model)}
    if backbone.source.startswith("random:"):
        out["seed"] = RANDOM_SEED
    return out


def check_job_architecture(backbone: Backbone, source: str, job_arch: str) -> None:
    """A site's backbone must have the job's architecture (the adapters' names and shapes follow from it)."""
    want = get_architecture(job_arch)
    got = backbone.arch
    if (got.layers, got.embed_dim, got.heads) != (want.layers, want.embed_dim, want.heads):
        raise FedesmError(f"site backbone {source} is {architecture_label(got)}, the job's model.arch is {job_arch}: "
                          f"point the site config's backbone at a {job_arch} checkpoint, or run a job exported "
                          f"with --set model.arch={architecture_label(got)}")


def _load_local(path: Path, origin: str) -> Backbone:
    data = read_checkpoint(path)
    model, alphabet = build_from_checkpoint(Path(path).stem, data, origin)
    return Backbone(model, alphabet, origin, architecture_of(model))


def _load_hf(source: str, cache_dir=None) -> Backbone:
    """A Hugging Face ESM-2 checkpoint mapped onto fair-esm's ESM2 (`fedesm.model.hf`)."""
    from fedesm.model.hf import load_hf_esm2

    esm2, alphabet, _ = load_hf_esm2(source, cache_dir=cache_dir)
    return Backbone(esm2, alphabet, source, architecture_of(esm2))


def _load_hub(name: str) -> Backbone:
    """Download only the model weights (never the contact-regression file)."""
    url = HUB_URL.format(name=name)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            data = torch.hub.load_state_dict_from_url(url, progress=True, map_location="cpu")
    except Exception as e:
        raise FedesmError(
            f"could not download {name} from the fair-esm hub ({type(e).__name__}); offline sites should pass "
            "a local checkpoint path or an s3:// URI instead"
        ) from None
    model, alphabet = build_from_checkpoint(name, data, name)
    return Backbone(model, alphabet, name, architecture_of(model))


def hub_cache_path(name: str) -> Path:
    """Where torch's hub cache keeps a fair-esm checkpoint (where `load_backbone(name)` downloads it to)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / f"{name}.pt"


def fetch_hub_checkpoint(name: str, timeout: float = 10.0) -> Path:
    """A fair-esm hub checkpoint as a local file: the torch hub cache's copy, else downloaded into it.

    Probes the URL first (`timeout` seconds), so an offline machine finds out in seconds, not minutes;
    FedesmError (one line, with the reason) when the file can be neither found nor downloaded."""
    import urllib.request

    path = hub_cache_path(name)
    if path.is_file():
        return path
    url = HUB_URL.format(name=name)
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            pass
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(path), progress=True)
    except Exception as e:
        raise FedesmError(f"{name}: not in {path} and not downloadable ({type(e).__name__})") from None
    return path
