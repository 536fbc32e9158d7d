"""Secure aggregation in `nvflare simulator`: the same job with and without `federation.secure_aggregation`,
same seeds and data, persists the same global model round after round (to 1e-5; the masked sums carry 2^-32
fixed point), with every site signing its keys with its kit from real provisioning."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from tests.secure_parts import make_kits

pytestmark = pytest.mark.slow


def _runs(tmp_path, n_sites: int, strategy: str, rounds: int = 3):
    from fedesm import results
    from fedesm.data.split import split_records, write_split
    from fedesm.data.synth import synth_records
    from fedesm.launch.jobs import export_job
    from fedesm.launch.simulate import run_simulator
    from fedesm.model.cards import read_adapter_state
    from fedesm.model.checkpoint import make_random_checkpoint
    from fedesm.site_config import write_site_config

    sites = [f"site-{i}" for i in range(1, n_sites + 1)]
    kits = make_kits(tmp_path / "kits", sites=sites)
    records = synth_records(n=60 * n_sites, n_families=10, pos_rate=0.1, min_len=60, max_len=160, seed=2)
    write_split(split_records(records, "iid", n_sites, seed=2, site_val_frac=0.15), tmp_path / "data")
    ckpt = make_random_checkpoint("esm2_t2_tiny", tmp_path / "esm2_t2_tiny.pt")
    cfg = write_site_config(tmp_path / "site.yaml", ckpt, tmp_path / "data")
    raw = yaml.safe_load(cfg.read_text())
    raw["kit_dir"] = str(kits / "{site}" / "startup")
    cfg.write_text(yaml.safe_dump(raw))
    base = {"model.arch": "esm2_t2_tiny", "model.backbone": str(ckpt), "training.rounds": rounds,
            "training.steps_per_round": 6, "training.batch_size": 4, "lora.r": 4, "training.max_len": 160,
            "federation.strategy": strategy, "federation.min_clients": n_sites,
            "federation.max_update_ratio": 0.0, "federation.clip_update_ratio": 0.0}
    persisted = {}
    for name, secure in (("plain", False), ("secure", True)):
        job = export_job("esm2_fra_lora", tmp_path / name, {**base, "federation.secure_aggregation": secure})
        result = run_simulator(job, tmp_path / f"ws_{name}", n_clients=n_sites, site_config=cfg, timeout=900)
        out = results.output_dir(result)
        persisted[name] = {r: {k: v.numpy() for k, v in read_adapter_state(results.round_dir(out, r)).items()}
                           for r in range(rounds + 1)}
    return persisted, (tmp_path / "ws_secure.log").read_text(errors="replace")


@pytest.mark.parametrize("n_sites, strategy", [(2, "fra"), (3, "fra-ef")])
def test_secure_fra_gives_the_plain_global_model_every_round(tmp_path, n_sites, strategy):
    persisted, log = _runs(tmp_path, n_sites, strategy)
    for r, plain in persisted["plain"].items():
        secure = persisted["secure"][r]
        assert set(secure) == set(plain)
        for k in plain:
            np.testing.assert_allclose(secure[k], plain[k], rtol=0, atol=1e-5, err_msg=f"round {r}: {k}")
        if r:
            assert not np.allclose(plain[k], persisted["plain"][0][k])  # the model moved: the check has teeth
    assert log.count("sent the round's signed key, kept the factors") == 3 * n_sites
    assert log.count("sent the masked pass2 message") == 3 * n_sites
    assert f"secure {strategy} of {n_sites} sites" in log
