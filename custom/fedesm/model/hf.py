"""Hugging Face ESM-2 in and out: `transformers` checkpoints mapped exactly onto fair-esm's ESM2 module.

fedesm trains one network (fair-esm's ESM2 + a linear per-residue head, `model.esm2`); Hugging Face
holds the same network under other names. This module is the one place that knows both:

  fair-esm ESM2                         transformers EsmModel (``esm.`` inside the task models)
  embed_tokens                          embeddings.word_embeddings
  layers.N.self_attn.{q,k,v}_proj       encoder.layer.N.attention.self.{query,key,value}
  layers.N.self_attn.out_proj           encoder.layer.N.attention.output.dense
  layers.N.self_attn_layer_norm         encoder.layer.N.attention.LayerNorm   (pre-attention norm)
  layers.N.fc1 / fc2                    encoder.layer.N.intermediate.dense / output.dense
  layers.N.final_layer_norm             encoder.layer.N.LayerNorm
  emb_layer_norm_after                  encoder.emb_layer_norm_after
  contact_head.regression               contact_head.regression
  lm_head.{dense,layer_norm,bias}       lm_head.{dense,layer_norm,bias} (EsmForMaskedLM, beside ``esm.``)
  classifier (fedesm's head)            classifier (EsmForTokenClassification)

Both use rotary position embeddings (computed, not stored), the same 33-token vocabulary in the same
order, and token-dropout rescaling, so the mapping is exact: a site holding an HF checkpoint and a
site holding the fair-esm file of the same weights build the same module and train identically.

Reading goes through `transformers` itself (`from_pretrained`), so every layout it reads
(safetensors, pytorch_model.bin, shards, old key names) is read the same way here.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Optional

import torch

from fedesm.errors import FedesmError

HF_PREFIX = "hf:"
FAIR_ESM_HUB_ORG = "facebook"  # fair-esm's published checkpoints live on the HF hub as facebook/<name>

# fair-esm module (relative to ESM2) -> HF module (relative to EsmModel), per layer where N appears
_LAYER_MODULES = {
    "self_attn.q_proj": "attention.self.query",
    "self_attn.k_proj": "attention.self.key",
    "self_attn.v_proj": "attention.self.value",
    "self_attn.out_proj": "attention.output.dense",
    "self_attn_layer_norm": "attention.LayerNorm",
    "fc1": "intermediate.dense",
    "fc2": "output.dense",
    "final_layer_norm": "LayerNorm",
}
_TOP_MODULES = {
    "embed_tokens": "embeddings.word_embeddings",
    "emb_layer_norm_after": "encoder.emb_layer_norm_after",
    "contact_head.regression": "contact_head.regression",
}
_LM_HEAD = ("lm_head.dense.weight", "lm_head.dense.bias", "lm_head.layer_norm.weight", "lm_head.layer_norm.bias",
            "lm_head.bias")
_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(.+)\.(weight|bias)$")
_HF_LAYER_KEY = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$")
HF_LORA_TARGETS = {"q_proj": "query", "k_proj": "key", "v_proj": "value"}  # PEFT's usual names on HF ESM


def is_hf_source(source: str) -> bool:
    """`hf:org/name` (a hub id) or a local folder holding an HF config.json."""
    source = str(source)
    if source.startswith(HF_PREFIX):
        return True
    path = Path(source).expanduser()
    return path.is_dir() and (path / "config.json").is_file()


def hf_name_for(source: Optional[str]) -> Optional[str]:
    """The HF model a backbone source corresponds to, for `base_model_name_or_path`: an `hf:` id, a local
    HF folder, or a fair-esm hub name's twin on the HF hub (facebook/<name>); None for random or .pt files."""
    from fedesm.architectures import ARCHITECTURES

    if not source:
        return None
    source = str(source)
    if source.startswith(HF_PREFIX):
        return source[len(HF_PREFIX):]
    if is_hf_source(source):
        return str(Path(source).expanduser().resolve())
    if source in ARCHITECTURES and ARCHITECTURES[source].on_hub:
        return f"{FAIR_ESM_HUB_ORG}/{source}"
    return None


