"""A checkpoint or Hugging Face folder that lacks, adds or reshapes tensors is refused (issue 23).

transformers fills missing weights with random values and says so only in a log line; fedesm lists the
tensors a file lacks or does not expect (the first few names) in one line and refuses it, so a model
folder whose weights file holds a single tensor never trains.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from fedesm.cli import main
from fedesm.errors import FedesmError
from fedesm.model.backbone import load_backbone
from fedesm.model.checkpoint import read_checkpoint


@pytest.fixture()
def hf_folder(tmp_path):
    from transformers import EsmConfig, EsmForMaskedLM

    config = EsmConfig(vocab_size=33, mask_token_id=32, pad_token_id=1, hidden_size=64, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=256, max_position_embeddings=1026,
                       position_embedding_type="rotary", layer_norm_eps=1e-5, emb_layer_norm_before=False,
                       token_dropout=True, architectures=["EsmForMaskedLM"])
    torch.manual_seed(0)
    out = tmp_path / "esm2_hf"
    EsmForMaskedLM(config).save_pretrained(out)
    return out


def _keep_only(folder, n: int):
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "model.safetensors")
    kept = dict(sorted(weights.items())[:n])
    save_file(kept, folder / "model.safetensors", metadata={"format": "pt"})
    return len(weights)


def test_a_whole_hf_folder_still_loads(hf_folder):
    assert load_backbone(str(hf_folder)).model.embed_dim == 64


def test_an_hf_folder_with_one_tensor_is_refused_naming_what_it_lacks(hf_folder, tmp_path, capsys, synth_data):
    from fedesm.data.readers import write_records

    total = _keep_only(hf_folder, 1)
    with pytest.raises(FedesmError) as e:
        load_backbone(str(hf_folder))
    message = str(e.value)
    import re

    lacks = int(re.search(r"lacks (\d+) tensors", message).group(1))
    assert "\n" not in message and 30 <= lacks < total and "esm.encoder" in message  # not lm_head (unused)
    assert "refusing" in message and "more)" in message  # the first few names, then how many more

    train, val = synth_data
    write_records(train[:20], tmp_path / "train.fa")
    write_records(val[:10], tmp_path / "val.fa")
    out = tmp_path / "run"
    assert main(["train", "--train", str(tmp_path / "train.fa"), "--val", str(tmp_path / "val.fa"),
                 "--backbone", str(hf_folder), "--out", str(out), "--rounds", "1", "--steps-per-round", "1",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "lacks" in err and str(hf_folder) in err
    assert not out.exists()  # refused before its first round: nothing left behind


def test_an_hf_folder_with_a_foreign_tensor_is_refused(hf_folder):
    from safetensors.torch import load_file, save_file

    weights = load_file(hf_folder / "model.safetensors")
    weights["esm.encoder.layer.0.attention.self.backdoor.weight"] = torch.zeros(64, 64)
    save_file(weights, hf_folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(FedesmError, match=r"has unexpected 1 tensor \(esm.encoder.layer.0.attention.self.backdoor"):
        load_backbone(str(hf_folder))


def test_a_fair_esm_checkpoint_lacking_or_adding_tensors_is_refused(tiny_checkpoint, tmp_path):
    data = read_checkpoint(tiny_checkpoint)
    names = sorted(data["model"])
    partial = dict(data, model={k: data["model"][k] for k in names[:1]})
    path = tmp_path / "esm2_partial.pt"
    torch.save(partial, path)
    with pytest.raises(FedesmError) as e:
        load_backbone(str(path))
    assert f"lacks {len(names) - 1} tensors" in str(e.value) and "\n" not in str(e.value)

    extra = dict(data, model={**data["model"], "encoder.sentence_encoder.layers.0.evil.weight": torch.zeros(2)})
    path = tmp_path / "esm2_extra.pt"
    torch.save(extra, path)
    with pytest.raises(FedesmError, match=r"has unexpected 1 tensor \(layers.0.evil.weight\)"):
        load_backbone(str(path))

    key = names[-1]
    reshaped = dict(data, model={**data["model"], key: torch.zeros(3)})
    path = tmp_path / "esm2_reshaped.pt"
    torch.save(reshaped, path)
    with pytest.raises(FedesmError, match=r"has in another shape 1 tensor"):
        load_backbone(str(path))


def test_a_checkpoint_whose_cfg_makes_no_esm2_is_one_line(tiny_checkpoint, tmp_path):
    import argparse

    data = read_checkpoint(tiny_checkpoint)
    for cfg in (argparse.Namespace(encoder_layers=2, encoder_embed_dim=64, encoder_attention_heads=5),
                argparse.Namespace(encoder_layers=-1, encoder_embed_dim=64, encoder_attention_heads=4)):
        path = tmp_path / "esm2_bad.pt"
        torch.save(dict(data, cfg={"model": cfg}), path)
        with pytest.raises(FedesmError, match="not an ESM-2 checkpoint"):
            load_backbone(str(path))
    shutil.rmtree(tmp_path, ignore_errors=True)


# ------------------------------------------------------------------------------------------ run folders


def _train_args(tmp_path, out, *extra):
    return ["train", "--train", str(tmp_path / "train.fa"), "--val", str(tmp_path / "val.fa"), "--backbone",
            "random:esm2_t2_tiny", "--out", str(out), "--rounds", "1", "--steps-per-round", "1", "--batch-size",
            "2", "--max-len", "64", "--no-progress", "--lora-r", "2", *extra]


def test_train_refuses_an_out_folder_that_holds_a_run_unless_forced(tmp_path, capsys, synth_data):
    import json

    from fedesm.data.readers import write_records

    train, val = synth_data
    write_records(train[:10], tmp_path / "train.fa")
    write_records(val[:6], tmp_path / "val.fa")
    out = tmp_path / "run"
    assert main(_train_args(tmp_path, out)) == 0
    before = (out / "metrics.jsonl").read_text()
    events = sorted(p.name for p in (out / "tb").rglob("*") if p.is_file())
    capsys.readouterr()

    assert main(_train_args(tmp_path, out)) == 2  # would mix two runs: rounds 0,1,0,1 and two event files
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "holds a run" in err and "--force" in err
    assert (out / "metrics.jsonl").read_text() == before  # untouched
    assert sorted(p.name for p in (out / "tb").rglob("*") if p.is_file()) == events

    assert main(_train_args(tmp_path, out, "--force", "--seed", "1")) == 0
    rounds = [json.loads(line)["round"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [0, 1]  # one run, replaced
    assert len([p for p in (out / "tb").rglob("*") if p.is_file()]) == 1


def test_a_failed_train_leaves_no_run_folder(tmp_path, capsys, synth_data):
    from fedesm.data.readers import write_records

    train, val = synth_data
    write_records(train[:10], tmp_path / "train.fa")
    write_records(val[:6], tmp_path / "val.fa")
    out = tmp_path / "run"
    args = _train_args(tmp_path, out)
    args[args.index("random:esm2_t2_tiny")] = str(tmp_path / "absent_backbone.pt")
    assert main(args) == 2
    assert "absent_backbone.pt" in capsys.readouterr().err
    assert not out.exists()
    out.mkdir()  # an existing, empty --out stays, and empty
    assert main(args) == 2
    assert out.is_dir() and not any(out.iterdir())
