"""ESM-2 + LoRA + a per-residue head: one module per concern (the shapes table and the key names are
`fedesm.architectures` and `fedesm.keys`, above this package, so settings can check against them).

  checkpoint     fair-esm's on-disk format: read, write, random-init checkpoints
  backbone       load an encoder from a hub name, a local .pt, an s3:// URI or random:ARCH
  esm2           EsmTokenClassifier: the encoder + the linear per-residue head
  attention      packed (unpadded) and fused self-attention on fair-esm's own layer modules
  adapters       PEFT LoRA wrapping, parameter counts, the exchanged state (LoRA A/B + head)
  cards          saved models: PEFT's layout + fedesm_model.json, and loading them back
  export         LoRA merged into the backbone as a plain fair-esm checkpoint
"""
