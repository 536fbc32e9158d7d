"""What protects a site's data in its updates: gradient noise (the paper's mode), DP-SGD, its accountant."""
