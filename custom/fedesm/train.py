"""The local trainer: rounds of N optimizer steps on batches drawn at random from local data.

The same code trains every federated site (the NVFLARE executor calls `train_steps` once per round)
and the centralized baseline (`fedesm.centralized`). The model and optimizer live in the trainer
for its whole life, so a site keeps its optimizer state between rounds.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from fedesm.data.batching import ESM2_MAX_RESIDUES, IGNORE_INDEX, RandomBatchSampler, Tokenizer, eval_batches
from fedesm.data.records import Record
from fedesm.metrics import binary_metrics
from fedesm.privacy import GradientNoise

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Local training settings; plain values so they travel in job configs and CLI flags."""

    steps_per_round: int = 100
    rounds: int = 1  # with steps_per_round, sets the length of the learning-rate schedule
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: Optional[int] = None  # default: 5% of all steps, at most 500
    schedule: str = "cosine"  # cosine | linear | constant (after warm-up)
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    # "balanced" (default): w_c = 0.5 / (local share of class c), so both classes weigh the same in the loss;
    # binding residues are 3-16% of real sets, and plain CE (None) learns slower and calls nothing at 0.5
    # (docs/results/cpu: test AUROC 0.715 balanced vs 0.658 plain vs 0.654 focal, same steps). Or [w0, w1].
    class_weights: Optional[list] = "balanced"
    focal_gamma: float = 0.0  # > 0: focal loss (1 - p_t)^gamma * CE, which down-weights easy negatives
    max_len: int = 1000
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    bucket: Optional[bool] = None  # length-bucketed batches; default on CUDA
    grad_noise_std: float = 0.0  # the paper's DP mode: Gaussian noise on every gradient, every step
    eval_batch_tokens: int = 16384
    threshold: float = 0.5
    freeze_lora_a: bool = False  # FFA-LoRA: only B trains
    dp_noise_multiplier: float = 0.0  # > 0: formal DP-SGD (fedesm.dp): Poisson batches, per-sample clipping, noise
    dp_max_grad_norm: float = 1.0  # DP-SGD per-sample clipping bound C
    dp_delta: float = 1e-5  # delta for the epsilon reported each round

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown training settings: {sorted(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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


def _lr_lambda(cfg: TrainConfig, total: int, warmup: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if cfg.schedule == "linear":
            decay = 1.0 - progress
        elif cfg.schedule == "cosine":
            decay = 0.5 * (1 + math.cos(math.pi * progress))
        else:
            raise ValueError(f"unknown schedule {cfg.schedule!r} (cosine, linear, constant)")
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay

    return f


class LocalTrainer:
    """Owns the model on its device, the optimizer, the schedule and the random batch sampler."""

    def __init__(self, model, alphabet, train_records: Sequence[Record], config: TrainConfig,
                 privacy: Optional[object] = None):
        check_max_len(config.max_len)
        self.config = config
        self.device = resolve_device(config.device)
        self.model = model.to(self.device)
        self.tokenizer = Tokenizer(alphabet)
        use_cuda = self.device.type == "cuda"
        self.autocast_dtype = None
        if config.precision == "bf16" or (config.precision == "auto" and use_cuda):
            self.autocast_dtype = torch.bfloat16
        bucket = use_cuda if config.bucket is None else config.bucket
        self.sampler = RandomBatchSampler(train_records, self.tokenizer, config.batch_size, config.max_len,
                                          seed=config.seed, bucket=bucket)
        if config.freeze_lora_a:
            for name, p in self.model.named_parameters():
                if ".lora_A." in name:
                    p.requires_grad_(False)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        total = max(1, config.steps_per_round * config.rounds)
        warmup = config.warmup_steps if config.warmup_steps is not None else min(500, int(0.05 * total))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(config, total, warmup))
        self.loss_weight = self._class_weights(train_records)
        self.privacy = privacy if privacy is not None else (
            GradientNoise(config.grad_noise_std, seed=config.seed) if config.grad_noise_std > 0 else None)
        if config.dp_noise_multiplier > 0:  # DP-SGD replaces the sampler and computes its own gradients
            from fedesm.dp import DPSGD

            self.privacy = DPSGD.attach(self, train_records)
        self.global_step = 0
        torch.manual_seed(config.seed)  # dropout masks: same seed, same run

    def _class_weights(self, records) -> Optional[torch.Tensor]:
        cw = self.config.class_weights
        if cw is None:
            return None
        if cw == "balanced":
            pos = sum(r.n_positive for r in records) / max(1, sum(len(r) for r in records))
            pos = min(max(pos, 1e-3), 1 - 1e-3)
            cw = [0.5 / (1 - pos), 0.5 / pos]
        return torch.tensor(cw, dtype=torch.float32, device=self.device)

    def loss(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            logits = self.model(tokens)
        losses, weights = token_losses(logits, labels, self.loss_weight, self.config.focal_gamma)
        return losses.sum() / weights.sum().clamp(min=1e-12)

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
            if getattr(self.privacy, "per_sample", False):  # DP-SGD: clipped per-sample grads + noise
                loss = self.privacy.backward(self, tokens, labels)
            else:
                loss = self.loss(tokens, labels)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if self.config.grad_clip:
                    torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
            if self.privacy is not None:
                self.privacy.apply(self.params)
            self.optimizer.step()
            self.scheduler.step()
            self.global_step += 1
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
                          lr=self.scheduler.get_last_lr()[0],
                          extra=self.privacy.spent() if hasattr(self.privacy, "spent") else {})

    def predict_proba(self, sequences: Sequence[str]) -> list[np.ndarray]:
        return predict_proba(self.model, self.tokenizer, sequences, self.config.max_len, self.device,
                             self.config.eval_batch_tokens, self.autocast_dtype)

    def evaluate(self, records: Sequence[Record], threshold: Optional[float] = None) -> dict:
        probs = self.predict_proba([r.sequence for r in records])
        return evaluate_probabilities(records, probs, self.config.threshold if threshold is None else threshold)


def token_losses(logits: torch.Tensor, labels: torch.Tensor, class_weight: Optional[torch.Tensor] = None,
                 focal_gamma: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (weighted) losses and the weights they carry, both (B, T); padding/specials weigh 0.

    Cross-entropy, class-weighted when `class_weight` is set, times (1 - p_t)^gamma when `focal_gamma`
    > 0 (focal loss). The batch loss is losses.sum() / weights.sum(): with gamma 0 exactly PyTorch's
    weighted-mean cross-entropy.
    """
    valid = labels != IGNORE_INDEX
    safe = labels.clamp(min=0)
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    loss = -logp
    if focal_gamma:
        loss = loss * (1 - logp.exp()).pow(focal_gamma)
    weights = class_weight[safe] * valid if class_weight is not None else valid.float()
    return loss * weights, weights


def evaluate_with_test(trainer: "LocalTrainer", val: Sequence[Record], test: Optional[Sequence[Record]] = None) -> dict:
    """`fedesm.evaluation.score` for a model in memory: validation metrics, and test metrics when `test` is given."""
    from fedesm.evaluation import score

    probs = lambda recs: trainer.predict_proba([r.sequence for r in recs]) if recs else []  # noqa: E731
    return score(val, probs(val), test, probs(test) if test else None)


def evaluate_probabilities(records: Sequence[Record], probs: Sequence[np.ndarray], threshold: float = 0.5) -> dict:
    labels = np.concatenate([r.labels for r in records]) if records else np.zeros(0)
    p = np.concatenate(probs) if probs else np.zeros(0)
    return binary_metrics(labels, p, threshold)


@torch.no_grad()
def predict_proba(model, tokenizer: Tokenizer, sequences: Sequence[str], max_len: int, device=None,
                  batch_tokens: int = 16384, autocast_dtype=None) -> list[np.ndarray]:
    """Per-residue probability of the positive class; long sequences averaged over overlapping windows."""
    check_max_len(max_len)
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = [np.full(len(s), np.nan, dtype=np.float64) for s in sequences]
    for windows, tokens in eval_batches(list(sequences), tokenizer, max_len, batch_tokens):
        with torch.autocast(torch.device(device).type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(tokens.to(device))
        prob = torch.softmax(logits.float(), dim=-1)[..., 1].cpu().numpy()
        for row, w in enumerate(windows):  # token 0 is <cls>: residue j of the window is token j + 1
            out[w.record][w.keep_start : w.keep_end] = prob[row, 1 + w.keep_start - w.start : 1 + w.keep_end - w.start]
    if was_training:
        model.train()
    return out


def check_max_len(max_len: int) -> None:
    if not 1 <= int(max_len) <= ESM2_MAX_RESIDUES:
        raise ValueError(f"max_len {max_len}: ESM-2 takes 1 to {ESM2_MAX_RESIDUES} residues per window "
                         f"(longer chains are cropped in training and tiled in evaluation)")
