"""The paper's experiments from one YAML file: `fedesm experiment run CONFIG --out DIR`.

A config names the data (SYNTHETIC generation parameters, or a labelled file such as
`data/gpsite/ATP_train.txt.gz` with an optional separate test file), how it is split, the ESM-2
backbone, LoRA and training settings, and a list of experiments, each a split mode, a job template
and a list of arms:

* a federated arm exports the job with the arm's settings and runs it in `nvflare simulator`
  (each site reads its own split through a site config; `{site}` expands to its name);
* a centralized arm trains the same model with the same settings on the pooled training data of
  the sites (`fedesm.centralized.run_centralized`), R rounds of N steps.

Every arm is also evaluated on the same held-out data: the global `val` split (no family shared
with any site), after every round, and the global `test` split for the final model. Sites evaluate
on their own local val splits as well (local model and global model, from the job's metrics table).

Layout of DIR (what `fedesm.experiments.report` reads)::

    run.json                   name, title, caption, settings, wall time
    config.yaml                the resolved config
    data/<split mode>/         the split (val.fa, test.fa, site-N/{train,val}.fa, split.json)
    backbone/                  the random-init checkpoint (when the backbone is `random`)
    <experiment>/experiment.json
    <experiment>/<arm>/arm.json      settings, status, wall time
    <experiment>/<arm>/metrics.jsonl per (round, site) rows: the job's table, or the centralized run's
    <experiment>/<arm>/heldout.jsonl per round: the arm's model on the held-out val (and test) split

Presets live in `presets/` beside this file: `cpu` (tiny random-init ESM-2, synthetic data; the
whole set in well under 30 minutes on 2 cores) and `paper` (ESM-2 35M, r=16, 30 x 5,000 steps, a
GPSite set; for a GPU).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import yaml

from fedesm.errors import FedesmError
from fedesm.fileio import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

PRESETS_DIR = Path(__file__).resolve().parent / "presets"
STRATEGIES = ("fra", "fra-ef", "fedit", "ffa")
SPLIT_MODES = ("iid", "family", "skew", "dirichlet")
# Settings an arm may change; each is both a job value and a TrainConfig field, so the federated and
# centralized arms of one experiment train exactly alike.
TRAINING_KEYS = ("rounds", "steps_per_round", "batch_size", "lr", "max_len", "class_weights", "focal_gamma",
                 "grad_noise_std",
                 "freeze_lora_a", "dp_noise_multiplier", "dp_max_grad_norm", "dp_delta")
TRAINING_DEFAULTS = {"rounds": 3, "steps_per_round": 100, "batch_size": 8, "lr": 1e-3, "max_len": 1000,
                     "class_weights": "balanced", "focal_gamma": 0.0, "grad_noise_std": 0.0, "freeze_lora_a": False,
                     "dp_noise_multiplier": 0.0, "dp_max_grad_norm": 1.0, "dp_delta": 1e-5}
HELDOUT = "held-out"


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


@dataclass
class DataSpec:
    synthetic: Optional[dict] = None  # n, families, pos_rate, min_len, max_len (fedesm.data.synth)
    path: Optional[str] = None  # a labelled file (any format fedesm reads)
    test_path: Optional[str] = None  # a separate test file; then test_frac is 0
    val_frac: float = 0.1
    test_frac: float = 0.1
    site_val_frac: float = 0.15
    alpha: float = 0.5  # dirichlet splits


@dataclass
class ArmSpec:
    id: str
    label: str = ""
    kind: str = "federated"  # federated | centralized
    strategy: str = "fra"
    training: dict = field(default_factory=dict)
    description: str = ""


@dataclass
class ExperimentSpec:
    id: str
    title: str
    split: str
    job: str = "esm2_fra_lora"
    description: str = ""
    training: dict = field(default_factory=dict)
    arms: list[ArmSpec] = field(default_factory=list)


@dataclass
class ExperimentConfig:
    name: str
    title: str
    data: DataSpec
    backbone: dict  # arch, source (random | checkpoint path | s3:// | hub name)
    lora: dict  # r, alpha, dropout
    training: dict
    experiments: list[ExperimentSpec]
    sites: int = 2
    seed: int = 0
    caption: str = ""
    description: str = ""
    runtime: dict = field(default_factory=dict)  # device, cpu_threads (per site and centralized run), simulator_timeout
    source: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("source")
        return d


_TOP_KEYS = {"name", "title", "caption", "description", "seed", "sites", "data", "backbone", "lora", "training",
             "runtime", "experiments"}
_DATA_KEYS = {"synthetic", "path", "test_path", "val_frac", "test_frac", "site_val_frac", "alpha"}
_SYNTH_KEYS = {"n", "families", "pos_rate", "min_len", "max_len", "mutation_rate"}
_BACKBONE_KEYS = {"arch", "source"}
_LORA_KEYS = {"r", "alpha", "dropout"}
_RUNTIME_KEYS = {"device", "cpu_threads", "simulator_timeout"}
_EXP_KEYS = {"id", "title", "split", "job", "description", "training", "arms"}
_ARM_KEYS = {"id", "label", "kind", "strategy", "training", "description"}


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def preset_path(name_or_path: str) -> Path:
    """A preset name (`cpu`, `paper`) or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise FedesmError(f"{name_or_path}: no such experiment config file")
        return path
    candidate = PRESETS_DIR / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    raise FedesmError(f"{name_or_path!r} is neither a YAML file nor a preset ({', '.join(list_presets())})")


