"""Every setting of a fedesm run, defined once: its one name, its default, its check and its help.

Four blocks, each a frozen dataclass that travels as a plain dict (``to_dict`` / ``from_dict``):

  model       which ESM-2: the architecture, and the backbone source used when a site names none
  lora        the adapters: rank ``r``, ``alpha``, ``dropout``, ``targets``
  training    one site's (or a centralized run's) local training: rounds of N steps, optimizer, loss, privacy
  federation  how sites and server combine: strategy, weighting, minimum sites, transfer dtype, best model

and two blocks that are the *site's* and never travel in a job:

  site_policy what a site (or the server) lets a job do beyond NVFLARE's own policy; it lives in the
              participant's ``local/resources.json`` (``fedesm.launch.policy`` writes it)
  privacy     the site's own DP rules for its data (minimum noise, largest clipping bound, epsilon
              budget, secret or debug noise); the ``privacy:`` block of its site config
              (``fedesm.site_config``)

The experiment YAML, the CLI flags (``add_arguments`` / ``from_arguments``), ``fedesm job export
--set`` and the NVFLARE components (a job's configs carry the four blocks, see
``fedesm.launch.jobs``) all go through these classes, so a setting has the same name from the YAML
to the aggregator and is checked where it is read: a bad value is one ``FedesmError`` line naming
the block and the field. Adding a setting = one field here (+ its check), its test, and the code
that uses it.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import math
import re
import typing
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Mapping, Optional, Sequence

import yaml

from fedesm.errors import FedesmError
from fedesm.strategies import STRATEGIES, STRATEGY

WEIGH_BY = ("uniform", "declared")
SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("auto", "fp32", "bf16")
TRANSFER_DTYPES = ("float32", "float16")
BEST_METRICS = ("auprc", "auroc", "f1", "mcc")
OPTIMIZER_STATES = ("auto", "keep", "reset", "align")
VERSION_MISMATCH = ("refuse", "warn")
ATTENTIONS = ("packed", "fused", "stock")


class SettingError(FedesmError):
    """A bad setting: says which block and field, and what is allowed."""


# One rule for numbers, whatever the way in: a float is finite unless its field says otherwise
# (`nonfinite=True`), and an integer lies in [-MAX_INT, MAX_INT] or in its field's own tighter
# `maximum` (a count or size beyond what the machine can address makes no run, only a hang or a crash).
MAX_INT = 2**31 - 1
MAX_BATCH_SIZE = 65_536  # sequences per step: 65,536 x 1,022 tokens is already beyond any accelerator
MAX_EVAL_BATCH_TOKENS = 2**26
MAX_NUM_LABELS = 1024
MAX_SEED = 2**32 - 1  # numpy's and every seeded generator's range
# The Linear modules of an ESM-2 layer that LoRA can adapt; each has embed_dim as its smaller side
# (q/k/v/out: E x E, fc1: E -> 4E, fc2: 4E -> E), so a rank above embed_dim adds nothing but cost.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def setting(default: Any, help: str, *, choices: Sequence[str] | None = None, flag: bool = True,
            aliases: Sequence[str] = (), metavar: str | None = None, maximum: int | None = None,
            nonfinite: bool = False):
    """A dataclass field with what the CLI and the checks need: help text, allowed values, flag aliases,
    an integer's largest value (`maximum`, default MAX_INT) and whether a float may be inf or NaN."""
    return field(default=default, metadata={"help": help, "choices": tuple(choices) if choices else None,
                                            "flag": flag, "aliases": tuple(aliases), "metavar": metavar,
                                            "maximum": maximum, "nonfinite": nonfinite})


# ---------------------------------------------------------------------------------------------
# Parsing values: one rule for YAML, JSON, `--set` and CLI flags
# ---------------------------------------------------------------------------------------------


def parse_value(text: str) -> Any:
    """A value written on a command line (`--set K=V`, a flag): YAML scalars and lists, else the text itself."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_assignment(item: str, flag: str = "--set") -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], parsed value)."""
    if "=" not in item:
        raise FedesmError(f"{flag} {item!r}: expected KEY=VALUE")
    key, value = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise FedesmError(f"{flag} {item!r}: empty key")
    return parts, parse_value(value)


def apply_overrides(raw: dict, items: Sequence[str], flag: str = "--set") -> dict:
    """A copy of `raw` with each `a.b.c=value` set; a list of mappings with `id` is indexed by id
    (`experiments.exp1_iid.training.steps_per_round=5`)."""
    raw = copy.deepcopy(raw)
    for item in items or []:
        parts, value = parse_assignment(item, flag)
        node = raw
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                match = [x for x in node if isinstance(x, dict) and x.get("id") == part]
                if not match:
                    raise FedesmError(f"{flag} {item!r}: no entry with id {part!r} under {'.'.join(parts[:i]) or 'top'}")
                node = match[0]
            elif isinstance(node, dict):
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
            else:
                raise FedesmError(f"{flag} {item!r}: {'.'.join(parts[:i])} is not a mapping")
        if not isinstance(node, dict):
            raise FedesmError(f"{flag} {item!r}: {'.'.join(parts[:-1])} is not a mapping")
        node[parts[-1]] = value
    return raw


