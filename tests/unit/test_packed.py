"""Packed (unpadded) batches against the padded fused path: same logits on every real token, same LoRA
gradients, same DP-SGD per-sample gradients, chains of 1 to 1,022 residues; and evaluation unchanged."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from fedesm.data.batching import IGNORE_INDEX, Tokenizer, eval_batches, tile_windows
from fedesm.model.adapters import build_lora_model
from fedesm.model.attention import Packing
from fedesm.model.backbone import load_backbone
from fedesm.model.esm2 import classifiers, set_attention
from fedesm.settings import LoraSettings, ModelSettings

AMINO = "ACDEFGHIKLMNPQRSTVWY"


def _seqs(lengths, seed=0):
    rng = random.Random(seed)
    return ["".join(rng.choice(AMINO) for _ in range(n)) for n in lengths]


def _lora_model(arch, seed=0, layers=None):
    """Random-init LoRA model with non-zero B factors (LoRA changes outputs and gets gradients)."""
    backbone = load_backbone(f"random:{arch}")
    if layers is not None:  # the first `layers` layers of the architecture, same shapes
        backbone.model.layers = backbone.model.layers[:layers]
    model = build_lora_model(backbone, LoraSettings(r=4), seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model, backbone.alphabet


def _run(model, tokens, attention):
    """Logits at real tokens and LoRA/head gradients of a loss over real tokens only."""
    set_attention(model, attention)
    model.eval()
    model.zero_grad(set_to_none=True)
    real = tokens.ne(classifiers(model)[0].esm.padding_idx)
    logits = model(tokens)[real]
    (logits.float().square().sum() / real.sum()).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def _assert_same(a, b):
    (la, ga), (lb, gb) = a, b
    assert float((la - lb).abs().max()) < 1e-5
    assert ga.keys() == gb.keys() and any(".lora_A." in n for n in ga) and any(".lora_B." in n for n in ga)
    for n in ga:
        assert float((ga[n] - gb[n]).abs().max() / ga[n].abs().max().clamp(min=1e-30)) < 1e-5, n


def test_packed_is_the_default():
    assert ModelSettings().attention == "packed"
    model, _ = _lora_model("esm2_t2_tiny")
    assert classifiers(model)[0].attention == "packed"


# (5, 5, 5, 40, 40, 3): runs of equal lengths go through one batched attention call each (Packing.runs)
@pytest.mark.parametrize("lengths", [(1, 7, 300, 2), (1022, 1, 500), (5, 5, 5, 40, 40, 3)])
def test_packed_equals_padded_tiny(lengths):
    model, alphabet = _lora_model("esm2_t2_tiny")
    tokens = Tokenizer(alphabet).collate([(s, None) for s in _seqs(lengths)])[0]
    _assert_same(_run(model, tokens, "fused"), _run(model, tokens, "packed"))
    packing = classifiers(model)[0].last_packing
    assert packing.lengths == [n + 2 for n in lengths] and packing.n_tokens == sum(lengths) + 2 * len(lengths)


def test_packed_equals_padded_8m_layer_1022_chain():
    """One ESM-2 8M layer (320 wide, 20 heads), a 1,022-residue chain beside short ones."""
    model, alphabet = _lora_model("esm2_t6_8M_UR50D", layers=1)
    tokens = Tokenizer(alphabet).collate([(s, None) for s in _seqs((1022, 5, 64), seed=3)])[0]
    _assert_same(_run(model, tokens, "fused"), _run(model, tokens, "packed"))


def test_token_dropout_rescaling_and_mask_tokens_match():
    """<mask> tokens (token dropout's per-sequence rescaling) and the stock path: the same logits."""
    model, alphabet = _lora_model("esm2_t2_tiny")
    tokens = Tokenizer(alphabet).collate([(s, None) for s in _seqs((40, 12, 90), seed=5)])[0]
    tokens[0, 3:9] = alphabet.mask_idx
    tokens[2, 50] = alphabet.mask_idx
    assert classifiers(model)[0].esm.token_dropout
    packed = _run(model, tokens, "packed")
    _assert_same(_run(model, tokens, "fused"), packed)
    _assert_same(_run(model, tokens, "stock"), packed)


def test_packing_layout():
    real = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    p = Packing(real)
    assert p.lengths == [3, 1, 0, 4] and p.offsets.tolist() == [0, 3, 4, 4, 8]
    assert p.positions.tolist() == [0, 1, 2, 0, 0, 1, 2, 3] and p.segments.tolist() == [0, 0, 0, 1, 3, 3, 3, 3]
    assert p.runs == [(0, 3, 3), (3, 4, 1), (4, 8, 4)]  # the empty sequence in no run
    assert Packing(torch.ones(3, 2, dtype=torch.bool)).runs == [(0, 6, 2)]
    same = Packing(torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool))
    assert same.runs == [(0, 6, 2), (6, 9, 3)]  # an empty sequence has no rows: its neighbours stay one run
    x = torch.arange(8.0)[:, None]
    back = p.unpack(x)[..., 0]
    assert back[real].tolist() == list(range(8)) and not back[~real].any()


