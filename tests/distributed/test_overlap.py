"""Gradient reduction overlapped with backward, in one process: which buckets start during the
step's last backward, which wait for reduce_gradients(), and that the numbers do not change."""
from types import SimpleNamespace

import numpy as np
import pytest

from minipeft.distributed import DataParallel, World
from minipeft.engine import Tensor
from minipeft.lessons.zero import QUICK, batches, make_model
from minipeft.optim import AdamW
from minipeft.train import TrainConfig, train


class Recording(World):
    """A world of one that notes, at each bucket's start, what ``probe()`` says then."""

    def __init__(self, probe):
        super().__init__()
        self.probe, self.log = probe, []

    def allreduce_sum_(self, buf, async_op=False):
        self.log.append(self.probe())
        return super().allreduce_sum_(buf, async_op)

    def reduce_sum_(self, buf, root, async_op=False):
        self.log.append(self.probe())
        return super().reduce_sum_(buf, root, async_op)


def _train(dp, steps=2, accum=1, kind="full", model=None):
    model = model or make_model(kind, QUICK, seed=0)
    get = batches(64, QUICK["block_size"])
    cfg = TrainConfig(max_steps=steps, batch_size=QUICK["batch"], grad_accum_steps=accum, lr=1e-2,
                      schedule="constant", grad_clip=1.0, progress=False)
    losses = train(model, lambda rng: get(rng, QUICK["batch"]), AdamW(model, lr=1e-2), cfg, parallel=dp).losses
    return losses, {n: p.data.copy() for n, p in model.named_parameters()}, model


def test_buckets_start_before_backward_reaches_the_embedding():
    """wte's gradient comes last (the embedding is the first op); buckets of later layers start before it."""
    model = make_model("full", QUICK, seed=0)
    world = Recording(lambda: model.transformer.wte.weight.grad is None)
    dp = DataParallel(world, num_shards=1, bucket_bytes=4096)
    _train(dp, steps=1, model=model)
    n = len(dp._grad_buckets)
    assert n > 3 and dp.launches == {"during backward": n, "after backward": 0}
    # every bucket but the embeddings' (wte's, wpe's: the first op's) started while backward ran on
    assert all(world.log[:n - 2]) and not world.log[-1]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_overlap_changes_no_bit(stage):
    """On and off: the same losses and weights, with 2 shards and 2 accumulated micro-batches."""
    on, off = (DataParallel(World(), stage=stage, num_shards=2, bucket_bytes=2048, overlap=o) for o in (True, False))
    losses_on, weights_on, _ = _train(on, accum=2, kind="lora")
    losses_off, weights_off, _ = _train(off, accum=2, kind="lora")
    assert losses_on == losses_off
    assert all(np.array_equal(weights_on[n], weights_off[n]) for n in weights_on)
    assert on.launches["during backward"] == 2 * len(on._grad_buckets) and on.launches["after backward"] == 0
    assert off.launches == {"during backward": 0, "after backward": 2 * len(off._grad_buckets)}
    assert on.traffic == off.traffic


def _three(world, **kw):
    a, b, c = (Tensor(np.full(4, v, np.float32), requires_grad=True) for v in (1.0, 2.0, 3.0))
    dp = DataParallel(world, bucket_bytes=16, **kw)  # one parameter per bucket
    dp.setup(None, SimpleNamespace(named_params=[("a", a), ("b", b), ("c", c)]))
    return dp, a, b, c


def test_a_parameter_without_gradient_holds_its_bucket_and_the_later_ones():
    world = Recording(lambda: None)
    dp, a, b, c = _three(world)
    assert [[n for n, _ in bk.members] for bk in dp._grad_buckets] == [["c"], ["b"], ["a"]]  # reversed
    for _ in dp.local_shards(np.zeros((1, 1))):
        ((a * 2.0).sum() + (c * 3.0).sum()).backward()  # b unused
    assert dp.launches == {"during backward": 1, "after backward": 0}  # c's; b holds b's and a's
    dp.reduce_gradients()
    assert dp.launches == {"during backward": 1, "after backward": 2} and len(world.log) == 3
    assert b.grad is None  # no gradient anywhere: none after the sum either
    np.testing.assert_array_equal(a.grad, np.full(4, 2.0, np.float32))
    np.testing.assert_array_equal(c.grad, np.full(4, 3.0, np.float32))
    assert a._grad_hooks == {} and c._grad_hooks == {}  # hooks live only during the step's last backward


def test_only_the_last_micro_batch_starts_buckets_and_misuse_is_an_error():
    dp, a, b, c = _three(World())
    for last in (False, True):
        for _ in dp.local_shards(np.zeros((1, 1)), last_micro_batch=last):
            (a * b * c).sum().backward()
        assert dp.launches["during backward"] == (3 if last else 0)
    with pytest.raises(RuntimeError, match="call reduce_gradients\\(\\) first"):
        dp.gather_losses([1.0], 1)
    dp.reduce_gradients()
    np.testing.assert_array_equal(a.grad, 2 * np.full(4, 6.0, np.float32))  # both micro-batches

    dp.zero_grad()
    for _ in dp.local_shards(np.zeros((1, 1))):  # every micro-batch said to be the last: the second ...
        (a * b * c).sum().backward()
    with pytest.raises(RuntimeError, match="a gradient changed after its bucket's reduction started"):
        (a * b * c).sum().backward()
    with pytest.raises(RuntimeError, match="last_micro_batch=False"):
        for _ in dp.local_shards(np.zeros((1, 1))):  # ... would change gradients already sent
            (a * b * c).sum().backward()
    with pytest.raises(RuntimeError, match="never finished: call reduce_gradients"):
        dp.zero_grad()
