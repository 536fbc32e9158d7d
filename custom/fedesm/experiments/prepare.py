"""What every arm of a run shares: the records, their split per split mode, the held-out data, the backbone."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from fedesm.errors import FedesmError
from fedesm.experiments import layout
from fedesm.experiments.config import RANDOM_BACKBONE, REPO_ROOT, ExperimentConfig


def load_records(cfg: ExperimentConfig, seed: int):
    """(records to split, separate test records or None); synthetic data is drawn with `seed`."""
    from fedesm.data.validate import load_dataset

    if cfg.data.synthetic:
        from fedesm.data.synth import synth_records

        s = cfg.data.synthetic
        records = synth_records(n=s.get("n", 200), n_families=s.get("families", 10), pos_rate=s.get("pos_rate", 0.1),
                                min_len=s.get("min_len", 60), max_len=s.get("max_len", 300), seed=seed,
                                mutation_rate=s.get("mutation_rate", 0.1))
    else:
        records = load_dataset(data_path(cfg.data.path, cfg))
    test = load_dataset(data_path(cfg.data.test_path, cfg)) if cfg.data.test_path else None
    return records, test


def data_path(path: str, cfg: ExperimentConfig) -> Path:
    """A shipped set's name (gpsite:ATP), a data path as given, or relative to the config file's folder,
    or to the repository root."""
    from fedesm.data.catalog import is_shipped_name, resolve

    if is_shipped_name(path):
        return Path(resolve(path))
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    for base in (Path(cfg.source).parent, REPO_ROOT):
        if (base / p).exists():
            return base / p
    raise FedesmError(f"data file {path}: not found (relative paths are tried from the current folder, the "
                      f"config's folder and the repository root)")


def prepare_data(cfg: ExperimentConfig, out: Path, seed: int, echo: Callable[[str], None]) -> dict[str, Path]:
    """Write one split per split mode used (drawn with `seed`); all share the same held-out val and test sets."""
    from fedesm.data.readers import write_records
    from fedesm.data.split import split_records, write_split
    from fedesm.data.synth import synth_comment

    records, test = load_records(cfg, seed)
    data_dir = layout.seed_dir(out, seed) / layout.DATA
    data_dir.mkdir(parents=True, exist_ok=True)
    if cfg.data.synthetic:
        s = cfg.data.synthetic
        write_records(records, data_dir / "synthetic.fa",
                      comment=synth_comment(len(records), s.get("families", 10), s.get("pos_rate", 0.1),
                                            s.get("min_len", 60), s.get("max_len", 300), seed))
    dirs = {}
    for mode in dict.fromkeys(e.split for e in cfg.experiments):
        split = split_records(records, mode, cfg.sites, val_frac=cfg.data.val_frac, test_frac=cfg.data.test_frac,
                              seed=seed, alpha=cfg.data.alpha, site_val_frac=cfg.data.site_val_frac)
        if test is not None:
            split.test = list(test)
        dirs[mode] = write_split(split, layout.split_dir(out, seed, mode), fmt="fasta", overwrite=True)
        s = split.summary()
        sites = ", ".join(f"{n} {v['train']['sequences']} train / {v['val']['sequences']} val "
                          f"({v['train']['positive_fraction']:.1%} positive)" for n, v in s["sites"].items())
        echo(f"  seed {seed}, data split {mode}: {sites}; held-out val {s['val']['sequences']}, test {s['test']['sequences']}")
    return dirs


def heldout_data(split_dir: Path) -> dict:
    """{'val': records, 'test': records (when the split has a non-empty test file)} of a split folder."""
    from fedesm.data.validate import load_dataset

    heldout = {"val": load_dataset(split_dir / "val.fa")}
    test_file = split_dir / "test.fa"
    if test_file.is_file():
        test = load_dataset(test_file)
        if test:
            heldout["test"] = test
    return heldout


def pooled_site_training(split_dir: Path) -> list:
    """Every site's training records of a split folder, site by site: what centralized arms and the
    reference model train on."""
    from fedesm.data.validate import load_dataset

    pooled = []
    for site in sorted(p for p in split_dir.iterdir() if p.is_dir() and (p / "train.fa").is_file()):
        pooled += load_dataset(site / "train.fa")
    return pooled


def prepare_backbone(cfg: ExperimentConfig, out: Path, seed: int) -> str:
    """The backbone every arm of a seed loads: a random-init checkpoint written once per seed
    (model.backbone: random), or the configured source (a local path made absolute)."""
    if cfg.model.backbone != RANDOM_BACKBONE:
        p = Path(cfg.model.backbone).expanduser()
        return str(p.resolve()) if p.exists() else cfg.model.backbone
    from fedesm.model.checkpoint import make_random_checkpoint

    path = layout.seed_dir(out, seed) / layout.BACKBONE / f"{cfg.model.arch}.pt"
    if not path.is_file():
        make_random_checkpoint(cfg.model.arch, path, seed=seed)
    return str(path.resolve())


def prepare_initial(cfg: ExperimentConfig, out: Path, seed: int, backbone: str) -> Path:
    """The initial adapters + head of every arm of a seed: what a federated job's persistor builds as its
    round 0 (`initial_exchanged_state`), written once; centralized and site-alone arms load it."""
    from fedesm.model.adapters import initial_exchanged_state
    from fedesm.architectures import get_architecture
    from fedesm.model.cards import ModelCard, save_adapter_state

    arch = get_architecture(cfg.model.arch)
    state = initial_exchanged_state(arch, cfg.lora, cfg.model.num_labels, seed)
    card = ModelCard.describe(backbone, arch, cfg.lora, num_labels=cfg.model.num_labels,
                              extra={"source": "initial adapters shared by every arm", "seed": seed})
    return save_adapter_state(state, card, layout.seed_dir(out, seed) / layout.INITIAL)
