"""Judging a model as the field does.

  metrics    residue-level accuracy, precision, recall, F1, MCC, AUROC, AUPRC; the threshold tuned on validation
  scoring    one model's predictions -> the metrics report; saved adapters scored like sites score theirs
  reference  the sequence-only reference: logistic regression on one-hot +-7 windows
"""
