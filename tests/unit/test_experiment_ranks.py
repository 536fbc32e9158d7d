"""An experiment arm with a site of smaller means: `site_config: {site-1: {lora_r: 4}}` in the YAML reaches that
site's own config and only that site's."""

from __future__ import annotations

import pytest

from fedesm.errors import FedesmError
from fedesm.experiments.config import load_config
from fedesm.site_config import load_site_config, write_site_config


def test_the_ranks_preset_arms():
    cfg = load_config("ranks")
    assert cfg.lora.r == 16 and cfg.seeds == [0, 1, 2]
    arms = {a.id: a for a in cfg.experiments[0].arms}
    assert arms["r16-r16"].site_config == {} and arms["r4-r16"].site_config == {"site-1": {"lora_r": 4}}


@pytest.mark.parametrize("site_config, needle", [
    ({"site-3": {"lora_r": 4}}, "unknown key(s) ['site-3']"),
    ({"site-1": {"lora_r": 32}}, "site-1.lora_r: a site's LoRA rank must be an integer from 1 to lora.r (16)"),
    ({"site-1": {"lora_r": 0}}, "from 1 to lora.r"),
    ({"site-1": {"backbone": "x"}}, "unknown key(s) ['backbone']"),
])
def test_bad_arm_site_configs_are_one_line(site_config, needle):
    import yaml

    from fedesm.experiments.config import parse_config, preset_path

    raw = yaml.safe_load(preset_path("ranks").read_text())
    raw["experiments"][0]["arms"][1]["site_config"] = site_config
    with pytest.raises(FedesmError) as e:
        parse_config(raw)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_site_alone_arms_have_no_site_config():
    import yaml

    from fedesm.experiments.config import parse_config, preset_path

    raw = yaml.safe_load(preset_path("ranks").read_text())
    raw["experiments"][0]["arms"].append({"id": "alone", "kind": "site-alone", "site_config": {"site-1": {"lora_r": 4}}})
    with pytest.raises(FedesmError, match="only federated arms"):
        parse_config(raw)


def test_per_site_values_reach_only_that_site(tmp_path):
    path = write_site_config(tmp_path / "site.yaml", "random:esm2_t2_tiny", tmp_path / "data",
                             per_site={"site-1": {"lora_r": 4}})
    assert load_site_config("site-1", path).lora_r == 4
    assert load_site_config("site-2", path).lora_r is None
    assert load_site_config("site-2", path).train.endswith("site-2/train.fa")
