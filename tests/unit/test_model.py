"""ESM-2 loading, LoRA wrapping, parameter counts, adapter I/O and merged export."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from fedesm.cli import main
from fedesm.errors import FedesmError
from fedesm.model.adapters import build_lora_model, count_parameters, get_exchanged_state, parameter_report, set_exchanged_state
from fedesm.model.backbone import load_backbone
from fedesm.model.cards import ModelCard, load_trained_model, save_adapters
from fedesm.model.checkpoint import make_random_checkpoint
from fedesm.model.export import export_merged, load_exported
from fedesm.settings import LoraSettings


def _tokens(alphabet, seqs):
    from fedesm.data.batching import Tokenizer

    return Tokenizer(alphabet).collate([(s, None) for s in seqs])[0]


def test_paper_parameter_count_35m_r16():
    rep = parameter_report("esm2_t12_35M_UR50D", LoraSettings(r=16))
    assert rep["trainable"] == 553_922
    assert rep["lora"] == 552_960 and rep["head"] == 962
    assert 33_000_000 < rep["total"] < 35_000_000


def test_params_cli_prints_553922(capsys):
    assert main(["params", "--arch", "esm2_t12_35M_UR50D", "--lora-r", "16"]) == 0
    assert "553,922" in capsys.readouterr().out


@pytest.mark.parametrize("arch,r", [("esm2_t6_8M_UR50D", 8), ("esm2_t33_650M_UR50D", 16), ("esm2_t36_3B_UR50D", 4)])
def test_parameter_formula_other_archs(arch, r):
    rep = parameter_report(arch, LoraSettings(r=r))
    assert rep["trainable"] == rep["layers"] * 3 * 2 * r * rep["embed_dim"] + rep["embed_dim"] * 2 + 2


def test_checkpoint_loads_with_fair_esm_local_loader(tiny_checkpoint):
    import esm

    assert tiny_checkpoint.with_name(tiny_checkpoint.stem + "-contact-regression.pt").exists()
    with torch.serialization.safe_globals([argparse.Namespace]):
        model, alphabet = esm.pretrained.load_model_and_alphabet_local(str(tiny_checkpoint))
    assert model.num_layers == 2 and model.embed_dim == 64
    ours = load_backbone(str(tiny_checkpoint))
    for (k, a), (_, b) in zip(model.state_dict().items(), ours.model.state_dict().items()):
        if not k.startswith("contact_head"):
            assert torch.equal(a, b), k
    assert ours.arch.layers == 2 and ours.source == str(tiny_checkpoint)


def test_random_source_matches_checkpoint_of_same_seed(tiny_checkpoint):
    a = load_backbone("random:esm2_t2_tiny").model.state_dict()
    b = load_backbone(str(tiny_checkpoint)).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("contact_head"))


@pytest.mark.parametrize(
    "source,needle",
    [
        ("/nonexistent/esm2_x.pt", "not found"),
        ("esm2_t2_tiny", "random:esm2_t2_tiny"),
        ("nonsense_model", "not a checkpoint file"),
        ("random:esm2_t99_nope", "unknown ESM-2 architecture"),
    ],
)
def test_backbone_source_errors(source, needle):
    with pytest.raises(FedesmError, match=needle):
        load_backbone(source)


def test_not_a_checkpoint_file(tmp_path):
    bad = tmp_path / "esm2_bad.pt"
    torch.save({"weights": torch.zeros(3)}, bad)
    with pytest.raises(FedesmError, match="not a fair-esm checkpoint"):
        load_backbone(str(bad))


def test_checkpoint_name_must_start_with_esm2(tmp_path):
    with pytest.raises(FedesmError, match="start with 'esm2'"):
        make_random_checkpoint("esm2_t2_tiny", tmp_path / "tiny.pt")


def test_lora_wrapping_freezes_backbone_and_counts(tiny_checkpoint):
    model = build_lora_model(load_backbone(str(tiny_checkpoint)), LoraSettings(r=4))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in n) or ("classifier" in n) for n in trainable)
    total, n_train = count_parameters(model)
    assert n_train == 2 * 3 * (2 * 4 * 64) + 64 * 2 + 2
    state = get_exchanged_state(model)
    assert sum(v.numel() for v in state.values()) == n_train
    assert any(k.endswith("q_proj.lora_A.weight") for k in state) and "base_model.model.classifier.weight" in state


def test_exchanged_state_roundtrip_and_rejections(tiny_checkpoint):
    model = build_lora_model(load_backbone(str(tiny_checkpoint)), LoraSettings(r=4))
    state = {k: torch.randn_like(v) for k, v in get_exchanged_state(model).items()}
    set_exchanged_state(model, state)
    back = get_exchanged_state(model)
    assert all(torch.equal(state[k], back[k]) for k in state)
    with pytest.raises(FedesmError, match="missing"):
        set_exchanged_state(model, dict(list(state.items())[1:]))
    wrong = dict(state)
    key = next(k for k in state if "lora_A" in k)
    wrong[key] = torch.zeros(5, 64)
    with pytest.raises(FedesmError, match="shape"):
        set_exchanged_state(model, wrong)


def _perturbed_model(checkpoint):
    model = build_lora_model(load_backbone(str(checkpoint)), LoraSettings(r=4))
    g = torch.Generator().manual_seed(1)
    set_exchanged_state(model, {k: 0.1 * torch.randn(v.shape, generator=g) for k, v in get_exchanged_state(model).items()})
    return model.eval()


def test_adapter_save_load_roundtrip_peft_layout(tiny_checkpoint, tmp_path):
    model = _perturbed_model(tiny_checkpoint)
    backbone = load_backbone(str(tiny_checkpoint))
    card = ModelCard.describe(backbone.source, backbone.arch, LoraSettings(r=4), threshold=0.3, max_len=128)
    out = save_adapters(model, card, tmp_path / "adapters")
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    loaded, alphabet, card = load_trained_model(out)
    assert card.threshold == 0.3 and card.max_len == 128 and card.backbone == str(tiny_checkpoint)
    assert card.lora_settings == LoraSettings(r=4)
    tokens = _tokens(alphabet, ["MKTAYIAKQRQISFVKSHFSRQ", "GAVLIK"])
    with torch.no_grad():
        assert torch.allclose(model(tokens), loaded(tokens), atol=1e-6)
    # PEFT itself reads the folder (standard layout)
    from peft import PeftConfig

    assert PeftConfig.from_pretrained(str(out)).r == 4


def test_save_adapters_replaces_atomically(tiny_checkpoint, tmp_path):
    model = _perturbed_model(tiny_checkpoint)
    backbone = load_backbone(str(tiny_checkpoint))
    card = ModelCard.describe(backbone.source, backbone.arch, LoraSettings(r=4))
    save_adapters(model, card, tmp_path / "m")
    save_adapters(model, card, tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_export_merged_matches_peft_model(tiny_checkpoint, tmp_path):
    model = _perturbed_model(tiny_checkpoint)
    path = export_merged(model, tmp_path / "esm2_merged.pt")
    plain, alphabet, card = load_exported(path)
    assert card["max_len"] == 1000
    tokens = _tokens(alphabet, ["MKTAYIAKQRQISFVKSHFSRQ", "GAVLIKCCH"])
    with torch.no_grad():
        np.testing.assert_allclose(model(tokens).numpy(), plain(tokens).numpy(), atol=1e-5)
    # still a fair-esm checkpoint
    assert load_backbone(str(path)).arch.layers == 2


def test_make_checkpoint_cli(tmp_path, capsys):
    out = tmp_path / "esm2_t2_tiny.pt"
    assert main(["make-checkpoint", "--arch", "esm2_t2_tiny", "--out", str(out)]) == 0
    assert out.exists()
    assert main(["make-checkpoint", "--arch", "esm2_t2_tiny", "--out", str(tmp_path / "bad.pt")]) == 2
    assert "start with 'esm2'" in capsys.readouterr().err
