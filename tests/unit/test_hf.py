"""Hugging Face ESM-2 in and out, offline: a small random EsmForMaskedLM built with transformers at test time,
trained on through fedesm, exported as an HF model and as PEFT adapters on HF names, loaded back with
transformers (+ peft): the same per-residue probabilities as `fedesm predict`."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from fedesm.cli import main
from fedesm.data.batching import Tokenizer
from fedesm.data.readers import write_records
from fedesm.errors import FedesmError
from fedesm.model.backbone import load_backbone
from fedesm.model.checkpoint import read_checkpoint, save_esm2_checkpoint
from fedesm.model.esm2 import EsmTokenClassifier
from fedesm.model.hf import fair_to_hf_key, hf_peft_key, hf_to_fair_key, is_hf_source, to_hf_masked_lm

SEQS = ["MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEKAVQVKVKALPDAQFEVV", "MSTNPKPQRKTKRNTNRRPQDVKFPGG",
        "GSHMLEDPVDAFQ"]


def hf_config(**kw):
    from transformers import EsmConfig

    base = dict(vocab_size=33, mask_token_id=32, pad_token_id=1, hidden_size=64, num_hidden_layers=2,
                num_attention_heads=4, intermediate_size=256, max_position_embeddings=1026,
                position_embedding_type="rotary", layer_norm_eps=1e-5, emb_layer_norm_before=False, token_dropout=True,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, architectures=["EsmForMaskedLM"])
    base.update(kw)
    return EsmConfig(**base)


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory):
    """A random EsmForMaskedLM (2 layers, 64-dim, 4 heads = esm2_t2_tiny's shape) as save_pretrained writes it."""
    from transformers import EsmForMaskedLM

    torch.manual_seed(7)
    model = EsmForMaskedLM(hf_config())
    with torch.no_grad():  # transformers' init leaves LayerNorms at 1/0 and biases at 0: make every weight count
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    out = tmp_path_factory.mktemp("hf") / "esm2_hf_tiny"
    model.save_pretrained(out)
    return out


def _tokens(alphabet, seqs):
    return Tokenizer(alphabet).collate([(s, None) for s in seqs])[0]


def test_key_maps_are_inverse_and_cover_esm2():
    from fedesm.architectures import get_architecture, new_esm2

    esm2, _ = new_esm2(get_architecture("esm2_t2_tiny"))
    mapped = {k: fair_to_hf_key(k) for k in esm2.state_dict()}
    for fair, hf in mapped.items():
        if hf is not None:
            assert hf_to_fair_key(hf) == fair
    skipped = sorted(k for k, v in mapped.items() if v is None)
    assert all(".rot_emb." in k or k.startswith("lm_head") for k in skipped)  # computed or beside the encoder
    assert mapped["layers.1.self_attn.q_proj.weight"] == "encoder.layer.1.attention.self.query.weight"
    assert mapped["layers.0.self_attn_layer_norm.bias"] == "encoder.layer.0.attention.LayerNorm.bias"
    assert mapped["layers.0.final_layer_norm.weight"] == "encoder.layer.0.LayerNorm.weight"
    assert hf_peft_key("base_model.model.esm.layers.3.self_attn.v_proj.lora_B.weight") == \
        "base_model.model.esm.encoder.layer.3.attention.self.value.lora_B.weight"
    assert hf_peft_key("base_model.model.classifier.weight") == "base_model.model.classifier.weight"


def test_hf_folder_loads_as_the_same_network(hf_dir):
    """Encoder outputs and MLM logits of the mapped fair-esm module equal transformers' own (float32 rounding)."""
    from transformers import EsmForMaskedLM

    assert is_hf_source(str(hf_dir)) and is_hf_source("hf:facebook/esm2_t6_8M_UR50D")
    backbone = load_backbone(str(hf_dir))
    assert (backbone.arch.layers, backbone.arch.embed_dim, backbone.arch.heads) == (2, 64, 4)
    hf = EsmForMaskedLM.from_pretrained(hf_dir).eval()
    tokens = _tokens(backbone.alphabet, SEQS)
    mask = tokens.ne(backbone.alphabet.padding_idx).long()
    with torch.no_grad():
        ours = EsmTokenClassifier(backbone.model).eval().encode(tokens)
        theirs = hf.esm(input_ids=tokens, attention_mask=mask).last_hidden_state
        lm_ours = backbone.model(tokens)["logits"]
        lm_theirs = hf(input_ids=tokens, attention_mask=mask).logits
    real = mask.bool()
    assert float((ours - theirs)[real].abs().max()) < 1e-5
    assert float((lm_ours - lm_theirs)[real].abs().max()) < 1e-5
    back = to_hf_masked_lm(backbone.model)  # and back: the exact same tensors
    for k, v in hf.state_dict().items():
        if "inv_freq" not in k:
            assert torch.equal(back.state_dict()[k], v), k


def test_hf_folder_errors(tmp_path, hf_dir):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FedesmError, match="needs config.json"):
        load_backbone(str(tmp_path / "empty"))
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((hf_dir / "config.json").read_text())
    with pytest.raises(FedesmError, match="no model weights"):
        load_backbone(str(bare))
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (bert / "model.safetensors").write_bytes(b"")
    with pytest.raises(FedesmError, match="not an ESM model"):
        load_backbone(str(bert))
    with pytest.raises(FedesmError, match="could not fetch .* Hugging Face hub"):
        load_backbone("hf:fedesm-offline/does-not-exist", cache_dir=tmp_path / "cache")


