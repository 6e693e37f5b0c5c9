"""Checkpoints: save and resume the whole training state, safely.

A checkpoint holds every tensor of a :class:`~fnloop.TrainState` (parameters, buffers,
optimizer state, EMA, loss scale, ...), its counters and history, and any plain ``extra``
data (RNG states, early-stopping state, data position, best-model record), so training
continues bit for bit where it stopped.

Three promises:

* **Loading never runs pickled code.** Files are read with ``torch.load(...,
  weights_only=True)`` only; a checkpoint is a plain dict of tensors, numbers, strings,
  lists and dicts, and ``save_checkpoint`` refuses anything else.
* **Writes are atomic.** A file is written under a temporary name in the same folder,
  flushed, fsynced and renamed over the target with ``os.replace``: a crash or an error
  mid-write leaves the previous file at that path untouched.
* **Damage is detected.** A SHA-256 of the serialized payload is stored beside it; a
  truncated or altered file raises :class:`CheckpointError`, and
  :func:`latest_good_checkpoint` falls back to the newest file that is sound.

File format (version 1), as written by ``torch.save``::

    {"format": "fnloop-checkpoint", "version": 1,
     "sha256": "<hex digest of the payload bytes>",
     "payload": <1-d uint8 tensor: the bytes of torch.save(payload_dict)>}

    payload_dict = {
        "leaves": {"params.0.weight": tensor, ..., "opt_state.0.mu.0.weight": tensor, ...},
        "step": int, "epoch": int, "micro_step": int,
        "history": {"train": {"loss": [float, ...]}, ...},
        "extra": {...},                       # the caller's plain data
        "meta": {"fnloop": str, "torch": str},
    }

Leaf keys name the path to each tensor in the state, with the field names of optimizer
states (``opt_state.0.mu.0.weight``). The static parts of a state (the module template,
``tx``, ``ema_decay``, plateau configuration) are not stored: they come from the ``like``
state passed to :func:`load_checkpoint`.

In a ``torch.distributed`` run only rank 0 writes: the save functions are no-ops on other
ranks (they return the path without touching the file system).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import io
import os
import pickle
import random
import re
import sys
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple, TypeVar, cast

import torch
from torch import nn
from torch.nn.modules.module import _EXTRA_STATE_KEY_SUFFIX

import fnloop
from fnloop import _tree
from fnloop._io import atomic_write_file
from fnloop.distributed import is_main_process
from fnloop.ensemble import stacked_models
from fnloop.state import (
    StateT,
    TrainState,
    check_not_donated,
    freeze_history,
    with_runtime_fields,
)

FORMAT = "fnloop-checkpoint"
"""The ``"format"`` tag of every fnloop checkpoint file."""
VERSION = 1
"""The checkpoint format version this fnloop writes and reads."""

_ZIP_MAGIC = b"PK\x03\x04"
# torch's legacy format (torch.save(..., _use_new_zipfile_serialization=False), torch
# before 1.6): pickle protocol 2, then torch's magic number as a 10-byte long.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a"

_SAFETENSORS_MISSING = (
    "Saving or loading '{path}' needs the optional 'safetensors' package. Install it with "
    "`pip install fnloop[safetensors]` (or `pip install safetensors`), or use a '.pt' path."
)
_SAFETENSORS_CHECKPOINT = (
    "save_checkpoint writes a PyTorch file, and {path} is named as a safetensors file (a "
    "model export, which save_model writes): torch.load, and so load_checkpoint, would "
    "read it as safetensors and fail. Name the checkpoint '.pt'."
)
_MODEL_FILE_HELP = (
    "load_model reads a model export: the file save_model writes (fit's best_model.pt in "
    "its out_dir) or one of torch.save(module.state_dict(), path)."
)
_EXPORT_AGAIN = "Export the weights again (save_model, or torch.save(module.state_dict(), path))."
_PLAIN_DATA_HELP = (
    "Checkpoints hold only plain data (dict, list, tuple, str, int, float, bool, None and "
    "torch.Tensor) so they can be loaded with torch.load(weights_only=True). Convert it "
    "first, e.g. with float(x), int(x), x.tolist(), torch.as_tensor(x) or a dict of its "
    "fields."
)


class CheckpointError(ValueError):
    """A checkpoint file cannot be used: missing, truncated, damaged or not a checkpoint.

    :func:`latest_good_checkpoint` skips files that raise this error (but not its
    subclass :class:`CheckpointMismatchError`).
    """


class CheckpointMismatchError(CheckpointError):
    """A sound checkpoint that does not fit: another model, optimizer or format version.

    This is a set-up problem, not damage, so :func:`latest_good_checkpoint` raises it
    instead of silently falling back to an older file.
    """


ModuleT = TypeVar("ModuleT", bound=nn.Module)


class Checkpoint(NamedTuple):
    """A loaded checkpoint: the state, the ``extra`` data saved with it, and its file."""

    state: TrainState
    extra: dict[str, Any]
    path: Path


class SkippedCheckpoint(NamedTuple):
    """A checkpoint file that :func:`latest_good_checkpoint` could not use, and why."""

    path: Path
    reason: str


# --------------------------------------------------------------------------- writing


def save_checkpoint(path: str | os.PathLike[str], state: TrainState, /, **extra: Any) -> Path:
    """Writes the whole training state, and any plain ``extra`` data, to ``path``.

    The write is atomic: the file appears complete under ``path`` or not at all, and an
    existing file there is only replaced once the new one is safely on disk. Missing
    parent folders are created. In a ``torch.distributed`` run only rank 0 writes; other
    ranks return ``path`` at once.

    Args:
      path: the file to write, conventionally ending in ``.pt``.
      state: the state to save.
      **extra: plain data to store beside the state (RNG states from
        :func:`rng_state`, early-stopping state, the data position, a best-model
        record, ...): nested dicts, lists and tuples of str, int, float, bool, None and
        tensors. Tensors come back on the CPU; a view of a larger tensor is saved
        without the rest of it, as the state's tensors are.

    Returns:
      ``path`` as a ``pathlib.Path``.

    Raises:
      TypeError: ``state`` is not a ``TrainState``, or an ``extra`` value or a
        non-tensor leaf of ``state`` (a field a subclass adds) is not plain data (the
        message names the key and the type).
      ValueError: two leaves of ``state`` map to the same key, or ``path`` ends in
        ``.safetensors`` (a model export's name: :func:`save_model`).
      RuntimeError: ``state`` was donated to a training step (save the state it returned).

    Example:
      >>> import pathlib, tempfile, torch
      >>> from fnloop import TrainState, optim
      >>> from fnloop.checkpoint import load_checkpoint, save_checkpoint
      >>> state = TrainState.create(torch.nn.Linear(2, 1), tx=optim.adam(1e-3), device="cpu")
      >>> with tempfile.TemporaryDirectory() as folder:
      ...     path = save_checkpoint(pathlib.Path(folder) / "ckpt.pt", state.replace(epoch=3))
      ...     restored = load_checkpoint(path, like=state)
      >>> restored.epoch
      3
    """
    path = _as_path(path, "save_checkpoint", "state")
    _check_state(state, "save_checkpoint")
    if _is_safetensors(path):
        raise ValueError(_SAFETENSORS_CHECKPOINT.format(path=path))
    check_not_donated(state, "save_checkpoint")
    keys, leaves, _ = _flatten_with_keys(state)
    for key, leaf in zip(keys, leaves, strict=True):
        if not isinstance(leaf, torch.Tensor):  # a field a subclass adds
            _check_plain(leaf, f"the state's leaf {key!r}")
    for key, value in extra.items():
        _check_plain(value, f"extra[{key!r}]")
    if not is_main_process():
        return path
    leaves = [leaf.detach() if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
    payload = {
        "leaves": _compact(dict(zip(keys, leaves, strict=True))),
        "step": int(state.step),
        "epoch": int(state.epoch),
        "micro_step": int(state.micro_step),
        "history": {
            split: {name: [float(v) for v in values] for name, values in metrics.items()}
            for split, metrics in state.history.items()
        },
        "extra": _compact(extra),
        "meta": {"fnloop": fnloop.__version__, "torch": str(torch.__version__)},
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    view = buffer.getbuffer()
    wrapper = {
        "format": FORMAT,
        "version": VERSION,
        "sha256": hashlib.sha256(view).hexdigest(),
        "payload": torch.frombuffer(view, dtype=torch.uint8),
    }
    atomic_write_file(path, lambda f: torch.save(wrapper, f))
    return path


def save_model(path: str | os.PathLike[str], state: TrainState, *, use_ema: bool = False) -> Path:
    """Exports the weights of ``state`` as a plain ``state_dict`` file.

    The file is what ``module.state_dict()`` would give for the trained module, so plain
    PyTorch loads it: ``module.load_state_dict(torch.load(path, weights_only=True))``.
    A path ending in ``.safetensors`` is written in the safetensors format (needs
    ``pip install fnloop[safetensors]``). The write is atomic, and only rank 0 writes in
    a ``torch.distributed`` run.

    Args:
      path: the file to write (``.pt`` or ``.safetensors``).
      state: the state whose weights are exported.
      use_ema: export the EMA weights instead of the raw parameters (when the state has
        no EMA, the raw parameters are exported).

    Returns:
      ``path`` as a ``pathlib.Path``.

    Raises:
      TypeError: ``state`` is not a ``TrainState``.
      ImportError: a ``.safetensors`` path and the ``safetensors`` package is missing.
      ValueError: ``state`` holds stacked models (save each, or use
        :func:`save_checkpoint`), or a ``.safetensors`` path and a submodule's extra
        state (``get_extra_state``, kept in the ``.pt`` file) is not a tensor.

    Example:
      >>> import pathlib, tempfile, torch
      >>> from fnloop import TrainState, optim
      >>> from fnloop.checkpoint import save_model
      >>> state = TrainState.create(torch.nn.Linear(2, 1), tx=optim.sgd(0.1), device="cpu")
      >>> with tempfile.TemporaryDirectory() as folder:
      ...     path = save_model(pathlib.Path(folder) / "model.pt", state)
      ...     torch.nn.Linear(2, 1).load_state_dict(torch.load(path, weights_only=True))
      <All keys matched successfully>
    """
    path = _as_path(path, "save_model", "state")
    _check_state(state, "save_model")
    n = stacked_models(state)
    if n is not None:
        raise ValueError(
            f"save_model exports one model's state_dict, but this state holds {n} stacked "
            f"models. Save each one: for i, s in enumerate(fl.unstack_states(state)): "
            f"save_model(f'model_{{i}}.pt', s); or keep the stacked state with "
            f"save_checkpoint."
        )
    if not is_main_process():
        return path
    entries = {
        name: _compact(t.detach()) if isinstance(t, torch.Tensor) else t
        for name, t in state.state_dict(use_ema=use_ema).items()
    }
    if _is_safetensors(path):
        st = _import_safetensors_torch(path)
        extra = next((k for k, v in entries.items() if not isinstance(v, torch.Tensor)), None)
        if extra is not None:
            raise ValueError(
                f"save_model cannot write {path}: the entry {extra!r} is the extra state "
                f"of a submodule (its get_extra_state() returns a "
                f"{type(entries[extra]).__name__}), and a safetensors file holds tensors "
                f"only. Export to a .pt path, which keeps it."
            )
        tensors = cast(dict[str, torch.Tensor], entries)
        data = st.save(_unshared(tensors), metadata={"format": "pt"})
        atomic_write_file(path, lambda f: f.write(data))
    else:
        atomic_write_file(path, lambda f: torch.save(entries, f))
    return path


def _unshared(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors that share no memory, as safetensors requires: a weight tied
    under several names (``state_dict`` lists it under each) is written once per name,
    and ``load_state_dict`` ties them again on loading."""
    seen: set[tuple[torch.device, int]] = set()
    out = {}
    for name, t in tensors.items():
        t = t.contiguous()
        key = (t.device, t.untyped_storage().data_ptr())
        out[name] = t.clone() if key in seen and t.numel() else t
        seen.add(key)
    return out


# --------------------------------------------------------------------------- reading


def load_checkpoint(path: str | os.PathLike[str], like: StateT) -> StateT:
    """Loads the training state saved at ``path``.

    Tensors come from the file, each placed on the device of the matching tensor in
    ``like``; ``step``, ``epoch``, ``micro_step`` and ``history`` come from the file; the
    module template, ``tx``, ``ema_decay`` and other static configuration come from
    ``like``. The optimizer's state is a tensor too: its moments, update counts, a
    plateau's rate, and the learning rate the next update uses (a constant one, and a
    schedule's current value) come from the file, as ``torch.optim``'s
    ``load_state_dict`` restores the rate of its param groups; a changed schedule in
    ``like``'s ``tx`` applies from the update after. Use
    :func:`load_checkpoint_with_extra` to get the ``extra`` data too.

    A ``like`` whose tensors are all on the ``meta`` device (a skeleton that allocates
    nothing: the module built under ``with torch.device("meta"):`` and
    ``TrainState.create(..., device="meta")``) gets the file's tensors on the CPU, as
    ``torch.load`` and ``load_state_dict(assign=True)`` would give them. To load straight
    onto a GPU, build ``like`` there instead: ``module.to_empty(device="cuda")`` allocates
    the weights without initializing them.

    Args:
      path: a file written by :func:`save_checkpoint`.
      like: a state of the same structure, typically the freshly created one
        (``TrainState.create(module, tx=...)`` with the same module and optimizer).

    Returns:
      The saved state.

    Raises:
      CheckpointError: the file is missing, truncated, damaged, holds pickled objects
        or is not an fnloop checkpoint.
      CheckpointMismatchError: the file is sound but was written for another model or
        optimizer (the message names the first differing key and, for shape or dtype
        differences, both values; and says so where one of the file and ``like`` holds
        stacked models and the other one model, or another number of them), or by a
        newer format version; or ``like`` has some tensors on the ``meta`` device and
        others on a real one.
    """
    return cast(StateT, _load(path, like, "load_checkpoint").state)  # like's class


def load_checkpoint_with_extra(path: str | os.PathLike[str], like: TrainState) -> Checkpoint:
    """Loads the training state and the ``extra`` data saved at ``path``.

    Same as :func:`load_checkpoint`, but returns a :class:`Checkpoint` named tuple
    ``(state, extra, path)``; ``extra`` is the dict of keyword arguments given to
    :func:`save_checkpoint`, with its tensors on the CPU.

    Example:
      >>> import pathlib, tempfile, torch
      >>> from fnloop import TrainState, optim
      >>> from fnloop.checkpoint import load_checkpoint_with_extra, save_checkpoint
      >>> state = TrainState.create(torch.nn.Linear(2, 1), tx=optim.sgd(0.1), device="cpu")
      >>> with tempfile.TemporaryDirectory() as folder:
      ...     path = save_checkpoint(pathlib.Path(folder) / "ckpt.pt", state, batch=7)
      ...     state, extra, _ = load_checkpoint_with_extra(path, like=state)
      >>> extra
      {'batch': 7}
    """
    return _load(path, like, "load_checkpoint_with_extra")


def _load(path: str | os.PathLike[str], like: TrainState, fn: str) -> Checkpoint:
    """The checkpoint at ``path`` for the public function ``fn`` (named in its errors)."""
    path = _as_path(path, fn, "like")
    _check_state(like, fn)
    payload = _read_payload(path)
    saved: dict[str, Any] = payload["leaves"]
    like = with_runtime_fields(
        like,
        {k: (t.dtype, tuple(t.shape)) for k, t in saved.items() if isinstance(t, torch.Tensor)},
    )
    keys, like_leaves, treedef = _flatten_with_keys(like)
    _check_structure(path, saved, keys, like_leaves, like)
    leaves = [_place(saved[k], ref) for k, ref in zip(keys, like_leaves, strict=True)]
    state = _tree.tree_unflatten(treedef, leaves).replace(
        step=payload["step"],
        epoch=payload["epoch"],
        micro_step=payload["micro_step"],
        history=freeze_history(payload["history"]),
    )
    return Checkpoint(state=state, extra=payload["extra"], path=path)


def load_model(path: str | os.PathLike[str], module: ModuleT, *, strict: bool = True) -> ModuleT:
    """Loads weights exported by :func:`save_model` into ``module`` and returns it.

    The file is read with ``torch.load(weights_only=True)`` (or safetensors for a
    ``.safetensors`` path); tensors are copied into the module's own parameters and
    buffers, wherever they live.

    Args:
      path: a file written by :func:`save_model` (or any plain ``state_dict`` file).
      module: the module to load into; it is changed in place.
      strict: passed to ``module.load_state_dict``: ``False`` loads the entries the
        file and the module share, skips the others and warns which (a new head of
        another name for fine-tuning); an entry of the same name and another shape (a
        head for another class count) is still torch's size-mismatch error: drop it
        from the dict and call ``module.load_state_dict(d, strict=False)``.

    Returns:
      ``module``.

    Raises:
      CheckpointError: the file is missing or cannot be read as a state dict (the
        message names the first entry that is not a tensor and, for a file that holds
        the state dict as one of its entries, such as ``{"model": state_dict, "epoch":
        3}``, how to load that entry).
      CheckpointMismatchError: with ``strict=False``, the file and the module share no
        key (nothing would load; the message shows keys of both). With ``strict=True``,
        ``module.load_state_dict`` raises its ``RuntimeError`` for any difference.
      ImportError: a ``.safetensors`` path and the ``safetensors`` package is missing.
    """
    path = _as_path(path, "load_model", "module")
    tensors = _read_state_dict(path)
    own = module.state_dict()
    if not strict and own and own.keys().isdisjoint(tensors):
        fix = (
            "Rename the file's keys to the module's (e.g. strip a prefix such as 'model.' "
            "or 'module.') and load the dict with module.load_state_dict."
            if tensors
            else "Export the weights again (save_model)."
        )
        raise CheckpointMismatchError(
            f"{path} shares no key with the module, so load_model(strict=False) would load "
            f"nothing: the file has {_some_keys(tensors) or 'no entry'}, the module "
            f"{_some_keys(own)}. {fix}"
        )
    result = module.load_state_dict(tensors, strict=strict)
    if result.missing_keys or result.unexpected_keys:  # (strict=False: torch returns them)
        warnings.warn(
            f"load_model(strict=False) loaded {len(tensors) - len(result.unexpected_keys)} "
            f"of the module's {len(own)} entries from {path}: "
            + "; ".join(
                f"{what} {_some_keys(dict.fromkeys(keys))}"
                for what, keys in (
                    ("not in the file (kept as they were):", result.missing_keys),
                    ("in the file, not in the module (skipped):", result.unexpected_keys),
                )
                if keys
            )
            + ".",
            stacklevel=2,
        )
    return module


def _read_state_dict(path: Path) -> dict[str, Any]:
    """The state dict in the file ``path``: safetensors for a ``.safetensors`` path, else
    ``torch.load(weights_only=True)`` with errors that say what the file holds instead."""
    if _is_safetensors(path):
        _check_is_file(path, _MODEL)  # (torch files: checked by _safe_torch_load)
        st = _import_safetensors_torch(path)
        try:
            return st.load_file(str(path), device="cpu")
        except Exception as e:
            raise CheckpointError(
                f"Cannot read the safetensors file {path}: {e}. It is truncated or damaged, "
                f"or not a safetensors file: export the weights again (save_model)."
            ) from e
    tensors = _safe_torch_load(path, kind=_MODEL)
    if isinstance(tensors, dict) and tensors.get("format") == FORMAT:
        raise CheckpointError(
            f"{path} is a training checkpoint, not a model export. Restore it with "
            f"load_checkpoint(path, like=state) and export with save_model."
        )
    if not isinstance(tensors, dict):
        raise CheckpointError(
            f"{path} does not hold a state dict (a dict of tensors); found "
            f"{type(tensors).__name__}. {_MODEL_FILE_HELP}"
        )
    # A submodule's extra state (get_extra_state) may be any data that loads safely.
    bad = next(
        (
            k
            for k, t in tensors.items()
            if not isinstance(t, torch.Tensor)
            and str(k).rpartition(".")[2] != _EXTRA_STATE_KEY_SUFFIX
        ),
        None,
    )
    if bad is not None:
        nested = next(
            (
                k
                for k, v in tensors.items()
                if isinstance(v, dict)
                and v
                and all(isinstance(t, torch.Tensor) for t in v.values())
            ),
            None,
        )
        hint = ""
        if nested is not None:
            hint = (
                f" {'That entry' if nested == bad else f'Its entry {nested!r}'} is a "
                f"dict of tensors, likely the state dict: load it with "
                f"module.load_state_dict(torch.load({str(path)!r}, "
                f"weights_only=True)[{nested!r}])."
            )
        raise CheckpointError(
            f"{path} does not hold a state dict (a dict of tensors): its entry {bad!r} "
            f"is of type {type(tensors[bad]).__name__}, not a tensor.{hint}"
        )
    return tensors


def _some_keys(state_dict: Mapping[str, Any]) -> str:
    keys = list(state_dict)
    more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
    return ", ".join(map(repr, keys[:3])) + more


def _read_payload(path: Path) -> dict[str, Any]:
    """The verified payload dict of the checkpoint at ``path``."""
    if _is_safetensors(path) and path.is_file():
        raise CheckpointError(
            f"{path} is a safetensors file, a model export (save_model), not a training "
            f"checkpoint. Load it into a module with load_model(path, module)."
        )
    wrapper = _safe_torch_load(path)
    if not isinstance(wrapper, dict) or wrapper.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not an fnloop checkpoint (no 'format': {FORMAT!r} entry); it may be "
            f"a model export (use load_model) or another program's file."
        )
    version = wrapper.get("version")
    if type(version) is not int:
        raise CheckpointError(f"{path} is damaged: its format version is {version!r}.")
    if version != VERSION:
        raise CheckpointMismatchError(
            f"{path} uses checkpoint format version {version}, but this fnloop reads "
            f"version {VERSION}. Load it with the fnloop version that wrote it."
        )
    digest, data = wrapper.get("sha256"), wrapper.get("payload")
    if (
        not isinstance(digest, str)
        or not isinstance(data, torch.Tensor)
        or data.dtype != torch.uint8
        or data.dim() != 1
    ):
        raise CheckpointError(f"{path} is damaged: its 'sha256' or 'payload' entry is malformed.")
    data = data.contiguous()  # keep a reference: string_at reads through a raw pointer
    raw = ctypes.string_at(data.data_ptr(), data.numel())
    del wrapper, data
    actual = hashlib.sha256(raw).hexdigest()
    if actual != digest:
        raise CheckpointError(
            f"{path} is damaged: checksum mismatch (sha256 of the payload is "
            f"{actual[:16]}..., the file records {digest[:16]}...). The file was altered "
            f"or corrupted after it was written."
        )
    payload = _safe_torch_load(path, io.BytesIO(raw))
    _check_payload(path, payload)
    return payload


