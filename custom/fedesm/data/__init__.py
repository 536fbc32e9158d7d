"""Binding-site data: readers, validation, splits, synthetic sets, batching."""

from fedesm.data.records import ESM_RESIDUES, STANDARD_AA, Record

__all__ = ["Record", "ESM_RESIDUES", "STANDARD_AA"]
