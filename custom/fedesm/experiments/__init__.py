"""Running jobs in the NVFLARE simulator, the paper's experiments, plots and reports."""
