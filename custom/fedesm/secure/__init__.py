"""Secure aggregation: the server learns only the sum of the sites' contributions (no NVFLARE here).

``sketch`` reduces FRA-LoRA to two sums of per-site terms (a randomized range finder), ``masking``
adds those sums under pairwise additive masks (fixed point modulo 2^64), ``keys`` agrees the pairwise
secrets by X25519 with public keys signed by each site's provisioned kit key, and ``rounds`` plays
one round's parts (site and server) in order. docs/architecture.md, "Secure aggregation", says how
the NVFLARE glue is to carry these messages.
"""
