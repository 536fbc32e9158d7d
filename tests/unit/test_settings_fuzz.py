"""Property test of every settings field through every way in (hypothesis): one line and exit 2, or a valid object.

For every field of every block (model, lora, training, federation, site_policy, privacy) values are drawn
from what a careless or hostile user writes: NaN, +-inf, 0, -0, negatives, integers past 2**63, floats
past 1e308, wrong types (lists, mappings, booleans, None), empty, blank, multi-line, NUL and odd
strings, besides each field's own default and choices. Each goes in through

  * the dataclass (`Block.from_dict`, as a JSON job config or a site config hands it over),
  * `--set BLOCK.FIELD=TEXT` (`JobSettings.with_overrides`, what `job export` and `experiment` use),
  * the CLI flags (`fedesm train --FIELD=TEXT`, `fedesm params --lora-FIELD=TEXT`, via `main([...])`),
  * a YAML document (`BLOCK: {FIELD: VALUE}`, as an experiment or site config is read).

Each must end in a `FedesmError` of one line naming `block.field` (exit 2 with that line on stderr for
the CLI, no run folder left), or in an object whose every float is finite, every integer within the
field's range, and that survives its own `to_dict` / `from_dict` unchanged. Any other exception is a
failure, and every draw runs under a SIGALRM bound so a hang fails the test instead of stalling it.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import io
import json
import math
import signal
import tempfile
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedesm.cli import main
from fedesm.errors import FedesmError
from fedesm.settings import (MAX_INT, FederationSettings, JobSettings, LoraSettings, ModelSettings, SettingError,
                             SiteGuardSettings, SitePrivacySettings, TrainConfig)

BLOCKS = (ModelSettings, LoraSettings, TrainConfig, FederationSettings, SiteGuardSettings, SitePrivacySettings)
FIELDS = [(cls, f) for cls in BLOCKS for f in dataclasses.fields(cls)]
JOB_FIELDS = [(cls, f) for cls, f in FIELDS if cls in JobSettings.BLOCKS.values()]
FLAG_FIELDS = [(cls, f) for cls, f in FIELDS if cls in (TrainConfig, LoraSettings)
               and f.metadata.get("flag", True) and typing.get_type_hints(cls)[f.name] is not bool]
PER_DRAW_SECONDS = 20  # a draw that has not finished by then is a hang
DRAWS = collections.Counter()

ODD = [math.nan, math.inf, -math.inf, 0, 0.0, -0.0, -1, -1.5, 1, 2**31, 2**63, 10**20, -10**20, 10**400, 1e308,
       5e-324, True, False, None, "", " ", "\t", "\x00", "a\nb", "nan", "NaN", "inf", "-inf", ".inf", "-.inf",
       ".nan", "1e309", "99999999999999999999", "-99999999999999999999", "0x10", "1_000", "[]", "{}", "~", "null",
       "none", "yes", "cuda:0", "cuda:-1", "balanced", "inf,1", "nan,nan", "0,0", "1,2,3", "q_proj,", ",,",
       "é", "\u202e", "%s%n", "{{x}}", "../../etc", [], {}, [1], [math.nan, 1], ["q_proj"], ["q_proj", ""],
       [None], {"a": 1}, [[1]], b"x"]


def _values(f: dataclasses.Field):
    own = [f.default] if f.default is not dataclasses.MISSING else []
    own += list(f.metadata.get("choices") or [])
    scalars = st.one_of(st.integers(), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                        st.booleans(), st.none())
    return st.one_of(st.sampled_from(ODD + own), st.integers(min_value=-2**70, max_value=2**70),
                     st.floats(), st.text(max_size=24), st.lists(scalars, max_size=3),
                     st.dictionaries(st.text(max_size=4), scalars, max_size=2))


@st.composite
def field_and_value(draw, fields=FIELDS):
    cls, f = draw(st.sampled_from(fields))
    return cls, f, draw(_values(f))


def _as_text(value) -> str:
    """What a user types for `value` on a command line (text as is, anything else as JSON/YAML flow)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("latin-1")
    return json.dumps(value)


