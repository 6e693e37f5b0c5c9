"""Checkpoints: exact round trips, no unpickling, atomic writes, damage detection, resume.

States come from one table of optimizers (``TXS``); every leaf is set to random values so
a round trip that drops or mixes up a tensor cannot pass by accident.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import hashlib
import importlib.util
import io
import os
import pickle
import random
import re
import shutil
import stat
import struct
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import fnloop
from fnloop import _io, _tree, optim
from fnloop import checkpoint as ckpt
from fnloop.checkpoint import (
    Checkpoint,
    CheckpointError,
    CheckpointMismatchError,
    find_checkpoints,
    latest_good_checkpoint,
    load_checkpoint,
    load_checkpoint_with_extra,
    load_model,
    rng_state,
    save_checkpoint,
    save_model,
    set_rng_state,
)
from fnloop.state import freeze_history

TXS: dict[str, Callable[[], optim.GradientTransformation]] = {
    "adamw": lambda: optim.adamw(1e-3),
    "clip-sgd-plateau": lambda: optim.chain(
        optim.clip_by_global_norm(1.0), optim.sgd(optim.reduce_on_plateau(0.1), momentum=0.9)
    ),
}
HISTORY = {
    "train": {"loss": [1.0, 0.5, 0.25]},
    "valid": {"loss": [1.1, 0.6, 0.3], "acc": [0.1, 0.5, 0.9]},
}


def make_module(hidden: int = 4) -> nn.Module:
    return nn.Sequential(nn.Linear(3, hidden), nn.BatchNorm1d(hidden))


def fresh_state(
    tx: str = "adamw", hidden: int = 4, ema_decay: float | None = 0.9
) -> fnloop.TrainState:
    torch.manual_seed(0)
    return fnloop.TrainState.create(
        make_module(hidden), tx=TXS[tx](), ema_decay=ema_decay, device="cpu"
    )


def randomized(state: fnloop.TrainState, seed: int = 1) -> fnloop.TrainState:
    """``state`` with every tensor leaf random and non-trivial counters and history."""
    gen = torch.Generator().manual_seed(seed)

    def scramble(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point():
            return torch.randn(t.shape, generator=gen, dtype=t.dtype)
        return torch.randint(0, 1000, t.shape, generator=gen, dtype=t.dtype)

    return _tree.tree_map(scramble, state).replace(
        step=1234, epoch=7, micro_step=3, history=freeze_history(HISTORY)
    )


def leaves_by_key(state: fnloop.TrainState) -> dict[str, Any]:
    keys, leaves, _ = ckpt._flatten_with_keys(state)
    return dict(zip(keys, leaves, strict=True))


def assert_same_state(a: fnloop.TrainState, b: fnloop.TrainState) -> None:
    la, lb = leaves_by_key(a), leaves_by_key(b)
    assert list(la) == list(lb)
    for key in la:
        assert la[key].dtype == lb[key].dtype, key
        assert torch.equal(la[key], lb[key]), key
    assert (a.step, a.epoch, a.micro_step) == (b.step, b.epoch, b.micro_step)
    assert {s: dict(m) for s, m in a.history.items()} == {s: dict(m) for s, m in b.history.items()}


def assert_same_data(a: Any, b: Any) -> None:
    """Deep equality for plain data with tensors (types included)."""
    assert type(a) is type(b), (a, b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same_data(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same_data(x, y)
    else:
        assert a == b


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("tx", list(TXS))
def test_round_trip_restores_every_leaf_counter_and_history(tmp_path: Path, tx: str) -> None:
    state = randomized(fresh_state(tx))
    path = save_checkpoint(tmp_path / "ckpt.pt", state)
    assert path == tmp_path / "ckpt.pt"

    like = fresh_state(tx)
    restored = load_checkpoint(path, like=like)

    assert_same_state(restored, state)
    assert restored.module is like.module and restored.tx is like.tx
    assert restored.ema_decay == like.ema_decay
    assert isinstance(restored.history["train"]["loss"], tuple)  # frozen again


def test_round_trip_with_loss_scale_and_grad_accum(tmp_path: Path) -> None:
    def with_extras(s: fnloop.TrainState) -> fnloop.TrainState:
        return s.replace(
            loss_scale={"scale": torch.tensor(65536.0), "good_steps": torch.tensor(3)},
            grad_accum={k: torch.zeros_like(v) for k, v in s.params.items()},
        )

    state = randomized(with_extras(fresh_state()), seed=5)
    restored = load_checkpoint(
        save_checkpoint(tmp_path / "c.pt", state), with_extras(fresh_state())
    )
    assert_same_state(restored, state)


def test_extra_round_trips_plain_data(tmp_path: Path) -> None:
    extra = {
        "rng": rng_state(),
        "early_stopping": {
            "best": 0.125,
            "bad_epochs": 2,
            "stopped": False,
            "monitor": "valid/loss",
        },
        "data": {"epoch": 7, "batch": 13, "order": torch.randperm(20)},
        "best": {"value": None, "path": "best.pt", "pair": (1, 2.5)},
        "losses": [1.0, float("inf")],
    }
    path = save_checkpoint(tmp_path / "ckpt.pt", fresh_state(), **extra)
    loaded = load_checkpoint_with_extra(path, fresh_state())

    assert isinstance(loaded, Checkpoint)
    assert loaded.path == path
    assert_same_data(loaded.extra, extra)


def test_leaves_that_require_grad_load_as_plain_tensors(tmp_path: Path) -> None:
    """The state's tensors are saved detached: they load without ``requires_grad``, as
    TrainState.create makes them (``torch.save`` alone keeps the flag)."""
    state = randomized(fresh_state())
    tracked = _tree.tree_map(
        lambda t: t.clone().requires_grad_() if t.is_floating_point() else t, state
    )
    loaded = load_checkpoint(save_checkpoint(tmp_path / "c.pt", tracked), fresh_state())
    assert_same_state(loaded, state)
    assert not any(t.requires_grad for t in _tree.tree_leaves(loaded))
    assert not any(t.requires_grad for t in _tree.tree_leaves(fresh_state()))


def test_a_history_of_numpy_or_tensor_numbers_is_saved_as_floats(tmp_path: Path) -> None:
    """A history set with ``replace`` may hold NumPy or tensor numbers: they are saved as
    floats (a NumPy scalar would make a file that weights_only loading refuses)."""
    history = {
        "train": {"loss": [np.float64(0.5), torch.tensor(0.25)]},
        "valid": {"acc": [np.float32(0.75), 1]},
    }
    state = fresh_state().replace(history=history)
    loaded = load_checkpoint(save_checkpoint(tmp_path / "c.pt", state), fresh_state())
    assert loaded.history == freeze_history(history)
    assert all(type(v) is float for m in loaded.history.values() for vs in m.values() for v in vs)


def test_restored_plateau_state_keeps_working(tmp_path: Path) -> None:
    state = fresh_state("clip-sgd-plateau")
    for loss in [1.0, 0.5, 0.6]:
        state = state.replace(opt_state=optim.observe_metric(state.opt_state, loss))
    restored = load_checkpoint(
        save_checkpoint(tmp_path / "c.pt", state), fresh_state("clip-sgd-plateau")
    )

    for loss in [0.7] * 12:
        state = state.replace(opt_state=optim.observe_metric(state.opt_state, loss))
        restored = restored.replace(opt_state=optim.observe_metric(restored.opt_state, loss))
    assert_same_state(restored, state)
    assert [float(x) for x in optim.learning_rates(restored.opt_state)] == pytest.approx([0.01])


def test_views_are_saved_without_their_whole_storage(tmp_path: Path) -> None:
    big = torch.zeros(1_000_000)
    state = fresh_state()
    params = {k: big[: v.numel()].view_as(v) + 0 * v for k, v in state.params.items()}
    params["0.bias"] = big[10:14]  # a view into 4 MB of storage
    state = state.replace(params=params)
    path = save_checkpoint(tmp_path / "c.pt", state)
    assert path.stat().st_size < 100_000
    assert_same_state(load_checkpoint(path, fresh_state()), state)


def conv_module() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv3d(4, 2, 2))


def channels_last_state() -> fnloop.TrainState:
    torch.manual_seed(0)
    module = conv_module()
    module[0].to(memory_format=torch.channels_last)
    module[2].to(memory_format=torch.channels_last_3d)
    return fnloop.TrainState.create(module, tx=optim.adamw(1e-3), ema_decay=0.9, device="cpu")


def test_channels_last_tensors_keep_their_layout(tmp_path: Path) -> None:
    state = channels_last_state()
    weights = ("0.weight", "2.weight")
    assert state.params["0.weight"].is_contiguous(memory_format=torch.channels_last)
    assert state.params["2.weight"].is_contiguous(memory_format=torch.channels_last_3d)
    # Each tensor alone in its storage (as created), and views of one buffer per group
    # (as TrainState.clone, which fit makes, lays them out).
    for i, saved in enumerate([state, state.clone()]):
        loaded = load_checkpoint(save_checkpoint(tmp_path / f"c{i}.pt", saved), like=state)
        assert_same_state(loaded, saved)
        for key, value in leaves_by_key(loaded).items():
            assert value.stride() == leaves_by_key(saved)[key].stride(), key
        for name in weights:
            assert loaded.ema is not None
            for t in (loaded.params[name], loaded.ema[name], loaded.opt_state[0].mu[name]):
                assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), name

    exported = torch.load(save_model(tmp_path / "m.pt", state.clone()), weights_only=True)
    for name in weights:
        assert exported[name].stride() == state.params[name].stride(), name


def test_views_that_overlap_or_skip_elements_are_saved_packed(tmp_path: Path) -> None:
    state = fresh_state()
    params = dict(state.params)
    params["0.bias"] = torch.randn(1).expand(4)  # one element seen 4 times
    params["1.weight"] = torch.randn(4, 2)[:, 0]  # every other element
    params["1.bias"] = torch.randn(4).as_strided((4,), (0,))  # one element 4 times, in 4
    state = state.replace(params=params)
    loaded = load_checkpoint(save_checkpoint(tmp_path / "c.pt", state), fresh_state())
    assert_same_state(loaded, state)
    for name in ("0.bias", "1.weight", "1.bias"):
        assert loaded.params[name].is_contiguous(), name
        assert loaded.params[name].untyped_storage().nbytes() == 16, name


def test_views_in_extra_are_saved_without_their_whole_storage(tmp_path: Path) -> None:
    big = torch.arange(1_000_000, dtype=torch.float32)
    weight = nn.Parameter(big[:6].view(2, 3))
    extra = {
        "head": big[:2],
        "nested": {"rows": [big[10:13], (7, big[::250_000])], 1: big[-1]},
        "weight": weight,
        "grad": big[20:22].requires_grad_(),
        "whole": torch.ones(3),
    }
    path = save_checkpoint(tmp_path / "c.pt", fresh_state(), **extra)
    assert path.stat().st_size < 100_000
    loaded = load_checkpoint_with_extra(path, fresh_state()).extra
    assert_same_data(loaded, extra)
    assert loaded["weight"].requires_grad and loaded["grad"].requires_grad
    assert big.requires_grad is False and weight.data_ptr() == big.data_ptr()  # untouched


def test_sparse_tensors_in_extra_round_trip(tmp_path: Path) -> None:
    """A sparse tensor has no strides to compact: it is saved as torch.save saves it."""
    coo = torch.eye(3).to_sparse()
    path = save_checkpoint(tmp_path / "c.pt", fresh_state(), mask=coo)
    loaded = load_checkpoint_with_extra(path, fresh_state()).extra["mask"]
    assert loaded.layout == torch.sparse_coo and torch.equal(loaded.to_dense(), torch.eye(3))


def test_save_creates_folders_and_respects_umask(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "runs" / "a" / "ckpt.pt", fresh_state())
    assert path.is_file()
    if os.name == "posix":
        umask = os.umask(0)
        os.umask(umask)
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


# --------------------------------------------------------------------------- bad input on save


class Opaque:
    pass


class TaggedTensor(torch.Tensor):
    """A tensor subclass: torch.save pickles its class, which weights_only refuses."""


@pytest.mark.parametrize(
    ("extra", "where", "type_name"),
    [
        ({"thing": Opaque()}, "extra['thing']", "Opaque"),
        ({"es": {"best": np.float64(0.5)}}, "extra['es']['best']", "float64"),
        ({"order": [1, 2, {3}]}, "extra['order'][2]", "set"),
        ({"pos": np.arange(3)}, "extra['pos']", "ndarray"),
        ({"mask": torch.ones(2).as_subclass(TaggedTensor)}, "extra['mask']", "TaggedTensor"),
    ],
)
def test_save_rejects_extra_that_is_not_plain_data(
    tmp_path: Path, extra: dict[str, Any], where: str, type_name: str
) -> None:
    with pytest.raises(TypeError) as info:
        save_checkpoint(tmp_path / "c.pt", fresh_state(), **extra)
    assert where in str(info.value) and type_name in str(info.value)
    assert "weights_only" in str(info.value)
    assert files_in(tmp_path) == []


def test_save_rejects_dict_keys_that_are_not_str_or_int(tmp_path: Path) -> None:
    """A key of another type was written, into a file that weights_only loading refuses
    (so resuming would skip it as damaged)."""
    extra = {"by_key": {Opaque(): 1}}
    buffer = io.BytesIO()
    torch.save(extra, buffer)
    buffer.seek(0)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(buffer, weights_only=True)
    with pytest.raises(
        TypeError, match=r"extra\['by_key'\] has a key .* of type Opaque; .* str or int"
    ):
        save_checkpoint(tmp_path / "c.pt", fresh_state(), **extra)
    assert files_in(tmp_path) == []


def test_save_rejects_a_dict_subclass_that_weights_only_loading_refuses(tmp_path: Path) -> None:
    extra = {"counts": collections.defaultdict(int, seen=2)}
    buffer = io.BytesIO()
    torch.save(extra, buffer)
    buffer.seek(0)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(buffer, weights_only=True)
    with pytest.raises(TypeError, match=r"extra\['counts'\] is a collections\.defaultdict"):
        save_checkpoint(tmp_path / "c.pt", fresh_state(), **extra)
    assert files_in(tmp_path) == []


@dataclasses.dataclass(frozen=True, kw_only=True)
class StateWithBest(fnloop.TrainState):
    best: Any = None


@pytest.mark.parametrize(
    ("best", "type_name"), [(np.float64(0.5), "float64"), (np.arange(3), "ndarray")]
)
def test_save_rejects_a_state_leaf_that_is_not_plain_data(
    tmp_path: Path, best: Any, type_name: str
) -> None:
    # Written, such a file could never be loaded (weights_only refuses its pickled object),
    # and resuming would skip it as damaged.
    state = StateWithBest.create(make_module(), tx=TXS["adamw"](), device="cpu", best=best)
    with pytest.raises(TypeError) as info:
        save_checkpoint(tmp_path / "c.pt", state)
    assert "'best'" in str(info.value) and type_name in str(info.value)
    assert "weights_only" in str(info.value)
    assert files_in(tmp_path) == []


def test_save_rejects_non_state(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="TrainState"):
        save_checkpoint(tmp_path / "c.pt", make_module())  # type: ignore[arg-type]


def test_save_rejects_two_leaves_with_the_same_key(tmp_path: Path) -> None:
    state = fresh_state(ema_decay=None)
    bad = state.replace(params={"a.b": torch.zeros(1), "a": {"b": torch.ones(1)}})
    with pytest.raises(ValueError, match=r"params.a.b"):
        save_checkpoint(tmp_path / "c.pt", bad)


# --------------------------------------------------------------------------- never unpickle


class WritesMarker:
    """Unpickling this object creates a file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


