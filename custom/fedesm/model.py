"""ESM-2 backbone loading, the per-residue classification head, LoRA wrapping and adapter I/O.

The one place that knows fair-esm's checkpoint format and the names of the adapted modules;
every other part (trainer, NVFLARE executor, aggregator, CLI) takes them from here.

Backbone sources (``load_backbone``):
  * ``esm2_t12_35M_UR50D``        a fair-esm hub name, downloaded when online (model weights only,
                                  never the contact-regression file, which fedesm does not use)
  * ``/path/esm2_x.pt``           a local checkpoint in fair-esm's format (air-gapped sites)
  * ``s3://bucket/key.pt``        a checkpoint fetched with boto3 into a local cache
  * ``random:esm2_t6_8M_UR50D``   a named architecture with a seeded random init (tests, demos)
"""

from __future__ import annotations

import argparse
import json
import math
import logging
import os
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from fedesm.errors import FedesmError
from fedesm.fileio import atomic_dir, atomic_path

log = logging.getLogger(__name__)

# Names of the parts of the exchanged state: LoRA factors and the classification head.
CLASSIFIER_NAME = "classifier"
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj")
MODEL_CARD = "fedesm_model.json"
HUB_URL = "https://dl.fbaipublicfiles.com/fair-esm/models/{name}.pt"


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


@dataclass
class LoraSettings:
    """LoRA hyper-parameters; the defaults are the paper's (r=16 on q, k, v)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    targets: Optional[tuple] = DEFAULT_LORA_TARGETS  # any sequence of module names; None = the default

    def __post_init__(self):
        self.targets = tuple(self.targets) if self.targets else DEFAULT_LORA_TARGETS

    def to_peft(self):
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.targets),
            modules_to_save=[CLASSIFIER_NAME],
            bias="none",
        )


def _alphabet():
    import esm

    return esm.data.Alphabet.from_architecture("ESM-1b")


def architecture_names() -> list[str]:
    return list(ARCHITECTURES)


def get_architecture(name: str) -> EsmArchitecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise FedesmError(f"unknown ESM-2 architecture {name!r}; choose one of {', '.join(ARCHITECTURES)}") from None


def new_esm2(arch: EsmArchitecture, seed: Optional[int] = 0, device=None):
    """A fresh fair-esm ESM2 module; seeded so every site building `random:NAME` gets the same weights."""
    from esm.model.esm2 import ESM2

    alphabet = _alphabet()
    if device == "meta":
        with torch.device("meta"):
            return ESM2(arch.layers, arch.embed_dim, arch.heads, alphabet, token_dropout=True), alphabet
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model = ESM2(arch.layers, arch.embed_dim, arch.heads, alphabet, token_dropout=True)
    return model, alphabet


# ---------------------------------------------------------------------------------------------
# fair-esm checkpoint format
# ---------------------------------------------------------------------------------------------


def _checkpoint_dict(esm2) -> dict:
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
    data = _checkpoint_dict(esm2)
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
        _atomic_torch_save(obj, path)
    return out_path


def _atomic_torch_save(obj, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def make_random_checkpoint(arch_name: str, out_path, seed: int = 0) -> Path:
    """A random-init ESM-2 checkpoint in fair-esm's own format (tests and demos; no pretrained weights)."""
    esm2, _ = new_esm2(get_architecture(arch_name), seed=seed)
    return save_esm2_checkpoint(esm2, out_path)


def _torch_load_checkpoint(path) -> dict:
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


def _build_from_checkpoint_data(name: str, data: dict, origin: str):
    import esm

    if not isinstance(data, dict) or "model" not in data or "cfg" not in data:
        raise FedesmError(f"{origin}: not a fair-esm checkpoint (expected keys 'cfg' and 'model')")
    try:
        cfg = data["cfg"]["model"]
        for attr in ("encoder_layers", "encoder_embed_dim", "encoder_attention_heads"):
            getattr(cfg, attr)
    except Exception:
        raise FedesmError(f"{origin}: not an ESM-2 checkpoint (cfg.model lacks encoder_layers/embed_dim/heads)") from None
    data = {"cfg": data["cfg"], "model": data["model"]}
    # fair-esm picks the ESM-2 code path by name; fedesm only loads ESM-2.
    name = name if name.startswith("esm2") else "esm2_" + name
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Regression weights not found")
            model, alphabet = esm.pretrained.load_model_and_alphabet_core(name, data, regression_data=None)
    except RuntimeError as e:
        raise FedesmError(f"{origin}: state dict does not match its cfg: {str(e).splitlines()[-1][:300]}") from None
    return model, alphabet


