"""Sites of different means: a site may train LoRA at a smaller rank than the job's.

The server keeps the global adapters at the job's rank R (`lora.r`). A site whose own config sets
`lora_r: r` (r <= R) builds its PEFT model at rank r and, every round, receives the global update
truncated to rank r: the best rank-r approximation of the global product B_g A_g (Eckart-Young),
from an SVD of the global factors (`truncate_state`, the same QR + small-core SVD as FRA-LoRA; as
FlexLoRA and NVFLARE's heterogeneous-LoRA example do). It sends back rank-r factors, so what it
uploads scales with r; FRA-LoRA then averages the full products B_k A_k of all sites, whatever
their ranks (the stacked factors simply have sum_k r_k columns), and re-factors to R.

PEFT scales a LoRA update by alpha / r. A site at rank r uses alpha * r / R (`site_lora`), so every
site's factors mean the same update at the same scale as the global ones: products of different
ranks average exactly, and truncation changes the update only by what the dropped singular values held.

The truncation happens at the site, after receiving: the rank is the site's own setting (its config,
never the job's), the server learns it only from the first contribution, and Scatter-and-Gather sends
one task to every site. The download is therefore the job's rank; the upload is the site's.
"""

from __future__ import annotations

from typing import Mapping, Optional

from fedesm.errors import FedesmError
from fedesm.keys import lora_pairs
from fedesm.settings import LoraSettings


def site_lora(job: LoraSettings, site_rank: Optional[int]) -> LoraSettings:
    """The LoRA settings a site trains with: the job's, at the site's rank (<= the job's) with alpha scaled
    so that alpha / r, PEFT's update scale, stays the job's."""
    if site_rank is None or int(site_rank) == job.r:
        return job
    site_rank = int(site_rank)
    if not 1 <= site_rank <= job.r:
        raise FedesmError(f"site lora_r {site_rank}: a site's LoRA rank must be between 1 and the job's lora.r "
                          f"({job.r}); the server keeps the global adapters at the job's rank")
    return job.replace(r=site_rank, alpha=job.alpha * site_rank / job.r)


def state_rank(state: Mapping) -> Optional[int]:
    """The LoRA rank of an exchanged state (rows of its first lora_A), None when it holds no LoRA pair."""
    pairs = lora_pairs(list(state))
    if not pairs:
        return None
    a_key, _ = next(iter(pairs.values()))
    return int(state[a_key].shape[0])


def truncate_state(state: Mapping, rank: int) -> dict:
    """The exchanged state with every LoRA pair replaced by the best rank-`rank` factors of its product
    (singular values split evenly, as FRA-LoRA does); pairs already at or below `rank` and the head as they
    are. Works on torch tensors or numpy arrays and returns the same kind and dtype.

    A pair whose B is all zero (the round-0 init: A random, B = 0) has a zero product, whose SVD would zero
    A too and leave the site's adapters without gradient; its first `rank` rows of A (and columns of B)
    are kept instead: the same product (zero), and exactly PEFT's init at the smaller rank.
    """
    from fedesm.aggregation import fra_lora

    out = dict(state)
    for a_key, b_key in lora_pairs(list(state)).values():
        a, b = state[a_key], state[b_key]
        if a.shape[0] <= rank:
            continue
        if not bool((abs(b) > 0).any()):
            out[a_key], out[b_key] = a[:rank] * 1, b[:, :rank] * 1  # copies, numpy or torch
            continue
        out[a_key], out[b_key] = fra_lora([(a, b)], [1.0], rank)
    return out