def _check_keys(where: str, d, allowed: set) -> dict:
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise FedesmError(f"{where}: expected a mapping, got {type(d).__name__}")
    unknown = set(d) - allowed
    if unknown:
        raise FedesmError(f"{where}: unknown key(s) {sorted(unknown)} (valid: {', '.join(sorted(allowed))})")
    return d


def apply_overrides(raw: dict, items: list[str]) -> dict:
    """`a.b.c=value` (value parsed as YAML); a list of mappings with `id` is indexed by id,
    e.g. `experiments.exp1_iid.training.steps_per_round=5`."""
    raw = copy.deepcopy(raw)
    for item in items or []:
        if "=" not in item:
            raise FedesmError(f"--set {item!r}: expected KEY.PATH=VALUE")
        key, value = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise FedesmError(f"--set {item!r}: empty key")
        node = raw
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                match = [x for x in node if isinstance(x, dict) and x.get("id") == part]
                if not match:
                    raise FedesmError(f"--set {item!r}: no entry with id {part!r} under {'.'.join(parts[:i]) or 'top'}")
                node = match[0]
            elif isinstance(node, dict):
                node = node.setdefault(part, {})
                if node is None:
                    raise FedesmError(f"--set {item!r}: {'.'.join(parts[:i + 1])} is empty")
            else:
                raise FedesmError(f"--set {item!r}: {'.'.join(parts[:i])} is not a mapping")
        if not isinstance(node, dict):
            raise FedesmError(f"--set {item!r}: {'.'.join(parts[:-1])} is not a mapping")
        try:
            node[parts[-1]] = yaml.safe_load(value)
        except yaml.YAMLError:
            node[parts[-1]] = value
    return raw


def load_config(name_or_path: str, overrides: Optional[list[str]] = None) -> ExperimentConfig:
    """Read, override (`--set`) and validate an experiment config; errors name the offending key."""
    path = preset_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise FedesmError(f"{path}: cannot read experiment config: {str(e).splitlines()[0]}") from None
    raw = apply_overrides(_check_keys(str(path), raw, _TOP_KEYS), overrides or [])
    return parse_config(raw, source=str(path))


def parse_config(raw: dict, source: str = "<config>") -> ExperimentConfig:
    _check_keys(source, raw, _TOP_KEYS)
    where = lambda k: f"{source}: {k}"  # noqa: E731
    data = _check_keys(where("data"), raw.get("data"), _DATA_KEYS)
    if bool(data.get("synthetic")) == bool(data.get("path")):
        raise FedesmError(f"{where('data')}: give exactly one of `synthetic` (generation parameters) or `path`")
    if data.get("synthetic"):
        _check_keys(where("data.synthetic"), data["synthetic"], _SYNTH_KEYS)
    data_spec = DataSpec(**data)
    if data_spec.test_path:
        data_spec.test_frac = 0.0
    backbone = _check_keys(where("backbone"), raw.get("backbone"), _BACKBONE_KEYS)
    if not backbone.get("arch"):
        raise FedesmError(f"{where('backbone')}: `arch` is required (e.g. esm2_t12_35M_UR50D, esm2_t2_tiny)")
    backbone.setdefault("source", "random")
    from fedesm.model import ARCHITECTURES

    if backbone["arch"] not in ARCHITECTURES:
        raise FedesmError(f"{where('backbone.arch')}: unknown architecture {backbone['arch']!r} "
                          f"({', '.join(ARCHITECTURES)})")
    lora = {"r": 16, "alpha": 32, "dropout": 0.05, **_check_keys(where("lora"), raw.get("lora"), _LORA_KEYS)}
    training = {**TRAINING_DEFAULTS, **_check_training(where("training"), raw.get("training"))}
    runtime = {"device": "auto", "cpu_threads": None, "simulator_timeout": None,
               **_check_keys(where("runtime"), raw.get("runtime"), _RUNTIME_KEYS)}
    sites = int(raw.get("sites", 2))
    if sites < 1:
        raise FedesmError(f"{where('sites')}: need at least one site")
    experiments = []
    seen = set()
    for i, e in enumerate(raw.get("experiments") or []):
        ew = where(f"experiments[{i}]")
        _check_keys(ew, e, _EXP_KEYS)
        for k in ("id", "title", "split"):
            if not e.get(k):
                raise FedesmError(f"{ew}: `{k}` is required")
        if e["id"] in seen:
            raise FedesmError(f"{ew}: duplicate experiment id {e['id']!r}")
        seen.add(e["id"])
        _check_id(ew, e["id"])
        if e["split"] not in SPLIT_MODES:
            raise FedesmError(f"{ew}: split must be one of {', '.join(SPLIT_MODES)}, got {e['split']!r}")
        if e["split"] == "skew" and sites != 2:
            raise FedesmError(f"{ew}: the skew split needs exactly 2 sites, config has {sites}")
        arms, arm_ids = [], set()
        for j, a in enumerate(e.get("arms") or []):
            aw = f"{ew}.arms[{j}]"
            _check_keys(aw, a, _ARM_KEYS)
            if not a.get("id"):
                raise FedesmError(f"{aw}: `id` is required")
            _check_id(aw, a["id"])
            if a["id"] in arm_ids:
                raise FedesmError(f"{aw}: duplicate arm id {a['id']!r}")
            arm_ids.add(a["id"])
            arm = ArmSpec(**{**a, "training": _check_training(f"{aw}.training", a.get("training"))})
            if arm.kind not in ("federated", "centralized"):
                raise FedesmError(f"{aw}: kind must be federated or centralized, got {arm.kind!r}")
            if arm.kind == "federated" and arm.strategy not in STRATEGIES:
                raise FedesmError(f"{aw}: strategy must be one of {', '.join(STRATEGIES)}, got {arm.strategy!r}")
            arm.label = arm.label or (arm.id if arm.kind == "federated" else "centralized")
            arms.append(arm)
        if not arms:
            raise FedesmError(f"{ew}: no arms")
        exp = ExperimentSpec(id=e["id"], title=e["title"], split=e["split"], job=e.get("job", "esm2_fra_lora"),
                             description=e.get("description", ""),
                             training=_check_training(f"{ew}.training", e.get("training")), arms=arms)
        for arm in arms:
            t = arm_training(training, exp, arm)
            _check_arm_settings(f"{ew}.arms[{arm.id}]", arm, t)
        experiments.append(exp)
    if not experiments:
        raise FedesmError(f"{source}: no experiments")
    return ExperimentConfig(name=str(raw.get("name") or Path(source).stem), title=str(raw.get("title") or ""),
                            caption=str(raw.get("caption") or ""), description=str(raw.get("description") or ""),
                            data=data_spec, backbone=backbone, lora=lora, training=training, experiments=experiments,
                            sites=sites, seed=int(raw.get("seed", 0)), runtime=runtime, source=source)