def test_pickled_code_in_the_file_is_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": ckpt.FORMAT, "version": 1, "x": WritesMarker(marker)}, path)
    torch.load(path, weights_only=False)  # the file really runs code when unpickled...
    assert marker.exists()
    marker.unlink()

    with pytest.raises(CheckpointError, match="pickled Python objects") as info:
        load_checkpoint(path, fresh_state())
    assert str(path) in str(info.value) and "eval" in str(info.value)
    assert not marker.exists()  # ...but not when fnloop loads it
    with pytest.raises(CheckpointError):
        load_model(path, make_module())
    assert not marker.exists()


def test_pickled_code_in_a_payload_with_a_valid_checksum_is_never_run(tmp_path: Path) -> None:
    import hashlib

    marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    torch.save({"leaves": {}, "x": WritesMarker(marker)}, buffer)
    data = buffer.getvalue()
    path = tmp_path / "evil.pt"
    wrapper = {
        "format": ckpt.FORMAT,
        "version": 1,
        "sha256": hashlib.sha256(data).hexdigest(),
        "payload": torch.frombuffer(bytearray(data), dtype=torch.uint8),
    }
    torch.save(wrapper, path)

    with pytest.raises(CheckpointError, match="pickled Python objects"):
        load_checkpoint(path, fresh_state())
    assert not marker.exists()


# --------------------------------------------------------------------------- damaged files


@pytest.fixture
def good_file(tmp_path: Path) -> Path:
    return save_checkpoint(tmp_path / "ckpt.pt", randomized(fresh_state()))


@pytest.mark.parametrize("keep", [0.5, 0.99, 100])
def test_truncated_file_is_detected(good_file: Path, keep: float) -> None:
    data = good_file.read_bytes()
    good_file.write_bytes(data[: int(len(data) * keep) if keep < 1 else int(keep)])
    with pytest.raises(CheckpointError, match="truncated or damaged") as info:
        load_checkpoint(good_file, fresh_state())
    assert str(good_file) in str(info.value)
    assert "weights_only=False" not in str(info.value)  # never advise unsafe loading


