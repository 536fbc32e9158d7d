"""The smaller rough edges a newcomer met (issue 24, point 6), each held by a test."""

from __future__ import annotations

import csv
import logging
import re
import subprocess
from pathlib import Path

import pytest

from fedesm.cli import main

REPO = Path(__file__).resolve().parents[2]


def test_table_columns_come_in_a_stable_order(tmp_path):
    from fedesm.tables import write_table

    a = [{"site": "site-2", "round": 1, "f1": 0.1, "auprc": 0.2}, {"round": 1, "site": "server", "round_seconds": 3.0}]
    b = [{"round_seconds": 3.0, "site": "server", "round": 1}, {"auprc": 0.2, "f1": 0.1, "round": 1, "site": "site-2"}]
    headers = []
    for name, rows in (("a", a), ("b", b)):
        write_table(tmp_path / f"{name}.jsonl", rows)
        headers.append(next(csv.reader((tmp_path / f"{name}.csv").open())))
    assert headers[0] == headers[1] == ["round", "site", "auprc", "f1", "round_seconds"]


def test_an_unknown_flag_prints_the_subcommands_usage(capsys):
    with pytest.raises(SystemExit) as e:
        main(["predict", "--model", "m", "--input", "i", "--out", "o", "--bogus"])
    err = capsys.readouterr().err
    # one line (issue 23) that names the subcommand and where its usage is, not the top-level usage
    assert e.value.code == 2 and err.strip() == ("fedesm predict: error: unrecognized arguments: --bogus "
                                                 "(see fedesm predict --help)")
    with pytest.raises(SystemExit):
        main(["job", "export", "esm2_fra_lora", "--out", "x", "--nope"])
    assert capsys.readouterr().err.strip() == ("fedesm job export: error: unrecognized arguments: --nope "
                                               "(see fedesm job export --help)")


def test_poc_policy_names_every_file_it_writes(tmp_path, capsys):
    assert main(["poc", "policy", "--role", "simulator", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name in ("privacy.json", "resources.json"):
        assert f"wrote {tmp_path / 'local' / name}" in out and (tmp_path / "local" / name).is_file()


def test_kits_are_ignored_by_git():
    proc = subprocess.run(["git", "check-ignore", "-q", "kits/fedesm/state/rootCA.key"], cwd=REPO)
    assert proc.returncode == 0


def test_provisioning_readme_states_the_wait_after_min_clients_default():
    from fedesm.settings import FederationSettings

    text = (REPO / "provisioning" / "README.md").read_text()
    stated = re.search(r"wait_after_min_clients` \(default (\d+) s", text)
    assert stated and int(stated.group(1)) == FederationSettings().wait_after_min_clients


def test_a_poc_site_config_runs_the_job_poc_up_prints(tmp_path, caplog):
    """What `fedesm poc up` writes into a site kit's local/ sets a site up for the export it prints."""
    from fedesm.launch.jobs import JOBS
    from fedesm.site_config import DEFAULT_NAME, POC_JOB_SETTINGS, write_poc_site_config
    from fedesm.site_run import SiteRun
    from tests.server_parts import Engine

    kit = tmp_path / "site-1"
    engine = Engine(kit)
    write_poc_site_config(kit / "local" / DEFAULT_NAME)
    overrides = dict(s.split("=", 1) for s in POC_JOB_SETTINGS)
    job = JOBS["esm2_fra_lora"].settings.with_overrides(
        {k: int(v) if v.isdigit() else v for k, v in overrides.items()})
    with pytest.MonkeyPatch.context() as mp, caplog.at_level(logging.INFO, logger="fedesm.site_run"):
        mp.delenv("FEDESM_SITE_CONFIG", raising=False)
        run = SiteRun.set_up(job, "site-1", engine.get_workspace().get_root_dir(), num_rounds=2)
    assert caplog.records[-1].getMessage().endswith(f"site config {kit / 'local' / DEFAULT_NAME}")
    assert len(run.train_records) > 100 and run.backbone_identity["source"] == "random:esm2_t2_tiny"


def test_plot_axes_read_as_words_and_the_legend_hides_no_line(tmp_path):
    import matplotlib.pyplot as plt

    from fedesm.experiments import plots

    assert plots.metric_label("test_f1_tuned") == "F1 at the val-tuned threshold (test split)"
    assert plots.metric_label("global_auprc") == "AUPRC (global model)"
    assert plots.metric_label("threshold_tuned") == "F1-maximising threshold"
    seen = {}
    real_save = plots._save

    def keep(fig, out_path):  # the figure as saved: its axes and legend, laid out
        fig.canvas.draw()
        ax = fig.axes[0]
        seen.update(ylabel=ax.get_ylabel(), legend=ax.get_legend().get_window_extent(), axes=ax.get_window_extent())
        return real_save(fig, out_path)

    site_rows = [{"round": r, "site": s, "test_f1_tuned": 0.1 + 0.01 * r} for r in (1, 2, 3) for s in ("site-1", "site-2")]
    global_rows = [{"round": r, "site": "global", "test_f1_tuned": 0.12 + 0.01 * r} for r in (0, 1, 2, 3)]
    plots._save = keep
    try:
        path = plots.plot_test_metric(site_rows, global_rows, "test_f1_tuned", tmp_path / "f1.png", reference=0.199)
    finally:
        plots._save = real_save
    assert path.is_file() and seen["ylabel"] == "F1 at the val-tuned threshold (test split)"
    legend, axes = seen["legend"], seen["axes"]
    assert legend.y1 <= axes.y0  # below the plotting area: the reference line (or any other) stays visible
    plt.close("all")


def test_the_cli_keeps_nvflares_info_lines_out_of_its_output(tmp_path):
    import logging

    nvflare_logger = logging.getLogger("nvflare.fuel.flare_api.flare_api")  # what `fedesm poc up`'s session logs
    try:
        assert main(["poc", "policy", "--out", str(tmp_path)]) == 0
        assert not nvflare_logger.isEnabledFor(logging.INFO) and nvflare_logger.isEnabledFor(logging.WARNING)
        assert main(["-v", "poc", "policy", "--out", str(tmp_path)]) == 0  # --verbose shows them again
        assert nvflare_logger.isEnabledFor(logging.INFO)
    finally:
        logging.getLogger("nvflare").setLevel(logging.NOTSET)
