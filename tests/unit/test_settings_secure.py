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
def test_until_the_job_carries_it_a_secure_job_is_refused_not_run_in_the_clear(strategy):
    with pytest.raises(SettingError, match="not yet carried by the NVFLARE job"):
        FederationSettings(strategy=strategy, secure_aggregation=True, **_OPEN)
