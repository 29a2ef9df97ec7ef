"""Batches on the device (peft_vit.data.loader) equal the per-item DataLoader path they replace:
same images, order and flips for a (seed, epoch, position), across resumes and process shares."""
import pytest
import torch
from torch.utils.data import DataLoader

from peft_vit.data import SeededAugment
from peft_vit.data.loader import EvalBatches, GlobalBatchSampler, TrainBatches
from peft_vit.data.transforms import flip_draws
from peft_vit.data.memory import InMemoryImages

CPU = torch.device("cpu")


def images(n=37, size=6, flip=True):
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    return InMemoryImages(x, torch.arange(n) % 5, "imagenet", flip)


def per_item_batches(ds, batch, seed, epoch, start=0, rank=0, world=1, drop_last=True):
    """The previous path: a DataLoader over SeededAugment, one item at a time."""
    sampler = GlobalBatchSampler(len(ds), batch, seed, rank, world, drop_last)
    sampler.set_epoch(epoch, start)
    return list(DataLoader(SeededAugment(ds), batch_sampler=sampler, generator=torch.Generator().manual_seed(seed)))


def assert_same(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert xa.dtype == xb.dtype == torch.float32 and torch.equal(xa, xb)  # bitwise
        assert torch.equal(ya, yb)


def test_flip_draws_are_seeded_augment_draws():
    seeds = [0, 1, 7, 2**62 - 1, 123456789012]
    want = []
    for s in seeds:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            want.append(bool(torch.rand(()) < 0.5))
    assert flip_draws(seeds).tolist() == want


@pytest.mark.parametrize("flip", [True, False])
@pytest.mark.parametrize("drop_last", [True, False])
def test_device_batches_equal_per_item_batches(flip, drop_last):
    ds = images(flip=flip)
    tb = TrainBatches(ds, 8, seed=5, device=CPU, drop_last=drop_last)
    assert len(tb) == (4 if drop_last else 5)
    flipped = 0
    for epoch in (0, 1, 4):
        new = list(tb.epoch(epoch))
        assert_same(new, per_item_batches(ds, 8, 5, epoch, drop_last=drop_last))
        unflipped = torch.stack([ds.images[i] for i in range(len(ds))]).float()
        flipped += sum(int(not any(torch.equal((x * ds.std + ds.mean).round(), u) for u in unflipped)) for x in
                       torch.cat([b[0] for b in new]))
    assert (flipped > 0) == flip  # some flipped images when flips are on, none when off


def test_resume_and_process_shares():
    ds = images()
    full = list(TrainBatches(ds, 8, seed=2, device=CPU).epoch(3))
    # a resumed epoch starts at its step and continues with the same batches
    assert_same(list(TrainBatches(ds, 8, seed=2, device=CPU).epoch(3, start_step=2)), full[2:])
    assert_same(list(TrainBatches(ds, 8, seed=2, device=CPU).epoch(3, start_step=2)),
                per_item_batches(ds, 8, 2, 3, start=2))
    # two processes: each takes its half of every global batch, as before
    shares = [list(TrainBatches(ds, 8, seed=2, device=CPU, rank=r, world=2).epoch(3)) for r in (0, 1)]
    for r in (0, 1):
        assert_same(shares[r], per_item_batches(ds, 8, 2, 3, rank=r, world=2))
    for (x0, y0), (x1, y1), (x, y) in zip(*shares, full):
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)


def test_global_rng_untouched():
    """The global RNG drives dropout and must resume exactly: drawing batches must not move it."""
    torch.manual_seed(11)
    before = torch.get_rng_state()
    list(TrainBatches(images(), 8, seed=0, device=CPU).epoch(0))
    assert torch.equal(torch.get_rng_state(), before)


def test_streamed_sets_keep_the_dataloader():
    """A set decoded per item (FGVC's random crops) still goes through DataLoader + SeededAugment."""
    ds = torch.utils.data.TensorDataset(torch.randn(20, 3, 4, 4), torch.arange(20))
    tb = TrainBatches(ds, 4, seed=1, device=CPU)
    assert not tb.on_device
    got = list(tb.epoch(2, start_step=1))
    s = GlobalBatchSampler(20, 4, 1)
    s.set_epoch(2, 1)
    want = [torch.stack([ds[i][0] for i, _ in b]) for b in s]
    assert len(got) == 4 and all(torch.equal(x, w) for (x, _), w in zip(got, want))


@pytest.mark.parametrize("world", [1, 2])
def test_eval_batches_equal_per_item(world):
    ds = images(n=23, flip=False)
    for rank in range(world):
        eb = EvalBatches(ds, 5, CPU, rank, world)
        want = list(DataLoader(torch.utils.data.Subset(ds, list(range(rank, 23, world))), batch_size=5))
        assert_same(list(eb), want)
    eb.timed(100, 2.0)
    assert eb.images_per_s == 50.0