def test_empty_file_is_detected(tmp_path: Path) -> None:
    (tmp_path / "c.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="is empty"):
        load_checkpoint(tmp_path / "c.pt", fresh_state())


@pytest.mark.parametrize("where", [0.25, 0.5, 0.75])
def test_flipped_byte_is_detected(good_file: Path, where: float) -> None:
    data = bytearray(good_file.read_bytes())
    data[int(len(data) * where)] ^= 0xFF
    good_file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(good_file, fresh_state())
    assert str(good_file) in str(info.value)


def _flip_first_pickle_opcode(path: Path) -> None:
    """Writes 0xFF, which is no pickle opcode, over the first opcode of the file's
    data.pkl (stored uncompressed; torch checks no CRC when it reads it)."""
    data = bytearray(path.read_bytes())
    info = next(i for i in zipfile.ZipFile(path).infolist() if i.filename.endswith("/data.pkl"))
    assert info.compress_type == zipfile.ZIP_STORED
    name_len, extra_len = struct.unpack(
        "<HH", data[info.header_offset + 26 : info.header_offset + 30]
    )
    start = info.header_offset + 30 + name_len + extra_len
    assert data[start] == pickle.PROTO[0]  # protocol opcode and version, then the first opcode
    data[start + 2] = 0xFF
    path.write_bytes(bytes(data))


def test_a_damaged_pickle_is_named_damage_not_pickled_objects(tmp_path: Path) -> None:
    """A flipped byte in the pickle of a checkpoint or a model export: torch's
    weights-only unpickler rejects the opcode, which fnloop reports as damage (not as
    Python objects it refuses to unpickle), naming the file."""
    state = randomized(fresh_state())
    path = save_checkpoint(tmp_path / "c.pt", state)
    _flip_first_pickle_opcode(path)
    says = f"Cannot read {path}: the file is damaged (Unsupported operand 255)."
    with pytest.raises(CheckpointError, match=f"^{re.escape(says)}$"):
        load_checkpoint(path, fresh_state())
    model = save_model(tmp_path / "model.pt", state)
    _flip_first_pickle_opcode(model)
    says = (
        f"Cannot read the model file {model}: the file is damaged (Unsupported operand 255). "
        f"Export the weights again (save_model, or torch.save(module.state_dict(), path))."
    )
    with pytest.raises(CheckpointError, match=f"^{re.escape(says)}$"):
        load_model(model, make_module())


def test_load_model_of_a_file_holding_no_dict_says_what_it_found(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save(list(make_module().parameters()), path)
    says = f"{path} does not hold a state dict (a dict of tensors); found list. load_model reads"
    with pytest.raises(CheckpointError, match=f"^{re.escape(says)}"):
        load_model(path, make_module())


def test_load_model_errors_name_the_model_file_and_the_fix(tmp_path: Path) -> None:
    """load_model's file errors said "Cannot read checkpoint" of the model file the user
    gave, and said nothing of what to pass instead."""
    best = save_model(tmp_path / "run" / "best_model.pt", randomized(fresh_state()))
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "text.pt").write_bytes(b"not torch")
    (tmp_path / "cut.pt").write_bytes(best.read_bytes()[:100])
    torch.save(make_module(), tmp_path / "whole.pt")
    reads = re.escape("load_model reads a model export: the file save_model writes")
    again = re.escape("Export the weights again (save_model, or torch.save(module.state_dict()")
    for name, says in [
        ("missing.pt", f"it does not exist. {reads}"),
        ("missing.safetensors", f"it does not exist. {reads}"),
        ("run", f"it is a folder. Did you mean {re.escape(str(best))}\\?$"),
        ("empty.pt", f"the file is empty. {again}"),
        ("text.pt", f"not a PyTorch file .* {reads}.* '.safetensors' name"),
        ("cut.pt", f"truncated or damaged .* {again}"),
        ("whole.pt", "pickled .* " + re.escape("torch.save(module.state_dict(), path).") + "$"),
    ]:
        kind = "Refusing to load" if name == "whole.pt" else "Cannot read"
        path = re.escape(str(tmp_path / name))
        with pytest.raises(CheckpointError, match=f"^{kind} the model file {path}: .*{says}"):
            load_model(tmp_path / name, make_module())


def test_altered_payload_fails_the_checksum(good_file: Path) -> None:
    wrapper = torch.load(good_file, weights_only=True)
    payload = wrapper["payload"].clone()
    payload[len(payload) // 2] ^= 1
    torch.save({**wrapper, "payload": payload}, good_file)  # a well-formed file again
    with pytest.raises(CheckpointError, match="checksum mismatch") as info:
        load_checkpoint(good_file, fresh_state())
    assert str(good_file) in str(info.value)


@pytest.mark.parametrize("prefix", [b"", b"PK\x03\x04"])
def test_random_garbage_is_detected(tmp_path: Path, prefix: bytes) -> None:
    path = tmp_path / "garbage.pt"
    path.write_bytes(prefix + os.urandom(4096))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, fresh_state())
    message = str(info.value)
    assert str(path) in message
    assert ("not a PyTorch file" in message) if not prefix else ("damaged" in message)


def test_a_model_export_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(make_module().state_dict(), path)
    with pytest.raises(CheckpointError, match=r"not an fnloop checkpoint.*load_model"):
        load_checkpoint(path, fresh_state())


@pytest.mark.parametrize("version", [0, 2])
def test_other_format_versions_are_refused(good_file: Path, version: int) -> None:
    wrapper = torch.load(good_file, weights_only=True)
    torch.save({**wrapper, "version": version}, good_file)
    with pytest.raises(CheckpointMismatchError, match=rf"version {version}.*reads version 1"):
        load_checkpoint(good_file, fresh_state())


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt", fresh_state())
    with pytest.raises(CheckpointError, match="is not a file"):
        load_checkpoint(tmp_path, fresh_state())


# --------------------------------------------------------------------------- other set-ups


def test_other_model_size_names_key_and_shapes(good_file: Path) -> None:
    with pytest.raises(CheckpointMismatchError) as info:
        load_checkpoint(good_file, fresh_state(hidden=5))
    message = str(info.value)
    assert "'params.0.bias' has shape (4,) in the file but (5,) in `like`" in message
    assert "another model" in message and str(good_file) in message


def test_a_stacked_checkpoint_and_a_like_of_one_model_say_so(tmp_path: Path) -> None:
    """A checkpoint of a stacked state (which the guide saves and loads with a stacked
    ``like``) loaded into one model's ``like``, or the other way round, was said to be
    "probably written with another model", of the same module."""
    one = fresh_state()
    stacked = fnloop.stack_states([one, one])
    stacked_file = save_checkpoint(tmp_path / "stacked.pt", stacked)
    one_file = save_checkpoint(tmp_path / "one.pt", one)
    for path, like, expected in [
        (
            stacked_file,
            one,
            "The file holds 2 stacked models and `like` one model ('params.0.weight' has "
            "shape (2, 4, 3) in the file and (4, 3) in `like`; the module's is (4, 3)): load "
            "it with like= a stacked state, fl.stack_states of 2 states",
        ),
        (
            one_file,
            stacked,
            "The file holds one model and `like` 2 stacked models ('params.0.weight' has "
            "shape (4, 3) in the file and (2, 4, 3) in `like`; the module's is (4, 3)): load "
            "it with like= one state",
        ),
        (
            stacked_file,
            fnloop.stack_states([one] * 3),
            "The file holds 2 stacked models and `like` 3 stacked models",
        ),
        (one_file, fnloop.stack_states([one]), "one model and `like` 1 stacked model ("),
    ]:
        with pytest.raises(CheckpointMismatchError) as info:
            load_checkpoint(path, like)
        message = str(info.value)
        assert expected in message and "another model" not in message, message
    loaded = load_checkpoint(stacked_file, fnloop.stack_states([fresh_state()] * 2))
    assert torch.equal(loaded.params["0.weight"], stacked.params["0.weight"])


def test_other_model_layers_names_first_missing_key(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "c.pt", fresh_state())
    like = fnloop.TrainState.create(
        nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)),
        tx=optim.adamw(1e-3),
        device="cpu",
    )
    with pytest.raises(CheckpointMismatchError) as info:
        load_checkpoint(path, like)
    message = str(info.value)
    assert "'params.2.bias' (and 5 more) is in `like` but not in the file" in message
    assert "'params.1.bias' (and 12 more) is in the file but not in `like`" in message
    assert "another model" in message


def test_other_optimizer_names_first_differing_keys(good_file: Path) -> None:
    like = fnloop.TrainState.create(
        make_module(), tx=optim.sgd(1e-2, momentum=0.9), ema_decay=0.9, device="cpu"
    )
    with pytest.raises(CheckpointMismatchError) as info:
        load_checkpoint(good_file, like)
    message = str(info.value)
    assert "'opt_state.1.count' (and 4 more) is in `like` but not in the file" in message
    assert "'opt_state.0.count' (and 8 more) is in the file but not in `like`" in message
    assert "another optimizer" in message


def test_other_dtype_names_key_and_dtypes(good_file: Path) -> None:
    like = fnloop.TrainState.create(
        make_module().double(), tx=optim.adamw(1e-3), ema_decay=0.9, device="cpu"
    )
    with pytest.raises(
        CheckpointMismatchError,
        match=r"'params.0.bias' has dtype torch.float32 in the file but torch.float64",
    ):
        load_checkpoint(good_file, like)


def test_ema_setting_mismatch_is_explained(good_file: Path) -> None:
    with pytest.raises(CheckpointMismatchError, match=r"'ema.0.bias'.*in the file.*ema_decay"):
        load_checkpoint(good_file, fresh_state(ema_decay=None))


