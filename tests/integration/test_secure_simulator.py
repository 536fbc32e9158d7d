"""Secure aggregation in `nvflare simulator`: the same job with and without `federation.secure_aggregation`,
same seeds and data, persists the same global model round after round (to 1e-5; the masked sums carry 2^-32
fixed point), with every site signing its keys with its kit from real provisioning."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from tests.secure_parts import make_kits

pytestmark = pytest.mark.slow


def _sites(tmp_path, n_sites: int, seed: int, kit_overrides=None):
    """`n_sites` sites on synthetic data with a tiny checkpoint and their kits from real provisioning: the site
    config (each site's `kit_dir` its own kit, unless `kit_overrides` names another), the checkpoint, the kits."""
    from fedesm.data.split import split_records, write_split
    from fedesm.data.synth import synth_records
    from fedesm.model.checkpoint import make_random_checkpoint
    from fedesm.site_config import write_site_config

    sites = [f"site-{i}" for i in range(1, n_sites + 1)]
    kits = make_kits(tmp_path / "kits", sites=sites)
    records = synth_records(n=60 * n_sites, n_families=10, pos_rate=0.1, min_len=60, max_len=160, seed=seed)
    write_split(split_records(records, "iid", n_sites, seed=seed, site_val_frac=0.15), tmp_path / "data")
    ckpt = make_random_checkpoint("esm2_t2_tiny", tmp_path / "esm2_t2_tiny.pt")
    cfg = write_site_config(tmp_path / "site.yaml", ckpt, tmp_path / "data")
    raw = yaml.safe_load(cfg.read_text())
    raw["kit_dir"] = str(kits / "{site}" / "startup")
    if kit_overrides:
        raw["sites"] = {site: {"kit_dir": str(path)} for site, path in kit_overrides.items()}
    cfg.write_text(yaml.safe_dump(raw))
    return cfg, ckpt, kits


def _runs(tmp_path, n_sites: int, strategy: str, rounds: int = 3):
    from fedesm import results
    from fedesm.launch.jobs import export_job
    from fedesm.launch.simulate import run_simulator
    from fedesm.model.cards import read_adapter_state

    cfg, ckpt, _ = _sites(tmp_path, n_sites, seed=2)
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


def _misconfigured_run(tmp_path, n_sites: int, rounds: int = 2):
    """`n_sites` sites, the last one's kit holding another project's root certificate (a site set up with the
    wrong kit): it signs its key with its own kit key, but refuses every peer's key when the first pass comes,
    so it is lost between the key exchange and the sums, every round."""
    import shutil

    from fedesm.launch.jobs import export_job
    from fedesm.launch.simulate import run_simulator

    last = f"site-{n_sites}"
    wrong = tmp_path / "wrong_kit"
    cfg, ckpt, kits = _sites(tmp_path, n_sites, seed=4, kit_overrides={last: wrong})
    other = make_kits(tmp_path / "other", name="elsewhere", sites=[f"site-{i}" for i in range(1, n_sites + 1)])
    shutil.copytree(kits / last / "startup", wrong)
    shutil.copy(other / last / "startup" / "rootCA.pem", wrong / "rootCA.pem")
    job = export_job("esm2_fra_lora", tmp_path / "job", {
        "model.arch": "esm2_t2_tiny", "model.backbone": str(ckpt), "training.rounds": rounds,
        "training.steps_per_round": 4, "training.batch_size": 4, "lora.r": 4, "training.max_len": 160,
        "federation.min_clients": 2, "federation.max_update_ratio": 0.0, "federation.clip_update_ratio": 0.0,
        "federation.secure_aggregation": True, "federation.wait_after_min_clients": 600})
    return lambda: run_simulator(job, tmp_path / "ws", n_clients=n_sites, site_config=cfg, timeout=900), \
        tmp_path / "ws.log"


def test_a_site_lost_between_the_passes_makes_the_round_run_again_with_the_others(tmp_path):
    from fedesm import results
    from fedesm.tables import read_table

    run, log_path = _misconfigured_run(tmp_path, 3)
    out = results.output_dir(run())
    log = log_path.read_text(errors="replace")
    assert log.count("round 0: running again with site-1, site-2 (they train again: fresh keys and masks)") == 1
    assert log.count("round 1: running again with site-1, site-2") == 1
    assert "site-3: secure aggregation: the public key for site 'site-1' comes with a certificate the project's " \
           "root CA did not issue" in log
    assert log.count("secure fra of 2 sites") == 2 and "secure fra of 3 sites" not in log
    for r in (1, 2):
        assert (results.round_dir(out, r) / "adapter_model.safetensors").is_file()
    rows = [r for r in read_table(out / results.METRICS) if r.get("site") == "site-3" and r.get("rejected")]
    assert {r["round"] for r in rows} == {1, 2} and all("no pass1 message" not in r["rejected"] for r in rows)


def test_a_site_lost_with_no_other_left_ends_the_job_with_the_reason_before_any_round_is_saved(tmp_path):
    from fedesm import results
    from fedesm.errors import FedesmError
    from fedesm.launch.simulate import result_dir

    run, log_path = _misconfigured_run(tmp_path, 2)
    with pytest.raises(FedesmError):
        run()
    log = log_path.read_text(errors="replace")
    assert ("round 0: lost site-2 between the secure passes; 1 site(s) left (site-1), a secure sum needs 2"
            in log)
    out = results.output_dir(result_dir(tmp_path / "ws"))
    assert not results.round_dir(out, 1).exists()  # nothing after the initial model was saved
