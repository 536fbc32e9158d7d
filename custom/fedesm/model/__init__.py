"""ESM-2 + LoRA + a per-residue head: one module per concern.

  architectures  the ESM-2 shapes fedesm knows (8M ... 15B, tiny test configs), a fresh fair-esm ESM2
  checkpoint     fair-esm's on-disk format: read, write, random-init checkpoints
  backbone       load an encoder from a hub name, a local .pt, an s3:// URI or random:ARCH
  esm2           EsmTokenClassifier: the encoder + the linear per-residue head
  attention      packed (unpadded) and fused self-attention on fair-esm's own layer modules
  keys           the names others agree on: the head, LoRA factor keys, time-major modules
  adapters       PEFT LoRA wrapping, parameter counts, the exchanged state (LoRA A/B + head)
  cards          saved models: PEFT's layout + fedesm_model.json, and loading them back
  export         LoRA merged into the backbone as a plain fair-esm checkpoint
"""
