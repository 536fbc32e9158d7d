"""The strategy table says what each strategy does, and the code does what the table says."""

import numpy as np
import pytest

from fedesm.aggregation import AggregationState, aggregate
from fedesm.settings import FederationSettings, JobSettings, SettingError, TrainConfig
from fedesm.strategies import STRATEGIES, STRATEGY
from fedesm.training.optimizer_state import resolve_optimizer_state

PAIR = "base_model.model.esm.layers.0.self_attn.q_proj"


def _site(rng, r, a=None):
    return {f"{PAIR}.lora_A.weight": rng.standard_normal((r, 8)) if a is None else a.copy(),
            f"{PAIR}.lora_B.weight": rng.standard_normal((8, r)), "base_model.model.head.weight": rng.standard_normal(8)}


def test_the_table_holds_the_four_strategies_of_the_settings():
    assert STRATEGIES == ("fra", "fra-ef", "fedit", "ffa")
    assert [FederationSettings(strategy=name).strategy for name in STRATEGIES] == list(STRATEGIES)
    with pytest.raises(SettingError, match="federation.strategy"):
        FederationSettings(strategy="fedavg")


@pytest.mark.parametrize("name", STRATEGIES)
def test_each_record_is_what_the_strategy_does(name):
    how, rng = STRATEGY[name], np.random.default_rng(0)
    a = rng.standard_normal((4, 8))
    same = [_site(rng, 4, a), _site(rng, 4, a)]
    state = AggregationState()
    out = aggregate(same, [1, 1], strategy=name, state=state)
    # re-factors: the global A is a new factor, neither site's A nor their mean
    assert (not np.allclose(out[f"{PAIR}.lora_A.weight"], a)) == how.refactors
    # keeps a residual: the rank-4 average of two rank-4 products has a dropped tail, kept between rounds
    assert (state.rounds == 1 and bool(state.residuals)) == how.keeps_residual
    if how.keeps_residual:
        with pytest.raises(ValueError, match="needs an AggregationState"):
            aggregate(same, [1, 1], strategy=name)
    # accepts a smaller rank
    mixed = [_site(rng, 4, a), _site(rng, 2)]
    if how.any_rank:
        out = aggregate(mixed, [1, 1], strategy=name, state=AggregationState())
        assert out[f"{PAIR}.lora_A.weight"].shape == (4, 8)
    else:
        with pytest.raises(ValueError, match="same rank"):
            aggregate(mixed, [1, 1], strategy=name, state=AggregationState())
    # freezes A: the settings refuse the strategy unless the sites train only B
    strategy_alone = lambda: JobSettings(federation=FederationSettings(strategy=name))  # noqa: E731
    if how.freezes_a:
        with pytest.raises(SettingError, match="freeze_lora_a"):
            strategy_alone()
        JobSettings(training=TrainConfig(freeze_lora_a=True), federation=FederationSettings(strategy=name))
    else:
        strategy_alone()
    # its optimizer-state default
    assert resolve_optimizer_state("auto", name) == how.optimizer_state == ("align" if how.refactors else "keep")