def test_a_leaf_that_is_a_tensor_in_one_and_not_the_other_is_a_mismatch(tmp_path: Path) -> None:
    """A subclass field held as a tensor in the file and as a number in ``like`` (or the
    other way round) was loaded as the file's, or failed on ``float.shape``."""
    tensor = StateWithBest.create(
        make_module(), tx=TXS["adamw"](), device="cpu", best=torch.tensor(0.5)
    )
    number = tensor.replace(best=0.5)
    for saved, like, detail in [
        (tensor, number, "'best' is a tensor in the file but float in `like`"),
        (number, tensor, "'best' is float in the file but Tensor in `like`"),
    ]:
        path = save_checkpoint(tmp_path / "c.pt", saved)
        with pytest.raises(CheckpointMismatchError) as info:
            load_checkpoint(path, like)
        assert detail in str(info.value)


def test_load_rejects_non_state_like(good_file: Path) -> None:
    with pytest.raises(TypeError, match="TrainState"):
        load_checkpoint(good_file, like=make_module())  # type: ignore[arg-type]


# --------------------------------------------------------------------------- atomic writes


def _partial_then(exc: BaseException) -> Callable[..., None]:
    real_save = torch.save

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(f, io.BytesIO):  # serializing the payload in memory: let it work
            return real_save(obj, f, *args, **kwargs)
        f.write(b"PK\x03\x04 half a checkpoint")
        raise exc

    return save


@pytest.mark.parametrize("exc", [OSError("No space left on device"), KeyboardInterrupt()])
def test_failure_while_writing_keeps_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exc: BaseException
) -> None:
    old = randomized(fresh_state(), seed=1)
    path = save_checkpoint(tmp_path / "ckpt.pt", old)
    before = path.read_bytes()

    monkeypatch.setattr(torch, "save", _partial_then(exc))
    with pytest.raises(type(exc)):
        save_checkpoint(path, randomized(fresh_state(), seed=2))
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert_same_state(load_checkpoint(path, fresh_state()), old)
    assert files_in(tmp_path) == ["ckpt.pt"]


def test_failure_in_replace_keeps_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = randomized(fresh_state(), seed=1)
    path = save_checkpoint(tmp_path / "ckpt.pt", old)

    def broken_replace(src: Any, dst: Any) -> None:
        raise OSError("rename failed")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="rename failed"):
        save_checkpoint(path, randomized(fresh_state(), seed=2))
    with pytest.raises(OSError, match="rename failed"):
        save_model(tmp_path / "model.pt", old)
    monkeypatch.undo()

    assert_same_state(load_checkpoint(path, fresh_state()), old)
    assert files_in(tmp_path) == ["ckpt.pt"]


def test_failure_on_first_write_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch, "save", _partial_then(OSError("disk full")))
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "ckpt.pt", fresh_state())
    assert files_in(tmp_path) == []


def record_writes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records, in order, each fsync of a file (with its size then), each rename and each
    fsync of a folder, as the writes call them."""
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        st = os.fstat(fd)
        events.append("fsync folder" if stat.S_ISDIR(st.st_mode) else f"fsync {st.st_size} bytes")
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        events.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


@pytest.mark.skipif(os.name != "posix", reason="folders are fsynced where they can be opened")
def test_the_file_is_fsynced_before_the_rename_and_the_folder_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What makes a write survive a power cut: the new file's data on disk before it
    takes the name, and the rename on disk before the save returns."""
    events = record_writes(monkeypatch)
    for save in (save_checkpoint, save_model):
        events.clear()
        save(tmp_path / "c.pt", fresh_state())
        size = (tmp_path / "c.pt").stat().st_size
        assert events == [f"fsync {size} bytes", "replace", "fsync folder"], save.__name__


@pytest.mark.skipif(os.name != "posix", reason="folders are fsynced where they can be opened")
def test_both_atomic_writers_fsync_all_the_data_before_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """atomic_write (the profiler's trace) as atomic_write_file (checkpoints, logs): the
    whole file is on disk, not in a buffer, before it takes the name."""
    events = record_writes(monkeypatch)
    data = b"epoch,loss\n1,0.5\n"
    _io.atomic_write(tmp_path / "trace.json", lambda tmp: tmp.write_bytes(data))
    assert events == [f"fsync {len(data)} bytes", "replace", "fsync folder"]
    events.clear()
    _io.atomic_write_file(tmp_path / "log.csv", lambda f: f.write(data))
    assert events == [f"fsync {len(data)} bytes", "replace", "fsync folder"]


@pytest.mark.parametrize("refused", ["open", "fsync"])
def test_a_folder_that_cannot_be_opened_or_fsynced_still_gets_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refused: str
) -> None:
    """Windows opens no folder and some file systems fsync none: the save succeeds."""
    real_open, real_fsync = os.open, os.fsync

    def open_(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if refused == "open" and os.path.isdir(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    def fsync(fd: int) -> None:
        if refused == "fsync" and stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(22, "Invalid argument")
        real_fsync(fd)

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "fsync", fsync)
    state = randomized(fresh_state())
    save_checkpoint(tmp_path / "c.pt", state)
    monkeypatch.undo()
    assert_same_state(load_checkpoint(tmp_path / "c.pt", fresh_state()), state)
    assert files_in(tmp_path) == ["c.pt"]


@pytest.mark.parametrize(
    ("error", "fails"),
    [(errno.EINVAL, False), (errno.ENOTSUP, False), (errno.EIO, True), (errno.ENOSPC, True)],
)
def test_a_file_fsync_is_skipped_where_unsupported_and_an_error_where_it_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: int, fails: bool
) -> None:
    """A file system that cannot fsync a file (EINVAL, ENOTSUP) gets the file from both
    writers; one whose fsync failed (EIO, ENOSPC: the data may not be on disk) fails the
    write in both, and the earlier file stays as it was, with no temporary file left."""
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(error, os.strerror(error))
        real_fsync(fd)

    writers = {
        "atomic_write": lambda path, b: _io.atomic_write(path, lambda tmp: tmp.write_bytes(b)),
        "atomic_write_file": lambda path, b: _io.atomic_write_file(path, lambda f: f.write(b)),
    }
    for name, write in writers.items():
        path = tmp_path / f"{name}.bin"
        path.write_bytes(b"earlier")
        monkeypatch.setattr(os, "fsync", fsync)
        if fails:
            with pytest.raises(OSError) as info:
                write(path, b"new")
            assert info.value.errno == error, name
        else:
            write(path, b"new")
        monkeypatch.undo()
        assert path.read_bytes() == (b"earlier" if fails else b"new"), name
    assert files_in(tmp_path) == sorted(f"{name}.bin" for name in writers)


@pytest.mark.skipif(os.name != "posix", reason="a umask and file permissions")
def test_atomic_write_of_a_file_the_umask_makes_read_only_for_its_writer() -> None:
    """Under umask 0o277 the profiler's trace file is read-only once written: fsyncing it
    before the rename must not need write access. Root passes every permission check, so
    there the write runs as the user nobody (in a folder of /tmp that user can reach)."""
    folder = Path(tempfile.mkdtemp())
    folder.chmod(0o777)
    as_root = os.geteuid() == 0
    umask = os.umask(0o277)
    try:
        if as_root:
            try:
                os.seteuid(65534)
            except PermissionError:  # a container that takes CAP_SETUID from root
                pytest.skip("root cannot act as the user nobody here")
        _io.atomic_write(folder / "trace.json", lambda tmp: tmp.write_bytes(b"{}"))
    finally:
        if as_root:
            os.seteuid(0)
        os.umask(umask)
    try:
        assert (folder / "trace.json").read_bytes() == b"{}"
        assert files_in(folder) == ["trace.json"]
    finally:
        shutil.rmtree(folder)


def test_a_write_that_fails_before_making_its_file_raises_its_own_error(tmp_path: Path) -> None:
    """No temporary file to remove: the cleanup must not replace the error with its own
    FileNotFoundError."""

    def write(tmp: Path) -> None:
        raise ValueError("nothing to write")

    with pytest.raises(ValueError, match="nothing to write"):
        _io.atomic_write(tmp_path / "trace.json", write)
    assert files_in(tmp_path) == []


def test_two_writes_of_one_path_under_way_at_once_use_their_own_temporary_files(
    tmp_path: Path,
) -> None:
    """Two writers of one path (two processes saving last.pt): the second finishes while
    the first still writes, then the first replaces its file."""
    path = tmp_path / "last.pt"

    def first(f: Any) -> None:
        f.write(b"first")
        _io.atomic_write_file(path, lambda g: g.write(b"second"))
        assert path.read_bytes() == b"second"

    _io.atomic_write_file(path, first)
    assert path.read_bytes() == b"first"
    assert files_in(tmp_path) == ["last.pt"]


