"""A site's own configuration: where its private data and its ESM-2 checkpoint live.

It lives at the site, never in the job, so one job bundle runs unchanged at every site. Looked up
in this order: the environment variable FEDESM_SITE_CONFIG (a YAML file), then
`<site workspace>/local/fedesm_site.yaml`. Example::

    backbone: s3://acme-fl/models/esm2_t12_35M_UR50D.pt     # or a local .pt, a hub name, random:ARCH, a
                                                             # Hugging Face folder or hf:facebook/esm2_...
    data:
      train: s3://acme-fl/binding/train.parquet              # or a local path
      val: /data/binding/val.fa
      test: /data/binding/test.fa                            # optional: test_* metrics every round
    allowed_prefixes: [s3://acme-fl/, /data/binding/]         # anything else is refused before reading
    cache_dir: /workspace/cache                              # default: <workspace>/local/fedesm_cache
    s3_endpoint_url: null                                    # default: boto3's own resolution
    device: auto
    cpu_threads: null                                        # torch CPU threads (default: torch's)
    lora_r: null                                             # this site's LoRA rank, <= the job's lora.r
                                                             # (less memory and upload; default: the job's)
    declared_samples: null                                   # training sequences this site's operator declares
                                                             # for a job weighing by declared counts (sent with
                                                             # each contribution only when set; capped by the job)
    kit_dir: null                                            # the startup/ folder of this site's provisioned kit
                                                             # (client.key, client.crt, rootCA.pem): signs its keys
                                                             # for secure aggregation (default <workspace>/startup)
    privacy:                                                 # this site's DP rules (settings.SitePrivacySettings)
      require_dp: true                                       # refuse jobs without DP-SGD
      min_noise_multiplier: 1.0                              # refuse jobs asking for less noise
      max_grad_norm: 1.0                                     # ... or a larger clipping bound
      target_epsilon: 8.0                                    # stop contributing before exceeding it
      target_delta: 1.0e-5

One file may also serve several sites (handy for the simulator): values under `sites: {NAME: ...}`
override the top-level ones, and `{site}` in any string is replaced by the site's name.

`allowed_prefixes` fails closed: without it a site reads no private data at all (the shipped public
sets stay readable), and an explicit empty list, at the top or in a site's override, is refused
when the file is read (it could only ever refuse everything, or hide a typo).

`privacy` is the site's own DP policy (`fedesm.settings.SitePrivacySettings`, enforced by
`fedesm.training.privacy.policy`); privacy noise is secret (OS entropy) unless it names a
`debug_noise_seed`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from fedesm.data.catalog import is_shipped_name
from fedesm.errors import FedesmError
from fedesm.settings import SitePrivacySettings

ENV_VAR = "FEDESM_SITE_CONFIG"
DEFAULT_NAME = "fedesm_site.yaml"
_KEYS = {"backbone", "data", "allowed_prefixes", "cache_dir", "s3_endpoint_url", "device", "cpu_threads", "lora_r",
         "declared_samples", "kit_dir", "privacy", "sites"}
MAX_DECLARED = 10**12  # = fedesm.flare.aggregator.MAX_DECLARED (the server refuses more)


@dataclass
class SiteConfig:
    site: str
    train: str
    val: str
    backbone: Optional[str] = None  # None: the job's default backbone
    test: Optional[str] = None
    allowed_prefixes: list = field(default_factory=list)
    cache_dir: Optional[str] = None
    s3_endpoint_url: Optional[str] = None
    device: str = "auto"
    cpu_threads: Optional[int] = None  # torch CPU threads; set it when several sites share one machine
    lora_r: Optional[int] = None  # this site's LoRA rank (<= the job's lora.r; fedesm.ranks); None: the job's
    # the operator's count for federation.weigh_by: declared; None: the site sends no count (its size stays here)
    declared_samples: Optional[int] = None
    kit_dir: Optional[str] = None  # the site's kit startup folder (secure aggregation); None: <workspace>/startup
    privacy: SitePrivacySettings = field(default_factory=SitePrivacySettings)  # the site's DP policy
    source: str = ""  # the file it came from, for messages

    def access_policy(self):
        from fedesm.storage import AccessPolicy

        return AccessPolicy(self.allowed_prefixes, source=self.source)


def _expand(value, site: str):
    if isinstance(value, str):
        return value.replace("{site}", site)
    if isinstance(value, list):
        return [_expand(v, site) for v in value]
    if isinstance(value, dict):
        return {k: _expand(v, site) for k, v in value.items()}
    return value


def find_site_config(workspace_root: Optional[str] = None) -> Path:
    env = os.environ.get(ENV_VAR)
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise FedesmError(f"{ENV_VAR}={env}: no such file")
        return path
    if workspace_root:
        path = Path(workspace_root) / "local" / DEFAULT_NAME
        if path.is_file():
            return path
    raise FedesmError(
        f"no fedesm site configuration: set {ENV_VAR} to a YAML file or create "
        f"{Path(workspace_root or '<workspace>') / 'local' / DEFAULT_NAME} (see fedesm.site_config)"
    )


def load_site_config(site: str, path=None, workspace_root: Optional[str] = None) -> SiteConfig:
    path = Path(path) if path else find_site_config(workspace_root)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise FedesmError(f"{path}: cannot read site configuration: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise FedesmError(f"{path}: site configuration must be a YAML mapping")
    unknown = set(raw) - _KEYS
    if unknown:
        raise FedesmError(f"{path}: unknown keys {sorted(unknown)} (valid: {sorted(_KEYS)})")
    merged = {k: v for k, v in raw.items() if k != "sites"}
    sites = raw.get("sites") or {}
    if not isinstance(sites, dict):
        raise FedesmError(f"{path}: sites must map site names to their overrides")
    per_site = sites.get(site) or {}
    if not isinstance(per_site, dict):
        raise FedesmError(f"{path}: sites.{site} must be a mapping of overrides")
    bad = set(per_site) - (_KEYS - {"sites"})
    if bad:
        raise FedesmError(f"{path}: unknown keys {sorted(bad)} under sites.{site} (valid: {sorted(_KEYS - {'sites'})})")
    for where, block in (("", raw), (f"sites.{site}.", per_site)):
        if "allowed_prefixes" in block:
            value = block["allowed_prefixes"]
            if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
                raise FedesmError(f"{path}: {where}allowed_prefixes must list at least one folder or s3:// prefix "
                                  f"(got {value!r}); leave the key out to read only the shipped public sets")
    for k, v in per_site.items():
        if k in ("data", "privacy") and isinstance(v, dict):
            merged[k] = {**(merged.get(k) or {}), **v}
        else:
            merged[k] = v
    merged = _expand(merged, site)
    data = merged.get("data") or {}
    for key in ("train", "val"):
        if not data.get(key):
            raise FedesmError(f"{path}: site {site!r} has no data.{key} location")
    default_cache = str(Path(workspace_root) / "local" / "fedesm_cache") if workspace_root else None
    lora_r = merged.get("lora_r")
    if lora_r is not None and (isinstance(lora_r, bool) or not isinstance(lora_r, int) or lora_r < 1):
        raise FedesmError(f"{path}: lora_r must be a positive integer (the site's LoRA rank), got {lora_r!r}")
    declared = merged.get("declared_samples")
    if declared is not None and (isinstance(declared, bool) or not isinstance(declared, int)
                                 or not 1 <= declared <= MAX_DECLARED):
        raise FedesmError(f"{path}: declared_samples must be a whole number of training sequences in 1 .. "
                          f"{MAX_DECLARED:.0e}, got {str(declared)[:40]!r}")
    if lora_r is not None:
        from fedesm.settings import LoraSettings

        LoraSettings.from_dict({"r": lora_r}, where=f"{path} (site {site}) lora_r")  # within every model's width
    return SiteConfig(
        site=site,
        train=str(data["train"]),
        val=str(data["val"]),
        test=data.get("test"),
        backbone=merged.get("backbone"),
        allowed_prefixes=list(merged.get("allowed_prefixes") or []),
        cache_dir=merged.get("cache_dir") or default_cache,
        s3_endpoint_url=merged.get("s3_endpoint_url"),
        device=merged.get("device", "auto"),
        cpu_threads=merged.get("cpu_threads"),
        lora_r=lora_r,
        declared_samples=declared,
        kit_dir=str(merged["kit_dir"]) if merged.get("kit_dir") else None,
        privacy=_privacy(merged.get("privacy"), path, site),
        source=str(path),
    )


def _privacy(raw, path: Path, site: str) -> SitePrivacySettings:
    if raw is not None and not isinstance(raw, dict):
        raise FedesmError(f"{path}: privacy must be a mapping of settings (valid: {', '.join(SitePrivacySettings.names())})")
    return SitePrivacySettings.from_dict(raw or {}, where=f"{path} (site {site})")


def backbone_source(config: SiteConfig, job_backbone: str) -> str:
    """The backbone this site loads: its own config's, else the job's default when the job may choose it.

    A job may pick `random:ARCH`, a fair-esm hub name (fixed download addresses of fair-esm) or a path,
    which the site's allow-list then checks; never a Hugging Face id, which would let a job decide
    which repository a site downloads and loads. A site that wants one names it in its own config.
    """
    if config.backbone:
        return config.backbone
    if str(job_backbone).startswith("hf:"):
        raise FedesmError(f"{config.site}: the job's model.backbone {str(job_backbone)[:80]} is a Hugging Face id the "
                          "job chose; this site loads such a backbone only when its own site config names it "
                          "(backbone: ...)")
    return job_backbone


def resolve_site_path(config: SiteConfig, uri: str) -> Path:
    """A local path for `uri`, checked against the site's allowed prefixes before any read."""
    from fedesm import storage

    cache = Path(config.cache_dir or Path.home() / ".cache" / "fedesm")
    return Path(storage.fetch(uri, cache, policy=config.access_policy(), endpoint_url=config.s3_endpoint_url))