@contextlib.contextmanager
def _quiet_transformers():
    """transformers reports unused / newly initialised weights on every partial load; the mapping checks
    what matters itself."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


# --------------------------------------------------------------------------------------------- names


def fair_to_hf_key(name: str) -> Optional[str]:
    """A fair-esm ESM2 state-dict key -> the EsmModel key (None for what HF does not store: rotary
    frequencies, and fair-esm's tied lm_head.weight)."""
    m = _LAYER_KEY.match(name)
    if m:
        layer, module, kind = m.groups()
        if module in _LAYER_MODULES:
            return f"encoder.layer.{layer}.{_LAYER_MODULES[module]}.{kind}"
        return None  # rot_emb.inv_freq
    module, _, kind = name.rpartition(".")
    if module in _TOP_MODULES:
        return f"{_TOP_MODULES[module]}.{kind}"
    return None


def hf_to_fair_key(name: str) -> Optional[str]:
    """An EsmModel key -> the fair-esm ESM2 key (None for what fair-esm does not have)."""
    m = _HF_LAYER_KEY.match(name)
    if m:
        layer, module, kind = m.groups()
        for fair, hf in _LAYER_MODULES.items():
            if module == hf:
                return f"layers.{layer}.{fair}.{kind}"
        return None
    module, _, kind = name.rpartition(".")
    for fair, hf in _TOP_MODULES.items():
        if module == hf:
            return f"{fair}.{kind}"
    return None


# --------------------------------------------------------------------------------------------- HF -> fair-esm


def _check_config(config, origin: str) -> None:
    if getattr(config, "model_type", None) != "esm":
        raise FedesmError(f"{origin}: not an ESM model (config.json model_type {getattr(config, 'model_type', None)!r})")
    if getattr(config, "is_folding_model", False):
        raise FedesmError(f"{origin}: an ESMFold model; fedesm fine-tunes the ESM-2 encoder only")
    problems = []
    if getattr(config, "position_embedding_type", "absolute") != "rotary":
        problems.append(f"position_embedding_type {config.position_embedding_type!r} (ESM-2 is rotary)")
    if getattr(config, "emb_layer_norm_before", False):
        problems.append("emb_layer_norm_before (ESM-1b style)")
    if config.vocab_size != 33:
        problems.append(f"vocab_size {config.vocab_size} (ESM-2 has 33 tokens)")
    if config.intermediate_size != 4 * config.hidden_size:
        problems.append(f"intermediate_size {config.intermediate_size} != 4 x hidden_size")
    if problems:
        raise FedesmError(f"{origin}: not an ESM-2 checkpoint: " + "; ".join(problems))


def _resolve_hf_path(source: str, cache_dir=None) -> tuple[str, str]:
    """(what from_pretrained takes, origin for messages); a hub id is downloaded into `cache_dir` when online."""
    source = str(source)
    if source.startswith(HF_PREFIX):
        repo = source[len(HF_PREFIX):]
        if not repo:
            raise FedesmError("hf: needs a model id, e.g. hf:facebook/esm2_t12_35M_UR50D")
        try:
            from huggingface_hub import snapshot_download

            cache = str(Path(cache_dir) / "hf") if cache_dir else None
            path = snapshot_download(repo, cache_dir=cache, allow_patterns=["*.json", "*.safetensors", "*.txt"])
            if not any(Path(path).glob("*.safetensors")):  # older repositories: PyTorch pickles only
                path = snapshot_download(repo, cache_dir=cache, allow_patterns=["*.json", "*.bin", "*.txt"])
        except Exception as e:
            raise FedesmError(f"could not fetch {repo} from the Hugging Face hub ({type(e).__name__}); offline "
                              "sites should pass a local folder written by save_pretrained instead") from None
        return path, source
    path = Path(source).expanduser()
    if not (path / "config.json").is_file():
        raise FedesmError(f"{source}: not a Hugging Face model folder (no config.json)")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise FedesmError(f"{source}: no model weights (model.safetensors or pytorch_model.bin) beside config.json")
    return str(path), source


def load_hf_esm2(source: str, cache_dir=None):
    """(fair-esm ESM2 module, alphabet, HF config) from an HF ESM-2 checkpoint, weights copied exactly."""
    from transformers import AutoConfig, EsmForMaskedLM, EsmModel

    from fedesm.architectures import EsmArchitecture, new_esm2

    path, origin = _resolve_hf_path(source, cache_dir)
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:
        raise FedesmError(f"{origin}: cannot read config.json ({type(e).__name__}: {str(e).splitlines()[0][:200]})") \
            from None
    _check_config(config, origin)
    has_lm_head = any("MaskedLM" in a for a in (config.architectures or []))
    try:
        with _quiet_transformers():
            if has_lm_head:
                hf, info = EsmForMaskedLM.from_pretrained(path, output_loading_info=True)
                hf = hf.float()
                encoder = hf.esm
            else:
                hf, info = EsmModel.from_pretrained(path, add_pooling_layer=False, output_loading_info=True)
                hf = encoder = hf.float()
    except Exception as e:
        raise FedesmError(f"{origin}: cannot load the weights ({type(e).__name__}: {str(e).splitlines()[0][:200]})") \
            from None
    _refuse_partial_weights(origin, info)
    arch = EsmArchitecture(config.num_hidden_layers, config.hidden_size, config.num_attention_heads, on_hub=False)
    esm2, alphabet = new_esm2(arch, seed=0)
    esm2.token_dropout = bool(config.token_dropout)
    hf_state = encoder.state_dict()
    fair_state = esm2.state_dict()
    loaded = {}
    for hf_key, tensor in hf_state.items():
        fair_key = hf_to_fair_key(hf_key)
        if fair_key is None:
            continue
        if fair_key not in fair_state or tuple(fair_state[fair_key].shape) != tuple(tensor.shape):
            raise FedesmError(f"{origin}: {hf_key} {tuple(tensor.shape)} has no place in ESM-2 "
                              f"{arch.layers}x{arch.embed_dim}")
        loaded[fair_key] = tensor.detach().clone()
    if has_lm_head:
        lm = hf.lm_head.state_dict()
        for key in _LM_HEAD:
            loaded[key] = lm[key[len("lm_head."):]].detach().clone()
        loaded["lm_head.weight"] = loaded["embed_tokens.weight"]  # tied, as in both libraries
    expected = {k for k in fair_state if ".rot_emb." not in k
                and (has_lm_head or not k.startswith("lm_head"))}
    missing = sorted(expected - set(loaded))
    if missing:
        raise FedesmError(f"{origin}: the checkpoint lacks {len(missing)} ESM-2 weights (e.g. {missing[:2]})")
    esm2.load_state_dict(loaded, strict=False)
    return esm2, alphabet, config


# --------------------------------------------------------------------------------------------- fair-esm -> HF


def hf_config_for(esm2, num_labels: Optional[int] = None, **extra):
    """An EsmConfig for a fair-esm ESM2 module (ESM-2's own values; layer-norm eps as fair-esm computes)."""
    from transformers import EsmConfig

    norm = esm2.layers[0].self_attn_layer_norm if len(esm2.layers) else esm2.emb_layer_norm_after
    kwargs = dict(vocab_size=esm2.alphabet_size, mask_token_id=esm2.mask_idx, pad_token_id=esm2.padding_idx,
                  cls_token_id=esm2.cls_idx, eos_token_id=esm2.eos_idx, hidden_size=esm2.embed_dim,
                  num_hidden_layers=esm2.num_layers, num_attention_heads=esm2.attention_heads,
                  intermediate_size=4 * esm2.embed_dim, hidden_act="gelu", hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0, max_position_embeddings=1026,
                  position_embedding_type="rotary", layer_norm_eps=float(getattr(norm, "eps", 1e-5)),
                  emb_layer_norm_before=False, token_dropout=bool(esm2.token_dropout), is_folding_model=False)
    if num_labels is not None:
        kwargs["num_labels"] = num_labels
    kwargs.update(extra)
    return EsmConfig(**kwargs)


def esm_model_state(esm2) -> dict[str, torch.Tensor]:
    """fair-esm ESM2 weights under EsmModel's names (no lm_head)."""
    out = {}
    for name, tensor in esm2.state_dict().items():
        hf_key = fair_to_hf_key(name)
        if hf_key is not None:
            out[hf_key] = tensor.detach().cpu().clone()
    return out


def to_hf_masked_lm(esm2):
    """A transformers EsmForMaskedLM with exactly the weights of a fair-esm ESM2 (tests, conversions)."""
    from transformers import EsmForMaskedLM

    model = EsmForMaskedLM(hf_config_for(esm2, architectures=["EsmForMaskedLM"]))
    state = {f"esm.{k}": v for k, v in esm_model_state(esm2).items()}
    lm = esm2.lm_head
    state.update({"lm_head.dense.weight": lm.dense.weight, "lm_head.dense.bias": lm.dense.bias,
                  "lm_head.layer_norm.weight": lm.layer_norm.weight, "lm_head.layer_norm.bias": lm.layer_norm.bias,
                  "lm_head.bias": lm.bias, "lm_head.decoder.weight": lm.weight})
    _load_exact(model, state, "EsmForMaskedLM")
    return model.eval()


def _refuse_partial_weights(origin, info: dict) -> None:
    """transformers fills what a weights file lacks with random values (and says so in a log line): refuse it.
    Ignored: rotary inv_freq and position ids (computed, not weights), the contact head (unused), and the
    heads a backbone folder may carry that fedesm does not use (lm_head, classifier, pooler)."""
    from fedesm.model.checkpoint import refuse_tensor_mismatch

    def used(key: str) -> bool:
        return not re.search(r"inv_freq|position_ids|contact_head|^(esm\.)?pooler\.|^lm_head\.|^classifier\.", key)

    mismatched = [m[0] if isinstance(m, (tuple, list)) else m for m in info.get("mismatched_keys") or []]
    refuse_tensor_mismatch(origin, [k for k in info.get("missing_keys") or [] if used(k)],
                           [k for k in info.get("unexpected_keys") or [] if used(k)], mismatched)


def _load_exact(model, state: dict, what: str) -> None:
    result = model.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=False)
    missing = [k for k in result.missing_keys if "inv_freq" not in k]
    if missing or result.unexpected_keys:
        raise FedesmError(f"{what}: weight mapping incomplete (missing {missing[:3]}, "
                          f"unexpected {result.unexpected_keys[:3]})")