def test_the_temporary_file_is_hidden_beside_its_target_and_removed_after_a_kill(
    tmp_path: Path,
) -> None:
    """The temporary file sits in the target's folder, hidden, without the target's name
    in its own (TensorBoard picks its files by name); one a killed write left (made again
    here) is what remove_temporaries removes, and only it."""
    path = tmp_path / "events.out.tfevents.1"
    seen: list[Path] = []

    def write(tmp: Path) -> None:
        seen.append(tmp)
        tmp.write_bytes(b"records")

    _io.atomic_write(path, write)
    (tmp,) = seen
    assert tmp.parent == tmp_path and tmp.name.startswith(".") and "tfevents" not in tmp.name
    tmp.write_bytes(b"half")  # what kill -9 during the write leaves
    _io.remove_temporaries(tmp_path)
    assert files_in(tmp_path) == [path.name]


def test_removing_temporaries_goes_past_one_it_cannot_remove(tmp_path: Path) -> None:
    (tmp_path / ".fnloop-0123456789ab.tmp").mkdir()  # a folder: unlink fails
    (tmp_path / ".fnloop-dead.tmp").write_bytes(b"half")
    _io.remove_temporaries(tmp_path)
    assert files_in(tmp_path) == [".fnloop-0123456789ab.tmp"]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts /proc/self/fd")
def test_writes_leave_no_file_descriptor_open(tmp_path: Path) -> None:
    _io.atomic_write(tmp_path / "trace.json", lambda tmp: tmp.write_bytes(b"{}"))
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        _io.atomic_write(tmp_path / "trace.json", lambda tmp: tmp.write_bytes(b"{}"))
        save_checkpoint(tmp_path / "c.pt", fresh_state())
    assert len(os.listdir("/proc/self/fd")) == before


# --------------------------------------------------------------------------- finding and resuming


def _set_mtime(path: Path, seconds: int) -> None:
    os.utime(path, ns=(seconds * 10**9, seconds * 10**9))


def test_find_checkpoints_newest_first(tmp_path: Path) -> None:
    for name, t in [("step-9.pt", 100), ("step-10.pt", 100), ("last.pt", 200), ("old.pt", 50)]:
        (tmp_path / name).write_bytes(b"x")
        _set_mtime(tmp_path / name, t)
    (tmp_path / ".last.pt.0123.tmp").write_bytes(b"x")  # an unfinished write
    (tmp_path / "notes.txt").write_bytes(b"x")
    (tmp_path / "sub.pt").mkdir()

    names = [p.name for p in find_checkpoints(tmp_path)]
    assert names == ["last.pt", "step-10.pt", "step-9.pt", "old.pt"]
    assert [p.name for p in find_checkpoints(tmp_path, "step-*.pt")] == ["step-10.pt", "step-9.pt"]
    assert find_checkpoints(tmp_path / "missing") == []


def test_find_checkpoints_of_one_time_are_ordered_by_the_numbers_in_their_names(
    tmp_path: Path,
) -> None:
    """Files written within the clock's resolution (or copied without times) come
    highest number first, whatever order the folder lists them in."""
    numbers = [3, 20, 1, 100, 7, 12, 2, 9, 30, 11]
    for n in numbers:
        (tmp_path / f"step-{n}.pt").write_bytes(b"x")
        _set_mtime(tmp_path / f"step-{n}.pt", 100)
    names = [p.name for p in find_checkpoints(tmp_path)]
    assert names == [f"step-{n}.pt" for n in sorted(numbers, reverse=True)]


def test_latest_good_checkpoint_skips_damaged_newest(tmp_path: Path) -> None:
    states = [randomized(fresh_state(), seed=s).replace(step=s) for s in (1, 2, 3)]
    for i, s in enumerate(states):
        path = save_checkpoint(tmp_path / f"step-{s.step}.pt", s, position=i)
        _set_mtime(path, 100 + i)
    newest = tmp_path / "step-3.pt"
    newest.write_bytes(newest.read_bytes()[:-50])
    _set_mtime(newest, 102)

    found, skipped = latest_good_checkpoint(tmp_path, fresh_state())

    assert found is not None and found.path == tmp_path / "step-2.pt"
    assert_same_state(found.state, states[1])
    assert found.extra == {"position": 1}
    assert [s.path for s in skipped] == [newest]
    assert "truncated or damaged" in skipped[0].reason and str(newest) in skipped[0].reason


def test_latest_good_checkpoint_tries_the_files_its_pattern_matches_only(tmp_path: Path) -> None:
    older = randomized(fresh_state(), seed=1)
    _set_mtime(save_checkpoint(tmp_path / "step-1.pt", older), 100)
    _set_mtime(save_checkpoint(tmp_path / "other.pt", randomized(fresh_state(), seed=2)), 200)

    found, skipped = latest_good_checkpoint(tmp_path, fresh_state(), pattern="step-*.pt")

    assert found is not None and found.path == tmp_path / "step-1.pt" and skipped == []
    assert_same_state(found.state, older)


def _signed(payload: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint wrapper around ``payload`` with a valid checksum."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    return {
        "format": ckpt.FORMAT,
        "version": ckpt.VERSION,
        "sha256": hashlib.sha256(data).hexdigest(),
        "payload": torch.frombuffer(bytearray(data), dtype=torch.uint8),
    }


def _payload_of(wrapper: dict[str, Any]) -> dict[str, Any]:
    return torch.load(io.BytesIO(wrapper["payload"].numpy().tobytes()), weights_only=True)


DAMAGED_ENTRIES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "version of another type": lambda w: {**w, "version": "1"},
    "version a bool": lambda w: {**w, "version": True},  # True == 1, but no int
    "payload not a tensor": lambda w: {**w, "payload": w["payload"].tolist()},
    "payload without step": lambda w: _signed(
        {k: v for k, v in _payload_of(w).items() if k != "step"}
    ),
    "payload not a dict": lambda w: _signed(list(_payload_of(w))),  # type: ignore[arg-type]
    "leaves not a dict": lambda w: _signed(
        {**_payload_of(w), "leaves": list(_payload_of(w)["leaves"].values())}
    ),
    "sha256 altered in its last digit": lambda w: {
        **w,
        "sha256": w["sha256"][:-1] + ("1" if w["sha256"][-1] == "0" else "0"),
    },
    "payload of another dtype": lambda w: {**w, "payload": w["payload"].view(torch.int8)},
    "payload of two dimensions": lambda w: {**w, "payload": w["payload"].unsqueeze(1)},
}


def test_a_payload_stored_with_gaps_is_checked_and_read_in_element_order(tmp_path: Path) -> None:
    """The checksum covers the payload's bytes in element order (as ``.numpy().tobytes()``
    gives them), however its tensor is laid out in the file: here every other byte of a
    storage twice its size."""
    state = randomized(fresh_state(), seed=4)
    path = save_checkpoint(tmp_path / "c.pt", state)
    wrapper = torch.load(path, weights_only=True)
    payload = wrapper["payload"]
    strided = torch.stack([payload, torch.zeros_like(payload)], dim=1)[:, 0]
    assert not strided.is_contiguous() and torch.equal(strided, payload)
    assert hashlib.sha256(strided.numpy().tobytes()).hexdigest() == wrapper["sha256"]
    torch.save({**wrapper, "payload": strided}, path)
    assert_same_state(load_checkpoint(path, fresh_state()), state)


@pytest.mark.parametrize("damage", list(DAMAGED_ENTRIES))
def test_a_file_with_malformed_entries_is_skipped_as_damaged(tmp_path: Path, damage: str) -> None:
    """A readable file whose entries are not what fnloop writes is damage, which
    latest_good_checkpoint skips: not a set-up mismatch, which it raises (a version
    of another type read as another version), nor a crash (KeyError, AttributeError)."""
    old = randomized(fresh_state(), seed=1)
    _set_mtime(save_checkpoint(tmp_path / "old.pt", old), 100)
    path = save_checkpoint(tmp_path / "new.pt", randomized(fresh_state(), seed=2))
    torch.save(DAMAGED_ENTRIES[damage](torch.load(path, weights_only=True)), path)
    _set_mtime(path, 200)

    found, skipped = latest_good_checkpoint(tmp_path, fresh_state())

    assert found is not None and found.path == tmp_path / "old.pt"
    assert_same_state(found.state, old)
    assert [s.path for s in skipped] == [path]
    assert f"{path} is damaged" in skipped[0].reason


def test_latest_good_checkpoint_with_nothing_usable(tmp_path: Path) -> None:
    assert latest_good_checkpoint(tmp_path, fresh_state()) == (None, [])
    (tmp_path / "a.pt").write_bytes(b"junk")
    found, skipped = latest_good_checkpoint(tmp_path, fresh_state())
    assert found is None and [s.path.name for s in skipped] == ["a.pt"]


def test_latest_good_checkpoint_raises_on_other_setup(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "last.pt", fresh_state())
    with pytest.raises(CheckpointMismatchError, match=r"params.0.bias"):
        latest_good_checkpoint(tmp_path, fresh_state(hidden=5))


# --------------------------------------------------------------------------- RNG


def _draws() -> tuple[Any, ...]:
    return (
        torch.rand(5),
        torch.randn(3),
        [random.random() for _ in range(3)],
        random.gauss(0.0, 1.0),
        np.random.rand(4),
        np.random.randn(3),
    )


def _assert_same_draws(a: tuple[Any, ...], b: tuple[Any, ...]) -> None:
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[2] == b[2] and a[3] == b[3]
    np.testing.assert_array_equal(a[4], b[4])
    np.testing.assert_array_equal(a[5], b[5])