@contextlib.contextmanager
def _bounded(seconds: int = PER_DRAW_SECONDS):
    def hang(signum, frame):
        raise TimeoutError(f"a draw ran past {seconds} s")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _assert_one_line(message: str, block: str, name: str) -> None:
    assert message and "\n" not in message and "Traceback" not in message, message
    assert len(message) < 600, message
    # the field itself, or (a rule across fields, e.g. DP-SGD refusing data-derived class weights) another of its block
    assert f"{block}." in message or f"{block}:" in message or "(see fedesm" in message, (block, name, message)


def _assert_valid(obj) -> None:
    """An accepted block holds only finite floats and in-range integers, and round-trips unchanged."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, float):
            assert math.isfinite(v), (f.name, v)
        if isinstance(v, int) and not isinstance(v, bool):
            assert -MAX_INT <= v <= (f.metadata.get("maximum") or MAX_INT), (f.name, v)
        if isinstance(v, list):  # class weights
            assert all(math.isfinite(x) for x in v), (f.name, v)
        if hints[f.name] is str:
            assert isinstance(v, str) and "\n" not in v
    assert type(obj).from_dict(obj.to_dict()) == obj


def _run(entry: str, draw_fn, examples: int, strategy):
    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def prop(drawn):
        DRAWS[entry] += 1
        with _bounded():
            draw_fn(*drawn)

    prop()
    assert DRAWS[entry] >= examples * 0.9, DRAWS


# ---------------------------------------------------------------------------------------- the entries


def _through_from_dict(cls, f, value):
    try:
        obj = cls.from_dict({f.name: value})
    except SettingError as e:
        _assert_one_line(str(e), cls.BLOCK, f.name)
        return
    _assert_valid(obj)


def _through_set(cls, f, value):
    item = f"{cls.BLOCK}.{f.name}={_as_text(value)}"
    try:
        if cls in JobSettings.BLOCKS.values():
            job = JobSettings().with_overrides([item])
            for block in JobSettings.BLOCKS:
                _assert_valid(getattr(job, block))
            assert JobSettings.from_dict(job.to_dict()) == job
        else:
            from fedesm.settings import apply_overrides

            _assert_valid(cls.from_dict(apply_overrides({}, [item])[cls.BLOCK]))
    except FedesmError as e:
        _assert_one_line(str(e), cls.BLOCK, f.name)


def _through_yaml(cls, f, value):
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    for text in (yaml.safe_dump({cls.BLOCK: {f.name: value}}), f"{cls.BLOCK}:\n  {f.name}: {_as_text(value)}\n"):
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError:
            continue  # the loaders (experiment and site configs) turn this into their own one line
        try:
            if cls in JobSettings.BLOCKS.values():
                job = JobSettings.from_dict(raw if isinstance(raw, dict) else {cls.BLOCK: raw}, where="config.yaml")
                _assert_valid(getattr(job, cls.BLOCK))
            else:
                _assert_valid(cls.from_dict(raw.get(cls.BLOCK) if isinstance(raw, dict) else raw, where="config.yaml"))
        except FedesmError as e:
            _assert_one_line(str(e), cls.BLOCK, f.name)


def _through_flags(cls, f, value):
    flag = f"--{'lora-' if cls is LoraSettings else ''}{f.name.replace('_', '-')}={_as_text(value)}"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        if cls is LoraSettings:  # `params` builds the model on the meta device: the rank meets the architecture
            argv = ["params", "--arch", "esm2_t2_tiny", flag]
        else:  # valid settings then stop at the (absent) data: one line either way
            argv = ["train", "--train", f"{tmp}/absent.fa", "--val", f"{tmp}/absent.fa", "--out", str(out), flag]
        err, stdout = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(stdout):
            try:
                rc = main(argv)
            except SystemExit as e:  # argparse: a value it cannot take (a NUL, an unknown choice)
                rc = e.code
        message = err.getvalue().strip()
        if rc == 0:
            assert cls is LoraSettings and "trainable" in stdout.getvalue() and not message
            return
        assert rc == 2, (argv, rc, message)
        if "absent.fa" in message:
            assert message.endswith("no such file") and "\n" not in message, message
        else:
            _assert_one_line(message.removeprefix("fedesm: error: "), cls.BLOCK, f.name)
        assert not out.exists()


@pytest.mark.parametrize("entry, fn, fields, examples", [
    ("from_dict", _through_from_dict, FIELDS, 1000),
    ("--set", _through_set, FIELDS, 800),
    ("yaml", _through_yaml, FIELDS, 500),
    ("flags", _through_flags, FLAG_FIELDS, 500),
])
def test_every_field_through_every_entry_is_one_line_or_a_valid_object(entry, fn, fields, examples):
    _run(entry, fn, examples, field_and_value(fields))


def test_the_fuzz_drew_enough():
    """Runs after the entries above (file order): at least 1,000 draws in all, every entry exercised."""
    if len(DRAWS) < 4:
        pytest.skip("runs with the whole file")
    assert sum(DRAWS.values()) >= 1000, DRAWS
    print(f"settings fuzz draws: {dict(DRAWS)}, total {sum(DRAWS.values())}")


# ---------------------------------------------------------------------------------- accepted means it runs

EDGES = {  # the ends of what each training and LoRA field accepts (the fuzz above probes past them)
    "batch_size": [1, 3], "lr": [1e-12, 5.0], "weight_decay": [0.0, 10.0], "warmup_steps": [0, None, 50],
    "schedule": ["cosine", "linear", "constant"], "min_lr_ratio": [0.0, 1.0], "grad_clip": [0.0, 1e-6, 1e6],
    "class_weights": ["balanced", "sqrt", None, [0.0, 1.0], [1.0, 0.0], [1e-9, 1e9]], "focal_gamma": [0.0, 5.0],
    "max_len": [1, 2, 1022], "seed": [0, 2**32 - 1], "grad_noise_std": [0.0, 1e-4],
    "freeze_lora_a": [False, True], "activation_checkpointing": [False, True],
}
LORA_EDGES = {"r": [1, 64], "alpha": [1e-6, 1e3], "dropout": [0.0, 0.999], "targets": [("q_proj",), ("fc1", "fc2"),
                                                                                     ("out_proj", "v_proj")]}


def test_accepted_edge_settings_run_a_step(tiny_checkpoint, synth_data):
    """A block the checks accept is one a short run accepts: two optimizer steps of the tiny model at the
    ends of every training and LoRA range, a finite loss."""
    from fedesm.model.adapters import build_lora_model
    from fedesm.model.backbone import load_backbone
    from fedesm.training.trainer import LocalTrainer

    backbone_path = str(tiny_checkpoint)
    train = synth_data[0][:16]

    @settings(max_examples=25, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(st.fixed_dictionaries({k: st.sampled_from(v) for k, v in EDGES.items()}),
           st.fixed_dictionaries({k: st.sampled_from(v) for k, v in LORA_EDGES.items()}))
    def prop(training, lora):
        DRAWS["runs"] += 1
        config = TrainConfig.from_dict({**training, "rounds": 1, "steps_per_round": 2})
        with _bounded(60):
            backbone = load_backbone(backbone_path)
            model = build_lora_model(backbone, LoraSettings.from_dict(lora), seed=config.seed)
            stats = LocalTrainer(model, backbone.alphabet, train, config).train_steps(2)
        assert stats.steps == 2 and math.isfinite(stats.loss), (training, lora, stats.loss)

    prop()
    assert DRAWS["runs"] >= 20
