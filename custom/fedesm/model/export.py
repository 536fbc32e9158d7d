"""A trained model with LoRA merged into the backbone, as a plain fair-esm checkpoint with the head inside."""

from __future__ import annotations

import copy
from pathlib import Path

from fedesm.errors import FedesmError
from fedesm.model.checkpoint import build_from_checkpoint, read_checkpoint, save_esm2_checkpoint
from fedesm.model.esm2 import EsmTokenClassifier


def export_merged(model, out_path, threshold: float = 0.5, max_len: int = 1000) -> Path:
    """Merge LoRA into the backbone and write a plain fair-esm checkpoint with the head inside.

    The result loads with fair-esm (extra keys are ignored) and with `fedesm predict --model FILE`.
    """
    merged = copy.deepcopy(model).merge_and_unload()
    head = merged.head
    extra = {
        "fedesm_classifier": {k: v.detach().cpu().clone() for k, v in head.state_dict().items()},
        "fedesm_card": {"num_labels": head.out_features, "threshold": threshold, "max_len": max_len},
    }
    return save_esm2_checkpoint(merged.esm, out_path, extra=extra)


def load_exported(path):
    """A merged checkpoint written by `export_merged`: (plain EsmTokenClassifier, alphabet, card dict)."""
    data = read_checkpoint(path)
    if "fedesm_classifier" not in data:
        raise FedesmError(f"{path}: not a fedesm export (no classifier weights inside)")
    esm2, alphabet = build_from_checkpoint(Path(path).stem, data, str(path))
    model = EsmTokenClassifier(esm2, num_labels=data["fedesm_card"]["num_labels"])
    model.head.load_state_dict(data["fedesm_classifier"])
    model.eval()
    return model, alphabet, {"threshold": 0.5, "max_len": 1000, **data["fedesm_card"]}