_CHECKPOINT, _MODEL = "checkpoint", "the model file"


def _safe_torch_load(
    path: Path, source: io.BytesIO | None = None, *, kind: str = _CHECKPOINT
) -> Any:
    """``torch.load(weights_only=True)`` onto the CPU, with errors that name ``path`` (as
    ``kind``: a checkpoint, or a model file with what ``load_model`` reads)."""
    model = kind == _MODEL
    fix = f" {_EXPORT_AGAIN}" if model else ""
    if source is None:
        _check_is_file(path, kind)
        with open(path, "rb") as f:
            head = f.read(len(_ZIP_MAGIC))
        if head not in (_ZIP_MAGIC, _LEGACY_MAGIC):
            what = "is empty" if not head else "is not a PyTorch file (no zip signature)"
            if model and head:
                fix = f" {_MODEL_FILE_HELP} A safetensors file needs a '.safetensors' name."
            raise CheckpointError(f"Cannot read {kind} {path}: the file {what}.{fix}")
    where = f"{path}" if source is None else f"the payload of {path}"
    if model:
        where = f"{kind} {path}"
    try:
        return torch.load(
            source if source is not None else path, map_location="cpu", weights_only=True
        )
    except pickle.UnpicklingError as e:
        detail = _unpickler_detail(e)
        if "global" in detail.lower():
            whole = (
                " A whole module saved with torch.save(module, path)? Save its weights "
                "instead: torch.save(module.state_dict(), path)."
                if model
                else ""
            )
            raise CheckpointError(
                f"Refusing to load {where}: it holds pickled Python objects, which fnloop "
                f"never unpickles ({detail}).{whole}"
            ) from e
        raise CheckpointError(f"Cannot read {where}: the file is damaged ({detail}).{fix}") from e
    except Exception as e:
        raise CheckpointError(
            f"Cannot read {where}: the file is truncated or damaged "
            f"({type(e).__name__}: {_first_sentence(str(e))}).{fix}"
        ) from e


