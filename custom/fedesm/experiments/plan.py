"""What a config will do, in words (`plan_lines`), and what can be checked before training (`dry_run`)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from fedesm.errors import FedesmError
from fedesm.experiments.config import RANDOM_BACKBONE, REPO_ROOT, ExperimentConfig, arm_settings
from fedesm.experiments.prepare import load_records
from fedesm.launch.jobs import export_job
from fedesm.architectures import ARCHITECTURES
from fedesm.settings import FederationSettings, TrainConfig


def describe_data(cfg: ExperimentConfig) -> str:
    d = cfg.data
    if d.synthetic:
        s = d.synthetic
        what = (f"SYNTHETIC (fedesm.data.synth): n={s.get('n', 200)}, families={s.get('families', 10)}, "
                f"pos_rate={s.get('pos_rate', 0.1)}, lengths {s.get('min_len', 60)}-{s.get('max_len', 300)}, "
                f"drawn per seed")
    else:
        what = f"{d.path}" + (f" (test: {d.test_path})" if d.test_path else "")
    held = f"held-out val {d.val_frac:.0%}" + (f", test {d.test_frac:.0%}" if not d.test_path else ", test = test file")
    return f"{what}; {held} (no sequence or family shared with the sites); per-site val {d.site_val_frac:.0%}"


def describe_backbone(cfg: ExperimentConfig) -> str:
    m = cfg.model
    if m.backbone == RANDOM_BACKBONE:
        return f"random-init {m.arch} checkpoint in fair-esm format (make_random_checkpoint, one per seed)"
    return f"{m.backbone} ({m.arch})"


def describe_training(t: TrainConfig, base: TrainConfig | None = None) -> str:
    """The settings that differ from `base` (the main ones when base is None)."""
    if base is None:
        s = (f"{t.rounds} rounds x {t.steps_per_round} steps, batch {t.batch_size}, lr {t.lr:g}, "
             f"max_len {t.max_len}")
        if t.class_weights is not None:
            s += f", class_weights {t.class_weights}"
        if t.focal_gamma:
            s += f", focal_gamma {t.focal_gamma:g}"
        extra = {k: getattr(t, k) for k in ("grad_noise_std", "freeze_lora_a", "dp_noise_multiplier") if getattr(t, k)}
        return s + "".join(f", {k} {v:g}" if not isinstance(v, bool) else f", {k}" for k, v in extra.items())
    a, b = t.to_dict(), base.to_dict()
    diff = {k: v for k, v in a.items() if b.get(k) != v}
    if diff.get("dp_noise_multiplier"):
        diff["dp_max_grad_norm"], diff["dp_delta"] = t.dp_max_grad_norm, t.dp_delta
    return ", ".join(f"{k}={v}" for k, v in diff.items())


def show_path(path: str) -> str:
    """A path relative to the repository when inside it (presets), else as given."""
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return path


def plan_lines(cfg: ExperimentConfig) -> list[str]:
    seed = cfg.seeds[0]
    base = TrainConfig.from_dict({**cfg.training, "seed": seed, "device": cfg.runtime["device"]})
    lines = [f"experiment config {cfg.name}: {cfg.title}".rstrip(": "),
             f"  source:   {show_path(cfg.source)}",
             f"  data:     {describe_data(cfg)}",
             f"  sites:    {cfg.sites} ({', '.join(f'site-{i}' for i in range(1, cfg.sites + 1))})",
             f"  seeds:    {', '.join(map(str, cfg.seeds))} (each draws the split, the backbone, the initial adapters "
             "shared by all arms, and training)",
             f"  backbone: {describe_backbone(cfg)}",
             f"  LoRA:     r={cfg.lora.r}, alpha={cfg.lora.alpha:g}, dropout {cfg.lora.dropout:g} on "
             f"{','.join(cfg.lora.targets)} (+ linear head)",
             f"  training: {describe_training(base)}",
             f"  runtime:  device {cfg.runtime['device']}, torch threads per simulated site and centralized run "
             f"{cfg.runtime['cpu_threads'] or 'default'}"]
    n_fed = n_central = 0
    steps = 0
    for exp in cfg.experiments:
        exp_base = TrainConfig.from_dict({**cfg.training, **exp.training, "seed": seed,
                                          "device": cfg.runtime["device"]})
        lines.append(f"  {exp.id}: {exp.title} [split {exp.split}, job {exp.job}]")
        if exp.training:
            lines.append(f"      experiment settings: {describe_training(exp_base, base)}")
        for arm in exp.arms:
            s = arm_settings(cfg, exp, arm, seed)
            what = {"federated": f"federated, nvflare simulator, strategy {s.federation.strategy}",
                    "centralized": "centralized on the pooled site training data",
                    "site-alone": "each site alone on its own training data"}[arm.kind]
            diff = describe_training(s.training, exp_base)
            fed_diff = ", ".join(f"{k}={v}" for k, v in s.federation.to_dict().items()
                                 if k not in ("strategy", "min_clients") and FederationSettings().to_dict()[k] != v)
            sites = ", ".join(f"{site} " + " ".join(f"{k} {v}" for k, v in values.items())
                              for site, values in arm.site_config.items())
            lines.append(f"      - {arm.id:<14} {what}" + (f"; {diff}" if diff else "")
                         + (f"; {fed_diff}" if fed_diff and arm.kind == "federated" else "")
                         + (f"; site config: {sites}" if sites else ""))
            local_steps = s.training.rounds * s.training.steps_per_round
            if arm.kind == "federated":
                n_fed += 1
                steps += cfg.sites * local_steps
            else:
                n_central += 1 if arm.kind == "centralized" else cfg.sites
                steps += local_steps * (cfg.sites if arm.kind == "site-alone" else 1)
    n = len(cfg.seeds)
    lines.append(f"  total: {n_fed * n} simulator run(s), {n_central * n} centralized run(s), {steps * n:,} optimizer "
                 f"steps (all sites together, {n} seed(s))")
    return lines


def dry_run(cfg: ExperimentConfig) -> list[str]:
    """Check everything that can be checked without training: data readable, backbone named right,
    each federated arm's job exports with its settings. Returns the plan plus what was checked."""
    lines = plan_lines(cfg)
    records, test = load_records(cfg, cfg.seeds[0])
    lines.append(f"  checked: {len(records)} labelled sequences"
                 + (f" + {len(test)} test sequences" if test is not None else "")
                 + f", {sum(r.n_positive for r in records):,} positive of {sum(len(r) for r in records):,} residues")
    src = cfg.model.backbone
    if src != RANDOM_BACKBONE and not src.startswith("s3://"):
        path = Path(src).expanduser()
        if path.suffix == ".pt" or path.exists():
            if not path.is_file():
                raise FedesmError(f"model.backbone {src}: checkpoint file not found")
        elif src not in ARCHITECTURES or not ARCHITECTURES[src].on_hub:
            raise FedesmError(f"model.backbone {src!r} is not a checkpoint, s3:// URI, 'random' or a fair-esm hub name")
        lines.append(f"  checked: backbone {src}" + (" (downloaded from the fair-esm hub at run time unless cached)"
                                                     if src in ARCHITECTURES else ""))
    with tempfile.TemporaryDirectory() as tmp:
        n = 0
        for exp in cfg.experiments:
            for arm in exp.arms:
                if arm.kind == "federated":
                    export_job(exp.job, Path(tmp), job_name=f"{exp.id}-{arm.id}", include_package=False,
                               settings=arm_settings(cfg, exp, arm, cfg.seeds[0]))
                    n += 1
    lines.append(f"  checked: {n} job export(s) accept their settings")
    return lines
