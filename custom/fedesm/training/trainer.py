"""The local trainer: rounds of N optimizer steps on batches drawn at random from local data.

The same code trains every federated site (`fedesm.site_run.SiteRun` calls `train_round` once per round,
and `seek` when a resumed job's first round is not round 0) and the centralized run (`fedesm.centralized`).
The model and optimizer live in the trainer for its whole life, so a site keeps its optimizer state between
rounds. Nothing outside `fedesm.training` writes its attributes: what a caller may change has a method here.
"""

from __future__ import annotations

import hashlib
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from fedesm.data.batching import IGNORE_INDEX, RandomBatchSampler, Tokenizer
from fedesm.data.records import Record
from fedesm.model.esm2 import set_activation_checkpointing
from fedesm.keys import is_lora_a
from fedesm.settings import TrainConfig
from fedesm.training.gradients import make_gradients
from fedesm.training.inference import autocast_dtype, predict_proba, resolve_device
from fedesm.training.losses import class_weights, token_losses
from fedesm.training.optimizer_state import align_state, reset_lora_moments


@dataclass
class RoundStats:
    steps: int
    samples: int
    residues: int
    loss: float
    seconds: float
    aborted: bool = False
    lr: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def residues_per_second(self) -> float:
        return self.residues / self.seconds if self.seconds else 0.0


def site_seed(seed: int, site: str) -> int:
    """A site's own seed, derived from the job's seed and the site's name: reproducible for the job, and
    different at every site (independent batches, crops and dropout)."""
    digest = hashlib.sha256(f"{int(seed)}/{site}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def lr_factor(cfg: TrainConfig, total: int, warmup: int) -> Callable[[int], float]:
    """Linear warm-up to 1, then cosine / linear decay to `min_lr_ratio` (or constant) over `total` steps."""
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        decay = 1.0 - progress if cfg.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay

    return f


class LocalTrainer:
    """Owns the model on its device, the optimizer, the schedule and the random batch sampler.

    `noise` is where privacy noise comes from (`fedesm.training.privacy.randomness`); default a fresh
    secret source, so noise never follows `config.seed` (which keeps batches, crops and dropout)."""

    def __init__(self, model, alphabet, train_records: Sequence[Record], config: TrainConfig, noise=None):
        if not train_records:
            raise ValueError("no training records")
        self.config = config
        self.device = resolve_device(config.device)
        self.model = model.to(self.device)
        set_activation_checkpointing(self.model, config.activation_checkpointing)
        self.tokenizer = Tokenizer(alphabet)
        self.autocast_dtype = autocast_dtype(self.device, config.precision)
        if config.freeze_lora_a:
            for name, p in self.model.named_parameters():
                if is_lora_a(name):
                    p.requires_grad_(False)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        total = max(1, config.steps_per_round * config.rounds)
        warmup = config.warmup_steps if config.warmup_steps is not None else min(500, int(0.05 * total))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(config, total, warmup))
        weights = class_weights(config.class_weights, train_records)
        self.loss_weight = None if weights is None else torch.tensor(weights, dtype=torch.float32, device=self.device)
        self.gradients = make_gradients(config, self.model, self.params, len(train_records), noise)
        bucket = self.device.type == "cuda" if config.bucket is None else config.bucket
        self.sampler = self.gradients.batches(RandomBatchSampler(
            train_records, self.tokenizer, config.batch_size, config.max_len, seed=config.seed, bucket=bucket))
        self.global_step = 0  # position in the learning-rate schedule
        self.steps_taken = 0  # optimizer steps this trainer has taken (its moments' history)
        torch.manual_seed(config.seed)  # dropout masks: same seed, same run

    def token_losses(self, tokens: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token weighted losses and weights of the model's output on a batch (see `losses.token_losses`)."""
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            logits = self.model(tokens)
        return token_losses(logits, labels, self.loss_weight, self.config.focal_gamma)

    @property
    def lr(self) -> float:
        """The learning rate the next step takes (the schedule's current position)."""
        return self.scheduler.get_last_lr()[0]

    @property
    def dp_steps(self) -> int:
        """Steps the DP-SGD accountant has counted (a resume's earlier rounds included); 0 without DP-SGD."""
        return self.gradients.accounted_steps()

    def seek(self, step: int) -> None:
        """Put the schedule at `step` (a resumed job's first round starts there, not at warm-up) and have the
        privacy mechanism count the steps before it as spent (`GradientMechanism.seek`). The optimizer's
        moments are not touched: they start afresh."""
        with warnings.catch_warnings():  # torch warns when the scheduler moves before the optimizer's first step
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.last_epoch = step - 1
            self.scheduler.step()
        self.global_step = step
        self.gradients.seek(step)

    def train_round(self, should_abort: Optional[Callable[[], bool]] = None) -> RoundStats:
        """One round: `steps_per_round` optimizer steps, stopped early (between steps) by `should_abort()`."""
        return self.train_steps(self.config.steps_per_round, should_abort=should_abort)

    def train_steps(self, n_steps: int, should_abort: Optional[Callable[[], bool]] = None,
                    progress: bool = False, desc: str = "train") -> RoundStats:
        """Run `n_steps` optimizer steps; stops early (between steps) when `should_abort()` is true."""
        self.model.train()
        t0 = time.perf_counter()
        losses, samples, residues, done, aborted = [], 0, 0, 0, False
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=n_steps, desc=desc, leave=False, dynamic_ncols=True)
        for _ in range(n_steps):
            if should_abort is not None and should_abort():
                aborted = True
                break
            tokens, labels = self.sampler.next_batch()
            tokens = tokens.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.gradients.backward(self.token_losses, tokens, labels)
            self.optimizer.step()
            self.scheduler.step()
            self.global_step += 1
            self.steps_taken += 1
            done += 1
            losses.append(loss.item())
            samples += tokens.shape[0]
            residues += int((labels != IGNORE_INDEX).sum())
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        if bar is not None:
            bar.close()
        return RoundStats(steps=done, samples=samples, residues=residues,
                          loss=float(np.nanmean(losses)) if losses else float("nan"),
                          seconds=time.perf_counter() - t0, aborted=aborted,
                          lr=self.lr, extra=self.gradients.spent())

    def load_global(self, state: dict, policy: str = "keep") -> dict:
        """Load global adapters + head into the model, handling the optimizer state by `policy`
        (`fedesm.training.optimizer_state`: keep | reset | align, already resolved from auto). Before the
        first local step there is nothing to keep or align: the global state is loaded as it is.
        Returns what was done, for the site's log and metrics."""
        from fedesm.model.adapters import get_exchanged_state, set_exchanged_state

        info = {"policy": policy if self.steps_taken else "initial"}
        if self.steps_taken and policy == "align":
            state, aligned, pairs = align_state(get_exchanged_state(self.model), state)
            info.update(aligned_pairs=aligned, lora_pairs=pairs)
        set_exchanged_state(self.model, state)
        if self.steps_taken and policy == "reset":
            info["reset_parameters"] = reset_lora_moments(self.model, self.optimizer)
        return info

    def predict_proba(self, sequences: Sequence[str]) -> list[np.ndarray]:
        return predict_proba(self.model, self.tokenizer, sequences, self.config.max_len, self.device,
                             self.config.eval_batch_tokens, self.autocast_dtype)