def _check_is_file(path: Path, kind: str) -> None:
    if path.is_file():
        return
    what = "is not a file" if path.exists() else "does not exist"
    fix = ""
    if kind == _MODEL:
        what = "is a folder" if path.is_dir() else what
        inside = path / "best_model.pt"
        fix = f" Did you mean {inside}?" if inside.is_file() else f" {_MODEL_FILE_HELP}"
    raise CheckpointError(f"Cannot read {kind} {path}: it {what}.{fix}")


def _unpickler_detail(e: Exception) -> str:
    """The useful line of torch's weights-only error, without its advice to unpickle."""
    match = re.search(r"WeightsUnpickler error:\s*(.+)", str(e), re.S)
    text = match.group(1) if match else str(e)
    return _first_sentence(text) or type(e).__name__


def _first_sentence(text: str) -> str:
    line = text.strip().split("\n", 1)[0].strip()
    return line.split(". ", 1)[0].rstrip(".")


def _check_payload(path: Path, payload: Any) -> None:
    expected = {
        "leaves": dict,
        "step": int,
        "epoch": int,
        "micro_step": int,
        "history": dict,
        "extra": dict,
    }
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path} is damaged: its payload is a {type(payload).__name__}.")
    for key, kind in expected.items():
        if not isinstance(payload.get(key), kind):
            raise CheckpointError(
                f"{path} is damaged: its payload entry {key!r} should be a {kind.__name__}, "
                f"got {type(payload.get(key)).__name__}."
            )