@dataclass
class Backbone:
    """A loaded ESM-2 encoder and where it came from (recorded in saved adapters)."""

    model: nn.Module
    alphabet: object
    source: str
    arch: EsmArchitecture


def _arch_of(esm2) -> EsmArchitecture:
    for spec in ARCHITECTURES.values():
        if (spec.layers, spec.embed_dim, spec.heads) == (esm2.num_layers, esm2.embed_dim, esm2.attention_heads):
            return spec
    return EsmArchitecture(esm2.num_layers, esm2.embed_dim, esm2.attention_heads, on_hub=False)


def load_backbone(source: str, cache_dir=None, policy=None, endpoint_url=None) -> Backbone:
    """Load an ESM-2 encoder from a hub name, a local .pt, an s3:// URI or `random:ARCH` (see module doc)."""
    source = str(source)
    if source.startswith("random:"):
        arch_name = source.split(":", 1)[1]
        esm2, alphabet = new_esm2(get_architecture(arch_name), seed=0)
        return Backbone(esm2, alphabet, source, get_architecture(arch_name))

    if source.startswith("s3://"):
        from fedesm import storage

        cache = Path(cache_dir or Path.home() / ".cache" / "fedesm")
        local = storage.fetch(source, cache, policy=policy, endpoint_url=endpoint_url)
        return _load_local(local, origin=source)

    path = Path(source).expanduser()
    if path.suffix == ".pt" or path.exists():
        if policy is not None:
            policy.check(str(path))
        if not path.is_file():
            raise FedesmError(f"{source}: checkpoint file not found")
        return _load_local(path, origin=source)

    if source in ARCHITECTURES and not ARCHITECTURES[source].on_hub:
        raise FedesmError(f"{source} has no published weights; use 'random:{source}' for a random init")
    if source in ARCHITECTURES:
        return _load_hub(source)
    raise FedesmError(
        f"{source!r} is not a checkpoint file, an s3:// URI, 'random:ARCH' or a fair-esm model name "
        f"({', '.join(n for n, a in ARCHITECTURES.items() if a.on_hub)})"
    )


def _load_local(path: Path, origin: str) -> Backbone:
    data = _torch_load_checkpoint(path)
    model, alphabet = _build_from_checkpoint_data(Path(path).stem, data, origin)
    return Backbone(model, alphabet, origin, _arch_of(model))


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
    model, alphabet = _build_from_checkpoint_data(name, data, name)
    return Backbone(model, alphabet, name, _arch_of(model))


# ---------------------------------------------------------------------------------------------
# Token classifier and LoRA
# ---------------------------------------------------------------------------------------------


class EsmTokenClassifier(nn.Module):
    """ESM-2 encoder + a linear per-residue head on the last layer's representations."""

    def __init__(self, esm2: nn.Module, num_labels: int = 2, head_dropout: float = 0.1):
        super().__init__()
        self.esm = esm2
        self.dropout = nn.Dropout(head_dropout)
        setattr(self, CLASSIFIER_NAME, nn.Linear(esm2.embed_dim, num_labels))

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Last-layer representations (B, T, E); fair-esm's ESM2.forward without the LM head."""
        esm2 = self.esm
        padding_mask = tokens.eq(esm2.padding_idx)
        x = esm2.embed_scale * esm2.embed_tokens(tokens)
        if esm2.token_dropout:  # same rescaling as fair-esm, so pretrained features are unchanged
            x = x.masked_fill((tokens == esm2.mask_idx).unsqueeze(-1), 0.0)
            mask_ratio_train = 0.15 * 0.8
            src_lengths = (~padding_mask).sum(-1)
            mask_ratio_observed = (tokens == esm2.mask_idx).sum(-1).to(x.dtype) / src_lengths
            x = x * (1 - mask_ratio_train) / (1 - mask_ratio_observed)[:, None, None]
        x = x * (1 - padding_mask.unsqueeze(-1).type_as(x))
        x = x.transpose(0, 1)
        mask = padding_mask if padding_mask.any() else None
        for layer in esm2.layers:
            x, _ = layer(x, self_attn_padding_mask=mask, need_head_weights=False)
        x = esm2.emb_layer_norm_after(x)
        return x.transpose(0, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return getattr(self, CLASSIFIER_NAME)(self.dropout(self.encode(tokens)))


def build_lora_model(backbone: Backbone, lora: LoraSettings | None = None, num_labels: int = 2, seed: int = 0):
    """Freeze the backbone, add the head, wrap with PEFT LoRA. Returns a `peft.PeftModel`."""
    from peft import get_peft_model

    lora = lora or LoraSettings()
    for p in backbone.model.parameters():
        p.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # same initial head and LoRA A at every site
        model = EsmTokenClassifier(backbone.model, num_labels=num_labels)
        peft_model = get_peft_model(model, lora.to_peft())
    peft_model.fedesm_backbone = backbone  # for saving the model card
    peft_model.fedesm_lora = lora
    return peft_model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, trainable), counting PEFT's frozen copy of the head once."""
    total = trainable = 0
    for name, p in model.named_parameters():
        if ".original_module." in name:
            continue
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return total, trainable


