"""Run by tests/test_mpi.py on several ranks: train() with no ``parallel`` argument; rank 0 writes the losses."""
import json
import sys

from minipeft.distributed import get_world
from minipeft.lessons.zero import QUICK, batches, make_model
from minipeft.optim import AdamW
from minipeft.train import TrainConfig, train


def run(parallel=None) -> list[float]:
    model = make_model("lora", QUICK, seed=0, dropout=0.1)
    get = batches(64, QUICK["block_size"])
    cfg = TrainConfig(max_steps=QUICK["steps"], batch_size=QUICK["batch"], lr=1e-2, schedule="constant",
                      progress=False, log_every=1)
    return train(model, lambda rng: get(rng, QUICK["batch"]), AdamW(model, lr=1e-2), cfg, parallel=parallel).losses


if __name__ == "__main__":
    losses = run()
    if get_world().rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump({"losses": losses, "world_size": get_world().size}, f)
