"""Which rank owns which parameter, and the buckets gradients and weights travel in.

**Ownership (ZeRO's partition).** ZeRO (Rajbhandari et al. 2020, Sec. 5) gives each of the
N_d ranks one N_d-th of the optimizer state (stage 1), of the gradients (stage 2) and of the
parameters (stage 3). The paper cuts the flattened parameter vector into N_d equal slices;
here the unit is a whole parameter, assigned largest first to the least-loaded rank (ties to
the lower rank). A whole parameter keeps every optimizer unchanged — 8-bit AdamW's blocks of
256 and paged AdamW's pages never straddle two ranks — so a partitioned update is the very
same arithmetic as the unpartitioned one. The price is balance: a rank holds Ψ_r parameters,
close to but not exactly Ψ / N_d (``memory_zero`` predicts with both).

**Buckets.** A collective per parameter would pay the launch latency hundreds of times a step;
a collective over all gradients at once needs a second copy of them all. PyTorch DDP's answer
(Li et al. 2020, "PyTorch Distributed", Sec. 3.2.3) is buckets of about 25 MiB: gradients are
copied into one flat buffer per bucket, reduced with one call, and copied back. A bucket holds
parameters of one dtype and — when it is reduced to or sent from one owner — of one owner.
"""
from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_BUCKET_BYTES = 25 * 2**20  # PyTorch DDP's default bucket_cap_mb = 25


def partition(named_sizes: list[tuple[str, int]], world_size: int) -> dict[str, int]:
    """``{name: owner rank}``: largest parameter first, each to the rank with the fewest elements so far."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    load = [0] * world_size
    owner = {}
    order = sorted(range(len(named_sizes)), key=lambda i: (-named_sizes[i][1], i))
    for i in order:
        name, n = named_sizes[i]
        r = min(range(world_size), key=lambda k: (load[k], k))
        owner[name] = r
        load[r] += n
    return owner


@dataclass
class Bucket:
    """Parameters whose gradients (or weights) travel together in one flat buffer."""

    dtype: object  # every member's dtype (one buffer, one dtype)
    owner: int | None  # the rank it is reduced to / sent from; None: all-reduced
    members: list = field(default_factory=list)  # (name, Parameter)
    numel: int = 0  # elements in the flat buffer

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def make_buckets(named_params, owner: dict[str, int] | None, bucket_bytes: int) -> list[Bucket]:
    """Buckets of at most ``bucket_bytes`` (a larger parameter gets one to itself), in parameter order.

    With ``owner`` every bucket holds one owner's parameters; without, any parameters of one dtype.
    """
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    open_: dict[tuple, Bucket] = {}
    done: list[Bucket] = []
    for name, p in named_params:
        key = (p.data.dtype, None if owner is None else owner[name])
        b = open_.get(key)
        if b is not None and b.members and (b.numel + p.data.size) * p.data.dtype.itemsize > bucket_bytes:
            done.append(b)
            b = None
        if b is None:
            b = open_[key] = Bucket(p.data.dtype, key[1])
        b.members.append((name, p))
        b.numel += int(p.data.size)
    done.extend(b for b in open_.values() if b.members)
    first = {name: i for i, (name, _) in enumerate(named_params)}
    return sorted(done, key=lambda b: first[b.members[0][0]])  # in the order the parameters come