def save_tokenizer(alphabet, out_dir) -> None:
    """ESM-2's tokenizer files (vocab.txt in fair-esm's token order + the special-token map), as transformers
    writes them for facebook/esm2_*."""
    from transformers import EsmTokenizer

    out_dir = Path(out_dir)
    vocab = out_dir / "vocab.txt"
    vocab.write_text("\n".join(alphabet.all_toks) + "\n")
    tokenizer = EsmTokenizer(str(vocab), model_max_length=1026)
    tokenizer.save_pretrained(str(out_dir))


def _model_card(threshold: float, max_len: int, backbone: str, lora: dict, num_labels: int) -> str:
    return f"""---
library_name: transformers
pipeline_tag: token-classification
tags: [esm2, protein, binding-site, lora, federated, fedesm]
---
# Per-residue binding-site classifier (ESM-2 + LoRA, fedesm)

An `EsmForTokenClassification` exported by `fedesm export --format hf`: ESM-2 with the LoRA adapters
merged into its weights and a {num_labels}-class per-residue head. Class 1 is "binding residue".

* **call threshold: {threshold:.6g}** (probability of class 1 at which a residue is called binding; tuned on
  validation data during training; also in config.json as `fedesm.threshold`)
* window: {max_len} residues (score longer chains in overlapping windows, as `fedesm predict` does)
* backbone: {backbone}; LoRA: r={lora.get('r')}, alpha={lora.get('alpha')}, on {', '.join(lora.get('targets', []))}

```python
import torch
from transformers import AutoModelForTokenClassification, AutoTokenizer
model = AutoModelForTokenClassification.from_pretrained(DIR).eval()
tokenizer = AutoTokenizer.from_pretrained(DIR)
batch = tokenizer(["MKTAYIAKQR"], return_tensors="pt")
prob = torch.softmax(model(**batch).logits, -1)[0, 1:-1, 1]   # one probability per residue
calls = prob >= {threshold:.6g}
```
"""