def _check_id(where: str, value: str) -> None:
    if not str(value).replace("-", "").replace("_", "").isalnum():
        raise FedesmError(f"{where}: id {value!r} may hold only letters, digits, '-' and '_'")


def _check_training(where: str, d) -> dict:
    return dict(_check_keys(where, d, set(TRAINING_KEYS)))


def _check_arm_settings(where: str, arm: ArmSpec, t: dict) -> None:
    for k in ("rounds", "steps_per_round", "batch_size", "max_len"):
        if not isinstance(t[k], int) or t[k] < 1:
            raise FedesmError(f"{where}: training.{k} must be a positive integer, got {t[k]!r}")
    if not t["lr"] > 0:
        raise FedesmError(f"{where}: training.lr must be > 0")
    if arm.kind == "federated" and arm.strategy == "ffa" and not t["freeze_lora_a"]:
        raise FedesmError(f"{where}: strategy ffa trains only LoRA B: set training.freeze_lora_a: true")
    if t["grad_noise_std"] and t["dp_noise_multiplier"]:
        raise FedesmError(f"{where}: choose one privacy mode, grad_noise_std (paper) or dp_noise_multiplier (DP-SGD)")
    if t["dp_noise_multiplier"] and not 0 < t["dp_delta"] < 1:
        raise FedesmError(f"{where}: training.dp_delta must be in (0, 1)")


def arm_training(base: dict, exp: ExperimentSpec, arm: ArmSpec) -> dict:
    """The arm's training settings: config defaults, then the experiment's, then the arm's own."""
    return {**base, **exp.training, **arm.training}


# ---------------------------------------------------------------------------------------------
# Plan and dry run
# ---------------------------------------------------------------------------------------------


def _describe_data(cfg: ExperimentConfig) -> str:
    d = cfg.data
    if d.synthetic:
        s = d.synthetic
        what = (f"SYNTHETIC (fedesm.data.synth): n={s.get('n', 200)}, families={s.get('families', 10)}, "
                f"pos_rate={s.get('pos_rate', 0.1)}, lengths {s.get('min_len', 60)}-{s.get('max_len', 300)}, "
                f"seed {cfg.seed}")
    else:
        what = f"{d.path}" + (f" (test: {d.test_path})" if d.test_path else "")
    held = f"held-out val {d.val_frac:.0%}" + (f", test {d.test_frac:.0%}" if not d.test_path else ", test = test file")
    return f"{what}; {held} (no sequence or family shared with the sites); per-site val {d.site_val_frac:.0%}"


def _describe_backbone(cfg: ExperimentConfig) -> str:
    b = cfg.backbone
    if b["source"] == "random":
        return f"random-init {b['arch']} checkpoint in fair-esm format (make_random_checkpoint, seed {cfg.seed})"
    return f"{b['source']} ({b['arch']})"


