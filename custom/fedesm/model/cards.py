"""Saved models: adapters + head in PEFT's standard layout, with a fedesm model card beside them.

A model folder holds `adapter_config.json`, `adapter_model.safetensors` (the head inside) and
`fedesm_model.json`: what is needed to rebuild the model (backbone source, architecture, LoRA
settings, head size), which backbone it was trained on (`backbone_identity`: architecture, source, sha256 of
its weights; `fedesm.model.backbone.identity`) and how to use it (the call threshold, the window length). `fedesm train`, the
server's persistor and `fedesm predict` all read and write it here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

from fedesm.errors import FedesmError
from fedesm.fileio import atomic_dir
from fedesm.model.adapters import build_lora_model, get_exchanged_state, set_exchanged_state
from fedesm.architectures import EsmArchitecture
from fedesm.model.backbone import load_backbone
from fedesm.settings import LoraSettings

MODEL_CARD = "fedesm_model.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


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
    backbone_identity: dict = field(default_factory=dict)  # arch, source, sha256 (and seed for random:ARCH)

    @classmethod
    def describe(cls, backbone: str, arch: EsmArchitecture, lora: LoraSettings, num_labels: int = 2,
                 threshold: float = 0.5, max_len: int = 1000, extra: Optional[dict] = None,
                 backbone_identity: Optional[dict] = None) -> "ModelCard":
        from fedesm.model.backbone import recorded_source

        return cls(backbone=recorded_source(backbone), arch=asdict(arch), lora=lora.to_dict(), num_labels=num_labels,
                   threshold=threshold, max_len=max_len, extra=dict(extra or {}),
                   backbone_identity=dict(backbone_identity or {}))

    @property
    def lora_settings(self) -> LoraSettings:
        return LoraSettings.from_dict(self.lora, where=MODEL_CARD)


def save_adapter_state(state: dict, card: ModelCard, out_dir) -> Path:
    """PEFT's layout (adapter_config.json, adapter_model.safetensors with the head inside) + fedesm_model.json.

    Takes a plain state dict, so the server can save global adapters without building a model.
    Written to a temporary folder and renamed: a failure never leaves a half-written model.
    """
    with atomic_dir(out_dir) as tmp:
        write_adapter_files(state, card, tmp)
    return Path(out_dir)


def write_adapter_files(state: dict, card: ModelCard, folder) -> None:
    """The three files of a model folder, written into `folder` as it is (a caller's temporary folder)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tensors = {k: torch.as_tensor(v).detach().cpu().contiguous() for k, v in state.items()}
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    card.lora_settings.to_peft().save_pretrained(str(folder))
    (folder / MODEL_CARD).write_text(json.dumps(asdict(card), indent=2))


def save_adapters(model, card: ModelCard, out_dir) -> Path:
    """A PEFT model's adapters + head (see `save_adapter_state`)."""
    return save_adapter_state(get_exchanged_state(model), card, out_dir)


def read_model_card(model_dir) -> ModelCard:
    path = Path(model_dir) / MODEL_CARD
    if not path.is_file():
        raise FedesmError(f"{model_dir}: not a fedesm model folder (no {MODEL_CARD})")
    return ModelCard(**json.loads(path.read_text()))


def read_adapter_state(model_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    weights = Path(model_dir) / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise FedesmError(f"{model_dir}: {ADAPTER_WEIGHTS} is missing")
    return load_file(str(weights))


def load_trained_model(model_dir, backbone_source: Optional[str] = None, **backbone_kwargs):
    """(PEFT model in eval mode, alphabet, card) from a folder written by `save_adapters` (or a job result).

    `backbone_source` overrides the card's (e.g. a site's local copy of the same checkpoint).
    """
    card = read_model_card(model_dir)
    backbone = load_recorded_backbone(card, model_dir, backbone_source, **backbone_kwargs)
    model = build_lora_model(backbone, card.lora_settings, num_labels=card.num_labels)
    set_exchanged_state(model, read_adapter_state(model_dir))
    model.eval()
    return model, backbone.alphabet, card


def load_recorded_backbone(card: ModelCard, model_dir, backbone_source: Optional[str] = None, **backbone_kwargs):
    """The backbone the card records (a relative path taken from the card's folder), or `backbone_source`;
    FedesmError in one line when it is not the one the model was trained on (architecture or weights digest)."""
    from fedesm.model.backbone import identity as backbone_identity

    recorded = card.backbone_identity or {}
    source = backbone_source or card.backbone
    if not backbone_source:
        beside = Path(model_dir) / card.backbone
        if not Path(card.backbone).expanduser().is_absolute() and beside.exists():
            source = str(beside)
    want = recorded.get("sha256")
    named = f"{recorded.get('source', card.backbone)} (sha256 {want[:12]})" if want else card.backbone
    try:
        backbone = load_backbone(source, **backbone_kwargs)
    except FedesmError as e:
        if backbone_source:
            raise
        raise FedesmError(f"{e}; this model was trained on backbone {named}: point --backbone at a copy "
                          "of it") from None
    if want:
        got = backbone_identity(backbone)
        if got["sha256"] != want:
            raise FedesmError(f"backbone {source} (sha256 {got['sha256'][:12]}, {got['arch']}) is not the one this "
                              f"model was trained on: {named}, {recorded.get('arch', '?')}; point --backbone at "
                              "that checkpoint")
    return backbone


def find_model_dir(path) -> Path:
    """A model folder itself, or the one inside a job result / training output (best/ preferred)."""
    path = Path(path)
    if (path / MODEL_CARD).exists():
        return path
    for candidate in sorted(path.rglob(MODEL_CARD), key=lambda p: ("best" not in str(p), len(str(p)))):
        return candidate.parent
    raise FedesmError(f"{path}: no trained model found (no {MODEL_CARD} inside)")