def parameter_report(arch_name: str, lora: LoraSettings, num_labels: int = 2) -> dict:
    """Parameter counts on the meta device: nothing is downloaded or allocated."""
    arch = get_architecture(arch_name)
    esm2, alphabet = new_esm2(arch, device="meta")
    backbone = Backbone(esm2, alphabet, f"random:{arch_name}", arch)
    with torch.device("meta"):
        model = build_lora_model(backbone, lora, num_labels)
    total, trainable = count_parameters(model)
    n_matrices = len(lora.targets) * arch.layers
    return {
        "arch": arch_name,
        "layers": arch.layers,
        "embed_dim": arch.embed_dim,
        "lora_r": lora.r,
        "lora_targets": list(lora.targets),
        "total": total,
        "trainable": trainable,
        "lora": n_matrices * lora.r * 2 * arch.embed_dim,
        "head": arch.embed_dim * num_labels + num_labels,
        "trainable_fraction": trainable / total,
    }


# ---------------------------------------------------------------------------------------------
# The exchanged state: LoRA factors + head, keyed by PEFT's own state-dict names
# ---------------------------------------------------------------------------------------------


def get_exchanged_state(model) -> dict[str, torch.Tensor]:
    """The tensors that travel between site and server: LoRA A/B and the head, nothing else."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}


def set_exchanged_state(model, state: dict[str, torch.Tensor]) -> None:
    """Load global adapters + head into the in-memory PEFT model; refuses unknown or missing names."""
    from peft import set_peft_model_state_dict

    expected = get_exchanged_state(model)
    missing = set(expected) - set(state)
    unknown = set(state) - set(expected)
    if missing or unknown:
        raise FedesmError(
            f"adapter state does not match the model: {len(missing)} missing (e.g. {sorted(missing)[:2]}), "
            f"{len(unknown)} unknown (e.g. {sorted(unknown)[:2]})"
        )
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise FedesmError(f"adapter tensor {k}: shape {tuple(v.shape)} != model's {tuple(expected[k].shape)}")
    result = set_peft_model_state_dict(model, {k: torch.as_tensor(v) for k, v in state.items()})
    if getattr(result, "unexpected_keys", None):
        raise FedesmError(f"PEFT did not accept adapter keys: {result.unexpected_keys[:3]}")


_LORA_KEY = re.compile(r"^(?P<prefix>.+)\.lora_(?P<which>[AB])\.weight$")


def split_lora_key(key: str):
    """('...q_proj', 'A') for a LoRA factor key, else None."""
    m = _LORA_KEY.match(key)
    return (m.group("prefix"), m.group("which")) if m else None


# ---------------------------------------------------------------------------------------------
# Saving, loading, export
# ---------------------------------------------------------------------------------------------


@dataclass
class ModelCard:
    """What is needed to rebuild a trained model: backbone source, LoRA settings, head, threshold."""

    backbone: str
    arch: dict
    lora: dict
    num_labels: int = 2
    threshold: float = 0.5
    max_len: int = 1000
    extra: dict = field(default_factory=dict)


def save_adapters(model, out_dir, threshold: float = 0.5, max_len: int = 1000, extra: Optional[dict] = None) -> Path:
    """Save a PEFT model's adapters + head in PEFT's standard layout with a fedesm model card."""
    backbone: Backbone = model.fedesm_backbone
    num_labels = getattr(model.base_model.model, CLASSIFIER_NAME).out_features
    card = ModelCard(backbone=backbone.source, arch=asdict(backbone.arch), lora=_lora_dict(model.fedesm_lora),
                     num_labels=num_labels, threshold=threshold, max_len=max_len, extra=extra or {})
    return save_adapter_state(get_exchanged_state(model), model.fedesm_lora, card, out_dir)


def _lora_dict(lora: LoraSettings) -> dict:
    return {**asdict(lora), "targets": list(lora.targets)}


def save_adapter_state(state: dict, lora: LoraSettings, card: ModelCard, out_dir) -> Path:
    """PEFT's layout (adapter_config.json, adapter_model.safetensors with the head inside) + fedesm_model.json.

    Takes a plain state dict, so the server can save global adapters without building a model.
    Written to a temporary folder and renamed: a failure never leaves a half-written model.
    """
    from safetensors.torch import save_file

    with atomic_dir(out_dir) as tmp:
        tensors = {k: torch.as_tensor(v).detach().cpu().contiguous() for k, v in state.items()}
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        lora.to_peft().save_pretrained(str(tmp))
        (tmp / MODEL_CARD).write_text(json.dumps(asdict(card), indent=2))
    return Path(out_dir)


def lora_from_dict(d: dict) -> LoraSettings:
    return LoraSettings(**d)


def initial_exchanged_state(arch: EsmArchitecture, lora: LoraSettings, num_labels: int = 2,
                            seed: int = 0) -> dict[str, torch.Tensor]:
    """The round-0 global adapters + head, without building (or allocating) the backbone.

    Names and shapes come from a PEFT model on the meta device; values follow PEFT's and torch's
    default inits (LoRA A Kaiming-uniform, B zero; head as nn.Linear), seeded.
    """
    esm2, alphabet = new_esm2(arch, device="meta")
    with torch.device("meta"):
        model = build_lora_model(Backbone(esm2, alphabet, "meta", arch), lora, num_labels)
    shapes = {k: tuple(v.shape) for k, v in get_exchanged_state_meta(model).items()}
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in sorted(shapes.items()):
        fan_in = shape[1] if len(shape) == 2 else arch.embed_dim
        bound = 1 / math.sqrt(fan_in)  # = kaiming_uniform(a=sqrt(5)) bound, as nn.Linear and PEFT use
        if key.endswith("lora_B.weight"):
            state[key] = torch.zeros(shape)
        else:
            state[key] = (torch.rand(shape, generator=g) * 2 - 1) * bound
    return state


def get_exchanged_state_meta(model) -> dict:
    from peft import get_peft_model_state_dict

    return dict(get_peft_model_state_dict(model))


def read_model_card(model_dir) -> ModelCard:
    path = Path(model_dir) / MODEL_CARD
    if not path.is_file():
        raise FedesmError(f"{model_dir}: not a fedesm model folder (no {MODEL_CARD})")
    return ModelCard(**json.loads(path.read_text()))


def load_trained_model(model_dir, backbone_source: Optional[str] = None, **backbone_kwargs):
    """Rebuild backbone + LoRA + head from a folder written by `save_adapters` (or a job result).

    `backbone_source` overrides the card's (e.g. a site's local copy of the same checkpoint).
    """
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    card = read_model_card(model_dir)
    backbone = load_backbone(backbone_source or card.backbone, **backbone_kwargs)
    lora = lora_from_dict(card.lora)
    model = build_lora_model(backbone, lora, num_labels=card.num_labels)
    weights = model_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise FedesmError(f"{model_dir}: adapter_model.safetensors is missing")
    set_exchanged_state(model, load_file(str(weights)))
    model.eval()
    return model, card


def export_merged(model, out_path, threshold: float = 0.5, max_len: int = 1000) -> Path:
    """Merge LoRA into the backbone and write a plain fair-esm checkpoint with the head inside.

    The result loads with fair-esm (extra keys are ignored) and with `fedesm predict --model FILE`.
    """
    import copy

    merged = copy.deepcopy(model).merge_and_unload()
    head = getattr(merged, CLASSIFIER_NAME)
    extra = {
        "fedesm_classifier": {k: v.detach().cpu().clone() for k, v in head.state_dict().items()},
        "fedesm_card": {"num_labels": head.out_features, "threshold": threshold, "max_len": max_len},
    }
    return save_esm2_checkpoint(merged.esm, out_path, extra=extra)


def load_exported(path):
    """A merged checkpoint written by `export_merged`: (plain EsmTokenClassifier, alphabet, card dict)."""
    data = _torch_load_checkpoint(path)
    if "fedesm_classifier" not in data:
        raise FedesmError(f"{path}: not a fedesm export (no classifier weights inside)")
    esm2, alphabet = _build_from_checkpoint_data(Path(path).stem, data, str(path))
    model = EsmTokenClassifier(esm2, num_labels=data["fedesm_card"]["num_labels"])
    getattr(model, CLASSIFIER_NAME).load_state_dict(data["fedesm_classifier"])
    model.eval()
    return model, alphabet, {"threshold": 0.5, "max_len": 1000, **data["fedesm_card"]}
