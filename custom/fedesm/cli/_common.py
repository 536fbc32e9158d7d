"""Argument groups shared by several subcommands: the settings blocks as flags, data locations."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedesm.settings import LoraSettings, ModelSettings, TrainConfig, add_arguments, from_arguments


def add_lora_args(p: argparse.ArgumentParser) -> None:
    """--lora-r, --lora-alpha, --lora-dropout, --lora-targets (fedesm.settings.LoraSettings)."""
    add_arguments(p, LoraSettings, prefix="lora-", title="LoRA")


def lora_from_args(args) -> LoraSettings:
    return from_arguments(args, LoraSettings, prefix="lora-")


def add_attention_arg(p: argparse.ArgumentParser) -> None:
    """--attention packed|fused|stock (fedesm.settings.ModelSettings.attention)."""
    add_arguments(p, ModelSettings, skip=[n for n in ModelSettings.names() if n != "attention"], title="model")


def attention_from_args(args) -> str:
    return from_arguments(args, ModelSettings).attention


def add_train_args(p: argparse.ArgumentParser) -> None:
    """One flag per training setting (fedesm.settings.TrainConfig): --rounds, --steps-per-round, --lr, ..."""
    add_arguments(p, TrainConfig, title="training")


def train_config_from_args(args) -> TrainConfig:
    return from_arguments(args, TrainConfig)


def load_data(uri: str, cache_dir=None):
    """Records from a local file or an s3:// object (validated; a DataError names file, record and line)."""
    from fedesm.data.validate import load_dataset

    if uri.startswith("s3://"):
        from fedesm import storage

        uri = str(storage.fetch(uri, Path(cache_dir or Path.home() / ".cache" / "fedesm"),
                                storage.AccessPolicy.exactly(uri, source="the command line")))
    return load_dataset(uri)
