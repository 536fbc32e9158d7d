"""A site's own DP policy applied to the job it is sent: refuse what asks for less, stop at the budget.

The job is written by whoever submits it; the privacy budget belongs to the data owner. So the
site checks the job's training settings against its `SitePrivacySettings` (its site config's
`privacy:` block) before it reads any data (`refusal`), accounts epsilon at its own delta
(`accounting_delta`), and before every round computes the epsilon that round would reach
(`EpsilonBudget`: DP-SGD's steps per round and sample rate are known in advance, so the RDP
accountant answers before any training). A round that would exceed the budget is not trained:
the site says so to the server instead of sending a contribution (`fedesm.flare.executor`).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from fedesm.errors import FedesmError
from fedesm.settings import SitePrivacySettings, TrainConfig
from fedesm.training.privacy.accountant import DEFAULT_ORDERS, rdp_sampled_gaussian, rdp_to_epsilon
from fedesm.training.privacy.randomness import NoiseSource


class PolicyRefusal(FedesmError):
    """The job asks for less privacy than the site allows: one line saying which setting and why."""


def _dp_problem(training: TrainConfig) -> Optional[str]:
    """Why the job's DP settings cannot be honoured whatever the site's policy: a non-finite number (nan passes
    every comparison, inf never ends the accounting), or class weights computed from the private data."""
    for name in ("dp_noise_multiplier", "dp_max_grad_norm", "dp_delta"):
        value = getattr(training, name)
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)):
            return f"the job's training.{name} {value!r} is not a finite number"
    if training.dp_noise_multiplier > 0 and isinstance(training.class_weights, str):
        return (f"the job's training.class_weights {training.class_weights} are computed from this site's private "
                "training set outside the DP accounting (fixed w0,w1 or none only)")
    return None


def refusal(training: TrainConfig, policy: SitePrivacySettings) -> Optional[str]:
    """Why this site refuses a job with these training settings, or None when it may run."""
    problem = _dp_problem(training)
    if problem:
        return problem
    dp_on = training.dp_noise_multiplier > 0
    if policy.dp_required and not dp_on:
        why = ", ".join(name for name, on in (("privacy.require_dp", policy.require_dp),
                                              ("privacy.target_epsilon", policy.target_epsilon is not None),
                                              ("privacy.min_noise_multiplier", policy.min_noise_multiplier > 0)) if on)
        paper = (f" (its grad_noise_std {training.grad_noise_std:g} gives no DP guarantee)"
                 if training.grad_noise_std > 0 else "")
        return f"this site requires DP-SGD ({why}) and the job trains without it{paper}"
    if dp_on and training.dp_noise_multiplier < policy.min_noise_multiplier:
        return (f"the job's training.dp_noise_multiplier {training.dp_noise_multiplier:g} is below this site's "
                f"privacy.min_noise_multiplier {policy.min_noise_multiplier:g}")
    if dp_on and policy.max_grad_norm is not None and training.dp_max_grad_norm > policy.max_grad_norm:
        return (f"the job's training.dp_max_grad_norm {training.dp_max_grad_norm:g} is above this site's "
                f"privacy.max_grad_norm {policy.max_grad_norm:g}")
    return None


def check_job(training: TrainConfig, policy: SitePrivacySettings) -> None:
    """Raise `PolicyRefusal` when the site refuses the job."""
    reason = refusal(training, policy)
    if reason:
        raise PolicyRefusal(f"site privacy policy: refusing the job: {reason}")


def accounting_delta(training: TrainConfig, policy: SitePrivacySettings) -> float:
    """The delta this site accounts at: the smaller of its own and the job's (epsilon only grows as delta falls,
    so the guarantee holds at both)."""
    return min(training.dp_delta, policy.target_delta)


def noise_source(policy: SitePrivacySettings, site: str) -> NoiseSource:
    """Secret noise from OS entropy, or reproducible noise when the site's own config names a debug seed."""
    if policy.debug_noise_seed is None:
        return NoiseSource.secret()
    return NoiseSource.from_seed(policy.debug_noise_seed, label=site)


class EpsilonBudget:
    """The epsilon a site's next round would reach, against its budget (DP-SGD only)."""

    def __init__(self, training: TrainConfig, policy: SitePrivacySettings, n_train: int):
        if training.dp_noise_multiplier <= 0:
            raise ValueError("an epsilon budget needs DP-SGD")
        self.target = policy.target_epsilon
        self.delta = accounting_delta(training, policy)
        self.noise_multiplier = training.dp_noise_multiplier
        self.sample_rate = training.batch_size / n_train
        self.steps_per_round = training.steps_per_round
        # RDP composes additively over identical steps: one step's RDP, scaled (= accountant.compute_epsilon)
        self._rdp_step = np.array([rdp_sampled_gaussian(self.sample_rate, self.noise_multiplier, a)
                                   for a in DEFAULT_ORDERS])

    def epsilon_after(self, steps: int) -> float:
        if steps <= 0:
            return 0.0
        return rdp_to_epsilon(DEFAULT_ORDERS, steps * self._rdp_step, self.delta)[0]

    def exhausted(self, steps_done: int) -> Optional[str]:
        """Why the next round may not be trained (it would pass the budget), or None when it may."""
        if self.target is None:
            return None
        now = self.epsilon_after(steps_done)
        after = self.epsilon_after(steps_done + self.steps_per_round)
        if after <= self.target:
            return None
        return (f"epsilon budget: the next round would spend epsilon {after:.3f} > this site's privacy.target_epsilon "
                f"{self.target:g} (delta {self.delta:g}; spent {now:.3f}); not contributing any more")

    def rounds_covered(self, rounds: int) -> int:
        """How many of `rounds` rounds the budget lets this site train (all of them without a budget)."""
        if self.target is None:
            return rounds
        done = 0
        while done < rounds and self.exhausted(done * self.steps_per_round) is None:
            done += 1
        return done