def test_hf_weights_in_fair_esm_file_are_identical(hf_dir, tmp_path):
    """An HF checkpoint written as a fair-esm .pt (what a mixed federation holds) gives the same tensors."""
    backbone = load_backbone(str(hf_dir))
    path = save_esm2_checkpoint(backbone.model, tmp_path / "esm2_from_hf.pt")
    again = load_backbone(str(path))
    for k, v in backbone.model.state_dict().items():
        if not k.startswith("contact_head"):  # fedesm reads fair-esm files without the contact head (unused)
            assert torch.equal(again.model.state_dict()[k], v), k
    assert read_checkpoint(path)["cfg"]["model"].encoder_layers == 2


def _read_predictions(path):
    with open(path) as f:
        return np.array([float(r["probability"]) for r in csv.DictReader(f)])


def test_hf_round_trip_train_export_load_predict(hf_dir, synth_data, tmp_path, capsys):
    """Train through fedesm on the HF checkpoint; `fedesm export --format hf` and `--format peft-hf`; load with
    transformers (+ peft); per-residue probabilities equal `fedesm predict`'s (1e-4)."""
    from peft import PeftModel
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    train, val = synth_data
    write_records(train[:60], tmp_path / "train.fa")
    write_records(val[:20], tmp_path / "val.fa")
    assert main(["train", "--train", str(tmp_path / "train.fa"), "--val", str(tmp_path / "val.fa"),
                 "--backbone", str(hf_dir), "--out", str(tmp_path / "run"), "--rounds", "1",
                 "--steps-per-round", "6", "--batch-size", "4", "--lr", "0.01", "--max-len", "128",
                 "--no-progress"]) == 0
    model_dir = tmp_path / "run" / "last"
    card = json.loads((model_dir / "fedesm_model.json").read_text())
    assert card["backbone"] == str(hf_dir)
    records = [r for r in val if len(r.sequence) <= 128][:6]  # one window each: tiling is fedesm's, not HF's
    assert len(records) >= 3
    write_records(records, tmp_path / "query.fa")
    assert main(["predict", "--model", str(model_dir), "--input", str(tmp_path / "query.fa"),
                 "--out", str(tmp_path / "pred.csv")]) == 0
    fedesm_probs = _read_predictions(tmp_path / "pred.csv")  # written with 4 decimals
    from fedesm.model.cards import load_trained_model
    from fedesm.training.inference import predict_proba

    model, alphabet, _ = load_trained_model(model_dir)
    exact = np.concatenate(predict_proba(model, Tokenizer(alphabet), [r.sequence for r in records], 128))
    assert np.abs(exact - fedesm_probs).max() <= 5e-5 + 1e-7
    assert exact.std() > 1e-3  # the trained head separates residues: a real comparison

    assert main(["export", "--model", str(model_dir), "--format", "hf", "--out", str(tmp_path / "hf_out")]) == 0
    assert main(["export", "--model", str(model_dir), "--format", "peft-hf", "--out", str(tmp_path / "peft_out")]) == 0
    out = capsys.readouterr().out
    assert "wrote Hugging Face model" in out and "wrote PEFT adapters" in out

    hf_model = AutoModelForTokenClassification.from_pretrained(tmp_path / "hf_out").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf_out")
    assert type(hf_model).__name__ == "EsmForTokenClassification"
    assert hf_model.config.fedesm["threshold"] == pytest.approx(card["threshold"])
    assert f"call threshold: {card['threshold']:.6g}" in (tmp_path / "hf_out" / "README.md").read_text()

    base = AutoModelForTokenClassification.from_pretrained(hf_dir, num_labels=2)
    adapter_config = json.loads((tmp_path / "peft_out" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(hf_dir.resolve())
    assert sorted(adapter_config["target_modules"]) == ["key", "query", "value"]
    peft_model = PeftModel.from_pretrained(base, tmp_path / "peft_out").eval()

    diffs = {}
    for name, net in (("hf", hf_model), ("peft-hf", peft_model)):
        probs = []
        for r in records:
            batch = tokenizer([r.sequence], return_tensors="pt")
            assert batch["input_ids"][0].tolist() == _tokens(alphabet, [r.sequence])[0].tolist()
            with torch.no_grad():
                logits = net(**batch).logits
            probs.append(torch.softmax(logits, -1)[0, 1:-1, 1].numpy())
        probs = np.concatenate(probs)
        assert np.abs(probs - fedesm_probs).max() < 1e-4, name
        diffs[name] = float(np.abs(probs - exact).max())
        assert diffs[name] < 1e-5, name
    # the exported folder is itself a backbone fedesm reads (EsmForTokenClassification: the head is not taken)
    again = load_backbone(str(tmp_path / "hf_out"))
    merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    for k, v in merged.esm.state_dict().items():
        if not k.startswith(("lm_head", "contact_head")) and ".rot_emb." not in k:
            assert torch.allclose(again.model.state_dict()[k], v, atol=1e-6), k
    (tmp_path / "max_diff.json").write_text(json.dumps(diffs))
    print(f"HF round trip, max |p - fedesm|: {diffs}")


def test_export_peft_hf_names_the_fair_esm_twin(tmp_path, tiny_checkpoint):
    """A model trained on a fair-esm hub name records facebook/<name> as its HF base; on a random init, none."""
    from fedesm.model.cards import ModelCard, save_adapter_state
    from fedesm.model.adapters import initial_exchanged_state
    from fedesm.architectures import get_architecture
    from fedesm.settings import LoraSettings

    arch = get_architecture("esm2_t2_tiny")
    state = initial_exchanged_state(arch, LoraSettings(r=4))
    for source, expected in (("esm2_t6_8M_UR50D", "facebook/esm2_t6_8M_UR50D"), ("random:esm2_t2_tiny", None)):
        card = ModelCard.describe(source, arch, LoraSettings(r=4))
        save_adapter_state(state, card, tmp_path / "m")
        assert main(["export", "--model", str(tmp_path / "m"), "--format", "peft-hf", "--out",
                     str(tmp_path / "p")]) == 0
        cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
        assert cfg["base_model_name_or_path"] == expected
        assert cfg["r"] == 4