def _describe_training(t: dict, base: Optional[dict] = None) -> str:
    """The settings that differ from `base` (all of the main ones when base is None)."""
    if base is None:
        s = (f"{t['rounds']} rounds x {t['steps_per_round']} steps, batch {t['batch_size']}, lr {t['lr']:g}, "
             f"max_len {t['max_len']}")
        if t["class_weights"] is not None:
            s += f", class_weights {t['class_weights']}"
        if t["focal_gamma"]:
            s += f", focal_gamma {t['focal_gamma']:g}"
        extra = {k: t[k] for k in ("grad_noise_std", "freeze_lora_a", "dp_noise_multiplier") if t[k]}
        return s + ("".join(f", {k} {v:g}" if not isinstance(v, bool) else f", {k}" for k, v in extra.items()))
    diff = {k: v for k, v in t.items() if base.get(k) != v}
    if diff.get("dp_noise_multiplier"):
        diff["dp_max_grad_norm"], diff["dp_delta"] = t["dp_max_grad_norm"], t["dp_delta"]
    return ", ".join(f"{k}={v}" for k, v in diff.items())


def _show_path(path: str) -> str:
    """A path relative to the repository when inside it (presets), else as given."""
    root = Path(__file__).resolve().parents[3]
    try:
        return str(Path(path).resolve().relative_to(root))
    except ValueError:
        return path


def plan_lines(cfg: ExperimentConfig) -> list[str]:
    t = cfg.training
    lines = [f"experiment config {cfg.name}: {cfg.title}".rstrip(": "),
             f"  source:   {_show_path(cfg.source)}",
             f"  data:     {_describe_data(cfg)}",
             f"  sites:    {cfg.sites} ({', '.join(f'site-{i}' for i in range(1, cfg.sites + 1))})",
             f"  backbone: {_describe_backbone(cfg)}",
             f"  LoRA:     r={cfg.lora['r']}, alpha={cfg.lora['alpha']}, dropout {cfg.lora['dropout']} on q,k,v "
             f"(+ linear head)",
             f"  training: {_describe_training(t)}",
             f"  runtime:  device {cfg.runtime['device']}, torch threads per simulated site and centralized run "
             f"{cfg.runtime['cpu_threads'] or 'default'}"]
    n_fed = n_central = 0
    steps = 0
    for exp in cfg.experiments:
        base = {**t, **exp.training}
        lines.append(f"  {exp.id}: {exp.title} [split {exp.split}, job {exp.job}]")
        if exp.training:
            lines.append(f"      experiment settings: {_describe_training(base, t)}")
        for arm in exp.arms:
            at = arm_training(t, exp, arm)
            what = (f"federated, nvflare simulator, strategy {arm.strategy}" if arm.kind == "federated"
                    else "centralized on the pooled site training data")
            diff = _describe_training(at, base)
            lines.append(f"      - {arm.id:<14} {what}" + (f"; {diff}" if diff else ""))
            if arm.kind == "federated":
                n_fed += 1
                steps += cfg.sites * at["rounds"] * at["steps_per_round"]
            else:
                n_central += 1
                steps += at["rounds"] * at["steps_per_round"]
    lines.append(f"  total: {n_fed} simulator run(s), {n_central} centralized run(s), {steps:,} optimizer steps "
                 f"(all sites together)")
    return lines


def dry_run(cfg: ExperimentConfig) -> list[str]:
    """Check everything that can be checked without training: data readable, backbone named right,
    each federated arm's job exports with its settings. Returns the plan plus what was checked."""
    from fedesm.jobs import export_job
    from fedesm.model import ARCHITECTURES

    lines = plan_lines(cfg)
    records, test = _load_records(cfg)
    lines.append(f"  checked: {len(records)} labelled sequences"
                 + (f" + {len(test)} test sequences" if test is not None else "")
                 + f", {sum(r.n_positive for r in records):,} positive of {sum(len(r) for r in records):,} residues")
    src = cfg.backbone["source"]
    if src != "random" and not src.startswith("s3://"):
        path = Path(src).expanduser()
        if path.suffix == ".pt" or path.exists():
            if not path.is_file():
                raise FedesmError(f"backbone.source {src}: checkpoint file not found")
        elif src not in ARCHITECTURES or not ARCHITECTURES[src].on_hub:
            raise FedesmError(f"backbone.source {src!r} is not a checkpoint, s3:// URI, 'random' or a fair-esm hub name")
        lines.append(f"  checked: backbone {src}" + (" (downloaded from the fair-esm hub at run time unless cached)"
                                                     if src in ARCHITECTURES else ""))
    with tempfile.TemporaryDirectory() as tmp:
        n = 0
        for exp in cfg.experiments:
            for arm in exp.arms:
                if arm.kind == "federated":
                    export_job(exp.job, Path(tmp) / f"{exp.id}-{arm.id}", job_overrides(cfg, exp, arm, "<backbone>"),
                               include_package=False)
                    n += 1
    lines.append(f"  checked: {n} job export(s) accept their settings")
    return lines


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