# --------------------------------------------------------------------------- structure


def _flatten_with_keys(state: TrainState) -> tuple[list[str], list[Any], Any]:
    """Leaf keys (``opt_state.0.mu.0.weight``), leaves and treedef of ``state``."""
    keys, leaves, treedef = _tree.tree_flatten_with_keys(state)
    seen: set[str] = set()
    for key in keys:
        if key in seen:
            raise ValueError(
                f"Two tensors of the state have the same checkpoint key {key!r}; rename the "
                f"parameter or dict entry whose name contains a '.'."
            )
        seen.add(key)
    return keys, leaves, treedef


def _check_structure(
    path: Path, saved: Mapping[str, Any], keys: list[str], like: list[Any], state: TrainState
) -> None:
    """Raises :class:`CheckpointMismatchError` when ``saved`` does not fit ``like``, the
    leaves of ``state``."""
    tensors = [(k, ref) for k, ref in zip(keys, like, strict=True) if isinstance(ref, torch.Tensor)]
    meta = [k for k, ref in tensors if ref.device.type == "meta"]
    real = [(k, ref.device) for k, ref in tensors if ref.device.type != "meta"]
    if meta and real:
        raise CheckpointMismatchError(
            f"Checkpoint {path} cannot be loaded into `like`: '{meta[0]}' is on the meta "
            f"device but '{real[0][0]}' is on {real[0][1]}. Tensors on meta (which hold no "
            f"data) are loaded onto the CPU, so the state would be split across devices: "
            f"build `like` on one device, all on meta (TrainState.create(..., "
            f"device='meta')) or all on the device to train on."
        )
    missing, unexpected = _tree.key_differences(keys, saved)
    if missing or unexpected:
        parts = []
        for names, where in (
            (missing, "in `like` but not in the file"),
            (unexpected, "in the file but not in `like`"),
        ):
            if names:
                more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
                parts.append(f"'{names[0]}'{more} is {where}")
        raise _mismatch(path, "; ".join(parts), (missing or unexpected)[0])
    for key, ref in zip(keys, like, strict=True):
        value = saved[key]
        if isinstance(ref, torch.Tensor) != isinstance(value, torch.Tensor):
            found = "a tensor" if isinstance(value, torch.Tensor) else type(value).__name__
            raise _mismatch(
                path, f"'{key}' is {found} in the file but {type(ref).__name__} in `like`", key
            )
        if not isinstance(ref, torch.Tensor):
            continue
        for what, in_file, in_like in (
            ("shape", tuple(value.shape), tuple(ref.shape)),
            ("dtype", value.dtype, ref.dtype),
        ):
            if in_file != in_like:
                detail = f"'{key}' has {what} {in_file} in the file but {in_like} in `like`"
                raise _stacking_mismatch(path, detail, saved, state) or _mismatch(path, detail, key)