def export_hf(model, out_dir, alphabet, threshold: float = 0.5, max_len: int = 1000, backbone: str = "",
              lora: Optional[dict] = None) -> Path:
    """A fedesm PEFT model with LoRA merged, as a folder `AutoModelForTokenClassification.from_pretrained`
    and `AutoTokenizer.from_pretrained` load: config.json + model.safetensors, ESM-2's tokenizer files,
    README.md (the model card, with the call threshold)."""
    import copy

    from transformers import EsmForTokenClassification

    from fedesm.fileio import atomic_dir

    merged = copy.deepcopy(model).merge_and_unload()
    head = merged.head
    num_labels = head.out_features
    config = hf_config_for(merged.esm, num_labels=num_labels, architectures=["EsmForTokenClassification"],
                           id2label={0: "other", 1: "binding"} if num_labels == 2 else None,
                           label2id={"other": 0, "binding": 1} if num_labels == 2 else None,
                           fedesm={"threshold": float(threshold), "max_len": int(max_len), "backbone": backbone})
    with _quiet_transformers():
        hf = EsmForTokenClassification(config)
    state = {f"esm.{k}": v for k, v in esm_model_state(merged.esm).items()}
    state.update({"classifier.weight": head.weight, "classifier.bias": head.bias})
    _load_exact(hf, state, "EsmForTokenClassification")
    with atomic_dir(out_dir) as tmp, _quiet_transformers():
        hf.save_pretrained(str(tmp))
        save_tokenizer(alphabet, tmp)
        (tmp / "README.md").write_text(_model_card(threshold, max_len, backbone, lora or {}, num_labels))
    return Path(out_dir)


