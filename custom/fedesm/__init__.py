"""fedesm: federated LoRA fine-tuning of ESM-2 for per-residue binding-site prediction on NVIDIA FLARE."""

__version__ = "0.1.0"