def test_rng_state_round_trip() -> None:
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    random.gauss(0.0, 1.0)  # leave a cached Gaussian in both generators
    np.random.randn(1)
    saved = rng_state()
    first = _draws()
    set_rng_state(saved)
    _assert_same_draws(first, _draws())


def test_rng_state_survives_a_checkpoint(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "c.pt", fresh_state(), rng=rng_state())
    first = _draws()
    for _ in range(3):
        _draws()  # move every generator on
    set_rng_state(load_checkpoint_with_extra(path, fresh_state()).extra["rng"])
    _assert_same_draws(first, _draws())


def _assert_same_numpy_state(a: tuple[Any, ...], b: tuple[Any, ...]) -> None:
    assert a[0] == b[0] and a[2:] == b[2:]
    np.testing.assert_array_equal(a[1], b[1])


def test_set_rng_state_restores_the_generators_it_holds_and_leaves_the_others() -> None:
    """A state of fewer generators (made before NumPy was imported, or by hand) restores
    those it holds; the others go on from where they are."""
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    saved = rng_state()
    first = _draws()
    py, numpy = random.getstate(), np.random.get_state()
    set_rng_state({"torch": saved["torch"]})
    assert torch.equal(torch.rand(4), first[0][:4])
    assert random.getstate() == py
    _assert_same_numpy_state(np.random.get_state(), numpy)
    set_rng_state({k: v for k, v in saved.items() if k != "numpy"})
    assert random.random() == first[2][0]
    _assert_same_numpy_state(np.random.get_state(), numpy)


def test_rng_state_does_not_import_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "numpy")
    state = rng_state()
    assert "numpy" not in state and "numpy" not in sys.modules
    assert set(state) >= {"torch", "python"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_rng_state_includes_cuda() -> None:
    torch.cuda.init()
    saved = rng_state()
    assert len(saved["cuda"]) == torch.cuda.device_count()
    a = torch.rand(3, device="cuda")
    set_rng_state(saved)
    assert torch.equal(a, torch.rand(3, device="cuda"))


# --------------------------------------------------------------------------- model export


@pytest.mark.parametrize("use_ema", [False, True])
def test_save_model_loads_into_a_plain_module(tmp_path: Path, use_ema: bool) -> None:
    state = randomized(fresh_state())
    path = save_model(tmp_path / "model.pt", state, use_ema=use_ema)
    weights = state.ema if use_ema else state.params
    assert weights is not None

    module = make_module()
    module.load_state_dict(torch.load(path, weights_only=True), strict=True)
    for name, value in module.state_dict().items():
        expected = weights[name] if name in weights else state.buffers[name]
        assert torch.equal(value, expected), name

    other = load_model(path, make_module())
    for name, value in other.state_dict().items():
        assert torch.equal(value, module.state_dict()[name]), name


def test_load_model_explains_a_training_checkpoint(good_file: Path) -> None:
    with pytest.raises(CheckpointError, match=r"training checkpoint.*load_checkpoint"):
        load_model(good_file, make_module())


def test_load_model_names_the_entry_that_is_not_a_tensor(tmp_path: Path) -> None:
    weights = make_module().state_dict()
    path = tmp_path / "nested.pt"
    torch.save({"model": weights, "epoch": 3}, path)
    with pytest.raises(CheckpointError) as info:
        load_model(path, make_module())
    message = str(info.value)
    assert "entry 'model' is of type OrderedDict, not a tensor" in message
    advice = f"module.load_state_dict(torch.load({str(path)!r}, weights_only=True)['model'])"
    assert advice in message
    module = make_module()
    module.load_state_dict(torch.load(str(path), weights_only=True)["model"])  # as advised

    torch.save({"epoch": 3, "ema": {}, "weights": weights}, path)
    with pytest.raises(
        CheckpointError, match=r"entry 'epoch' is of type int.*Its entry 'weights' is a dict"
    ):
        load_model(path, make_module())

    torch.save({"config": {"lr": 0.1}, "weights": weights}, path)
    with pytest.raises(
        CheckpointError, match=r"entry 'config' is of type dict.*Its entry 'weights' is a dict"
    ):
        load_model(path, make_module())

    torch.save({**weights, "step": 3}, path)
    with pytest.raises(CheckpointError, match=r"entry 'step' is of type int, not a tensor\.$"):
        load_model(path, make_module())


def test_load_model_strict_false_loads_the_shared_keys_and_refuses_none(tmp_path: Path) -> None:
    """Fine-tuning: a new head loads with ``strict=False``; a file that shares no key
    (saved from a wrapper, keys ``model.0.weight``) loaded nothing, silently."""
    source, target = make_module(), make_module()
    torch.nn.init.normal_(target[1].weight)  # the "head": layer 1, not in the file
    weights = {k: v for k, v in source.state_dict().items() if k.startswith("0.")}
    path = tmp_path / "partial.pt"
    torch.save(weights, path)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.warns(UserWarning, match=r"loaded 2 of the module's 7 entries.*'1\.weight'"):
        load_model(path, target, strict=False)
    for name, value in target.state_dict().items():
        assert torch.equal(value, weights.get(name, before[name])), name
    assert not torch.equal(target[0].weight, before["0.weight"])

    torch.save({f"model.{k}": v for k, v in weights.items()}, path)
    untouched = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(
        CheckpointMismatchError, match=r"shares no key.*'model\.0\..*strip a prefix"
    ):
        load_model(path, target, strict=False)
    assert all(torch.equal(v, untouched[k]) for k, v in target.state_dict().items())

    torch.save({}, path)  # an empty state dict shares no key either (it warned "loaded 0")
    with pytest.raises(
        CheckpointMismatchError, match=r"the file has no entry, the module '0\.weight'.*again"
    ):
        load_model(path, target, strict=False)
    assert all(torch.equal(v, untouched[k]) for k, v in target.state_dict().items())


def test_load_model_strict_is_load_state_dicts_error(tmp_path: Path) -> None:
    """The default ``strict=True`` refuses a file that lacks some of the module's
    entries, holds others, or shares none with it, with the error
    ``module.load_state_dict`` gives."""
    weights = make_module().state_dict()
    partial = {k: v for k, v in weights.items() if k.startswith("0.")}
    for name, entries in [
        ("missing", partial),
        ("unexpected", {**weights, "2.bias": torch.ones(2)}),
        ("disjoint", {f"model.{k}": v for k, v in weights.items()}),  # no key shared
    ]:
        path = tmp_path / f"{name}.pt"
        torch.save(entries, path)
        with pytest.raises(RuntimeError) as expected:
            make_module().load_state_dict(entries)
        with pytest.raises(RuntimeError) as got:
            load_model(path, make_module())
        assert str(got.value) == str(expected.value)


def test_load_model_strict_false_counts_the_entries_it_loaded(tmp_path: Path) -> None:
    """Entries of the file that the module lacks are skipped, not counted as loaded."""
    source = make_module()
    shared = {k: v for k, v in source.state_dict().items() if k.startswith("0.")}
    entries = {**shared, "2.weight": torch.ones(2, 4), "2.bias": torch.ones(2)}
    path = tmp_path / "head.pt"
    torch.save(entries, path)
    target = make_module()
    loaded = len(entries.keys() & target.state_dict().keys())
    with pytest.warns(UserWarning) as record:
        load_model(path, target, strict=False)
    (message,) = [str(w.message) for w in record]
    assert f"loaded {loaded} of the module's 7 entries" in message and loaded == 2
    assert "in the file, not in the module (skipped): '2.weight', '2.bias'" in message
    for name, value in shared.items():
        assert torch.equal(target.state_dict()[name], value), name


def test_safetensors_export(tmp_path: Path) -> None:
    pytest.importorskip("safetensors")
    state = randomized(fresh_state())
    path = save_model(tmp_path / "model.safetensors", state)
    module = load_model(path, make_module())
    for name, value in state.state_dict().items():
        assert torch.equal(module.state_dict()[name], value), name


def test_load_model_of_a_missing_or_damaged_file_names_the_file(tmp_path: Path) -> None:
    pytest.importorskip("safetensors")
    for name in ("missing.pt", "missing.safetensors"):
        with pytest.raises(CheckpointError, match=rf"{name}: it does not exist"):
            load_model(tmp_path / name, make_module())
    path = save_model(tmp_path / "model.safetensors", randomized(fresh_state()))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=r"Cannot read the safetensors file .*model"):
        load_model(path, make_module())
    exported = save_model(tmp_path / "best.safetensors", randomized(fresh_state()))
    with pytest.raises(CheckpointError, match=r"safetensors file, a model export .*load_model"):
        load_checkpoint(exported, fresh_state())


def test_safetensors_export_of_channels_last_weights(tmp_path: Path) -> None:
    """safetensors stores contiguous data only; the weights still load into a module."""
    pytest.importorskip("safetensors")
    state = channels_last_state()
    for i, saved in enumerate([state, state.clone()]):
        module = load_model(save_model(tmp_path / f"m{i}.safetensors", saved), conv_module())
        for name, value in saved.state_dict().items():
            assert torch.equal(module.state_dict()[name], value), name


