"""The demo's backbone: pretrained ESM-2 8M from the fair-esm/torch hub cache (or a download) when it can be had,
else the random init with one line saying so and how to get real weights; `--backbone random` forces it."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest
import torch

from fedesm.experiments.demo import PRETRAINED, choose_backbone
from fedesm.model.backbone import HUB_URL, fetch_hub_checkpoint, hub_cache_path, load_backbone


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty torch hub cache and no network (as on this machine and in CI): every URL probe fails."""
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    calls = []

    def no_network(request, *a, **kw):
        calls.append(getattr(request, "full_url", request))
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    yield calls
    torch.hub.set_dir(old)


def test_offline_without_cache_falls_back_to_random_with_one_clear_line(offline_hub):
    arch, backbone, line = choose_backbone("auto", "esm2_t2_tiny")
    assert (arch, backbone) == ("esm2_t2_tiny", None)
    assert offline_hub == [HUB_URL.format(name=PRETRAINED)]  # it tried the download, once
    assert line.startswith("random-init ESM-2 (esm2_t2_tiny): no pretrained weights, esm2_t6_8M_UR50D: not in ")
    assert "not downloadable (URLError)" in line and str(hub_cache_path(PRETRAINED)) in line
    assert HUB_URL.format(name=PRETRAINED) in line and "--backbone random" in line and "\n" not in line


def test_weights_in_the_hub_cache_are_used(offline_hub):
    from fedesm.model.checkpoint import make_random_checkpoint

    cached = make_random_checkpoint(PRETRAINED, hub_cache_path(PRETRAINED))  # stands in for the downloaded file
    arch, backbone, line = choose_backbone("auto", "esm2_t2_tiny")
    assert (arch, backbone) == (PRETRAINED, str(cached)) and offline_hub == []
    assert line == f"pretrained ESM-2 {PRETRAINED} from {cached}"
    assert load_backbone(backbone).arch.layers == 6
    # a published --arch is looked for under its own name
    assert choose_backbone("auto", "esm2_t12_35M_UR50D")[:2] == ("esm2_t12_35M_UR50D", None)


def test_random_forces_the_old_behaviour_without_looking(offline_hub):
    def never(name):
        raise AssertionError("must not look for weights")

    assert choose_backbone("random", "esm2_t2_tiny", fetch=never)[:2] == ("esm2_t2_tiny", None)
    assert choose_backbone("/models/esm2_x.pt", "esm2_t6_8M_UR50D", fetch=never)[:2] == (
        "esm2_t6_8M_UR50D", "/models/esm2_x.pt")
    assert offline_hub == []


def test_fetch_reports_why_in_one_line(offline_hub):
    from fedesm.errors import FedesmError

    with pytest.raises(FedesmError, match=r"esm2_t6_8M_UR50D: not in .*esm2_t6_8M_UR50D.pt and not downloadable"):
        fetch_hub_checkpoint("esm2_t6_8M_UR50D", timeout=1)


def test_demo_cli_passes_the_choice_through(offline_hub, monkeypatch, tmp_path):
    from fedesm.cli import main
    from fedesm.experiments import demo

    seen = {}
    monkeypatch.setattr(demo, "run_demo", lambda out, **kw: seen.update(kw))
    assert main(["demo", "--out", str(tmp_path)]) == 0
    assert seen["settings"].model.backbone is None and seen["settings"].model.arch == "esm2_t2_tiny"
    assert seen["backbone_line"].startswith("random-init ESM-2 (esm2_t2_tiny): no pretrained weights")
