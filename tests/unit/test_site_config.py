"""A site's own configuration, and a site reading its data and checkpoint from S3 (moto server on loopback)."""

from __future__ import annotations

import boto3
import pytest
import torch

from fedesm.errors import FedesmError
from fedesm.model.backbone import load_backbone
from fedesm.site_config import load_site_config, resolve_site_path
from tests.s3_server import s3, s3_server  # noqa: F401 (fixtures)


def _write(path, text):
    path.write_text(text)
    return path


def test_shared_file_with_per_site_overrides_and_placeholders(tmp_path):
    cfg = _write(tmp_path / "site.yaml", """
backbone: /models/esm2_t2_tiny.pt
data:
  train: /data/{site}/train.fa
  val: /data/{site}/val.fa
cpu_threads: 1
sites:
  site-2:
    backbone: s3://bucket-2/esm2.pt
    data:
      val: s3://bucket-2/{site}/val.parquet
    allowed_prefixes: [s3://bucket-2/, /data/site-2]
""")
    one = load_site_config("site-1", cfg)
    two = load_site_config("site-2", cfg)
    assert (one.train, one.val, one.backbone, one.cpu_threads) == (
        "/data/site-1/train.fa", "/data/site-1/val.fa", "/models/esm2_t2_tiny.pt", 1)
    assert (two.train, two.val, two.backbone) == ("/data/site-2/train.fa", "s3://bucket-2/site-2/val.parquet",
                                                 "s3://bucket-2/esm2.pt")
    assert two.allowed_prefixes == ["s3://bucket-2/", "/data/site-2"] and one.allowed_prefixes == []


def test_lookup_order_env_then_workspace(tmp_path, monkeypatch):
    ws = tmp_path / "ws"
    (ws / "local").mkdir(parents=True)
    _write(ws / "local" / "fedesm_site.yaml", "data: {train: /a/train.fa, val: /a/val.fa}\n")
    monkeypatch.delenv("FEDESM_SITE_CONFIG", raising=False)
    cfg = load_site_config("site-1", workspace_root=str(ws))
    assert cfg.train == "/a/train.fa" and cfg.cache_dir == str(ws / "local" / "fedesm_cache")
    env_cfg = _write(tmp_path / "env.yaml", "data: {train: /b/train.fa, val: /b/val.fa}\n")
    monkeypatch.setenv("FEDESM_SITE_CONFIG", str(env_cfg))
    assert load_site_config("site-1", workspace_root=str(ws)).train == "/b/train.fa"
    monkeypatch.setenv("FEDESM_SITE_CONFIG", str(tmp_path / "missing.yaml"))
    with pytest.raises(FedesmError, match="no such file"):
        load_site_config("site-1", workspace_root=str(ws))


@pytest.mark.parametrize("text,needle", [
    ("data: {train: /a.fa}\n", "no data.val"),
    ("dataa: {train: /a.fa, val: /b.fa}\n", "unknown keys"),
    # an explicit empty allow-list could only refuse everything: refused when read, top level or per site
    ("data: {train: /a.fa, val: /b.fa}\nallowed_prefixes: []\n", r"allowed_prefixes must list at least one"),
    ("data: {train: /a.fa, val: /b.fa}\nallowed_prefixes: [/a]\nsites: {site-1: {allowed_prefixes: []}}\n",
     r"sites\.site-1\.allowed_prefixes must list at least one"),
    ("data: {train: /a.fa, val: /b.fa}\nallowed_prefixes: /a\n", "allowed_prefixes must list"),
    ("data: {train: /a.fa, val: /b.fa}\nsites: {site-1: {alowed_prefixes: [/a]}}\n", r"unknown keys .* under sites"),
    ("- just\n- a list\n", "must be a YAML mapping"),
    ("data: {train: [unclosed\n", "cannot read"),
    ("data: {train: /a.fa, val: /b.fa}\nprivacy: {target_epsilonn: 8}\n",
     r"\(site site-1\): unknown privacy setting 'target_epsilonn' \(did you mean 'target_epsilon'\?\)"),
    ("data: {train: /a.fa, val: /b.fa}\nprivacy: [8]\n", "privacy must be a mapping"),
    ("data: {train: /a.fa, val: /b.fa}\nprivacy: {target_epsilon: -1}\n", "privacy.target_epsilon: the epsilon"),
])
def test_bad_site_configs(tmp_path, text, needle):
    with pytest.raises(FedesmError, match=needle):
        load_site_config("site-1", _write(tmp_path / "s.yaml", text))