STACKING_MISMATCH_MSG = (
    "Checkpoint {path} does not match `like`: {detail}. The file holds {in_file} and "
    "`like` {in_like} ('{key}' has shape {file_shape} in the file and {like_shape} in "
    "`like`; the module's is {own}): {fix}"
)


def _stacking_mismatch(
    path: Path, detail: str, saved: Mapping[str, Any], like: TrainState
) -> CheckpointMismatchError | None:
    """The error for a file that holds another number of stacked models than ``like``
    (a stacked state's checkpoint and a ``like`` of one model, or the other way round):
    every parameter, in the file and in ``like``, has the module template's shape, or
    that shape under one leading dimension of the same size; else ``None``."""
    template = dict(like.module.named_parameters())
    counts: tuple[set[int | None], set[int | None]] = (set(), set())
    for name, param in like.params.items():
        value = saved.get(f"params.{name}")
        if name not in template or not isinstance(value, torch.Tensor):
            return None
        own = tuple(template[name].shape)
        for seen, shape in zip(counts, (tuple(value.shape), tuple(param.shape))):
            # 0: one model; n: n stacked models; None: neither
            stacked = len(shape) == len(own) + 1 and shape[1:] == own
            seen.add(0 if shape == own else shape[0] if stacked else None)
    if len(counts[0]) != 1 or len(counts[1]) != 1:
        return None
    in_file, in_like = counts[0].pop(), counts[1].pop()
    if in_file is None or in_like is None or in_file == in_like:
        return None
    name, param = next(iter(like.params.items()))
    value, own = saved[f"params.{name}"], tuple(template[name].shape)
    if not in_like:
        fix = (
            f"load it with like= a stacked state, fl.stack_states of {in_file} states made "
            f"as that run made them, and take one model with fl.unstack_states(loaded)[i]."
        )
    elif not in_file:
        fix = (
            "load it with like= one state made as that run made it (fl.stack_states([loaded] "
            "* n) stacks copies of it)."
        )
    else:
        fix = f"make `like` with fl.stack_states of {in_file} states."
    held = [f"{n} stacked model{'s' * (n > 1)}" if n else "one model" for n in (in_file, in_like)]
    return CheckpointMismatchError(
        STACKING_MISMATCH_MSG.format(
            path=path,
            detail=detail,
            in_file=held[0],
            key=f"params.{name}",
            file_shape=tuple(value.shape),
            like_shape=tuple(param.shape),
            own=own,
            in_like=held[1],
            fix=fix,
        )
    )