# --------------------------------------------------------------------------------------------- PEFT on HF names


def hf_peft_key(key: str) -> str:
    """A fedesm exchanged-state key (PEFT on fair-esm names) -> the same tensor's key in PEFT on
    EsmForTokenClassification: `base_model.model.esm.layers.3.self_attn.q_proj.lora_A.weight` ->
    `base_model.model.esm.encoder.layer.3.attention.self.query.lora_A.weight`; the head keeps its name."""
    m = re.match(r"^(?P<pre>.*?\besm\.)layers\.(?P<n>\d+)\.(?P<mod>[a-z_.]+?)\.(?P<rest>lora_[AB].*|weight|bias)$", key)
    if not m:
        return key
    module = m.group("mod")
    if module not in _LAYER_MODULES:
        raise FedesmError(f"{key}: no Hugging Face module for {module!r}")
    return f"{m.group('pre')}encoder.layer.{m.group('n')}.{_LAYER_MODULES[module]}.{m.group('rest')}"


def hf_target_modules(targets) -> list[str] | str:
    """PEFT target_modules on HF ESM for fedesm's targets: [query, key, value] for q/k/v, else a regex of
    the full module names (HF reuses `dense` in several places)."""
    targets = list(targets)
    if all(t in HF_LORA_TARGETS for t in targets):
        return [HF_LORA_TARGETS[t] for t in targets]
    unknown = [t for t in targets if f"self_attn.{t}" not in _LAYER_MODULES and t not in _LAYER_MODULES]
    if unknown:
        raise FedesmError(f"LoRA targets {unknown} have no Hugging Face ESM module")
    names = [_LAYER_MODULES.get(f"self_attn.{t}", _LAYER_MODULES.get(t)) for t in targets]
    return r".*encoder\.layer\.\d+\.(" + "|".join(re.escape(n) for n in names) + r")$"


def export_peft_hf(state: dict, card, out_dir) -> Path:
    """The adapters + head in PEFT's layout against EsmForTokenClassification's module names, for
    `PeftModel.from_pretrained(AutoModelForTokenClassification.from_pretrained(BASE, num_labels=2), DIR)`.
    `base_model_name_or_path` names the HF twin of the training backbone when there is one."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    from fedesm.fileio import atomic_dir
    from fedesm.keys import CLASSIFIER_NAME

    lora = card.lora_settings
    alpha = int(lora.alpha) if float(lora.alpha).is_integer() else lora.alpha
    base = hf_name_for(card.backbone)
    config = LoraConfig(r=lora.r, lora_alpha=alpha, lora_dropout=lora.dropout,
                        target_modules=hf_target_modules(lora.targets), modules_to_save=[CLASSIFIER_NAME],
                        bias="none", base_model_name_or_path=base)
    tensors = {hf_peft_key(k): torch.as_tensor(v).detach().cpu().contiguous() for k, v in state.items()}
    with atomic_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(str(tmp))
        (tmp / "fedesm_export.json").write_text(json.dumps(
            {"threshold": card.threshold, "max_len": card.max_len, "num_labels": card.num_labels,
             "backbone": card.backbone, "base_model_name_or_path": base}, indent=2))
    return Path(out_dir)
