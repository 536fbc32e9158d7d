"""PEFT LoRA on the ESM-2 token classifier, and the exchanged state: the tensors that travel.

The exchanged state is PEFT's own adapter state dict: the LoRA A/B factors of every adapted module
and the head (`modules_to_save`), nothing of the frozen backbone. The server builds the round-0
state from the architecture alone (`initial_exchanged_state`), with no backbone weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from fedesm.errors import FedesmError
from fedesm.architectures import EsmArchitecture, get_architecture, new_esm2
from fedesm.model.backbone import Backbone
from fedesm.model.esm2 import EsmTokenClassifier
from fedesm.keys import is_lora_b
from fedesm.settings import LoraSettings


def build_lora_model(backbone: Backbone, lora: LoraSettings | None = None, num_labels: int = 2, seed: int = 0,
                     attention: str | None = None, head_dropout: float | None = None):
    """Freeze the backbone, add the head, wrap with PEFT LoRA. Returns a `peft.PeftModel`.

    ``attention``, ``head_dropout``: ``model.attention``, ``model.head_dropout`` (None: the setting's default).
    """
    from peft import get_peft_model

    lora = lora or LoraSettings()
    lora.check_fits(getattr(backbone, "source", "the backbone"), int(backbone.model.embed_dim))
    for p in backbone.model.parameters():
        p.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # same initial head and LoRA A at every site
        model = EsmTokenClassifier(backbone.model, num_labels=num_labels, attention=attention,
                                   head_dropout=head_dropout)
        return get_peft_model(model, lora.to_peft())


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


def _meta_model(arch: EsmArchitecture, lora: LoraSettings, num_labels: int):
    esm2, alphabet = new_esm2(arch, device="meta")
    with torch.device("meta"):
        return build_lora_model(Backbone(esm2, alphabet, "meta", arch), lora, num_labels)


def parameter_report(arch_name: str, lora: LoraSettings, num_labels: int = 2) -> dict:
    """Parameter counts on the meta device: nothing is downloaded or allocated."""
    arch = get_architecture(arch_name)
    total, trainable = count_parameters(_meta_model(arch, lora, num_labels))
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


def exchanged_shapes(arch: EsmArchitecture, lora: LoraSettings, num_labels: int = 2) -> dict[str, tuple]:
    """Name -> shape of every exchanged tensor (LoRA A/B + head), from the architecture alone (meta device)."""
    from peft import get_peft_model_state_dict

    return {k: tuple(v.shape) for k, v in get_peft_model_state_dict(_meta_model(arch, lora, num_labels)).items()}


def initial_exchanged_state(arch: EsmArchitecture, lora: LoraSettings, num_labels: int = 2,
                            seed: int = 0) -> dict[str, torch.Tensor]:
    """The round-0 global adapters + head, without building (or allocating) the backbone.

    Names and shapes come from a PEFT model on the meta device; values follow PEFT's and torch's
    default inits (LoRA A Kaiming-uniform, B zero; head as nn.Linear), seeded.
    """
    shapes = exchanged_shapes(arch, lora, num_labels)
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in sorted(shapes.items()):
        fan_in = shape[1] if len(shape) == 2 else arch.embed_dim
        bound = 1 / math.sqrt(fan_in)  # = kaiming_uniform(a=sqrt(5)) bound, as nn.Linear and PEFT use
        if is_lora_b(key):
            state[key] = torch.zeros(shape)
        else:
            state[key] = (torch.rand(shape, generator=g) * 2 - 1) * bound
    return state