def test_the_privacy_block_is_the_sites_and_merges_per_site(tmp_path):
    path = _write(tmp_path / "s.yaml", "data: {train: /a.fa, val: /b.fa}\n"
                  "privacy: {require_dp: true, target_epsilon: 8, target_delta: 1.0e-6}\n"
                  "sites: {site-2: {privacy: {target_epsilon: 2, debug_noise_seed: 4}}}\n")
    one, two = load_site_config("site-1", path).privacy, load_site_config("site-2", path).privacy
    assert (one.require_dp, one.target_epsilon, one.target_delta, one.debug_noise_seed) == (True, 8.0, 1e-6, None)
    assert (two.require_dp, two.target_epsilon, two.target_delta, two.debug_noise_seed) == (True, 2.0, 1e-6, 4)
    plain = load_site_config("site-1", _write(tmp_path / "p.yaml", "data: {train: /a.fa, val: /b.fa}\n")).privacy
    assert not plain.dp_required and plain.debug_noise_seed is None  # default: secret noise, no DP demanded


def test_a_site_without_allowed_prefixes_reads_no_private_data(tmp_path):
    """Missing key = empty allow-list = every private read refused; a shipped public set still loads."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.fa").write_text(">a\nMKV\n010\n")
    cfg = load_site_config("site-1", _write(tmp_path / "s.yaml", f"data: {{train: {tmp_path}/data/train.fa, "
                                                                    "val: gpsite:ATP:test}\n"))
    assert cfg.allowed_prefixes == []
    with pytest.raises(FedesmError, match=r"train.fa: refused: this site's allowed_prefixes \(.*s.yaml\) lists nothing"):
        resolve_site_path(cfg, cfg.train)
    assert resolve_site_path(cfg, cfg.val).name == "ATP_test.txt.gz"
    other = load_site_config("site-2", _write(tmp_path / "t.yaml", f"data: {{train: {tmp_path}/data/train.fa, "
                                                                      f"val: x}}\nallowed_prefixes: [{tmp_path}/data]\n"))
    assert resolve_site_path(other, other.train) == tmp_path / "data" / "train.fa"


def test_no_config_anywhere_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDESM_SITE_CONFIG", raising=False)
    with pytest.raises(FedesmError, match="no fedesm site configuration"):
        load_site_config("site-1", workspace_root=str(tmp_path))


def test_site_reads_data_and_checkpoint_from_s3(s3, tmp_path, tiny_checkpoint, synth_data):  # noqa: F811
    from fedesm.data.readers import write_records
    from fedesm.data.validate import load_dataset

    train, val = synth_data
    write_records(train, tmp_path / "train.parquet")
    client = boto3.client("s3", endpoint_url=s3.endpoint_url)
    client.create_bucket(Bucket="site-1-data")
    client.create_bucket(Bucket="other-org")
    client.upload_file(str(tmp_path / "train.parquet"), "site-1-data", "binding/train.parquet")
    client.upload_file(str(tiny_checkpoint), "site-1-data", "models/esm2_t2_tiny.pt")
    client.upload_file(str(tmp_path / "train.parquet"), "other-org", "binding/train.parquet")
    cfg = load_site_config("site-1", _write(tmp_path / "site.yaml", f"""
backbone: s3://site-1-data/models/esm2_t2_tiny.pt
data:
  train: s3://site-1-data/binding/train.parquet
  val: s3://other-org/binding/train.parquet
allowed_prefixes: [s3://site-1-data/]
cache_dir: {tmp_path / 'cache'}
"""))
    records = load_dataset(resolve_site_path(cfg, cfg.train))
    assert len(records) == len(train) and records[0].sequence == train[0].sequence
    assert str(resolve_site_path(cfg, cfg.train)).startswith(str(tmp_path / "cache"))
    backbone = load_backbone(cfg.backbone, cache_dir=cfg.cache_dir, policy=cfg.access_policy())
    local = load_backbone(str(tiny_checkpoint))
    assert torch.equal(backbone.model.embed_tokens.weight, local.model.embed_tokens.weight)
    with pytest.raises(FedesmError, match="outside this site's allowed prefixes"):
        resolve_site_path(cfg, cfg.val)
    with pytest.raises(FedesmError, match="no such object"):
        load_backbone("s3://site-1-data/models/esm2_missing.pt", cache_dir=cfg.cache_dir, policy=cfg.access_policy())


def test_declared_samples_is_the_operators_whole_count(tmp_path):
    from fedesm.errors import FedesmError
    from fedesm.site_config import load_site_config

    path = tmp_path / "site.yaml"
    base = "data: {train: /d/train.fa, val: /d/val.fa}\n"
    path.write_text(base)
    assert load_site_config("site-1", path).declared_samples is None  # nothing declared: no count leaves
    path.write_text(base + "declared_samples: 1200\n")
    assert load_site_config("site-1", path).declared_samples == 1200
    for bad in ("0", "-3", "1.5", "true", "1e400", "10000000000000"):
        path.write_text(base + f"declared_samples: {bad}\n")
        with pytest.raises(FedesmError, match="declared_samples must be a whole number"):
            load_site_config("site-1", path)
