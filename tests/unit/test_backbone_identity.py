"""Which backbone a model was trained on travels with it, and a different one is refused.

* `fedesm train --backbone <relative path>` records the absolute path and the weights' digest; predict from
  another directory finds it; another checkpoint of the same shape is refused in one line naming both digests.
* A site whose backbone is not the job's architecture refuses the job at set-up, naming both.
* The server's model card records what the sites trained on (their updates say it; local paths by name only),
  so predict on a federated result loads `random:ARCH` instead of failing on the bare architecture.
* A site's one-line FedesmError travels to the server in its reply (no data) and lands in the server's table.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey, ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import AppConstants

from fedesm.cli import main
from fedesm.data.readers import write_records
from fedesm.model.cards import MODEL_CARD


def train_tiny(tmp_path, backbone: str, synth_data, cwd: Path) -> Path:
    train, val = synth_data
    write_records(train[:40], tmp_path / "train.fa")
    write_records(val[:20], tmp_path / "val.fa")
    here = os.getcwd()
    os.chdir(cwd)
    try:
        assert main(["train", "--train", str(tmp_path / "train.fa"), "--val", str(tmp_path / "val.fa"),
                     "--backbone", backbone, "--out", str(tmp_path / "run"), "--rounds", "1",
                     "--steps-per-round", "2", "--max-len", "96", "--lora-r", "4"]) == 0
    finally:
        os.chdir(here)
    return tmp_path / "run"


def test_a_trained_models_card_pins_its_backbone(tmp_path, synth_data, capsys):
    from fedesm.model.checkpoint import make_random_checkpoint

    (tmp_path / "ckpt").mkdir()
    ckpt = make_random_checkpoint("esm2_t2_tiny", tmp_path / "ckpt" / "esm2_x.pt", seed=0)
    out = train_tiny(tmp_path, "ckpt/esm2_x.pt", synth_data, cwd=tmp_path)  # a relative path, as a user types it
    assert "round 1/1: evaluating on 20 validation chains" in capsys.readouterr().err  # progress of the val pass
    card = json.loads((out / "best" / MODEL_CARD).read_text())
    assert card["backbone"] == str(ckpt.resolve())
    ident = card["backbone_identity"]
    assert ident["arch"] == "esm2_t2_tiny" and ident["source"] == str(ckpt.resolve()) and len(ident["sha256"]) == 64
    write_records(synth_data[1][:3], tmp_path / "q.fa")
    assert main(["predict", "--model", str(out), "--input", str(tmp_path / "q.fa"),  # from another directory
                 "--out", str(tmp_path / "p.csv")]) == 0
    assert "predicting 3 sequences" in capsys.readouterr().err  # said before the (slow on a CPU) pass
    other = make_random_checkpoint("esm2_t2_tiny", tmp_path / "esm2_other.pt", seed=1)  # same shape, other weights
    capsys.readouterr()
    rc = main(["predict", "--model", str(out), "--input", str(tmp_path / "q.fa"), "--out", str(tmp_path / "p2.csv"),
               "--backbone", str(other)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and not (tmp_path / "p2.csv").exists()
    assert ident["sha256"][:12] in err and str(other) in err and "--backbone" in err
    from fedesm.model.backbone import identity, load_backbone

    assert identity(load_backbone(str(other)))["sha256"][:12] in err
    ckpt.rename(tmp_path / "esm2_moved.pt")  # the recorded file is gone: the line says what to point --backbone at
    rc = main(["predict", "--model", str(out), "--input", str(tmp_path / "q.fa"), "--out", str(tmp_path / "p3.csv")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "checkpoint file not found" in err and ident["sha256"][:12] in err and "--backbone" in err


def test_a_site_backbone_of_another_architecture_refuses_the_job_at_set_up(tmp_path, synth_data):
    from fedesm.flare.executor import EsmLoraExecutor
    from fedesm.launch.jobs import JOBS
    from fedesm.model.checkpoint import make_random_checkpoint
    from fedesm.site_config import write_site_config
    from tests.server_parts import Engine

    ckpt = make_random_checkpoint("esm2_t4_small", tmp_path / "esm2_small.pt")
    (tmp_path / "data" / "site-1").mkdir(parents=True)
    write_records(synth_data[0][:20], tmp_path / "data" / "site-1" / "train.fa")
    write_records(synth_data[1][:10], tmp_path / "data" / "site-1" / "val.fa")
    cfg = write_site_config(tmp_path / "site.yaml", ckpt, tmp_path / "data")
    job = JOBS["esm2_fra_lora"].settings.with_overrides({"model.arch": "esm2_t2_tiny", "lora.r": 4,
                                                        "training.max_len": 96})
    executor = EsmLoraExecutor(**job.to_dict())
    ctx = FLContext()
    ctx.set_prop(ReservedKey.ENGINE, Engine(tmp_path / "ws"), private=True, sticky=False)
    ctx.set_prop(ReservedKey.IDENTITY_NAME, "site-1", private=False, sticky=False)
    task = Shareable()
    task.set_header(AppConstants.CURRENT_ROUND, 0)
    os.environ["FEDESM_SITE_CONFIG"] = str(cfg)
    try:
        reply = executor.execute("train", task, ctx, Signal())
    finally:
        del os.environ["FEDESM_SITE_CONFIG"]
    from fedesm.flare.payload import withheld_reason

    assert reply.get_return_code() == ReturnCode.EXECUTION_EXCEPTION and executor.run is None
    line = withheld_reason(reply)
    assert line == (f"site backbone {ckpt} is esm2_t4_small, the job's model.arch is esm2_t2_tiny: point the site "
                    "config's backbone at a esm2_t2_tiny checkpoint, or run a job exported with "
                    "--set model.arch=esm2_t4_small")
    assert set(reply) == {"__headers__"}  # the line and nothing else: no data leaves with the error
    # the server logs it and records it in its table (what `nvflare job logs` and the result show)
    from fedesm.flare.metrics_recorder import MetricsRecorder
    from fedesm.tables import read_table

    recorder = MetricsRecorder()
    recorder.out_dir = tmp_path / "server"
    recorder.out_dir.mkdir()
    reply.set_peer_props({ReservedKey.IDENTITY_NAME: "site-1"})
    reply.set_header(ReservedKey.TASK_NAME, "train")
    server_ctx = FLContext()
    server_ctx.set_prop(FLContextKey.TASK_RESULT, reply, private=True, sticky=False)
    recorder.handle_event(EventType.BEFORE_PROCESS_SUBMISSION, server_ctx)
    assert read_table(recorder.out_dir / "metrics.jsonl") == [{"round": 1, "site": "site-1", "withheld": line}]


def test_a_missing_site_config_line_reaches_the_server(tmp_path, caplog):
    from fedesm.flare.executor import EsmLoraExecutor
    from fedesm.flare.payload import withheld_reason
    from fedesm.launch.jobs import JOBS
    from tests.server_parts import Engine

    executor = EsmLoraExecutor(**JOBS["esm2_fra_lora"].settings.to_dict())
    ctx = FLContext()
    ctx.set_prop(ReservedKey.ENGINE, Engine(tmp_path / "ws"), private=True, sticky=False)
    ctx.set_prop(ReservedKey.IDENTITY_NAME, "site-2", private=False, sticky=False)
    env = os.environ.pop("FEDESM_SITE_CONFIG", None)
    try:
        reply = executor.execute("train", Shareable(), ctx, Signal())
    finally:
        if env is not None:
            os.environ["FEDESM_SITE_CONFIG"] = env
    assert reply.get_return_code() == ReturnCode.EXECUTION_EXCEPTION
    assert "FEDESM_SITE_CONFIG" in withheld_reason(reply)


def test_the_server_card_records_the_sites_backbone():
    from fedesm.flare.persistor import backbone_of_sites

    same = {"arch": "esm2_t2_tiny", "source": "random:esm2_t2_tiny", "sha256": "a" * 64, "seed": 0}
    source, ident = backbone_of_sites({"site-1": same, "site-2": dict(same)}, "esm2_t2_tiny")
    assert source == "random:esm2_t2_tiny" and ident["sha256"] == "a" * 64
    assert ident["sites"] == {"site-1": "random:esm2_t2_tiny", "site-2": "random:esm2_t2_tiny"}
    source, ident = backbone_of_sites({"site-1": same, "site-2": {**same, "sha256": "b" * 64}}, "esm2_t2_tiny")
    assert source == "esm2_t2_tiny" and "sha256" not in ident and set(ident["sites"]) == {"site-1", "site-2"}
    assert backbone_of_sites({}, "esm2_t2_tiny") == ("esm2_t2_tiny", {})
    local = {**same, "source": "esm2_x.pt"}  # sites name a local file by its name only
    assert backbone_of_sites({"site-1": local}, "/models/esm2_x.pt")[0] == "/models/esm2_x.pt"
    assert backbone_of_sites({"site-1": local}, "esm2_t2_tiny")[0] == "esm2_x.pt"


def test_a_local_backbone_path_stays_at_the_site(tiny_checkpoint):
    from fedesm.model.backbone import identity, load_backbone

    b = load_backbone(str(tiny_checkpoint))
    shared, local = identity(b, shared=True), identity(b)
    assert shared["source"] == tiny_checkpoint.name and local["source"] == str(Path(tiny_checkpoint).resolve())
    assert shared["sha256"] == local["sha256"] == identity(load_backbone(str(tiny_checkpoint)))["sha256"]
    assert identity(load_backbone("random:esm2_t2_tiny"), shared=True) == {
        "arch": "esm2_t2_tiny", "source": "random:esm2_t2_tiny", "seed": 0,
        "sha256": identity(load_backbone("random:esm2_t2_tiny"))["sha256"]}
