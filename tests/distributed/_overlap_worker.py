"""Run by tests/distributed/test_mpi.py on several ranks: gradient reduction overlapped with backward
on and off. Rank 0 writes, for every kind and ZeRO stage, whether the losses and weights are equal
bit for bit on every rank, how many buckets started during backward, and a case where one rank's
shard leaves a parameter without gradient (that rank starts its bucket after backward)."""
import json
import sys
from types import SimpleNamespace

import numpy as np

from minipeft.distributed import DataParallel, get_world
from minipeft.engine import Tensor
from minipeft.lessons.zero import QUICK, run_case

CASES = (("full", "adamw", 0.0), ("lora", "adamw8bit", 0.1), ("qlora", "paged_adamw", 0.0))


def same(x, y) -> bool:
    return x["losses"] == y["losses"] and all(np.array_equal(x["weights"][n], y["weights"][n]) for n in x["weights"])


def uneven(world, stage: int) -> dict:
    """Rank 0 uses b, the others do not: their buckets b and a wait for reduce_gradients()."""
    a, b, c = (Tensor(np.full(4, v, np.float32), requires_grad=True) for v in (1.0, 2.0, 3.0))
    dp = DataParallel(world, stage=stage, bucket_bytes=16)  # one parameter per bucket: c, b, a
    dp.setup(None, SimpleNamespace(named_params=[("a", a), ("b", b), ("c", c)], keep_only=lambda names: None))
    for _ in dp.local_shards(np.zeros((world.size, 1))):
        loss = (a * float(world.rank + 1)).sum() + (c * 0.5).sum()
        if world.rank == 0:
            loss = loss + (b * 5.0).sum()
        loss.backward()
    during = dp.launches["during backward"]
    dp.reduce_gradients()
    want = {"a": float(sum(range(1, world.size + 1))), "b": 5.0, "c": 0.5 * world.size}
    right = all(p.grad is None if stage >= 2 and dp.owner[n] != world.rank  # stage 2: only the owner keeps it
                else np.array_equal(p.grad, np.full(4, want[n], np.float32)) for n, p in (("a", a), ("b", b), ("c", c)))
    return {"right": right, "during": during}


def main(path: str) -> None:
    world = get_world()
    out = {"world_size": world.size, "equal": {}, "during": {}, "uneven": {}}
    for kind, optimizer, dropout in CASES:
        for stage in range(4):
            runs = {}
            for overlap in (True, False):
                dp = DataParallel(world, stage=stage, bucket_bytes=2048, overlap=overlap)
                runs[overlap] = run_case(kind, optimizer, dp, QUICK, dropout=dropout)
                runs[overlap]["launches"] = dict(dp.launches)
            key = f"{kind}-{stage}"
            flags = world.allgather(np.asarray([same(runs[True], runs[False])], dtype=np.int32))
            out["equal"][key] = bool(np.asarray(flags).all())
            out["during"][key] = [runs[True]["launches"]["during backward"], runs[False]["launches"]["during backward"]]
    for stage in (0, 2):
        got = uneven(world, stage)
        rows = np.asarray(world.allgather(np.asarray([got["right"], got["during"]], dtype=np.int32)))  # (N, 2)
        out["uneven"][stage] = {"right": bool(rows[:, 0].all()), "during": rows[:, 1].tolist()}
    if world.rank == 0:
        with open(path, "w") as f:
            json.dump(out, f)


if __name__ == "__main__":
    main(sys.argv[1])