def test_safetensors_missing_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match=r"pip install fnloop\[safetensors\]"):
        save_model(tmp_path / "model.safetensors", fresh_state())
    assert files_in(tmp_path) == []


class Versioned(nn.Linear):
    """A layer with extra state (``get_extra_state``), as quantized or fp8 layers keep
    their settings: ``module.state_dict()`` holds it as ``"<name>._extra_state"``."""

    def __init__(self, extra: Any = None) -> None:
        super().__init__(3, 2)
        self.extra = {"version": 3, "calibrated": [1.5, 2.0]} if extra is None else extra

    def get_extra_state(self) -> Any:
        return self.extra

    def set_extra_state(self, state: Any) -> None:
        self.extra = state


def versioned_module(extra: Any = None) -> nn.Module:
    return nn.Sequential(Versioned(extra), nn.BatchNorm1d(2))


@pytest.mark.parametrize("extra", ["plain", "tensor"])
def test_extra_state_is_exported_and_loads_strictly(tmp_path: Path, extra: str) -> None:
    """A module whose layer keeps extra state: the state's state_dict, save_model's .pt
    file and best_model.pt hold the entry module.state_dict() has, and load into a fresh
    module with strict=True, which sets the layer's extra state (a strict load refused
    them: 'Missing key(s) in state_dict: "0._extra_state"')."""
    value = {"version": 3, "calibrated": [1.5, 2.0]} if extra == "plain" else torch.arange(3.0)
    torch.manual_seed(0)
    module = versioned_module(value)
    state = randomized(fnloop.TrainState.create(module, tx=optim.sgd(0.1), device="cpu"))
    want = {**state.params, **state.buffers}

    sd = state.state_dict()
    assert list(sd) == list(module.state_dict())  # torch's keys, in torch's order
    files = [save_model(tmp_path / "model.pt", state)]
    if extra == "tensor" and importlib.util.find_spec("safetensors"):
        files.append(save_model(tmp_path / "model.safetensors", state))
    for source in [sd, *(torch.load(f, weights_only=True) for f in files[:1])]:
        fresh = versioned_module("unset")
        fresh.load_state_dict(source, strict=True)
        assert_same_extra(fresh[0].extra, value)
        for name, t in fresh.state_dict().items():
            if not name.endswith("_extra_state"):
                assert torch.equal(t, want[name]), name
    for path in files:
        loaded = load_model(path, versioned_module("unset"))
        assert_same_extra(loaded[0].extra, value)
        assert torch.equal(loaded[0].weight, state.params["0.weight"])

    # fit's best model: written with the extra state, and a re-run of the finished job
    # finds the file holding exactly the run's best model (it is left as it was).
    data = torch.utils.data.TensorDataset(torch.randn(16, 3), torch.randint(0, 2, (16,)))
    loader = torch.utils.data.DataLoader(data, batch_size=8)

    def step(model: Any, batch: Any) -> dict[str, torch.Tensor]:
        x, y = batch
        return {"loss": nn.functional.cross_entropy(model(x), y)}

    def run() -> None:
        torch.manual_seed(0)
        made = fnloop.TrainState.create(versioned_module(value), tx=optim.sgd(0.1))
        fnloop.fit(
            made,
            step,
            loader,
            max_epochs=1,
            out_dir=tmp_path / "run",
            log_to_console=False,
            progress=False,
        )

    run()
    best = tmp_path / "run" / "best_model.pt"
    fresh = load_model(best, versioned_module("unset"))
    assert_same_extra(fresh[0].extra, value)
    written = best.stat().st_mtime_ns
    run()
    assert best.stat().st_mtime_ns == written


def assert_same_extra(got: Any, want: Any) -> None:
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and torch.equal(got, want)
    else:
        assert got == want


def test_extra_state_of_the_module_itself_and_of_a_nested_layer_loads(tmp_path: Path) -> None:
    """torch names extra state '<prefix>_extra_state': '_extra_state' for the module itself,
    '0.0._extra_state' two levels down. A non-tensor entry whose name merely ends in
    '_extra_state' is no extra state: the file is not a state dict."""
    for make, key in [
        (Versioned, "_extra_state"),
        (lambda extra: nn.Sequential(nn.Sequential(Versioned(extra))), "0.0._extra_state"),
    ]:
        torch.manual_seed(0)
        module = make({"v": 1})
        assert key in module.state_dict()
        state = fnloop.TrainState.create(module, tx=optim.sgd(0.1), device="cpu")
        path = save_model(tmp_path / "model.pt", state)
        fresh = make("unset")
        fresh.load_state_dict(torch.load(path, weights_only=True))  # torch's own load
        loaded = load_model(path, make("unset"))
        assert loaded.state_dict()[key] == fresh.state_dict()[key] == {"v": 1}

    path = tmp_path / "notes.pt"
    torch.save({**Versioned().state_dict(), "notes_extra_state": "tuned"}, path)
    with pytest.raises(CheckpointError, match=r"entry 'notes_extra_state' is of type str"):
        load_model(path, Versioned())


def test_save_model_refuses_extra_state_a_safetensors_file_cannot_hold(tmp_path: Path) -> None:
    """Extra state that is not a tensor has no place in a safetensors file: a clear error
    before anything is written, and an earlier export at that path is kept."""
    pytest.importorskip("safetensors")
    state = fnloop.TrainState.create(versioned_module(), tx=optim.sgd(0.1), device="cpu")
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"earlier export")
    with pytest.raises(
        ValueError,
        match=r"entry '0\._extra_state' is the extra state of a submodule \(its "
        r"get_extra_state\(\) returns a dict\).*holds tensors only\. Export to a \.pt path",
    ):
        save_model(path, state)
    assert path.read_bytes() == b"earlier export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


# --------------------------------------------------------------------------- distributed


def test_only_rank_zero_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert ckpt.is_main_process()
    monkeypatch.setattr(ckpt, "is_main_process", lambda: False)  # rank 1, say
    assert save_checkpoint(tmp_path / "c.pt", fresh_state()) == tmp_path / "c.pt"
    assert save_model(tmp_path / "m.pt", fresh_state()) == tmp_path / "m.pt"
    assert files_in(tmp_path) == []
    with pytest.raises(TypeError):  # bad input still fails on every rank
        save_checkpoint(tmp_path / "c.pt", fresh_state(), bad=Opaque())


# --------------------------------------------------------------------------- devices


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_leaves_follow_the_device_of_like(tmp_path: Path) -> None:
    cpu_state = randomized(fresh_state())
    path = save_checkpoint(tmp_path / "c.pt", cpu_state, order=torch.arange(3))
    torch.manual_seed(0)
    like = fnloop.TrainState.create(
        make_module(), tx=optim.adamw(1e-3), ema_decay=0.9, device="cuda"
    )
    loaded = load_checkpoint_with_extra(path, like)
    assert all(t.device.type == "cuda" for t in _tree.tree_leaves(loaded.state))
    assert loaded.extra["order"].device.type == "cpu"
    assert_same_state(_tree.tree_map(lambda t: t.cpu(), loaded.state), cpu_state)
    path2 = save_checkpoint(tmp_path / "c2.pt", loaded.state)
    assert_same_state(load_checkpoint(path2, fresh_state()), cpu_state)