def test_dp_per_sample_gradients_packed_equal_padded(tiny_checkpoint, synth_data):
    """DP-SGD's per-sample gradients (each sample's tokens summed) on the packed path equal the padded ones."""
    from fedesm.settings import TrainConfig
    from fedesm.training.trainer import LocalTrainer

    train, _ = synth_data
    backbone = load_backbone(str(tiny_checkpoint))
    model = build_lora_model(backbone, LoraSettings(r=4))
    config = TrainConfig(device="cpu", steps_per_round=5, batch_size=6, max_len=96, dp_noise_multiplier=1.0, class_weights=None,
                         dp_max_grad_norm=1.0)
    trainer = LocalTrainer(model, backbone.alphabet, train, config)
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.05)
    trainer.model.eval()
    tokens, labels = trainer.sampler.base.next_batch()
    assert tokens.eq(trainer.tokenizer.padding_idx).any()
    dp = trainer.gradients

    def per_sample(attention):
        set_attention(trainer.model, attention)
        trainer.optimizer.zero_grad()
        dp.grads.enabled = True
        dp.per_sample_losses(trainer.token_losses, tokens, labels).sum().backward()
        dp.grads.enabled = False
        return {id(p): g for p, g in dp.grads.compute(tokens.shape[0])}

    padded, packed = per_sample("fused"), per_sample("packed")
    assert classifiers(trainer.model)[0].last_packing is not None
    assert padded.keys() == packed.keys() == {id(p) for p in trainer.params}
    for k in padded:
        assert float((padded[k] - packed[k]).abs().max() / padded[k].abs().max().clamp(min=1e-30)) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_packed_varlen_within_the_padded_paths_bf16_spread():
    """On CUDA in bf16 (varlen flash attention), packed differs from fp32 no more than padded fused does."""
    model, alphabet = _lora_model("esm2_t6_8M_UR50D")
    model.cuda()
    tokens = Tokenizer(alphabet).collate([(s, None) for s in _seqs((1000, 700, 300, 1), seed=7)])[0].cuda()

    def run(attention, dtype):
        with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            logits, grads = _run(model, tokens, attention)
        return logits.float(), grads

    ref, _ = run("fused", None)
    fused, _ = run("fused", torch.bfloat16)
    packed, _ = run("packed", torch.bfloat16)
    assert float((packed - ref).abs().max()) <= 1.5 * float((fused - ref).abs().max()) + 1e-3


def test_evaluation_numbers_unchanged_packed_vs_padded():
    """A small evaluation as the demo scores (GPSite ATP test chains, tiled windows, threshold from val):
    every probability and every reported metric the same to 1e-5 on the packed and the padded path."""
    from fedesm.data.validate import load_dataset
    from fedesm.evaluation.scoring import score
    from fedesm.training.inference import predict_proba

    test = load_dataset("gpsite:ATP:test")
    chains = sorted(test, key=len)[:6] + sorted(test, key=len)[-3:]  # short ones and long ones (tiled at 256)
    val, tst = chains[::2], chains[1::2]
    assert max(len(r) for r in chains) > 256
    model, alphabet = _lora_model("esm2_t2_tiny")
    tok = Tokenizer(alphabet)
    out = {}
    for attention in ("fused", "packed"):
        set_attention(model, attention)
        probs = {k: predict_proba(model, tok, [r.sequence for r in recs], 256, batch_tokens=2048)
                 for k, recs in (("val", val), ("test", tst))}
        out[attention] = probs, score(val, probs["val"], tst, probs["test"])
    (pv, mv), (pp, mp) = out["fused"], out["packed"]
    for k in ("val", "test"):
        assert all(np.isfinite(a).all() and float(np.abs(a - b).max()) < 1e-5 for a, b in zip(pv[k], pp[k]))
    assert mv.keys() == mp.keys() and "test_auprc" in mv
    for k in mv:
        if isinstance(mv[k], float) and np.isfinite(mv[k]):
            assert abs(mv[k] - mp[k]) < 1e-5, k