def job_overrides(cfg: ExperimentConfig, exp: ExperimentSpec, arm: ArmSpec, backbone_source: str) -> dict:
    t = arm_training(cfg.training, exp, arm)
    return {"arch": cfg.backbone["arch"], "backbone": backbone_source, "backbone_hint": backbone_source,
            "num_rounds": t["rounds"], "min_clients": cfg.sites, "strategy": arm.strategy,
            "lora_r": cfg.lora["r"], "lora_alpha": cfg.lora["alpha"], "lora_dropout": cfg.lora["dropout"],
            "steps_per_round": t["steps_per_round"], "lr": t["lr"], "batch_size": t["batch_size"],
            "max_len": t["max_len"], "class_weights": t["class_weights"], "focal_gamma": t["focal_gamma"],
            "grad_noise_std": t["grad_noise_std"],
            "freeze_lora_a": t["freeze_lora_a"], "dp_noise_multiplier": t["dp_noise_multiplier"],
            "dp_max_grad_norm": t["dp_max_grad_norm"], "dp_delta": t["dp_delta"], "seed": cfg.seed}


def train_config(cfg: ExperimentConfig, t: dict):
    from fedesm.train import TrainConfig

    return TrainConfig(steps_per_round=t["steps_per_round"], rounds=t["rounds"], batch_size=t["batch_size"],
                       lr=t["lr"], max_len=t["max_len"], class_weights=t["class_weights"], focal_gamma=t["focal_gamma"],
                       grad_noise_std=t["grad_noise_std"], freeze_lora_a=t["freeze_lora_a"],
                       dp_noise_multiplier=t["dp_noise_multiplier"], dp_max_grad_norm=t["dp_max_grad_norm"],
                       dp_delta=t["dp_delta"], seed=cfg.seed, device=cfg.runtime["device"])


def lora_settings(cfg: ExperimentConfig):
    from fedesm.model import LoraSettings

    return LoraSettings(r=cfg.lora["r"], alpha=cfg.lora["alpha"], dropout=cfg.lora["dropout"])


def _load_records(cfg: ExperimentConfig):
    """(records to split, separate test records or None)."""
    from fedesm.data.validate import load_dataset

    if cfg.data.synthetic:
        from fedesm.data.synth import synth_records

        s = cfg.data.synthetic
        records = synth_records(n=s.get("n", 200), n_families=s.get("families", 10), pos_rate=s.get("pos_rate", 0.1),
                                min_len=s.get("min_len", 60), max_len=s.get("max_len", 300), seed=cfg.seed,
                                mutation_rate=s.get("mutation_rate", 0.1))
    else:
        records = load_dataset(_data_path(cfg.data.path, cfg))
    test = load_dataset(_data_path(cfg.data.test_path, cfg)) if cfg.data.test_path else None
    return records, test


def _data_path(path: str, cfg: ExperimentConfig) -> Path:
    """A shipped set's name (gpsite:ATP), a data path as given, or relative to the config file's folder,
    or to the repository root."""
    from fedesm.data.catalog import is_shipped_name, resolve

    if is_shipped_name(path):
        return Path(resolve(path))
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    for base in (Path(cfg.source).parent, Path(__file__).resolve().parents[3]):
        if (base / p).exists():
            return base / p
    raise FedesmError(f"data file {path}: not found (relative paths are tried from the current folder, the "
                      f"config's folder and the repository root)")


def prepare_data(cfg: ExperimentConfig, out: Path, echo: Callable[[str], None]) -> dict[str, Path]:
    """Write one split per split mode used; all share the same held-out val and test sets."""
    from fedesm.data.readers import write_records
    from fedesm.data.split import split_records, write_split
    from fedesm.data.synth import synth_comment

    records, test = _load_records(cfg)
    data_dir = out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    if cfg.data.synthetic:
        s = cfg.data.synthetic
        write_records(records, data_dir / "synthetic.fa",
                      comment=synth_comment(len(records), s.get("families", 10), s.get("pos_rate", 0.1),
                                            s.get("min_len", 60), s.get("max_len", 300), cfg.seed))
    dirs = {}
    for mode in dict.fromkeys(e.split for e in cfg.experiments):
        split = split_records(records, mode, cfg.sites, val_frac=cfg.data.val_frac, test_frac=cfg.data.test_frac,
                              seed=cfg.seed, alpha=cfg.data.alpha, site_val_frac=cfg.data.site_val_frac)
        if test is not None:
            split.test = list(test)
        dirs[mode] = write_split(split, data_dir / mode, fmt="fasta", overwrite=True)
        s = split.summary()
        sites = ", ".join(f"{n} {v['train']['sequences']} train / {v['val']['sequences']} val "
                          f"({v['train']['positive_fraction']:.1%} positive)" for n, v in s["sites"].items())
        echo(f"  data split {mode}: {sites}; held-out val {s['val']['sequences']}, test {s['test']['sequences']}")
    return dirs


