"""An experiment config: one YAML file (or a shipped preset) naming the data, the model, the settings and the arms.

Top level: `name`, `title`, `caption`, `description`, `seeds` (every arm runs once per seed; the
seed draws the split, the random-init backbone, the initial adapters and training), `sites`, `data`
(a shipped set or a file, or synthetic generation), `model` (`arch`; `backbone`: random = a
random-init checkpoint written once per seed and shared by all arms, or a checkpoint / hub name),
and the settings blocks of `fedesm.settings` -- `lora`, `training`, `federation` -- with the same
names as everywhere else; `runtime` (device, cpu_threads, simulator_timeout), and `experiments`,
each a split mode, a job template and a list of arms. An experiment and an arm may each override
`training` and `federation`. An arm is `federated` (the job in `nvflare simulator`), `centralized`
(the same trainer on the pooled site training data) or `site-alone` (each site trains on its own
data only, as it would without federating); a federated arm may set what sites hold in their own
config (`site_config: {site-1: {lora_r: 4}}`: a site of smaller means, `fedesm.ranks`). `arm_settings` resolves an arm's full settings: config,
then experiment, then arm; the seed is every arm's `training.seed` and `sites` their
`federation.min_clients`. Every arm of a seed starts from the same initial adapters and head.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from fedesm.errors import FedesmError
from fedesm.launch.jobs import job_source
from fedesm.paths import repo_root
from fedesm.settings import (FederationSettings, JobSettings, LoraSettings, ModelSettings, SettingError, TrainConfig,
                             apply_overrides)

PRESETS_DIR = Path(__file__).resolve().parent / "presets"
REPO_ROOT = repo_root()  # relative data paths are also tried from here
SPLIT_MODES = ("iid", "family", "skew", "dirichlet")
ARM_KINDS = ("federated", "centralized", "site-alone")
RANDOM_BACKBONE = "random"  # model.backbone: a random-init checkpoint of model.arch, written once per run


@dataclass
class DataSpec:
    synthetic: Optional[dict] = None  # n, families, pos_rate, min_len, max_len, mutation_rate (fedesm.data.synth)
    path: Optional[str] = None  # a labelled file (any format fedesm reads) or a shipped set (gpsite:ATP)
    test_path: Optional[str] = None  # a separate test file; then test_frac is 0
    val_frac: float = 0.1
    test_frac: float = 0.1
    site_val_frac: float = 0.15
    alpha: float = 0.5  # dirichlet splits


@dataclass
class ArmSpec:
    id: str
    label: str = ""
    kind: str = "federated"  # one of ARM_KINDS: federated | centralized | site-alone
    training: dict = field(default_factory=dict)
    federation: dict = field(default_factory=dict)
    description: str = ""
    site_config: dict = field(default_factory=dict)  # site name -> that site's own settings (lora_r), federated arms


@dataclass
class ExperimentSpec:
    id: str
    title: str
    split: str
    job: str = "esm2_fra_lora"
    description: str = ""
    training: dict = field(default_factory=dict)
    federation: dict = field(default_factory=dict)
    arms: list[ArmSpec] = field(default_factory=list)


@dataclass
class ExperimentConfig:
    name: str
    title: str
    data: DataSpec
    model: ModelSettings
    lora: LoraSettings
    training: dict  # the config-level training block (partial: TrainConfig's defaults fill the rest)
    federation: dict
    experiments: list[ExperimentSpec]
    sites: int = 2
    seeds: list = field(default_factory=lambda: [0])
    caption: str = ""
    description: str = ""
    runtime: dict = field(default_factory=dict)  # device, cpu_threads (per site and centralized run), simulator_timeout
    source: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("source")
        d["model"], d["lora"] = self.model.to_dict(), self.lora.to_dict()
        return d


_TOP_KEYS = {"name", "title", "caption", "description", "seeds", "sites", "data", "model", "lora", "training",
             "federation", "runtime", "experiments"}
_DATA_KEYS = {"synthetic", "path", "test_path", "val_frac", "test_frac", "site_val_frac", "alpha"}
_SYNTH_KEYS = {"n", "families", "pos_rate", "min_len", "max_len", "mutation_rate"}
_RUNTIME_KEYS = {"device", "cpu_threads", "simulator_timeout"}
_EXP_KEYS = {"id", "title", "split", "job", "description", "training", "federation", "arms"}
_ARM_KEYS = {"id", "label", "kind", "training", "federation", "description", "site_config"}
_ARM_SITE_KEYS = {"lora_r"}  # what an arm may set in a site's own config (fedesm.site_config)
# set by the experiment itself, for every arm alike
_FIXED = {"training": {"seed": "the top-level `seeds`", "device": "runtime.device"},
          "federation": {"min_clients": "the top-level `sites`"}}


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


def _block(where: str, block: str, d) -> dict:
    """A partial settings block as written in the YAML: known names only, and none the experiment sets itself."""
    d = dict(_check_keys(where, d, set(JobSettings.BLOCKS[block].names())))
    for key, owner in _FIXED.get(block, {}).items():
        if key in d:
            raise FedesmError(f"{where}.{key}: set by the experiment for every arm; use {owner}")
    return d


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
    model_raw = dict(raw.get("model") or {})
    if not model_raw.get("arch"):
        raise FedesmError(f"{where('model')}: `arch` is required (e.g. esm2_t12_35M_UR50D, esm2_t2_tiny)")
    model_raw.setdefault("backbone", RANDOM_BACKBONE)
    try:
        model = ModelSettings.from_dict(model_raw, where=source)
        lora = LoraSettings.from_dict(raw.get("lora"), where=source)
    except SettingError as e:
        raise FedesmError(str(e)) from None
    training = _block(where("training"), "training", raw.get("training"))
    federation = _block(where("federation"), "federation", raw.get("federation"))
    runtime = {"device": "auto", "cpu_threads": None, "simulator_timeout": None,
               **_check_keys(where("runtime"), raw.get("runtime"), _RUNTIME_KEYS)}
    sites = int(raw.get("sites", 2))
    if sites < 1:
        raise FedesmError(f"{where('sites')}: need at least one site")
    seeds = raw.get("seeds", [0])
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    if (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
            or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in seeds)):
        raise FedesmError(f"{where('seeds')}: a list of distinct non-negative integers, e.g. [0, 1, 2]; got {seeds!r}")
    cfg = ExperimentConfig(name=str(raw.get("name") or Path(source).stem), title=str(raw.get("title") or ""),
                           caption=str(raw.get("caption") or ""), description=str(raw.get("description") or ""),
                           data=data_spec, model=model, lora=lora, training=training, federation=federation,
                           experiments=[], sites=sites, seeds=list(seeds), runtime=runtime, source=source)
    seen = set()
    for i, e in enumerate(raw.get("experiments") or []):
        exp = _parse_experiment(where(f"experiments[{i}]"), e, cfg)
        if exp.id in seen:
            raise FedesmError(f"{where(f'experiments[{i}]')}: duplicate experiment id {exp.id!r}")
        seen.add(exp.id)
        cfg.experiments.append(exp)
    if not cfg.experiments:
        raise FedesmError(f"{source}: no experiments")
    return cfg


def _parse_experiment(ew: str, e, cfg: ExperimentConfig) -> ExperimentSpec:
    _check_keys(ew, e, _EXP_KEYS)
    for k in ("id", "title", "split"):
        if not e.get(k):
            raise FedesmError(f"{ew}: `{k}` is required")
    _check_id(ew, e["id"])
    if e["split"] not in SPLIT_MODES:
        raise FedesmError(f"{ew}: split must be one of {', '.join(SPLIT_MODES)}, got {e['split']!r}")
    if e["split"] == "skew" and cfg.sites != 2:
        raise FedesmError(f"{ew}: the skew split needs exactly 2 sites, config has {cfg.sites}")
    exp = ExperimentSpec(id=e["id"], title=e["title"], split=e["split"], job=e.get("job", "esm2_fra_lora"),
                         description=e.get("description", ""),
                         training=_block(f"{ew}.training", "training", e.get("training")),
                         federation=_block(f"{ew}.federation", "federation", e.get("federation")))
    job_source(exp.job)  # a known job
    arm_ids = set()
    for j, a in enumerate(e.get("arms") or []):
        aw = f"{ew}.arms[{j}]"
        _check_keys(aw, a, _ARM_KEYS)
        if not a.get("id"):
            raise FedesmError(f"{aw}: `id` is required")
        _check_id(aw, a["id"])
        if a["id"] in arm_ids:
            raise FedesmError(f"{aw}: duplicate arm id {a['id']!r}")
        arm_ids.add(a["id"])
        arm = ArmSpec(id=a["id"], label=a.get("label", ""), kind=a.get("kind", "federated"),
                      training=_block(f"{aw}.training", "training", a.get("training")),
                      federation=_block(f"{aw}.federation", "federation", a.get("federation")),
                      description=a.get("description", ""),
                      site_config=_arm_site_config(f"{aw}.site_config", a.get("site_config"), cfg))
        if arm.kind not in ARM_KINDS:
            raise FedesmError(f"{aw}: kind must be one of {', '.join(ARM_KINDS)}, got {arm.kind!r}")
        if arm.site_config and arm.kind != "federated":
            raise FedesmError(f"{aw}.site_config: only federated arms have sites with their own config")
        arm.label = arm.label or {"federated": arm.id, "centralized": "centralized", "site-alone": "site alone"}[arm.kind]
        try:
            arm_settings(cfg, exp, arm, cfg.seeds[0])  # every value checked now, where it is read
        except SettingError as e:
            raise FedesmError(f"{ew}.arms[{arm.id}]: {e}") from None
        exp.arms.append(arm)
    if not exp.arms:
        raise FedesmError(f"{ew}: no arms")
    return exp


def _arm_site_config(where: str, d, cfg: ExperimentConfig) -> dict:
    """{site-N: {lora_r: r}}: what a federated arm changes in its sites' own configs (sites of different means:
    1 <= lora_r <= lora.r)."""
    d = _check_keys(where, d, {f"site-{i}" for i in range(1, cfg.sites + 1)})
    out = {}
    for site, values in d.items():
        values = _check_keys(f"{where}.{site}", values, _ARM_SITE_KEYS)
        r = values.get("lora_r")
        if r is not None and (isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= cfg.lora.r):
            raise FedesmError(f"{where}.{site}.lora_r: a site's LoRA rank must be an integer from 1 to lora.r "
                              f"({cfg.lora.r}), got {r!r}")
        out[site] = dict(values)
    return out


def _check_id(where: str, value: str) -> None:
    if not str(value).replace("-", "").replace("_", "").isalnum():
        raise FedesmError(f"{where}: id {value!r} may hold only letters, digits, '-' and '_'")


def arm_settings(cfg: ExperimentConfig, exp: ExperimentSpec, arm: ArmSpec, seed: int,
                 backbone: Optional[str] = None) -> JobSettings:
    """The arm's full settings for one seed: the config's blocks, then the experiment's, then the arm's own;
    `backbone` (the prepared checkpoint) replaces `model.backbone`."""
    training = TrainConfig.from_dict({**cfg.training, **exp.training, **arm.training, "seed": seed,
                                      "device": cfg.runtime["device"]})
    federation = FederationSettings.from_dict({**cfg.federation, **exp.federation, **arm.federation,
                                               "min_clients": cfg.sites})
    model = cfg.model.replace(backbone=backbone) if backbone else cfg.model
    return JobSettings(model=model, lora=cfg.lora, training=training, federation=federation)
