"""fit with multi-process data loading: workers drawing random augmentation from torch,
NumPy and ``random``, an IterableDataset, KeyboardInterrupt and resume, worker clean-up."""

from __future__ import annotations

import multiprocessing
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

import fnloop as fl
from fnloop import optim


class _Augmented(Dataset):
    """Each item draws noise from torch's, NumPy's and Python's generators."""

    def __init__(self, n=40):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 6, generator=g, dtype=torch.float64)
        self.y = (self.x[:, 0] > 0).long()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        noise = 0.1 * torch.randn(6, dtype=torch.float64)
        shift = 0.05 * float(np.random.rand()) + 0.05 * random.random()
        return self.x[i] + noise + shift, self.y[i]


class _AugmentedStream(IterableDataset):
    """The same items as a stream (no len()), each worker yielding its share."""

    def __iter__(self):
        items, info = _Augmented(), torch.utils.data.get_worker_info()
        start, step = (info.id, info.num_workers) if info is not None else (0, 1)
        for i in range(start, len(items), step):
            yield items[i]


def _seed_worker(worker_id):
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def map_loader(persistent=False):
    return DataLoader(
        _Augmented(),
        batch_size=8,
        shuffle=True,
        num_workers=2,
        persistent_workers=persistent,
        worker_init_fn=_seed_worker,
        generator=torch.Generator().manual_seed(7),
    )


def stream_loader():
    return DataLoader(_AugmentedStream(), batch_size=8, num_workers=2, worker_init_fn=_seed_worker)


def make_state():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 2))
    return fl.TrainState.create(module.double(), tx=optim.adam(1e-2), device="cpu")


def classify(model, batch):
    x, y = batch
    return {"loss": F.cross_entropy(model(x), y)}


class InterruptAt(fl.callbacks.Callback):
    """Ctrl-C after the given batch (0-based) of the given epoch (1-based)."""

    def __init__(self, epoch, batch):
        self.epoch, self.batch = epoch, batch

    def on_train_batch_end(self, state, outputs, batch, batch_idx):
        if state.epoch + 1 == self.epoch and batch_idx == self.batch:
            raise KeyboardInterrupt


def run(out_dir, loader, callbacks=(), **kw):
    return fl.fit(
        make_state(),
        classify,
        loader(),
        max_epochs=3,
        out_dir=out_dir,
        callbacks=list(callbacks),
        log_to_console=False,
        progress=False,
        **kw,
    )


def assert_same(a, b):
    assert (a.step, a.epoch) == (b.step, b.epoch)
    for name, p in a.params.items():
        assert torch.equal(p, b.params[name]), name
    assert a.history == b.history


def reseed_globals():
    """A re-run's process starts with other global generator states."""
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)


@pytest.mark.parametrize(
    ("loader", "every"),
    [
        pytest.param(map_loader, None, id="map-epoch-checkpoint", marks=pytest.mark.slow),
        pytest.param(map_loader, 2, id="map-mid-epoch"),
        pytest.param(stream_loader, None, id="stream-epoch-checkpoint", marks=pytest.mark.slow),
        pytest.param(stream_loader, 2, id="stream-mid-epoch"),
    ],
)
def test_workers_augmenting_with_torch_numpy_and_random_resume_bit_exactly(tmp_path, loader, every):
    """Guide, section 5: the workers are seeded each epoch, so the augmentation repeats
    after a resume; Ctrl-C in the middle of epoch 2, then the same fit again."""
    ref = run(tmp_path / "ref", loader, checkpoint_every_n_steps=every)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", loader, [InterruptAt(2, 2)], checkpoint_every_n_steps=every)
    reseed_globals()
    assert_same(run(tmp_path / "cut", loader, checkpoint_every_n_steps=every), ref)


def test_two_runs_with_workers_are_bit_identical_and_leave_no_worker_processes(tmp_path):
    """Two runs in processes whose global generators differ give the same float64 state;
    fit's workers are gone when it returns and when Ctrl-C ends it."""
    assert not multiprocessing.active_children()
    first = run(tmp_path / "a", map_loader)
    assert not multiprocessing.active_children()
    reseed_globals()
    assert_same(run(tmp_path / "a2", map_loader), first)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", map_loader, [InterruptAt(2, 1)])
    assert not multiprocessing.active_children()


class _Sizes(fl.callbacks.Callback):
    """Each train batch's size and loss, per epoch."""

    def __init__(self):
        self.batches = {}

    def on_train_batch_end(self, state, outputs, batch, batch_idx):
        n = len(batch[1])
        self.batches.setdefault(state.epoch + 1, []).append((n, float(outputs["loss"])))


def test_an_iterable_dataset_with_workers_averages_partial_batches_by_their_size(tmp_path):
    """Two workers each end their share with a partial batch (20 items, batches of 8: sizes
    8, 2, 8, 2); the epoch mean weighs each batch's loss by its size."""

    class Stream(_AugmentedStream):
        def __iter__(self):
            items, info = _Augmented(20), torch.utils.data.get_worker_info()
            for i in range(info.id, len(items), info.num_workers):
                yield items[i]

    def loader():
        return DataLoader(Stream(), batch_size=8, num_workers=2, worker_init_fn=_seed_worker)

    sizes = _Sizes()
    state = run(tmp_path, loader, [sizes])
    for epoch, batches in sizes.batches.items():
        assert sorted(n for n, _ in batches) == [2, 2, 8, 8]
        mean = sum(n * loss for n, loss in batches) / 20
        assert state.history["train"]["loss"][epoch - 1] == pytest.approx(mean, rel=1e-12)


class _Positions(Dataset):
    """Item i is i itself: the batches show the shuffle order."""

    def __len__(self):
        return 24

    def __getitem__(self, i):
        return torch.full((6,), float(i), dtype=torch.float64), torch.tensor(i % 2)


class _Order(fl.callbacks.Callback):
    def __init__(self):
        self.order = {}

    def on_train_batch_end(self, state, outputs, batch, batch_idx):
        self.order.setdefault(state.epoch + 1, []).extend(batch[0][:, 0].long().tolist())


@pytest.mark.parametrize(
    ("seeded", "cut", "every"),
    [
        pytest.param(False, (2, 0), None, id="global-epoch"),
        pytest.param(True, (2, 0), None, id="generator-epoch", marks=pytest.mark.slow),
        pytest.param(False, (1, 1), 1, id="global-mid-epoch-1", marks=pytest.mark.slow),
        pytest.param(True, (1, 1), 1, id="generator-mid-epoch-1", marks=pytest.mark.slow),
    ],
)
def test_persistent_workers_resume_keeps_the_shuffle_order(tmp_path, seeded, cut, every):
    """Started, persistent workers draw their base seed from the loader's generator (the
    global one without) once: fit starts them before it records or restores any random
    state, so a resumed run's shuffle order and dropout repeat the uninterrupted run's."""

    def loader():
        return DataLoader(
            _Positions(),
            batch_size=8,
            shuffle=True,
            num_workers=1,
            persistent_workers=True,
            generator=torch.Generator().manual_seed(7) if seeded else None,
        )

    ref = _Order()
    want = run(tmp_path / "ref", loader, [ref], checkpoint_every_n_steps=every)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", loader, [InterruptAt(*cut)], checkpoint_every_n_steps=every)
    reseed_globals()
    resumed = _Order()
    got = run(tmp_path / "cut", loader, [resumed], checkpoint_every_n_steps=every)
    for epoch in range(cut[0] + 1, 4):
        assert resumed.order[epoch] == ref.order[epoch], epoch
    assert_same(got, want)