def write_site_config(path, backbone, data_dir, cpu_threads: Optional[int] = 1, device: Optional[str] = None,
                      test=None, per_site: Optional[dict] = None) -> Path:
    """One site config for every simulated site: `data_dir/{site}/{train,val}.fa` (a `fedesm data split`
    layout), the backbone, an allow-list of exactly those folders; `test` (a path or a shipped set's
    name) is every site's test split. `cpu_threads`/`device` are written when given; `per_site`
    ({site-1: {lora_r: 4}}) becomes the `sites:` section, one site's own values."""
    data_dir = Path(data_dir).resolve()
    backbone_path = Path(backbone)
    config = {
        "backbone": str(backbone_path.resolve()) if backbone_path.exists() else str(backbone),
        "data": {"train": str(data_dir / "{site}" / "train.fa"), "val": str(data_dir / "{site}" / "val.fa")},
        "allowed_prefixes": [str(data_dir)] + ([str(backbone_path.resolve().parent)] if backbone_path.exists() else []),
    }
    if test is not None:
        config["data"]["test"] = str(test) if is_shipped_name(test) else str(Path(test).resolve())
    if device is not None:
        config["device"] = device
    if cpu_threads:
        config["cpu_threads"] = int(cpu_threads)
    if per_site:
        config["sites"] = {site: dict(values) for site, values in per_site.items()}
    path = Path(path)
    path.write_text("# fedesm site configuration for the simulator: {site} becomes each site's name\n"
                    + yaml.safe_dump(config, sort_keys=False))
    return path


POC_ARCH = "esm2_t2_tiny"  # what a `fedesm poc up` site trains, so a POC job finishes in minutes on a CPU
POC_JOB_SETTINGS = (f"model.arch={POC_ARCH}", "lora.r=4", "training.rounds=2", "training.steps_per_round=20",
                    "training.max_len=256")  # the --set flags of a job for those sites


def write_poc_site_config(path) -> Path:
    """A POC site's config (`fedesm poc up`): the shipped public GPSite ATP set (its test split as validation) and
    a random-init tiny backbone, no private data (no allowed_prefixes). A real site writes its own."""
    config = {"backbone": f"random:{POC_ARCH}", "data": {"train": "gpsite:ATP", "val": "gpsite:ATP:test"},
              "cpu_threads": 1}
    path = Path(path)
    path.write_text("# fedesm site configuration written by `fedesm poc up`: public data and a random-init model, "
                    "for trying the network only\n" + yaml.safe_dump(config, sort_keys=False))
    return path