def _mismatch(path: Path, detail: str, key: str) -> CheckpointMismatchError:
    """The error for a file whose leaves do not fit ``like`` at ``key``, naming the
    set-up that the state field of ``key`` suggests was another."""
    what = {
        "params": "another model",
        "buffers": "another model",
        "opt_state": "another optimizer (tx)",
        "ema": "another ema_decay setting (EMA on or off)",
        "loss_scale": "another precision setting",
        "grad_accum": "another gradient-accumulation setting",
    }.get(key.split(".", 1)[0], "another set-up")
    return CheckpointMismatchError(
        f"Checkpoint {path} does not match `like`: {detail}. It was probably written with "
        f"{what}: build `like` with the same module and TrainState.create(...) arguments "
        f"as the run that saved it."
    )


def _place(value: Any, ref: Any) -> Any:
    """``value`` on the device of ``ref`` (non-tensors unchanged), or where it was read
    (the CPU) when ``ref`` is on the ``meta`` device, which holds no data."""
    if isinstance(value, torch.Tensor) and ref.device.type != "meta" and value.device != ref.device:
        return value.to(ref.device)
    return value


# --------------------------------------------------------------------------- finding


def find_checkpoints(directory: str | os.PathLike[str], pattern: str = "*.pt") -> list[Path]:
    """The files in ``directory`` matching ``pattern``, newest first.

    "Newest" is by modification time, which works for any naming scheme (``last.pt``
    overwritten each epoch beside ``step-000123.pt`` snapshots). Files with the same
    time are ordered by name, numbers compared as numbers (``step-10`` after ``step-9``),
    highest first. Copying a run folder without keeping modification times
    (``cp`` without ``-p``) loses this order. Temporary files of unfinished writes never
    match ``*.pt``. A missing folder has no checkpoints.

    Args:
      directory: the folder to search (not recursively).
      pattern: a glob pattern for the file names.

    Returns:
      Paths, newest first.
    """
    folder = Path(directory)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.glob(pattern):
        with contextlib.suppress(OSError):
            if p.is_file():
                found.append((p.stat().st_mtime_ns, _natural_key(p.name), p))
    found.sort(key=lambda item: (item[0], item[1]), reverse=True)
    return [p for _, _, p in found]


