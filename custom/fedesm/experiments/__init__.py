"""The paper's experiments and the demo, from settings to report.

  config   the YAML schema (data, model, settings blocks, experiments, arms) and each arm's full settings
  plan     the plan in words, and the dry run
  prepare  the data split per split mode, held-out val and test, the backbone
  arms     one federated (nvflare simulator) or centralized arm, scored on the held-out data; the reference
  run      `fedesm experiment run`: all arms, their status, the report
  layout   the run folder's file names
  numbers  a run folder read back: arms over seeds, mean and spread, paired comparisons
  report   report.md and summary.json from those numbers; plots: the figures
  demo     `make demo`
"""
