"""Binding-site data: readers, validation, splits, synthetic sets, batching."""

from fedesm.data.records import ESM_RESIDUES, STANDARD_AA, Record

__all__ = ["Record", "ESM_RESIDUES", "STANDARD_AA"]

from fedesm.data.readers import read_records, write_records  # noqa: E402
from fedesm.data.split import SplitResult, split_records, write_split  # noqa: E402
from fedesm.data.synth import synth_records  # noqa: E402
from fedesm.data.validate import load_dataset, validate_records  # noqa: E402

__all__ += [
    "read_records", "write_records", "load_dataset", "validate_records",
    "SplitResult", "split_records", "write_split", "synth_records",
]
