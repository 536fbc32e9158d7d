"""Fused attention (scaled_dot_product_attention on fair-esm's own modules) against fair-esm's stock
attention, and activation checkpointing: same logits, same LoRA gradients, the settings that choose them."""

from __future__ import annotations

import random

import pytest
import torch

from fedesm.errors import FedesmError
from fedesm.model import attention as fused_attention
from fedesm.model.adapters import build_lora_model
from fedesm.model.backbone import load_backbone
from fedesm.model.esm2 import classifiers, set_activation_checkpointing, set_attention
from fedesm.settings import JobSettings, LoraSettings, ModelSettings, TrainConfig

AMINO = "ACDEFGHIKLMNPQRSTVWY"


def _tokens(alphabet, lengths, seed=0):
    rng = random.Random(seed)
    batch = [(f"s{i}", "".join(rng.choice(AMINO) for _ in range(n))) for i, n in enumerate(lengths)]
    return alphabet.get_batch_converter()(batch)[2]


def _lora_model(arch, seed=0, **kw):
    """A random-init LoRA model whose B factors are non-zero, so LoRA changes the outputs and gets gradients."""
    backbone = load_backbone(f"random:{arch}")
    model = build_lora_model(backbone, LoraSettings(r=4, **kw), seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model, backbone.alphabet


def _logits_and_grads(model, tokens, attention, train=False, seed=1):
    set_attention(model, attention)
    model.train(train)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks on both paths when training
    logits = model(tokens)
    (logits.float().square().mean()).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def _max_rel_grad_diff(g1, g2):
    assert g1.keys() == g2.keys() and any(".lora_A." in n for n in g1) and any(".lora_B." in n for n in g1)
    return max(float((g1[n] - g2[n]).abs().max() / g1[n].abs().max().clamp(min=1e-30)) for n in g1)


# ----------------------------------------------------------------------------------- exactness, fp32 on CPU


@pytest.mark.parametrize("arch,lengths", [
    ("esm2_t2_tiny", (1020, 700, 33)),  # a long chain (1,022 tokens with BOS/EOS), padding in two rows
    ("esm2_t4_small", (600, 257)),
    ("esm2_t6_8M_UR50D", (400, 120)),
])
def test_fused_equals_stock_logits_and_lora_gradients(arch, lengths):
    model, alphabet = _lora_model(arch)
    tokens = _tokens(alphabet, lengths)
    assert tokens.eq(alphabet.padding_idx).any()
    stock_logits, stock_grads = _logits_and_grads(model, tokens, "stock")
    fused_logits, fused_grads = _logits_and_grads(model, tokens, "fused")
    assert float((stock_logits - fused_logits).abs().max()) < 1e-5
    assert _max_rel_grad_diff(stock_grads, fused_grads) < 1e-5
    # the comparison can fail: LoRA matters for these outputs
    set_attention(model, "fused")
    with torch.no_grad():
        plain = model.get_base_model()
        with model.disable_adapter():
            base = plain(tokens)
    assert float((base - fused_logits).abs().max()) > 1e-3


def test_fused_equals_stock_in_training_mode_with_dropout():
    model, alphabet = _lora_model("esm2_t2_tiny", dropout=0.3)
    tokens = _tokens(alphabet, (150, 90, 40), seed=3)
    stock_logits, stock_grads = _logits_and_grads(model, tokens, "stock", train=True)
    fused_logits, fused_grads = _logits_and_grads(model, tokens, "fused", train=True)
    assert float((stock_logits - fused_logits).abs().max()) < 1e-5
    assert _max_rel_grad_diff(stock_grads, fused_grads) < 1e-5


def test_unpadded_batch_takes_the_unmasked_kernel(monkeypatch):
    model, alphabet = _lora_model("esm2_t2_tiny")
    tokens = _tokens(alphabet, (80, 80))
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, attn_mask=None, **kw):
        seen.append(attn_mask)
        return real(*args, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(fused_attention.F, "scaled_dot_product_attention", spy)
    stock, _ = _logits_and_grads(model, tokens, "stock")
    fused, _ = _logits_and_grads(model, tokens, "fused")
    assert seen and all(m is None for m in seen)  # no padding: flash-eligible on CUDA
    assert float((stock - fused).abs().max()) < 1e-5


# ----------------------------------------------------------------------------------- which path runs


@pytest.mark.parametrize("attention", ["packed", "fused"])
def test_packed_and_fused_never_call_the_stock_attention(monkeypatch, attention):
    assert ModelSettings().attention == "packed"
    model, alphabet = _lora_model("esm2_t2_tiny")
    set_attention(model, attention)
    (clf,) = classifiers(model)
    assert clf.attention == attention
    assert all(fn is fused_attention.fused_layer for fn in clf._layer_fns)
    from esm.multihead_attention import MultiheadAttention

    def refuse(*a, **k):
        raise AssertionError("fair-esm's attention forward ran")

    monkeypatch.setattr(MultiheadAttention, "forward", refuse)
    tokens = _tokens(alphabet, (50, 30))
    model(tokens).sum().backward()  # packed / fused: never the stock forward
    set_attention(model, "stock")
    with pytest.raises(AssertionError, match="fair-esm's attention forward ran"):
        model(tokens)


def test_the_setting_turns_it_off_everywhere_it_is_read():
    stock = build_lora_model(load_backbone("random:esm2_t2_tiny"), LoraSettings(r=4), attention="stock")
    assert classifiers(stock)[0].attention == "stock"
    assert all(fn is fused_attention.stock_layer for fn in classifiers(stock)[0]._layer_fns)
    job = JobSettings().with_overrides({"model.attention": "stock"})
    assert job.model.attention == "stock" and JobSettings().to_dict()["model"]["attention"] == "packed"
    with pytest.raises(FedesmError, match=r"^model.attention: 'flash' is not one of packed, fused, stock$"):
        ModelSettings(attention="flash")
    with pytest.raises(ValueError, match="not one of"):
        set_attention(stock, "flash")


def test_weights_and_contacts_still_come_from_fair_esm():
    """need_head_weights / contacts are fair-esm's own forward (stock), on the same weights as ours."""
    model, alphabet = _lora_model("esm2_t2_tiny")
    model.eval()
    tokens = _tokens(alphabet, (60, 45))
    esm2 = classifiers(model)[0].esm
    with torch.no_grad():
        out = esm2(tokens, repr_layers=[esm2.num_layers], need_head_weights=True, return_contacts=True)
        ours = classifiers(model)[0].encode(tokens)
    assert out["attentions"].shape == (2, esm2.num_layers, esm2.attention_heads, tokens.shape[1], tokens.shape[1])
    assert out["contacts"].shape == (2, tokens.shape[1] - 2, tokens.shape[1] - 2)
    assert float((out["representations"][esm2.num_layers] - ours).abs().max()) < 1e-5


def test_gelu_is_fair_esms_erf_gelu():
    """The fused GELU is fair-esm's erf form (not the tanh approximation), to float rounding."""
    from esm.modules import gelu

    x = torch.linspace(-8, 8, 100001)
    assert float((fused_attention.gelu_erf(x) - gelu(x)).abs().max()) < 1e-6
    tanh_form = torch.nn.functional.gelu(x, approximate="tanh")
    assert float((tanh_form - gelu(x)).abs().max()) > 1e-4  # the test would see the other form


def test_a_layer_it_cannot_reproduce_falls_back_to_stock():
    from esm.modules import TransformerLayer

    fusable = TransformerLayer(64, 128, 4, add_bias_kv=False, use_esm1b_layer_norm=True, use_rotary_embeddings=True)
    with_bias_kv = TransformerLayer(64, 128, 4, add_bias_kv=True, use_esm1b_layer_norm=True,
                                    use_rotary_embeddings=True)
    learned_positions = TransformerLayer(64, 128, 4, add_bias_kv=False, use_rotary_embeddings=False)
    assert fused_attention.can_fuse(fusable)
    assert not fused_attention.can_fuse(with_bias_kv) and not fused_attention.can_fuse(learned_positions)


# ----------------------------------------------------------------------------------- activation checkpointing


@pytest.mark.parametrize("attention", ["packed", "fused", "stock"])
def test_activation_checkpointing_gives_the_same_gradients(attention):
    model, alphabet = _lora_model("esm2_t4_small", dropout=0.2)
    tokens = _tokens(alphabet, (200, 120), seed=5)
    logits, grads = _logits_and_grads(model, tokens, attention, train=True)
    set_activation_checkpointing(model, True)
    assert classifiers(model)[0].checkpoint_layers
    ck_logits, ck_grads = _logits_and_grads(model, tokens, attention, train=True)
    assert float((logits - ck_logits).abs().max()) < 1e-6  # dropout masks replayed in the recomputation
    assert _max_rel_grad_diff(grads, ck_grads) < 1e-5


def test_activation_checkpointing_recomputes_in_backward(monkeypatch):
    model, alphabet = _lora_model("esm2_t2_tiny")
    tokens = _tokens(alphabet, (40, 30))
    from fedesm.model import esm2 as esm2_module

    calls = []
    real = fused_attention.fused_layer
    monkeypatch.setattr(esm2_module, "fused_layer", lambda *a: calls.append(1) or real(*a))
    clf = classifiers(model)[0]
    clf.set_attention("fused")  # picks up the spy
    for enabled, expected in ((False, 2), (True, 4)):  # 2 layers; with checkpointing each runs again in backward
        calls.clear()
        set_activation_checkpointing(model, enabled)
        model.train()
        model(tokens).sum().backward()
        assert len(calls) == expected
    calls.clear()
    model.eval()
    with torch.no_grad():
        model(tokens)
    assert len(calls) == 2  # no recomputation outside training


def test_trainer_applies_the_training_setting(tiny_checkpoint, synth_data):
    from fedesm.training.trainer import LocalTrainer

    backbone = load_backbone(str(tiny_checkpoint))
    model = build_lora_model(backbone, LoraSettings(r=4))
    trainer = LocalTrainer(model, backbone.alphabet, synth_data[0][:8],
                           TrainConfig(steps_per_round=2, batch_size=2, device="cpu", activation_checkpointing=True))
    assert classifiers(trainer.model)[0].checkpoint_layers
    assert trainer.train_steps(2).steps == 2
    assert not TrainConfig().activation_checkpointing
    with pytest.raises(FedesmError, match="^training.activation_checkpointing: DP-SGD"):
        TrainConfig(activation_checkpointing=True, dp_noise_multiplier=1.0)


# ----------------------------------------------------------------------------------- CUDA, bf16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch", ["esm2_t6_8M_UR50D", "esm2_t12_35M_UR50D"])
def test_cuda_bf16_fused_within_the_stock_paths_own_bf16_spread(arch):
    """On CUDA in bf16, fused differs from fp32 no more than fair-esm's own attention does in bf16."""
    model, alphabet = _lora_model(arch)
    model.cuda().eval()
    tokens = _tokens(alphabet, (1000, 700, 300, 60), seed=7).cuda()

    def run(attention, dtype):
        with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            logits, grads = _logits_and_grads(model, tokens, attention)
        return logits.float(), grads

    ref_logits, ref_grads = run("stock", None)  # fp32
    stock_logits, stock_grads = run("stock", torch.bfloat16)
    fused_logits, fused_grads = run("fused", torch.bfloat16)
    stock_spread = float((stock_logits - ref_logits).abs().max())
    assert float((fused_logits - ref_logits).abs().max()) <= 1.5 * stock_spread + 1e-3
    assert _max_rel_grad_diff(ref_grads, fused_grads) <= 1.5 * _max_rel_grad_diff(ref_grads, stock_grads) + 1e-3
    fp32_fused, _ = run("fused", None)
    assert float((fp32_fused - ref_logits).abs().max()) < 1e-4  # TF32 off by default for matmuls in torch


# ----------------------------------------------------------------------------------- the command line


def test_train_and_predict_take_the_attention_flag(tiny_checkpoint, synth_data, tmp_path, capsys):
    import csv

    from fedesm.cli import main
    from fedesm.data.readers import write_records

    train, val = synth_data
    write_records(train[:40], tmp_path / "train.fa")
    write_records(val[:10], tmp_path / "val.fa")
    out = tmp_path / "run"
    assert main(["train", "--train", str(tmp_path / "train.fa"), "--val", str(tmp_path / "val.fa"),
                 "--backbone", str(tiny_checkpoint), "--out", str(out), "--rounds", "1", "--steps-per-round", "3",
                 "--lora-r", "4", "--no-progress", "--attention", "stock", "--activation-checkpointing"]) == 0
    probs = {}
    for attention in ("packed", "fused", "stock"):
        preds = tmp_path / f"{attention}.csv"
        assert main(["predict", "--model", str(out), "--input", str(tmp_path / "val.fa"), "--out", str(preds),
                     "--attention", attention]) == 0
        probs[attention] = [float(r["probability"]) for r in csv.DictReader(preds.open())]
    assert len(probs["fused"]) == sum(len(r) for r in val[:10])
    assert max(abs(a - b) for a, b in zip(probs["fused"], probs["stock"])) <= 1e-4  # 4 decimals in the CSV
    assert max(abs(a - b) for a, b in zip(probs["fused"], probs["packed"])) <= 1e-4
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "--attention {packed,fused,stock}" in text and "--activation-checkpointing" in text