def prepare_backbone(cfg: ExperimentConfig, out: Path) -> str:
    if cfg.backbone["source"] != "random":
        src = cfg.backbone["source"]
        p = Path(src).expanduser()
        return str(p.resolve()) if p.exists() else src
    from fedesm.model import make_random_checkpoint

    path = out / "backbone" / f"{cfg.backbone['arch']}.pt"
    if not path.is_file():
        make_random_checkpoint(cfg.backbone["arch"], path, seed=cfg.seed)
    return str(path.resolve())


METRIC_KEYS = ("accuracy", "precision", "recall", "f1", "mcc", "auroc", "auprc")
TUNED_KEYS = ("precision_tuned", "recall_tuned", "f1_tuned", "mcc_tuned")


def _metric_row(arm_id: str, round_num: int, split: str, metrics: dict) -> dict:
    """A held-out row: split "val" from plain metrics, split "test" from the `test_*` ones (at 0.5 and at
    the threshold tuned on the held-out val)."""
    row = {"arm": arm_id, "site": HELDOUT, "round": round_num, "split": split}
    if split == "test":
        row.update({k: metrics.get(f"test_{k}") for k in METRIC_KEYS + TUNED_KEYS})
        row["positive_fraction"] = metrics.get("test_positive_fraction")
    else:
        row.update({k: metrics.get(k) for k in METRIC_KEYS})
        row.update(residues=metrics.get("residues"), positives=metrics.get("positives"))
    row["threshold_tuned"] = metrics.get("threshold_tuned")
    return row


def _final_test(arm_id: str, round_num: int, metrics: dict, arm_dir: Path) -> dict:
    """The test row of an arm's final model; its precision-recall curve goes to test_pr_curve.json."""
    if metrics.get("pr_curve"):
        _write_json(arm_dir / "test_pr_curve.json", metrics["pr_curve"])
    return _metric_row(arm_id, round_num, "test", metrics)


def _clean(v):
    import math

    return None if isinstance(v, float) and math.isnan(v) else v


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps({k: _clean(v) for k, v in r.items()}) + "\n" for r in rows))


def _write_csv(path: Path, rows: list[dict]) -> None:
    """The same rows as a CSV (union of columns), for spreadsheets."""
    import csv

    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: _clean(v) for k, v in r.items()} for r in rows)