def test_like_on_meta_loads_onto_the_cpu_and_trains(tmp_path: Path) -> None:
    """A skeleton ``like`` built on meta (nothing allocated) gets real tensors, not meta."""

    def mse(model: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        x, y = batch
        return {"loss": ((model(x) - y) ** 2).mean()}

    step = fnloop.make_train_step(mse)
    batch = (torch.randn(8, 3), torch.randn(8, 4))
    state, _ = step(fresh_state(), batch)
    path = save_checkpoint(tmp_path / "c.pt", state)
    with torch.device("meta"):
        skeleton = make_module()
    like = fnloop.TrainState.create(skeleton, tx=optim.adamw(1e-3), ema_decay=0.9, device="meta")

    loaded = load_checkpoint(path, like)

    assert {t.device.type for t in _tree.tree_leaves(loaded)} == {"cpu"}
    assert_same_state(loaded, state)
    expected, _ = step(state, batch)
    trained, metrics = fnloop.make_train_step(mse)(loaded, batch)
    assert torch.isfinite(metrics["loss"])
    assert_same_state(trained, expected)


def test_like_partly_on_meta_is_refused(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "c.pt", fresh_state())
    like = fresh_state()
    like = like.replace(params={k: v.to("meta") for k, v in like.params.items()})
    with pytest.raises(
        CheckpointMismatchError, match=r"'params\.0\.bias' is on the meta device.*on cpu"
    ):
        load_checkpoint(path, like)


def test_safetensors_export_of_tied_weights(tmp_path: Path) -> None:
    """state_dict lists a tied weight under each name; safetensors refuses shared memory."""
    pytest.importorskip("safetensors")
    from test_state import Tied

    torch.manual_seed(0)
    state = fnloop.TrainState.create(Tied(), tx=optim.sgd(0.1), device="cpu")
    module = load_model(save_model(tmp_path / "tied.safetensors", state), Tied())
    assert module.out.weight is module.emb.weight
    assert torch.equal(module.emb.weight, state.params["emb.weight"])


def test_save_model_refuses_a_stacked_state(tmp_path: Path) -> None:
    stacked = fnloop.stack_states([fresh_state(), fresh_state()])
    with pytest.raises(ValueError, match=r"holds 2 stacked models.*unstack_states"):
        save_model(tmp_path / "model.pt", stacked)
    assert not (tmp_path / "model.pt").exists()


def test_save_model_of_one_unstacked_model_holds_that_model_only(tmp_path: Path) -> None:
    """unstack_states gives views of the stacked tensors: the export of one model (the
    guide's best-of-sweep) is as large as torch.save of its own weights, not the sweep's."""
    torch.manual_seed(0)
    states = [
        fnloop.TrainState.create(nn.Linear(128, 128), tx=optim.sgd(0.1), device="cpu")
        for _ in range(8)
    ]
    best = fnloop.unstack_states(fnloop.stack_states(states))[3]
    reference = io.BytesIO()
    torch.save({k: v.clone() for k, v in best.state_dict().items()}, reference)
    path = save_model(tmp_path / "best.pt", best)
    assert path.stat().st_size < 1.1 * len(reference.getvalue())
    module = load_model(path, nn.Linear(128, 128))
    for name, value in states[3].state_dict().items():
        assert torch.equal(module.state_dict()[name], value), name


def test_swapped_path_and_state_is_a_clear_error(tmp_path: Path) -> None:
    state = fnloop.TrainState.create(torch.nn.Linear(2, 1), tx=optim.sgd(0.1), device="cpu")
    path = fnloop.save_checkpoint(tmp_path / "c.pt", state)
    before = path.read_bytes()
    for call, fn in [
        (lambda: fnloop.save_checkpoint(state, path), r"save_checkpoint\(path, state\)"),
        (lambda: fnloop.save_model(state, path), r"save_model\(path, state\)"),
        (lambda: fnloop.load_checkpoint(state, path), r"load_checkpoint\(path, like\)"),
        (lambda: fnloop.load_model(torch.nn.Linear(2, 1), path), r"load_model\(path, module\)"),
    ]:
        with pytest.raises(TypeError, match=rf"path first: {fn}; its first argument is a"):
            call()
    assert path.read_bytes() == before


def test_errors_name_the_loading_function_called(tmp_path: Path) -> None:
    """load_checkpoint_with_extra (and latest_good_checkpoint, first_good_checkpoint)
    raised errors that named load_checkpoint, a function the user had not called."""
    state = fnloop.TrainState.create(torch.nn.Linear(2, 1), tx=optim.sgd(0.1), device="cpu")
    path = fnloop.save_checkpoint(tmp_path / "c.pt", state)
    module = torch.nn.Linear(2, 1)
    for fn, call in [
        ("load_checkpoint", lambda: load_checkpoint(path, module)),
        ("load_checkpoint_with_extra", lambda: load_checkpoint_with_extra(path, module)),
        ("latest_good_checkpoint", lambda: latest_good_checkpoint(tmp_path, module)),
        ("first_good_checkpoint", lambda: ckpt.first_good_checkpoint([path], module)),
    ]:
        with pytest.raises(
            TypeError, match=rf"^{fn} needs an fnloop.TrainState; got Linear\. Pass like="
        ):
            call()
    with pytest.raises(
        TypeError, match=r"^load_checkpoint_with_extra takes the file's path first: "
    ):
        load_checkpoint_with_extra(state, path)
    with pytest.raises(
        TypeError,
        match=r"^latest_good_checkpoint takes the folder first: latest_good_checkpoint\(directory, "
        r"like\); its first argument is a TrainState\.$",
    ):
        latest_good_checkpoint(state, tmp_path)  # type: ignore[arg-type]


def test_first_good_checkpoint_refuses_one_path_swapped_arguments_and_a_bad_like(
    tmp_path: Path,
) -> None:
    """One path was iterated character by character (every character a missing file:
    ``(None, skipped)``, a silent fresh start), swapped arguments raised Python's bare
    'not iterable', and a wrong ``like`` passed unnoticed where no file was tried."""
    state = fnloop.TrainState.create(torch.nn.Linear(2, 1), tx=optim.sgd(0.1), device="cpu")
    path = fnloop.save_checkpoint(tmp_path / "c.pt", state)
    for one in (path, str(path)):
        with pytest.raises(TypeError, match=r"got one path, '.*c\.pt'\. Pass \[path\]"):
            ckpt.first_good_checkpoint(one, state)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^first_good_checkpoint takes the files first: "):
        ckpt.first_good_checkpoint(state, [path])  # type: ignore[arg-type]
    module = torch.nn.Linear(2, 1)
    for call in (
        lambda: ckpt.first_good_checkpoint([], module),  # type: ignore[arg-type]
        lambda: latest_good_checkpoint(tmp_path / "none", module),  # type: ignore[arg-type]
    ):
        with pytest.raises(TypeError, match=r"needs an fnloop.TrainState; got Linear"):
            call()
    assert ckpt.first_good_checkpoint([path], state)[0] is not None


def test_the_learning_rate_comes_from_the_file_and_tx_from_like(tmp_path: Path) -> None:
    """As the guide says: a constant rate is optimizer state (torch's load_state_dict
    restores a param group's lr); a changed schedule in ``like`` applies from the update
    after the first."""

    def mse(model: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        x, y = batch
        return {"loss": ((model(x) - y) ** 2).mean()}

    torch.manual_seed(0)
    module = nn.Linear(3, 1)
    batch = (torch.randn(4, 3), torch.randn(4, 1))
    step = fnloop.make_train_step(mse)
    state, _ = step(fnloop.TrainState.create(module, tx=optim.adamw(1e-3), device="cpu"), batch)
    path = save_checkpoint(tmp_path / "c.pt", state)

    def rate(s: fnloop.TrainState) -> float:
        (lr,) = optim.learning_rates(s.opt_state)
        return float(lr)

    constant = load_checkpoint(path, fnloop.TrainState.create(module, tx=optim.adamw(1e-2)))
    assert rate(constant) == rate(step(constant, batch)[0]) == 1e-3
    schedule = optim.cosine_schedule(1e-2, 10)
    scheduled = load_checkpoint(path, fnloop.TrainState.create(module, tx=optim.adamw(schedule)))
    assert rate(scheduled) == 1e-3
    after = step(scheduled, batch)[0]
    assert after.step == 2 and rate(after) == pytest.approx(float(schedule(torch.tensor(2.0))))


def test_a_stacked_fp16_state_loads_into_a_freshly_stacked_like(tmp_path: Path) -> None:
    def mse(model: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        x, y = batch
        return {"loss": ((model(x) - y) ** 2).mean()}

    def stacked() -> fnloop.TrainState:
        states = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            states.append(
                fnloop.TrainState.create(nn.Linear(3, 1), tx=optim.sgd(0.1), device="cpu")
            )
        return fnloop.stack_states(states)

    step = fnloop.make_train_step(mse, precision="fp16")
    many = torch.func.vmap(step, in_dims=(0, None), randomness="different")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fp16 autocast on the CPU
        trained, _ = many(stacked(), (torch.randn(4, 3), torch.randn(4, 1)))
    assert trained.loss_scale is not None and trained.loss_scale.scale.shape == (2,)
    path = save_checkpoint(tmp_path / "c.pt", trained)
    loaded = load_checkpoint(path, like=stacked())
    assert torch.equal(loaded.loss_scale.scale, trained.loss_scale.scale)


def test_load_model_reads_a_state_dict_in_torchs_legacy_format(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = nn.Linear(2, 1)
    path = tmp_path / "legacy.pt"
    torch.save(source.state_dict(), path, _use_new_zipfile_serialization=False)
    target = load_model(path, nn.Linear(2, 1))
    assert torch.equal(target.weight, source.weight)


def test_find_checkpoints_orders_names_with_superscript_digits(tmp_path: Path) -> None:
    (tmp_path / "model-v1²2.pt").write_bytes(b"x")
    assert find_checkpoints(tmp_path) == [tmp_path / "model-v1²2.pt"]


def test_a_module_as_like_is_told_what_like_needs(tmp_path: Path) -> None:
    module = nn.Linear(2, 1)
    path = save_checkpoint(
        tmp_path / "c.pt", fnloop.TrainState.create(module, tx=optim.sgd(0.1), device="cpu")
    )
    with pytest.raises(TypeError) as info:
        load_checkpoint(path, like=module)  # type: ignore[type-var]
    message = str(info.value)
    assert "like" in message and "torch.save" not in message


def test_a_checkpoint_named_as_a_safetensors_file_is_refused(tmp_path: Path) -> None:
    """save_checkpoint wrote a PyTorch file under a '.safetensors' name, which torch.load
    (and so load_checkpoint) reads as safetensors: a checkpoint no call could load, which
    load_checkpoint then called a model export."""
    state = fnloop.TrainState.create(torch.nn.Linear(2, 1), tx=optim.sgd(0.1), device="cpu")
    path = tmp_path / "ckpt.safetensors"
    with pytest.raises(
        ValueError, match=r"^save_checkpoint writes a PyTorch file, and .*'\.pt'\.$"
    ):
        fnloop.save_checkpoint(path, state)
    assert not path.exists()
