"""Which of a round's metrics may leave a site that trains with DP-SGD: a closed list, nothing else.

DP-SGD's guarantee covers the adapters it sends (clipped, noised, accounted). It does not cover numbers
computed on the secret Poisson batches outside that mechanism: the batch loss, the residues trained on,
the seconds that training took (throughput x seconds = the exact residue count of the round's batches),
sample or residue counts. So under DP a round's metrics are cut to this list (`releasable_metrics`, by
the executor before it streams or replies) and the site's outbound filter (`fedesm.flare.privacy`) refuses
a DP job's result that carries any other metric, whatever the job asks. What remains:

* evaluation of a model on the site's whole validation / test split (`fedesm.evaluation.metrics`:
  accuracy, precision, recall, F1, MCC, AUROC, AUPRC, the tuned threshold, `test_*`, `global_*`):
  statistics of fixed splits, not of the secret batches (DP does not cover them either: see the table in
  docs/threat-model.md);
* the schedule and the accounting: `steps`, `lr`, `epsilon`, `dp_delta`, `dp_steps`, and the site's own
  `epsilon_budget` and `noise_reproducible`: functions of public settings and of q = batch_size / n_train.
  `epsilon_prv` (with `training.dp_report_prv`) is added on purpose: Opacus' PRV accountant's epsilon for the
  same (sigma, q, steps) as `epsilon`, so it is a function of the same public numbers and tells no more.
"""

from __future__ import annotations

from typing import Mapping

from fedesm.evaluation.metrics import METRIC_NAMES, TUNED_NAMES

# Training numbers a DP-SGD site may send: the schedule and the privacy accounting (no batch contents, no time)
DP_TRAINING_METRICS = frozenset({"steps", "lr", "epsilon", "epsilon_prv", "dp_delta", "dp_steps",
                                 "epsilon_budget", "noise_reproducible"})
EVALUATION_METRICS = frozenset(set(METRIC_NAMES) | {"threshold_tuned"} | {f"test_{k}" for k in METRIC_NAMES}
                               | {f"test_{k}_tuned" for k in TUNED_NAMES})
DP_RELEASABLE = frozenset(DP_TRAINING_METRICS | EVALUATION_METRICS | {f"global_{k}" for k in EVALUATION_METRICS})


def releasable_under_dp(name: str) -> bool:
    """Whether a metric of this name may leave a DP-SGD site (the closed list above)."""
    return name in DP_RELEASABLE


def releasable_metrics(metrics: Mapping, dp: bool) -> dict:
    """The metrics that may leave: all of them without DP; under DP only the closed list."""
    return dict(metrics) if not dp else {k: v for k, v in metrics.items() if releasable_under_dp(k)}
