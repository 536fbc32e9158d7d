"""federation.secure_aggregation: off by default; on, it is refused in one line for what it cannot do."""

import dataclasses

import pytest

from fedesm.settings import FederationSettings, SettingError
from fedesm.strategies import STRATEGY

_OPEN = dict(max_update_ratio=0.0, clip_update_ratio=0.0)  # the server cannot screen what it cannot see


def test_off_by_default_and_every_shipped_strategy_has_a_secure_path():
    assert FederationSettings().secure_aggregation is False
    assert [n for n, how in STRATEGY.items() if how.secure] == ["fra", "fra-ef", "fedit", "ffa"]


def test_a_strategy_without_a_secure_path_is_refused(monkeypatch):
    """The check reads the table: a strategy whose record has no secure path is refused by name."""
    monkeypatch.setitem(STRATEGY, "fedit", dataclasses.replace(STRATEGY["fedit"], secure=False))
    with pytest.raises(SettingError, match=r"federation.secure_aggregation: has no path for strategy fedit.*"
                                           "use fra or fra-ef or ffa"):
        FederationSettings(strategy="fedit", secure_aggregation=True, **_OPEN)


@pytest.mark.parametrize("screen, shown", [(dict(max_update_ratio=10.0, clip_update_ratio=0.0), "max_update_ratio 10"),
                                           (dict(max_update_ratio=0.0, clip_update_ratio=1.0), "clip_update_ratio 1"),
                                           (dict(_OPEN, max_update_norm=5.0), "max_update_norm 5")])
def test_server_side_update_bounds_are_refused_with_it(screen, shown):
    with pytest.raises(SettingError, match=rf"cannot bound it \({shown}\)"):
        FederationSettings(strategy="fra", secure_aggregation=True, **screen)


@pytest.mark.parametrize("strategy", ["fra", "fra-ef", "fedit", "ffa"])
def test_every_secure_strategy_is_accepted_and_its_job_routes_the_passes(strategy):
    from fedesm.launch.jobs import JOBS, render_job

    fed = FederationSettings(strategy=strategy, secure_aggregation=True, min_clients=2, **_OPEN)
    assert fed.secure_aggregation and fed.secure_pass_timeout == 600
    template = JOBS["esm2_fra_lora"]
    training = template.settings.training.replace(freeze_lora_a=strategy == "ffa")
    files = render_job(template, template.settings.replace(federation=fed, training=training))
    assert files["app/config/config_fed_client.json"]["executors"][0]["tasks"] == [
        "train", "validate", "submit_model", "secure_pass1", "secure_pass2", "secure_sum"]
    plain = render_job(template)  # off: the executor takes only the usual tasks
    assert plain["app/config/config_fed_client.json"]["executors"][0]["tasks"] == ["train", "validate", "submit_model"]


@pytest.mark.parametrize("fields, shown", [(dict(weigh_by="declared"), "uniform only"),
                                           (dict(min_clients=1), "min_clients >= 2"),
                                           (dict(secure_pass_timeout=0), "secure_pass_timeout: must be >= 1")])
def test_what_a_secure_sum_cannot_do_is_refused_in_one_line(fields, shown):
    with pytest.raises(SettingError, match=shown):
        FederationSettings(**{"strategy": "fra", "secure_aggregation": True, "min_clients": 2, **_OPEN, **fields})


def test_a_cyclic_job_with_secure_aggregation_is_refused_at_export(tmp_path):
    from fedesm.errors import FedesmError
    from fedesm.launch.jobs import export_job

    with pytest.raises(FedesmError, match="needs the scatter-and-gather workflow"):
        export_job("esm2_cyclic", tmp_path, {"federation.secure_aggregation": True, "federation.max_update_ratio": 0,
                                             "federation.clip_update_ratio": 0})
    assert not (tmp_path / "esm2_cyclic").exists()  # nothing written
