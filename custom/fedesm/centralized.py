"""The centralized run: the same trainer on pooled data, R rounds of N steps, evaluated after each round."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from fedesm.data.records import Record
from fedesm.evaluation.metrics import METRIC_NAMES
from fedesm.evaluation.scoring import score_trainer
from fedesm.model.adapters import build_lora_model
from fedesm.model.backbone import identity as backbone_identity, load_backbone
from fedesm.model.cards import ModelCard, save_adapters
from fedesm.settings import JobSettings
from fedesm.tables import TableLog
from fedesm.training.trainer import LocalTrainer

log = logging.getLogger(__name__)


class _RoundLog:
    """The run's rows, one a round: `metrics.jsonl`/`metrics.csv` and, optionally, TensorBoard events in `tb/`."""

    def __init__(self, out: Path, arm: str, tensorboard: bool):
        self.arm, self.rows, self.started = arm, [], time.perf_counter()
        self.table = TableLog(out / "metrics.jsonl")
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out / "tb"))

    def add(self, round_num: int, metrics: dict, stats=None) -> dict:
        row = {"arm": self.arm, "site": self.arm, "round": round_num, **metrics}
        if stats is not None:
            row.update(train_loss=stats.loss, steps=stats.steps, samples=stats.samples,
                       train_seconds=stats.seconds, residues_per_second=stats.residues_per_second, lr=stats.lr)
        row["elapsed_seconds"] = time.perf_counter() - self.started
        self.table.append(row)
        self.rows.append(row)
        if self.writer is not None:
            for k in (*METRIC_NAMES, "threshold_tuned", "train_loss"):
                if row.get(k) is not None:
                    self.writer.add_scalar(f"{self.arm}/{k}", row[k], round_num)
            self.writer.flush()
        return row

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def run_centralized(settings: JobSettings, train: Sequence[Record], val: Sequence[Record], out_dir,
                    arm: str = "centralized", progress: bool = True, tensorboard: bool = True,
                    initial_state: Optional[dict] = None) -> list[dict]:
    """Train for `training.rounds` rounds of `training.steps_per_round` steps; evaluate on `val` after each.

    `settings`: the job's model, LoRA and training blocks, as a federated site reads them (the federation
    block plays no part). `initial_state` (adapters + head, e.g. a federated job's round-0 state) replaces
    PEFT's own init, so a centralized run can start from exactly the model the federated arms start from.

    Writes `metrics.jsonl`/`metrics.csv` (round 0 = before training), TensorBoard events under `tb/`,
    and the `best/` (by validation AUPRC) and `last/` adapters in PEFT's layout; their model cards carry
    the threshold that maximised F1 on `val`, which `fedesm predict` then calls with.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    m, lora, config = settings.model, settings.lora, settings.training
    backbone = load_backbone(m.backbone_source)
    backbone_id = backbone_identity(backbone)  # before LoRA wraps it: the card says which weights it was trained on
    model = build_lora_model(backbone, lora, num_labels=m.num_labels, seed=config.seed, attention=m.attention,
                             head_dropout=m.head_dropout)
    trainer = LocalTrainer(model, backbone.alphabet, train, config)
    if initial_state is not None:
        trainer.load_global(initial_state)
    rounds, best = _RoundLog(out, arm, tensorboard), -1.0

    def score(round_num: int) -> dict:
        if progress:  # the validation pass can take minutes on a CPU: say so before it starts
            print(f"round {round_num}/{config.rounds}: evaluating on {len(val)} validation chains "
                  f"({sum(len(r) for r in val):,} residues) ...", file=sys.stderr, flush=True)
        return score_trainer(trainer, val)

    def card(row: dict, round_num: int) -> ModelCard:
        return ModelCard.describe(backbone.source, backbone.arch, lora, num_labels=m.num_labels,
                                  threshold=row["threshold_tuned"], max_len=config.max_len,
                                  backbone_identity=backbone_id,
                                  extra={"round": round_num, "val_auprc": row["auprc"], "val_f1": row["f1"],
                                         "threshold_source": "maximises F1 on the validation data"})

    rounds.add(0, score(0))
    for r in range(1, config.rounds + 1):
        stats = trainer.train_steps(config.steps_per_round, progress=progress, desc=f"round {r}/{config.rounds}")
        row = rounds.add(r, score(r), stats)
        log.info("round %d/%d  loss %.4f  AUROC %.3f  AUPRC %.3f  acc %.3f  prec %.3f  rec %.3f  F1 %.3f", r,
                 config.rounds, stats.loss, row["auroc"], row["auprc"], row["accuracy"], row["precision"],
                 row["recall"], row["f1"])
        value = row["auprc"] if row["auprc"] == row["auprc"] else row["f1"]  # NaN when val has one class
        if value > best:
            best = value
            save_adapters(model, card(row, r), out / "best")
    save_adapters(model, card(rounds.rows[-1], config.rounds), out / "last")
    rounds.close()
    return rounds.rows
