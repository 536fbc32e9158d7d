"""Local training, the same for every site and the centralized run.

  trainer      LocalTrainer: rounds of N optimizer steps on random batches; the optimizer lives with it
  gradients    how a step's gradients are made: plain (clip + optional noise) or DP-SGD
  losses       per-token (class-weighted, focal) losses
  inference    per-residue probabilities over tiled windows, device choice
  centralized  the centralized run: R rounds of N steps on pooled data, evaluated per round
  privacy/     the paper's gradient noise, DP-SGD, the RDP accountant
"""
