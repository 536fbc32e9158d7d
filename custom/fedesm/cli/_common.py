"""Argument groups shared by several subcommands: the settings blocks as flags, data locations."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Mapping, Sequence

from fedesm.settings import (JobSettings, LoraSettings, ModelSettings, TrainConfig, add_arguments,
                             from_arguments)

CARD = "the model card's"  # where `predict` and `export` take a value no flag gives: the trained model's


def add_model_args(p: argparse.ArgumentParser, only: Sequence[str] = (),
                   defaults_from: Mapping[str, str] | None = None) -> None:
    """--arch, --backbone, --num-labels, --attention, --head-dropout (fedesm.settings.ModelSettings), or `only`
    some of them."""
    add_arguments(p, ModelSettings, title="model", only=only, defaults_from=defaults_from)


def model_from_args(args) -> ModelSettings:
    return from_arguments(args, ModelSettings)


def add_lora_args(p: argparse.ArgumentParser) -> None:
    """--lora-r, --lora-alpha, --lora-dropout, --lora-targets (fedesm.settings.LoraSettings)."""
    add_arguments(p, LoraSettings, prefix="lora-", title="LoRA")


def lora_from_args(args) -> LoraSettings:
    return from_arguments(args, LoraSettings, prefix="lora-")


def add_train_args(p: argparse.ArgumentParser, only: Sequence[str] = (),
                   defaults_from: Mapping[str, str] | None = None, title: str = "training") -> None:
    """One flag per training setting (fedesm.settings.TrainConfig): --rounds, --steps-per-round, --lr, ...
    (or `only` some of them)."""
    add_arguments(p, TrainConfig, title=title, only=only, defaults_from=defaults_from)


def train_config_from_args(args) -> TrainConfig:
    return from_arguments(args, TrainConfig)


def job_settings_from_args(args) -> JobSettings:
    """The model, LoRA and training blocks from their flags (the federation block keeps its defaults)."""
    return JobSettings(model=model_from_args(args), lora=lora_from_args(args), training=train_config_from_args(args))


def load_data(uri: str, cache_dir=None):
    """Records from a local file or an s3:// object (validated; a DataError names file, record and line)."""
    from fedesm.data.validate import load_dataset

    if uri.startswith("s3://"):
        from fedesm import storage

        uri = str(storage.fetch(uri, Path(cache_dir or Path.home() / ".cache" / "fedesm"),
                                storage.AccessPolicy.exactly(uri, source="the command line")))
    return load_dataset(uri)