def _natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    return tuple(
        (0, int(part)) if part.isdecimal() else (1, part) for part in re.split(r"(\d+)", name)
    )


def latest_good_checkpoint(
    directory: str | os.PathLike[str], like: TrainState, *, pattern: str = "*.pt"
) -> tuple[Checkpoint | None, list[SkippedCheckpoint]]:
    """The newest checkpoint in ``directory`` that loads cleanly, and the files skipped.

    Files are tried newest first (see :func:`find_checkpoints`). A damaged file (one
    that raises :class:`CheckpointError`) is skipped and reported, so the caller can
    log ``skipping damaged checkpoint {path}: {reason}``. A sound file that does not fit
    ``like`` raises :class:`CheckpointMismatchError` instead: silently resuming from an
    older file, or from scratch, would hide a set-up mistake.

    Args:
      directory: the folder holding the checkpoints.
      like: a state of the same structure (see :func:`load_checkpoint`).
      pattern: a glob pattern for the checkpoint file names.

    Returns:
      ``(checkpoint, skipped)``: the loaded :class:`Checkpoint`, or ``None`` when no file
      loads, and the :class:`SkippedCheckpoint` entries ``(path, reason)`` of the newer
      files that could not be used.

    Raises:
      CheckpointMismatchError: the newest sound file belongs to another set-up.
      TypeError: the arguments are swapped, or ``like`` is not a ``TrainState``.
    """
    _check_not_swapped(directory, "latest_good_checkpoint", "the folder", "directory, like")
    return _first_good(find_checkpoints(directory, pattern), like, "latest_good_checkpoint")


def first_good_checkpoint(
    paths: Iterable[str | os.PathLike[str]], like: TrainState
) -> tuple[Checkpoint | None, list[SkippedCheckpoint]]:
    """The first of ``paths`` that loads cleanly, and the files skipped before it.

    As :func:`latest_good_checkpoint`, for files in an order of the caller's (``fit``
    orders its ``ckpt-<step>-<kind>.pt`` files by the step in their names, which a copy
    of the run folder keeps, where it may not keep modification times).

    Args:
      paths: the files to try, in order.
      like: a state of the same structure (see :func:`load_checkpoint`).

    Returns:
      ``(checkpoint, skipped)``, as :func:`latest_good_checkpoint` returns them.

    Raises:
      CheckpointMismatchError: the first sound file belongs to another set-up.
      TypeError: ``paths`` is one path (a string) or a state, or ``like`` is not a
        ``TrainState``.
    """
    _check_not_swapped(paths, "first_good_checkpoint", "the files", "paths, like")
    if isinstance(paths, str | bytes | os.PathLike):  # (its characters are no files)
        raise TypeError(
            f"first_good_checkpoint takes the files to try, in order, such as a list; got "
            f"one path, {str(paths)!r}. Pass [path], or load the one file with "
            f"load_checkpoint_with_extra(path, like)."
        )
    return _first_good(paths, like, "first_good_checkpoint")


def _first_good(
    paths: Iterable[str | os.PathLike[str]], like: TrainState, fn: str
) -> tuple[Checkpoint | None, list[SkippedCheckpoint]]:
    _check_state(like, fn)  # (also where there is no file to load)
    skipped: list[SkippedCheckpoint] = []
    for path in map(Path, paths):
        try:
            return _load(path, like, fn), skipped
        except CheckpointMismatchError:
            raise
        except CheckpointError as e:
            skipped.append(SkippedCheckpoint(path, str(e)))
    return None, skipped