def _machine() -> dict:
    import platform

    import torch

    info = {"platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


@contextlib.contextmanager
def _forward_log(logger_name: str, echo, prefix: str):
    """Show a module's INFO lines (e.g. the centralized runner's per-round line) as progress lines."""
    logger = logging.getLogger(logger_name)

    class Handler(logging.Handler):
        def emit(self, record):
            echo(f"{prefix}{record.getMessage()}")

    handler = Handler(level=logging.INFO)
    old_level, old_propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        logger.propagate = old_propagate


def _fmt(v, spec=".3f") -> str:
    return format(v, spec) if isinstance(v, (int, float)) else "-"


def run_federated(cfg, exp, arm, arm_dir: Path, data_dir: Path, backbone: str, heldout, evaluator, echo) -> dict:
    from fedesm.experiments.simulate import run_simulator
    from fedesm.jobs import export_job
    from fedesm.metrics_log import read_rows

    t = arm_training(cfg.training, exp, arm)
    job = export_job(exp.job, arm_dir, job_overrides(cfg, exp, arm, backbone), job_name="job")
    from fedesm.site_config import write_site_config

    site_cfg = write_site_config(arm_dir / "site_config.yaml", backbone, data_dir, cfg.runtime["cpu_threads"],
                                 cfg.runtime["device"])
    prefix = f"  [{exp.id}/{arm.id}]"
    start = time.perf_counter()

    def on_round(n, rows):
        parts = []
        for r in sorted(rows, key=lambda r: r["site"]):
            s = f"{r['site']} F1 {_fmt(r.get('f1'))}"
            if r.get("epsilon") is not None:
                s += f" eps {r['epsilon']:.2f}"
            parts.append(s)
        echo(f"{prefix} round {n}/{t['rounds']}: local models on site val: {', '.join(parts)} "
             f"({time.perf_counter() - start:.0f}s)")

    echo(f"{prefix} nvflare simulator: {cfg.sites} sites x {t['rounds']} rounds x {t['steps_per_round']} steps, "
         f"strategy {arm.strategy} (log {arm_dir / 'simulator.log'})")
    result = run_simulator(job, arm_dir / "workspace", n_clients=cfg.sites, site_config=site_cfg,
                           log_path=arm_dir / "simulator.log", timeout=cfg.runtime["simulator_timeout"],
                           on_round=on_round)
    rows = [{"arm": arm.id, **r} for r in read_rows(result / "fedesm" / "metrics.jsonl")]
    _write_jsonl(arm_dir / "metrics.jsonl", rows)
    _write_csv(arm_dir / "metrics.csv", rows)
    sim_seconds = time.perf_counter() - start
    held = []
    rounds = sorted((result / "fedesm" / "rounds").glob("round_*"))
    for rd in rounds:
        n = int(rd.name.split("_")[1])
        last = rd == rounds[-1] and heldout.get("test")
        m = evaluator.evaluate(rd, heldout["val"], t["max_len"], heldout["test"] if last else None, curve=True)
        held.append(_metric_row(arm.id, n, "val", m))
        if last:
            held.append(_final_test(arm.id, n, m, arm_dir))
    _write_jsonl(arm_dir / "heldout.jsonl", held)
    _write_csv(arm_dir / "heldout.csv", held)
    final = [r for r in held if r["split"] == "val"][-1] if held else {}
    echo(f"{prefix} done in {time.perf_counter() - start:.0f}s: global model on held-out val after "
         f"{final.get('round')} rounds: F1 {_fmt(final.get('f1'))}, precision {_fmt(final.get('precision'))}, "
         f"recall {_fmt(final.get('recall'))}")
    return {"result_dir": str(result), "simulator_seconds": sim_seconds}


def pooled_site_training(split_dir: Path) -> list:
    """Every site's training records of a split folder, site by site: what centralized arms and the
    baseline train on."""
    from fedesm.data.validate import load_dataset

    pooled = []
    for site in sorted(p for p in split_dir.iterdir() if p.is_dir() and (p / "train.fa").is_file()):
        pooled += load_dataset(site / "train.fa")
    return pooled


def run_central(cfg, exp, arm, arm_dir: Path, split_dir: Path, backbone: str, heldout, evaluator, echo) -> dict:
    from fedesm.centralized import run_centralized

    t = arm_training(cfg.training, exp, arm)
    pooled = pooled_site_training(split_dir)
    prefix = f"  [{exp.id}/{arm.id}]"
    echo(f"{prefix} centralized: {len(pooled)} pooled training sequences, {t['rounds']} rounds x "
         f"{t['steps_per_round']} steps, evaluated on the held-out val split")
    start = time.perf_counter()
    with _forward_log("fedesm.centralized", echo, f"{prefix} "):
        rows = run_centralized(pooled, heldout["val"], backbone, arm_dir, train_config(cfg, t), lora_settings(cfg),
                               arm=arm.id, progress=False, tensorboard=False)
    eps = _central_epsilon(t, len(pooled))
    held = []
    for r in rows[:-1] if heldout.get("test") else rows:
        row = _metric_row(arm.id, r["round"], "val", r)
        if eps is not None:
            row["epsilon"] = eps(r["round"])
        held.append(row)
    if heldout.get("test"):  # the last model once more, for the tuned threshold and the test split
        m = evaluator.evaluate(arm_dir / "last", heldout["val"], t["max_len"], heldout["test"], curve=True)
        held.append(_metric_row(arm.id, t["rounds"], "val", m))
        if eps is not None:
            held[-1]["epsilon"] = eps(t["rounds"])
        held.append(_final_test(arm.id, t["rounds"], m, arm_dir))
    _write_jsonl(arm_dir / "heldout.jsonl", held)
    _write_csv(arm_dir / "heldout.csv", held)
    final = held[-2] if heldout.get("test") else held[-1]
    echo(f"{prefix} done in {time.perf_counter() - start:.0f}s: held-out val F1 {_fmt(final.get('f1'))}, "
         f"precision {_fmt(final.get('precision'))}, recall {_fmt(final.get('recall'))}")
    return {"n_train": len(pooled)}


def _run_baseline(exp, exp_dir: Path, split_dir: Path, heldout, seed: int, echo) -> dict:
    """The sequence-only reference on the experiment's pooled site training data: exp_dir/baseline.json."""
    from fedesm.evaluation import baseline_scores

    pooled = pooled_site_training(split_dir)
    scores = baseline_scores(pooled, heldout["val"], heldout["test"], seed=seed)
    _write_json(exp_dir / "baseline.json", scores)
    echo(f"  [{exp.id}/baseline] {scores['model']}, {len(pooled)} pooled training chains: test AUROC "
         f"{scores['test_auroc']:.3f}, AUPRC {scores['test_auprc']:.3f}, F1 {scores['test_f1_tuned']:.3f} at the "
         f"held-out val's threshold {scores['threshold_tuned']:.3f}")
    return scores


def _central_epsilon(t: dict, n: int):
    if not t["dp_noise_multiplier"]:
        return None
    from fedesm.dp import compute_epsilon

    q = t["batch_size"] / n
    return lambda r: compute_epsilon(t["dp_noise_multiplier"], q, r * t["steps_per_round"], t["dp_delta"])


def run_experiments(cfg: ExperimentConfig, out_dir, only: Optional[list[str]] = None,
                    arms: Optional[list[str]] = None, resume: bool = False, force: bool = False,
                    echo: Callable[[str], None] = print, report: bool = True, target_f1: float = 0.5) -> Path:
    """Run the config's experiments (or those in `only`, arms in `arms`) into `out_dir`; write the report."""
    out = Path(out_dir).resolve()
    experiments = [e for e in cfg.experiments if not only or e.id in only]
    unknown = set(only or []) - {e.id for e in cfg.experiments}
    if unknown:
        raise FedesmError(f"unknown experiment(s) {sorted(unknown)}; config has {[e.id for e in cfg.experiments]}")
    known_arms = {a.id for e in experiments for a in e.arms}
    if arms and set(arms) - known_arms:
        raise FedesmError(f"unknown arm(s) {sorted(set(arms) - known_arms)}; selected experiments have {sorted(known_arms)}")
    if only or arms:  # the plan, config copy and report show what this run does
        cfg = copy.copy(cfg)
        cfg.experiments = [copy.copy(e) for e in experiments]
        for e in cfg.experiments:
            e.arms = [a for a in e.arms if not arms or a.id in arms]
        experiments = [e for e in cfg.experiments if e.arms]
        cfg.experiments = experiments
    if out.exists() and (out / "run.json").exists() and not (resume or force):
        raise FedesmError(f"{out} holds a previous run: use --resume to continue it or --force to start over")
    if force and out.exists():
        if not (out / "run.json").exists() and any(out.iterdir()):
            raise FedesmError(f"{out}: not empty and not an experiment run; refusing to delete it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    t0 = time.perf_counter()
    for line in plan_lines(cfg):
        echo(line)
    atomic_write_text(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    run_info = {"name": cfg.name, "title": cfg.title, "caption": cfg.caption, "description": cfg.description,
                "source": cfg.source, "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
                "plan": plan_lines(cfg), "status": "running", "machine": _machine()}
    _write_json(out / "run.json", run_info)
    if cfg.runtime["cpu_threads"]:  # the centralized arms and evaluation here, like each simulated site
        import torch

        torch.set_num_threads(int(cfg.runtime["cpu_threads"]))
    data_dirs = prepare_data(cfg, out, echo)
    backbone = prepare_backbone(cfg, out)
    from fedesm.data.validate import load_dataset

    any_dir = next(iter(data_dirs.values()))
    heldout = {"val": load_dataset(any_dir / "val.fa")}
    test_file = any_dir / "test.fa"
    if test_file.is_file():
        test = load_dataset(test_file)
        if test:
            heldout["test"] = test
    from fedesm.evaluation import AdapterEvaluator

    evaluator = AdapterEvaluator(backbone, lora_settings(cfg), seed=cfg.seed, device=cfg.runtime["device"])
    failures = []
    for exp in experiments:
        exp_dir = out / exp.id
        exp_dir.mkdir(exist_ok=True)
        _write_json(exp_dir / "experiment.json", {"id": exp.id, "title": exp.title, "split": exp.split,
                                                  "job": exp.job, "description": exp.description,
                                                  "arms": [a.id for a in exp.arms]})
        echo(f"{exp.id}: {exp.title}")
        if heldout.get("test"):
            _run_baseline(exp, exp_dir, data_dirs[exp.split], heldout, cfg.seed, echo)
        for arm in exp.arms:
            arm_dir = exp_dir / arm.id
            info_path = arm_dir / "arm.json"
            if resume and info_path.is_file() and json.loads(info_path.read_text()).get("status") == "done":
                echo(f"  [{exp.id}/{arm.id}] already done; skipped (--resume)")
                continue
            if arm_dir.exists():
                shutil.rmtree(arm_dir)
            arm_dir.mkdir(parents=True)
            t = arm_training(cfg.training, exp, arm)
            info = {"id": arm.id, "label": arm.label, "kind": arm.kind, "experiment": exp.id,
                    "strategy": arm.strategy if arm.kind == "federated" else None, "description": arm.description,
                    "split": exp.split, "job": exp.job if arm.kind == "federated" else None, "training": t,
                    "lora": cfg.lora, "backbone": cfg.backbone, "sites": cfg.sites, "status": "running"}
            _write_json(info_path, info)
            start = time.perf_counter()
            try:
                runner = run_federated if arm.kind == "federated" else run_central
                info.update(runner(cfg, exp, arm, arm_dir, data_dirs[exp.split], backbone, heldout, evaluator, echo))
                info["status"] = "done"
            except FedesmError as e:
                info.update(status="failed", error=str(e))
                failures.append(f"{exp.id}/{arm.id}: {str(e).splitlines()[0]}")
                echo(f"  [{exp.id}/{arm.id}] FAILED: {e}")
            info["wall_seconds"] = time.perf_counter() - start
            _write_json(info_path, info)
    run_info.update(status="failed" if failures else "done", failures=failures,
                    finished=time.strftime("%Y-%m-%d %H:%M:%S"), wall_seconds=time.perf_counter() - t0)
    _write_json(out / "run.json", run_info)
    if report:
        from fedesm.experiments.report import build_report

        path = build_report(out, target_f1=target_f1)
        echo(f"report: {path}")
    echo(f"total {time.perf_counter() - t0:.0f}s" + (f"; {len(failures)} arm(s) failed" if failures else ""))
    if failures:
        raise FedesmError(f"{len(failures)} arm(s) failed: " + "; ".join(failures))
    return out