def _coerce(kind: Any, value: Any, where: str, meta: Mapping | None = None) -> Any:
    """`value` as the annotated type `kind` (int, float, bool, str, Optional[...], tuple[str, ...]), within
    the one rule for numbers (finite floats, integers up to the field's `maximum` or MAX_INT)."""
    meta = meta or {}
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is typing.Union:  # Optional[X]
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where, meta)
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise SettingError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(args[0] if args else str, v, where) for v in value)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.strip().lower() in ("true", "yes", "on", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise SettingError(f"{where}: expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool):
            raise SettingError(f"{where}: expected an integer, got {value!r}")
        try:
            if isinstance(value, float) and value.is_integer():
                number = int(value)
            else:
                number = int(value) if isinstance(value, (int, str)) else _fail()
        except (TypeError, ValueError, OverflowError):
            raise SettingError(f"{where}: expected an integer, got {_short(value)}") from None
        highest = meta.get("maximum") or MAX_INT
        if number > highest:
            raise SettingError(f"{where}: must be at most {highest:,}, got {_short(number)}")
        if number < -MAX_INT:
            raise SettingError(f"{where}: must be at least {-MAX_INT:,}, got {_short(number)}")
        return number
    if kind is float:
        if isinstance(value, bool):
            raise SettingError(f"{where}: expected a number, got {value!r}")
        try:
            number = float(value) if isinstance(value, (int, float, str)) else _fail()
        except (TypeError, ValueError, OverflowError):
            raise SettingError(f"{where}: expected a number, got {_short(value)}") from None
        if not math.isfinite(number) and not meta.get("nonfinite"):
            raise SettingError(f"{where}: must be a finite number, got {_short(value)}")
        return number
    if kind is str:
        if not isinstance(value, str):
            raise SettingError(f"{where}: expected text, got {_short(value)}")
        if "\x00" in value or "\n" in value or "\r" in value:
            raise SettingError(f"{where}: must be one line of text without NUL, got {_short(value)}")
        return value
    return value  # Any: the field's own check normalises it


def _fail():
    raise ValueError


def _short(value: Any, limit: int = 60) -> str:
    """`value`'s repr cut to one short line (an error names the value, not a 20-digit integer in full)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Settings:
    """What every block shares: typed and checked on construction, plain dicts in and out."""

    BLOCK: ClassVar[str] = ""

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            where = f"{self.BLOCK}.{f.name}"
            value = _coerce(hints[f.name], getattr(self, f.name), where, f.metadata)
            choices = f.metadata.get("choices")
            if choices and value not in choices:
                raise SettingError(f"{where}: {value!r} is not one of {', '.join(choices)}")
            object.__setattr__(self, f.name, value)
        self.check()

    def check(self) -> None:
        """Checks across fields, or beyond a type; raise SettingError (via `self.fail`)."""

    def fail(self, name: str, message: str):
        raise SettingError(f"{self.BLOCK}.{name}: {message}")

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, d: Mapping | None, where: str | None = None):
        """The block from a mapping (YAML, JSON, a job config); missing keys take their defaults."""
        if isinstance(d, cls):
            return d
        prefix = f"{where}: " if where else ""
        if d is not None and not isinstance(d, Mapping):
            raise SettingError(f"{prefix}{cls.BLOCK}: expected a mapping of settings, got {_short(d)}")
        d = dict(d or {})
        unknown = [k for k in d if k not in cls.names()]
        if unknown:
            hint = difflib.get_close_matches(str(unknown[0]), cls.names(), n=1)
            raise SettingError(f"{prefix}unknown {cls.BLOCK} setting {unknown[0]!r}"
                               + (f" (did you mean {hint[0]!r}?)" if hint else "")
                               + f"; valid: {', '.join(cls.names())}")
        try:
            return cls(**d)
        except SettingError as e:
            raise SettingError(f"{where}: {e}" if where else str(e)) from None

    def to_dict(self) -> dict:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------------------------
# The blocks
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSettings(Settings):
    BLOCK: ClassVar[str] = "model"

    arch: str = setting("esm2_t12_35M_UR50D", "ESM-2 architecture: fixes adapter names and shapes")
    backbone: Optional[str] = setting(
        None, "ESM-2 weights: fair-esm hub name, local .pt, a Hugging Face folder or hf:ID, s3:// URI or "
        "random:ARCH; recorded in saved model cards; in a federated job a site's own config wins "
        "(default: the hub checkpoint of arch)")
    num_labels: int = setting(2, "classes of the per-residue head", maximum=MAX_NUM_LABELS)
    attention: str = setting("packed", "self-attention path: packed (padding dropped, only real tokens computed, "
                             "attention per sequence: varlen flash on CUDA), fused (padded batch through PyTorch "
                             "scaled_dot_product_attention) or stock (fair-esm's explicit softmax over every head's "
                             "L x L weights); same weights and outputs", choices=ATTENTIONS)
    head_dropout: float = setting(0.1, "dropout on the last layer's representations before the per-residue head "
                                  "(training only), in [0, 1)")

    def check(self) -> None:
        from fedesm.architectures import ARCHITECTURES

        if self.arch not in ARCHITECTURES:
            self.fail("arch", f"unknown ESM-2 architecture {self.arch!r}; choose one of {', '.join(ARCHITECTURES)}")
        if self.num_labels < 2:
            self.fail("num_labels", f"need at least 2 classes, got {self.num_labels}")
        if not 0 <= self.head_dropout < 1:
            self.fail("head_dropout", f"must be in [0, 1), got {self.head_dropout:g}")

    @property
    def backbone_source(self) -> str:
        return self.backbone or self.arch


@dataclass(frozen=True)
class LoraSettings(Settings):
    """LoRA hyper-parameters; the defaults are the paper's (r=16 on q, k, v)."""

    BLOCK: ClassVar[str] = "lora"

    r: int = setting(16, "LoRA rank (at most the model's embedding width, the smaller side of every adapted "
                     "matrix)")
    alpha: float = setting(32, "LoRA alpha; the update is scaled by alpha / r")
    dropout: float = setting(0.05, "dropout on the LoRA input")
    targets: tuple[str, ...] = setting(("q_proj", "k_proj", "v_proj"), "modules to adapt (comma-separated on "
                                       "the command line)", metavar="NAMES")

    def check(self) -> None:
        if self.r < 1:
            self.fail("r", f"the LoRA rank must be a positive integer, got {self.r}")
        from fedesm.architectures import ARCHITECTURES

        widest = max(a.embed_dim for a in ARCHITECTURES.values())
        if self.r > widest:
            self.fail("r", f"the LoRA rank must be at most the adapted matrices' smaller side (the embedding width, "
                      f"{widest} in the widest ESM-2), got {self.r:,}")
        if not self.alpha > 0:
            self.fail("alpha", f"must be > 0, got {self.alpha:g}")
        if not 0 <= self.dropout < 1:
            self.fail("dropout", f"must be in [0, 1), got {self.dropout:g}")
        if not self.targets:
            self.fail("targets", "name at least one module to adapt (e.g. q_proj,k_proj,v_proj)")
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown:
            self.fail("targets", f"{unknown[0]!r} names no module of an ESM-2 layer; choose from {', '.join(LORA_TARGETS)}")
        if len(set(self.targets)) != len(self.targets):
            self.fail("targets", f"names a module twice: {','.join(self.targets)}")

    def check_fits(self, arch_name: str, embed_dim: int) -> None:
        """The rank fits the model: at most the smaller side of every adapted matrix (its embedding width)."""
        if self.r > embed_dim:
            self.fail("r", f"the LoRA rank must be at most {embed_dim}, the adapted matrices' smaller side in "
                      f"{arch_name}, got {self.r:,}")

    def to_peft(self):
        from peft import LoraConfig

        from fedesm.keys import CLASSIFIER_NAME

        alpha = int(self.alpha) if float(self.alpha).is_integer() else self.alpha
        return LoraConfig(r=self.r, lora_alpha=alpha, lora_dropout=self.dropout, target_modules=list(self.targets),
                          modules_to_save=[CLASSIFIER_NAME], bias="none")


CLASS_WEIGHT_MODES = ("balanced", "sqrt")


def parse_class_weights(value) -> Any:
    """'balanced' | 'sqrt' | None (plain cross-entropy; also 'none') | [w0, w1] (also 'w0,w1')."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
        return None
    if isinstance(value, str) and value.strip() in CLASS_WEIGHT_MODES:
        return value.strip()
    if isinstance(value, str):
        try:
            value = [float(x) for x in value.split(",")]
        except ValueError:
            raise SettingError(f"training.class_weights: {value!r} is not balanced, sqrt, none or 'w0,w1'") from None
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0 for x in value):
        try:
            weights = [float(x) for x in value]
        except OverflowError:
            weights = [math.inf]
        if all(math.isfinite(w) for w in weights) and any(w > 0 for w in weights):
            return weights
        raise SettingError(f"training.class_weights: two finite weights w0,w1 >= 0, not both 0, got {_short(value)}")
    raise SettingError(f"training.class_weights: {value!r} is not balanced, sqrt, none or two weights w0,w1 >= 0")


@dataclass(frozen=True)
class TrainConfig(Settings):
    """Local training: rounds of N optimizer steps on batches drawn at random from the local data."""

    BLOCK: ClassVar[str] = "training"

    rounds: int = setting(3, "rounds R; with steps_per_round it fixes the learning-rate schedule (a federated "
                          "job runs this many rounds)")
    steps_per_round: int = setting(100, "optimizer steps N per round, each on a batch drawn at random")
    batch_size: int = setting(8, "sequences per step", maximum=MAX_BATCH_SIZE)
    lr: float = setting(1e-3, "peak AdamW learning rate")
    weight_decay: float = setting(0.01, "AdamW weight decay")
    warmup_steps: Optional[int] = setting(None, "linear warm-up steps (default: 5% of all steps, at most 500)")
    schedule: str = setting("cosine", "decay after warm-up", choices=SCHEDULES)
    min_lr_ratio: float = setting(0.1, "the schedule's final learning rate, relative to lr")
    grad_clip: float = setting(1.0, "gradient-norm clip; 0 disables")
    # "balanced": w_c = 0.5 / (local share of class c), so both classes weigh the same in the loss;
    # sqrt: chosen on held-out VALIDATION AUPRC over 3 seeds on GPSite ATP (3.9%), PRO (15.6%) and a synthetic
    # 1.5% set (scripts/class_weight_study.py, docs/results/loss): mean rank sqrt 1.67, plain 2.00, balanced 2.33.
    # The differences are within the seed spread on ATP and PRO; at 1.5% balanced (~65x) over-corrects
    # (val AUPRC 0.32 vs 0.57 sqrt, 0.60 plain), while plain CE calls nothing at 0.5 on ATP.
    class_weights: Any = setting("sqrt", "loss class weights from the training data's positive rate: balanced "
                                 "(both classes weigh the same), sqrt (tempered: the square root of the balanced "
                                 "ratio), none (plain cross-entropy), or w0,w1; under DP-SGD only none or w0,w1 (no "
                                 "use of the private data outside the accounting)", metavar="MODE")
    focal_gamma: float = setting(0.0, "focal loss (1-p_t)^gamma x CE, e.g. 2; 0 = off")
    max_len: int = setting(1000, "context in residues: longer chains are random-cropped in training, tiled in "
                           "evaluation (ESM-2 takes at most 1,022)")
    seed: int = setting(0, "seed of the initial adapters, batch sampling, crops and dropout (never of privacy "
                        "noise, which is secret: fedesm.training.privacy.randomness)", maximum=MAX_SEED)
    device: str = setting("auto", "auto (CUDA when present), cpu, cuda, cuda:N; in a federated job a site's own "
                          "config wins")
    precision: str = setting("auto", "auto = bf16 autocast on CUDA, fp32 on CPU", choices=PRECISIONS)
    bucket: Optional[bool] = setting(None, "length-bucketed batches (default: on CUDA)", flag=False)
    eval_batch_tokens: int = setting(16384, "tokens per evaluation batch", flag=False, maximum=MAX_EVAL_BATCH_TOKENS)
    threshold: float = setting(0.5, "call threshold for metrics at a fixed threshold", flag=False)
    freeze_lora_a: bool = setting(False, "train only LoRA B (FFA-LoRA; the ffa strategy needs it)")
    activation_checkpointing: bool = setting(False, "recompute each encoder layer's activations in the backward "
                                             "pass instead of keeping them: less memory for the large models "
                                             "(150M and up) at the cost of about one more forward per step")
    grad_noise_std: float = setting(0.0, "the paper's DP mode: Gaussian noise of this std on every gradient, "
                                    "every step (paper: 1e-4), drawn from OS entropy", aliases=("--grad-noise",))
    dp_noise_multiplier: float = setting(0.0, "> 0: formal DP-SGD (Poisson batches, per-sample clipping, "
                                         "Gaussian noise sigma*C; noise and sampling from OS entropy)")
    dp_max_grad_norm: float = setting(1.0, "DP-SGD per-sample clipping bound C")
    dp_delta: float = setting(1e-5, "delta of the (epsilon, delta) reported each round")
    dp_report_prv: bool = setting(False, "DP-SGD: also report epsilon_prv, Opacus' PRV accountant's (tighter) "
                                  "epsilon for the same steps, beside the RDP epsilon that budgets use; "
                                  "seconds a round at 1e5 steps and more")

    def __post_init__(self):
        object.__setattr__(self, "class_weights", parse_class_weights(self.class_weights))
        super().__post_init__()

    def check(self) -> None:
        for name in ("rounds", "steps_per_round", "batch_size", "eval_batch_tokens"):
            if getattr(self, name) < 1:
                self.fail(name, f"must be a positive integer, got {getattr(self, name)}")
        from fedesm.data.batching import ESM2_MAX_RESIDUES

        if not 1 <= self.max_len <= ESM2_MAX_RESIDUES:
            self.fail("max_len", f"ESM-2 takes 1 to {ESM2_MAX_RESIDUES} residues per window, got {self.max_len} "
                      "(longer chains are cropped in training and tiled in evaluation)")
        if not self.lr > 0:
            self.fail("lr", f"the learning rate must be > 0, got {self.lr:g}")
        for name in ("weight_decay", "grad_clip", "focal_gamma", "grad_noise_std", "dp_noise_multiplier"):
            if getattr(self, name) < 0:
                self.fail(name, f"must be >= 0, got {getattr(self, name):g}")
        if self.seed < 0:
            self.fail("seed", f"must be >= 0, got {self.seed}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            self.fail("warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            self.fail("min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio:g}")
        if not 0 < self.threshold < 1:
            self.fail("threshold", f"must be in (0, 1), got {self.threshold:g}")
        for name in ("dp_noise_multiplier", "dp_max_grad_norm", "dp_delta"):  # nan and inf pass < and >
            if not math.isfinite(getattr(self, name)):
                self.fail(name, f"must be a finite number, got {getattr(self, name)}")
        if self.dp_max_grad_norm <= 0:
            self.fail("dp_max_grad_norm", "the DP-SGD clipping bound C must be > 0")
        if not 0 < self.dp_delta < 1:
            self.fail("dp_delta", f"must be in (0, 1), got {self.dp_delta:g}")
        if self.activation_checkpointing and self.dp_noise_multiplier:
            self.fail("activation_checkpointing", "DP-SGD's per-sample gradients need each layer to run once per "
                      "step; turn one of activation_checkpointing and dp_noise_multiplier off")
        if self.grad_noise_std and self.dp_noise_multiplier:
            self.fail("dp_noise_multiplier", "choose one privacy mode: grad_noise_std (paper) or "
                      "dp_noise_multiplier (DP-SGD)")
        if not (self.device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d{1,4}", self.device)):
            self.fail("device", f"{self.device!r} is not auto, cpu, cuda or cuda:N")
        if self.dp_noise_multiplier and isinstance(self.class_weights, str):
            self.fail("class_weights", f"{self.class_weights} is computed from the private training set, which "
                      "DP-SGD does not account for: under DP set fixed weights w0,w1 or none")

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["class_weights"] = list(self.class_weights) if isinstance(self.class_weights, list) else self.class_weights
        return d


@dataclass(frozen=True)
class FederationSettings(Settings):
    """How the sites' contributions are combined, and what the server keeps."""

    BLOCK: ClassVar[str] = "federation"

    strategy: str = setting("fra", "aggregation: fra (FRA-LoRA), fra-ef (with error feedback), fedit (average A "
                            "and B), ffa (A frozen, B averaged)", choices=STRATEGIES)
    min_clients: int = setting(2, "sites needed for a round (and to start the job)")
    # No site weighs itself by a number it reports about itself: every site runs the job's steps_per_round, so
    # uniform is "equal at equal steps" (the paper); declared takes the count each site's operator declares in
    # its own site config (declared_samples), fixed with its first contribution and capped by max_weight_share.
    weigh_by: str = setting("uniform", "site weights in the average: uniform (equal: every site runs the job's "
                            "steps_per_round), or declared (the training count each site's operator declares in "
                            "its site config, fixed for the job, no share above max_weight_share)", choices=WEIGH_BY)
    max_weight_share: float = setting(0.5, "weigh_by declared: the largest share of the average one site can get, "
                                      "whatever count it declares (the excess goes to the others)")
    transfer_dtype: str = setting("float32", "dtype of the adapters a site sends (float16 halves the bytes)",
                                  choices=TRANSFER_DTYPES)
    evaluate_global: bool = setting(True, "sites also score the received global model on their val (and test) "
                                    "split every round")
    evaluate_global_test: bool = setting(True, "with evaluate_global, the test split too (off where the job scores "
                                         "each round's global model on the test split itself, as the demo does)")
    optimizer_state: str = setting("auto", "what a site does with its optimizer state for the LoRA factors when "
                                   "global adapters arrive: keep, reset (zero moments and step count), align (the "
                                   "global product in the factorization closest to the site's own factors); auto = "
                                   "align for fra / fra-ef, keep for fedit / ffa", choices=OPTIMIZER_STATES)
    server_lr: float = setting(1.0, "the server's step along the round's averaged update, G + server_lr * (average - "
                               "G) (FedOpt's server SGD; 1 = the plain average)")
    best_metric: str = setting("auprc", "global-model validation metric (mean over sites) that picks best/",
                               choices=BEST_METRICS)
    max_residual_rank: Optional[int] = setting(None, "fra-ef: cap on the rank of the kept residual (default K*r)")
    keep_rounds: bool = setting(True, "the server keeps every round's global adapters (rounds/round_NNN)")
    train_timeout: int = setting(0, "seconds the server waits for a site's round (0 = no limit)")
    # NVFLARE counts a failed or withheld reply as a response: without a grace period a site that sends nothing
    # (its epsilon budget spent, its filter refusing) would end the round before the others deliver.
    wait_after_min_clients: int = setting(3600, "once min_clients sites have answered a round (sent a contribution, "
                                          "failed or withheld one), seconds the server still waits for the others; "
                                          "the round ends as soon as every live site has answered (NVFLARE's "
                                          "wait_time_after_min_received)")
    # 10x: honest sites doing the same N steps at the same learning rate stayed within 2.2x of the other sites'
    # median (synthetic iid/dirichlet/skew and GPSite ATP skew/dirichlet splits, 3 rounds; the 2.1x was a site of
    # 9 chains beside two of 170); scaled or sign-flipped updates sit at 1e4-1e5x (tests/integration).
    max_update_ratio: float = setting(10.0, "reject a site's update whose norm (the change of B.A over the adapted "
                                      "matrices, plus the head's change) is more than this multiple of the median "
                                      "of the other sites' in the round (0 = off)")
    # 1x: a site cannot pull harder than a typical site (norm bounding); a scaled or sign-flipped update below
    # max_update_ratio moves the average by at most about 2/K of a typical update. Needs two other sites.
    clip_update_ratio: float = setting(1.0, "scale a site's update down to this multiple of the median norm of the "
                                       "other sites' updates when it is larger (with at least two other sites; 0 "
                                       "= off)")
    max_update_norm: Optional[float] = setting(None, "reject a site's update whose norm exceeds this absolute cap "
                                               "(same units as max_update_ratio's norm; default: no cap)")
    resume_from: Optional[str] = setting(None, "continue a previous run from a saved round: its "
                                         "fedesm/rounds/round_NNN (or fedesm/last) folder, a path or s3:// URI "
                                         "on the server; the job runs rounds NNN+1 .. training.rounds",
                                         metavar="PATH")
    secure_aggregation: bool = setting(False, "the server learns only the sum of the sites' updates (pairwise masks, "
                                       "keys signed by each site's kit; fra and fra-ef through a two-pass sketch, "
                                       "fedit and ffa as one masked sum); "
                                       "needs max_update_ratio and clip_update_ratio 0 (the server cannot see one "
                                       "site's update), weigh_by uniform and min_clients >= 2; each site signs its "
                                       "keys with its kit (site config kit_dir)")
    secure_pass_timeout: int = setting(600, "secure_aggregation: seconds the server waits for a site's masked message "
                                       "of a pass; a site lost between the passes makes the round run again "
                                       "with the others")
    mlflow: bool = setting(False, "the server also streams the per-round metrics to MLflow (one run per site, the "
                           "same tags and steps as TensorBoard); needs the mlflow package on the server")
    mlflow_tracking_uri: Optional[str] = setting(
        None, "MLflow tracking server (http://host:5000, sqlite:///path.db, file:/path) when mlflow is on, for the "
        "simulator; default: the server's MLFLOW_TRACKING_URI environment variable, else mlflow.db in the job's "
        "result folder (a provisioned participant refuses a job that sets it: fedesm.flare.job_check)",
        metavar="URI")
    mlflow_experiment: str = setting("fedesm", "MLflow experiment the runs are logged under")

    def __post_init__(self):
        if self.weigh_by in ("samples", "steps"):
            raise SettingError(f"federation.weigh_by: {self.weigh_by!r} took a count each site reports about itself; "
                               "use uniform (every site runs training.steps_per_round) or declared (the count each "
                               "site's operator declares in its site config, capped by federation.max_weight_share)")
        super().__post_init__()

    def check(self) -> None:
        if self.mlflow_tracking_uri and not self.mlflow:
            self.fail("mlflow_tracking_uri", "is set but federation.mlflow is off; set federation.mlflow: true to "
                      "stream metrics to it")
        if not self.mlflow_experiment.strip():
            self.fail("mlflow_experiment", "needs a name")
        if self.min_clients < 1:
            self.fail("min_clients", f"need at least one site, got {self.min_clients}")
        if self.max_residual_rank is not None and self.max_residual_rank < 1:
            self.fail("max_residual_rank", f"must be a positive integer, got {self.max_residual_rank}")
        if self.secure_pass_timeout < 1:
            self.fail("secure_pass_timeout", f"must be >= 1 second, got {self.secure_pass_timeout}")
        if self.train_timeout < 0:
            self.fail("train_timeout", f"must be >= 0, got {self.train_timeout}")
        if self.wait_after_min_clients < 0:
            self.fail("wait_after_min_clients", f"must be >= 0, got {self.wait_after_min_clients}")
        if not self.server_lr > 0:
            self.fail("server_lr", f"must be > 0, got {self.server_lr:g}")
        if self.max_update_ratio != 0 and not self.max_update_ratio > 1:
            self.fail("max_update_ratio", f"must be > 1 (a multiple of the other sites' median) or 0 (off), "
                      f"got {self.max_update_ratio:g}")
        if not (math.isfinite(self.max_weight_share) and 0 < self.max_weight_share <= 1):
            self.fail("max_weight_share", f"must be in (0, 1], got {self.max_weight_share:g}")
        if not (math.isfinite(self.clip_update_ratio) and (self.clip_update_ratio == 0 or self.clip_update_ratio >= 1)):
            self.fail("clip_update_ratio", f"must be >= 1 (a multiple of the other sites' median) or 0 (off), "
                      f"got {self.clip_update_ratio:g}")
        if not math.isfinite(self.max_update_ratio):
            self.fail("max_update_ratio", f"must be finite, got {self.max_update_ratio:g}")
        if self.max_update_norm is not None and not self.max_update_norm > 0:
            self.fail("max_update_norm", f"must be > 0, got {self.max_update_norm:g}")
        if self.resume_from is not None:
            self._check_resume_from()
        if self.secure_aggregation:
            self._check_secure_aggregation()

    def _check_secure_aggregation(self) -> None:
        if not STRATEGY[self.strategy].secure:
            self.fail("secure_aggregation", f"has no path for strategy {self.strategy}; use "
                      f"{' or '.join(n for n, how in STRATEGY.items() if how.secure)}")
        screens = [f"{k} {getattr(self, k):g}" for k in ("max_update_ratio", "clip_update_ratio") if getattr(self, k)]
        screens += [f"max_update_norm {self.max_update_norm:g}"] if self.max_update_norm is not None else []
        if screens:
            self.fail("secure_aggregation", f"hides each site's update from the server, which therefore cannot "
                      f"bound it ({', '.join(screens)}); set them to 0 (max_update_norm: null) and bound updates at "
                      "the sites (DP-SGD clipping)")
        if self.weigh_by != "uniform":
            self.fail("secure_aggregation", f"masks and weights must agree at every site before the round: it weighs "
                      f"by uniform only (weigh_by {self.weigh_by} would make each site's weight the server's word)")
        if self.min_clients < 2:
            self.fail("secure_aggregation", f"needs min_clients >= 2 (a sum of one site is that site's update), got "
                      f"{self.min_clients}")

    def _check_resume_from(self) -> None:
        text = self.resume_from.strip()  # blank, none or null already mean "not resuming"
        object.__setattr__(self, "resume_from", text)
        if text[:5].lower() == "s3://":
            from fedesm.storage import parse_s3_uri

            try:
                parse_s3_uri(text.rstrip("/"))
            except FedesmError as e:
                self.fail("resume_from", str(e))


@dataclass(frozen=True)
class SiteGuardSettings(Settings):
    """A participant's own rules for the jobs it is sent (its local/resources.json, never the job's)."""

    BLOCK: ClassVar[str] = "site_policy"

    version_mismatch: str = setting(
        "refuse", "a job exported by another fedesm version than the one installed here: refuse it (one line in "
        "the job's deploy detail, nothing runs) or warn in the log and run it", choices=VERSION_MISMATCH)


@dataclass(frozen=True)
class SitePrivacySettings(Settings):
    """A site's own privacy rules for its data (the `privacy:` block of its site config, never the job's).

    The site enforces them whatever the job asks (`fedesm.training.privacy.policy`): a job asking
    for less privacy is refused, and the site stops contributing before a round that would take it
    past its epsilon budget. Privacy noise is secret (OS entropy) unless `debug_noise_seed` is set.
    """

    BLOCK: ClassVar[str] = "privacy"

    require_dp: bool = setting(False, "refuse jobs that do not train with DP-SGD (training.dp_noise_multiplier > 0); "
                               "the paper's gradient noise alone gives no guarantee", flag=False)
    min_noise_multiplier: float = setting(0.0, "refuse jobs whose DP-SGD noise multiplier is below this (> 0 also "
                                          "means DP-SGD is required)", flag=False)
    max_grad_norm: Optional[float] = setting(None, "refuse DP-SGD jobs whose clipping bound C "
                                             "(training.dp_max_grad_norm) is above this", flag=False)
    target_epsilon: Optional[float] = setting(None, "this site's epsilon budget for one job: it stops contributing "
                                              "before a round that would exceed it (needs DP-SGD)", flag=False)
    target_delta: float = setting(1e-5, "delta of this site's (epsilon, delta): epsilon is accounted at the "
                                  "smaller of this and the job's training.dp_delta", flag=False)
    debug_noise_seed: Optional[int] = setting(None, "DEBUGGING ONLY: draw privacy noise from this seed (and the "
                                              "site's name) instead of OS entropy, so runs repeat exactly; whoever "
                                              "knows it can remove the noise (logged, and noise_reproducible = 1 "
                                              "in the metrics)", flag=False, maximum=MAX_SEED)

    def check(self) -> None:
        for name in ("min_noise_multiplier", "max_grad_norm", "target_epsilon", "target_delta"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):  # nan and inf pass < and >
                self.fail(name, f"must be a finite number, got {value}")
        if self.debug_noise_seed is not None and self.debug_noise_seed < 0:
            self.fail("debug_noise_seed", f"must be >= 0, got {self.debug_noise_seed}")
        if self.min_noise_multiplier < 0:
            self.fail("min_noise_multiplier", f"must be >= 0, got {self.min_noise_multiplier:g}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            self.fail("max_grad_norm", f"the largest clipping bound must be > 0, got {self.max_grad_norm:g}")
        if self.target_epsilon is not None and not self.target_epsilon > 0:
            self.fail("target_epsilon", f"the epsilon budget must be > 0, got {self.target_epsilon:g}")
        if not 0 < self.target_delta < 1:
            self.fail("target_delta", f"must be in (0, 1), got {self.target_delta:g}")

    @property
    def dp_required(self) -> bool:
        """Whether this site trains only with DP-SGD (asked outright, by a minimum noise or by a budget)."""
        return self.require_dp or self.min_noise_multiplier > 0 or self.target_epsilon is not None


@dataclass(frozen=True)
class JobSettings:
    """The four blocks of a federated job, checked together (what a job's config files carry)."""

    model: ModelSettings = field(default_factory=ModelSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    training: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationSettings = field(default_factory=FederationSettings)

    BLOCKS: ClassVar[dict] = {"model": ModelSettings, "lora": LoraSettings, "training": TrainConfig,
                              "federation": FederationSettings}

    def __post_init__(self):
        from fedesm.architectures import ARCHITECTURES

        self.lora.check_fits(self.model.arch, ARCHITECTURES[self.model.arch].embed_dim)
        if STRATEGY[self.federation.strategy].freezes_a and not self.training.freeze_lora_a:
            raise SettingError(f"federation.strategy {self.federation.strategy} trains only LoRA B: "
                               "set training.freeze_lora_a: true")

    @classmethod
    def from_dict(cls, d: Mapping | None, where: str | None = None) -> "JobSettings":
        d = dict(d or {})
        unknown = set(d) - set(cls.BLOCKS)
        if unknown:
            raise SettingError(f"{where + ': ' if where else ''}unknown block(s) {sorted(unknown)}; "
                               f"valid: {', '.join(cls.BLOCKS)}")
        return cls(**{name: kind.from_dict(d.get(name), where) for name, kind in cls.BLOCKS.items()})

    def to_dict(self) -> dict:
        return {name: getattr(self, name).to_dict() for name in self.BLOCKS}

    def replace(self, **blocks) -> "JobSettings":
        return dataclasses.replace(self, **blocks)

    @classmethod
    def resolve_key(cls, key: str) -> tuple[str, str]:
        """'training.lr' or a bare field name that only one block has ('lr', 'strategy') -> (block, field)."""
        parts = key.split(".")
        if len(parts) == 2 and parts[0] in cls.BLOCKS:
            if parts[1] not in cls.BLOCKS[parts[0]].names():
                hint = difflib.get_close_matches(parts[1], cls.BLOCKS[parts[0]].names(), n=1)
                raise SettingError(f"unknown {parts[0]} setting {parts[1]!r}"
                                   + (f" (did you mean {parts[0]}.{hint[0]}?)" if hint else "")
                                   + f"; valid: {', '.join(cls.BLOCKS[parts[0]].names())}")
            return parts[0], parts[1]
        if len(parts) == 1:
            owners = [b for b, kind in cls.BLOCKS.items() if key in kind.names()]
            if len(owners) == 1:
                return owners[0], key
            if len(owners) > 1:
                raise SettingError(f"{key!r} is in several blocks; write one of "
                                   + ", ".join(f"{b}.{key}" for b in owners))
        every = [f"{b}.{n}" for b, kind in cls.BLOCKS.items() for n in kind.names()]
        hint = difflib.get_close_matches(key, every + [e.split('.')[1] for e in every], n=1)
        raise SettingError(f"unknown job setting {key!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                           + "; write BLOCK.FIELD with a block of " + ", ".join(cls.BLOCKS))

    def with_overrides(self, overrides: Mapping[str, Any] | Sequence[str] | None) -> "JobSettings":
        """Apply `{'training.lr': 0.002, 'strategy': 'fra-ef'}` or ['training.lr=0.002', ...]."""
        if not overrides:
            return self
        if not isinstance(overrides, Mapping):
            pairs = [parse_assignment(item) for item in overrides]
            overrides = {".".join(parts): value for parts, value in pairs}
        d = self.to_dict()
        for key, value in overrides.items():
            block, name = self.resolve_key(key)
            d[block][name] = value
        return JobSettings.from_dict(d)


# ---------------------------------------------------------------------------------------------
# Command-line flags generated from the blocks
# ---------------------------------------------------------------------------------------------


def _flag(prefix: str, name: str) -> str:
    return f"--{prefix}{name.replace('_', '-')}"


def add_arguments(parser: argparse.ArgumentParser, cls, prefix: str = "", skip: Sequence[str] = (),
                  title: str | None = None, defaults: Optional[Settings] = None, only: Sequence[str] = (),
                  defaults_from: Mapping[str, str] | None = None) -> None:
    """One flag per field of `cls` (`--steps-per-round`, with `prefix` `--lora-r`), help and default from here.

    Flags default to None (= not given), so `from_arguments` keeps the block's own defaults (or `defaults`'),
    which the help shows. `only`: just these fields (also those no subcommand shows unasked, flag=False).
    `defaults_from`: {field: where a flag not given takes its value instead, e.g. "the model card's"}.
    Each flag's action carries `setting` = (cls, field), so a test can hold every flag to its field.
    """
    group = parser.add_argument_group(title or cls.BLOCK)
    base = defaults or cls()
    hints = typing.get_type_hints(cls)
    elsewhere = defaults_from or {}
    for f in fields(cls):
        if (f.name not in only) if only else (f.name in skip or not f.metadata.get("flag", True)):
            continue
        default = getattr(base, f.name)
        shown = ",".join(default) if isinstance(default, tuple) else default
        help_text = f.metadata["help"]
        if f.name in elsewhere:  # replaces the default a None field's help names at its end
            help_text = re.sub(r" \(default: [^()]*\)$", "", help_text) + f" (default: {elsewhere[f.name]})"
        elif default is not None:  # a None default is explained in the help itself
            help_text += f" (default {shown})"
        help_text = help_text.replace("%", "%%")  # argparse formats help with %
        names = [_flag(prefix, f.name), *f.metadata.get("aliases", ())]
        dest = f"{prefix.replace('-', '_')}{f.name}"
        if hints[f.name] is bool:
            action = group.add_argument(*names, dest=dest, action=argparse.BooleanOptionalAction, default=None,
                                        help=help_text)
        else:
            action = group.add_argument(
                *names, dest=dest, default=None, choices=f.metadata.get("choices"),
                metavar=f.metadata.get("metavar") or (None if f.metadata.get("choices") else "VALUE"), help=help_text)
        action.setting = (cls, f.name)


def from_arguments(args: argparse.Namespace, cls, prefix: str = "", base: Optional[Settings] = None):
    """The block from parsed flags (see `add_arguments`): given flags over `base` (default: the block's defaults)."""
    base = base or cls()
    changes = {}
    for f in fields(cls):
        dest = f"{prefix.replace('-', '_')}{f.name}"
        value = getattr(args, dest, None)
        if value is not None:
            changes[f.name] = parse_value(value) if isinstance(value, str) else value
    return base.replace(**changes) if changes else base