# --------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """The state of every global random number generator, as plain checkpointable data.

    Captures torch's CPU generator, every CUDA device's generator when CUDA is
    initialized, Python's ``random`` module, and NumPy's global generator
    (``numpy.random.seed`` / ``numpy.random.rand``) when NumPy is already imported (it
    is never imported here). Generators that code owns itself (``torch.Generator``,
    ``numpy.random.default_rng()``) are not global and not included. Pass the result to
    :func:`save_checkpoint` as extra data and restore it with :func:`set_rng_state`.

    Returns:
      A dict of tensors, ints, floats, strings and ``None`` (keys ``"torch"``,
      ``"python"`` and, when captured, ``"cuda"`` and ``"numpy"``).

    Example:
      >>> import torch
      >>> from fnloop.checkpoint import rng_state, set_rng_state
      >>> saved = rng_state()
      >>> a = torch.rand(3)
      >>> set_rng_state(saved)
      >>> torch.equal(a, torch.rand(3))
      True
    """
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {
            "version": int(version),
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss,
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    np = sys.modules.get("numpy")
    if np is not None:
        kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
        state["numpy"] = {
            "kind": str(kind),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restores global generators from a dict made by :func:`rng_state`.

    Every generator present in ``state`` is restored: torch's CPU generator, CUDA
    generators (for as many devices as both the state and this machine have), Python's
    ``random`` and NumPy's global generator (NumPy is imported if the state holds it).

    Args:
      state: the dict returned by :func:`rng_state`, possibly after a checkpoint round
        trip.
    """
    if "torch" in state:
        torch.set_rng_state(torch.as_tensor(state["torch"]).cpu().to(torch.uint8))
    if state.get("cuda") and torch.cuda.is_available():
        saved = list(state["cuda"])[: torch.cuda.device_count()]
        for device, s in enumerate(saved):
            torch.cuda.set_rng_state(torch.as_tensor(s).cpu().to(torch.uint8), device)
    if "python" in state:
        py = state["python"]
        internal = tuple(int(v) for v in torch.as_tensor(py["state"]).tolist())
        gauss = py["gauss_next"]
        random.setstate((int(py["version"]), internal, None if gauss is None else float(gauss)))
    if "numpy" in state:
        import numpy as np

        ns = state["numpy"]
        keys = torch.as_tensor(ns["keys"]).cpu().numpy().astype(np.uint32)
        np.random.set_state(
            (ns["kind"], keys, int(ns["pos"]), int(ns["has_gauss"]), float(ns["cached_gaussian"]))
        )


# --------------------------------------------------------------------------- helpers


def _check_not_swapped(first: Any, fn: str, what: str, params: str) -> None:
    """Raises ``TypeError`` when ``fn``'s ``first`` argument is a state or a module (the
    arguments swapped), saying that it takes ``what`` first: ``fn(params)``."""
    if isinstance(first, TrainState | nn.Module):
        raise TypeError(
            f"{fn} takes {what} first: {fn}({params}); its first argument is a "
            f"{type(first).__name__}."
        )


def _as_path(path: Any, fn: str, second: str) -> Path:
    """``path`` as a ``Path``, checked by :func:`_check_not_swapped`."""
    _check_not_swapped(path, fn, "the file's path", f"path, {second}")
    return Path(path)


def _check_state(state: Any, fn: str) -> None:
    if not isinstance(state, TrainState):
        if not fn.startswith("save_"):  # load_checkpoint and its siblings, fit's resume
            fix = (
                "Pass like=fl.TrainState.create(module, tx=...) with the optimizer the run "
                "used; to load a model export (save_model, best_model.pt) into a module, use "
                "fl.load_model(path, module)."
            )
        else:
            fix = "To save a bare module's weights use torch.save(module.state_dict(), path)."
        raise TypeError(f"{fn} needs an fnloop.TrainState; got {type(state).__name__}. {fix}")


def _check_plain(value: Any, where: str) -> None:
    """Raises ``TypeError`` naming ``where`` unless ``value`` is plain checkpoint data."""
    kind = type(value)
    if kind in (str, int, float, bool, type(None), torch.Tensor, nn.Parameter):
        return
    if kind is dict:
        for key, item in value.items():
            if type(key) not in (str, int):
                raise TypeError(
                    f"{where} has a key {key!r} of type {type(key).__name__}; checkpoint dict "
                    f"keys must be str or int."
                )
            _check_plain(item, f"{where}[{key!r}]")
        return
    if kind in (list, tuple):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    raise TypeError(f"{where} is a {kind.__module__}.{kind.__qualname__}. {_PLAIN_DATA_HELP}")


def _compact(value: Any) -> Any:
    """``value`` without storage it does not use (``torch.save`` writes whole storages).

    Dicts, lists and tuples are rebuilt with each tensor in them compacted. A tensor that
    fills its storage exactly, its elements packed without gaps or overlaps in any order
    of dimensions (channels-last included), is kept as it is, strides included. A view of
    a larger storage, or a tensor whose elements overlap (``expand``), is copied: with its
    strides where it is packed, else in the layout ``torch.preserve_format`` picks; the
    copy keeps ``requires_grad`` and, for an ``nn.Parameter``, its type.
    """
    if type(value) is dict:
        return {key: _compact(item) for key, item in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_compact(item) for item in value)
    if not isinstance(value, torch.Tensor) or value.layout != torch.strided:
        return value
    packed, span = True, 1  # span: the elements that the smaller strides cover if packed
    for stride, size in sorted((st, n) for n, st in zip(value.shape, value.stride()) if n != 1):
        packed = packed and stride == span
        span *= size
    used = value.numel() * value.element_size()
    if packed and value.storage_offset() == 0 and value.untyped_storage().nbytes() == used:
        return value
    copy = value.detach().clone(memory_format=torch.preserve_format)
    if isinstance(value, nn.Parameter):
        return nn.Parameter(copy, requires_grad=value.requires_grad)
    return copy.requires_grad_(value.requires_grad)


def _is_safetensors(path: Path) -> bool:
    return path.suffix == ".safetensors"


def _import_safetensors_torch(path: Path) -> Any:
    try:
        import safetensors.torch as st
    except ImportError as e:
        raise ImportError(_SAFETENSORS_MISSING.format(path=path)) from e
    return st
