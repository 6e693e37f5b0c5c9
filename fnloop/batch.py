"""Batches of any structure: moving them to a device and finding their size (I10, S13)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import numbers
from collections import UserDict, defaultdict
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
from torch.nn.utils.rnn import PackedSequence

from fnloop.typing import Batch

BatchT = TypeVar("BatchT")


def to_device(batch: BatchT, device: torch.device | str) -> BatchT:
    """Moves every tensor in ``batch`` to ``device`` (asynchronously where possible).

    Any nesting of tensors, tuples, lists, dicts (``defaultdict``, ``OrderedDict``, ...),
    namedtuples and dataclasses is kept; a subclass of ``dict``, ``UserDict`` or ``list``
    is copied with its items moved, so it keeps its attributes (a tokenizer's
    ``BatchEncoding``) as ``DataLoader``'s collate made it (one that refuses changes with
    a ``TypeError`` is made by its type instead); a ``PackedSequence`` moves as
    its ``to`` moves it (its ``batch_sizes`` stay on the CPU); other values pass through.
    Tensors already on ``device`` are not copied.

    >>> import torch
    >>> to_device({"x": torch.ones(2), "ids": [torch.zeros(1)], "name": "a"}, "cpu")
    {'x': tensor([1., 1.]), 'ids': [tensor([0.])], 'name': 'a'}
    """
    device = torch.device(device)
    # Asynchronous copies only towards an accelerator: a copy to the CPU must be complete
    # before the CPU reads it.
    non_blocking = device.type != "cpu"

    def move(obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            return obj.to(device, non_blocking=non_blocking) if obj.device != device else obj
        if isinstance(obj, PackedSequence):  # a namedtuple whose batch_sizes stay on the CPU
            return obj.to(device, non_blocking=non_blocking)  # type: ignore[arg-type]
        if isinstance(obj, Mapping):
            moved = {k: move(v) for k, v in obj.items()}
            if type(obj) is dict:
                return moved
            if isinstance(obj, defaultdict):  # (torch.compile cannot copy one)
                return type(obj)(obj.default_factory, moved)
            if isinstance(obj, dict | UserDict):
                # A subclass: a shallow copy (with items of its own) with the moved values
                # keeps what it holds beside its items (the attributes of a tokenizer's
                # BatchEncoding) and calls no __init__, whose arguments may be others
                # than a dict's (DataLoader's collate makes batches of such a type so).
                # Another mapping's copy may share its items with the batch's. One that
                # refuses changes (TypeError, as DataLoader's collate expects) is made by
                # its type, as any other mapping.
                try:
                    copied = copy.copy(obj)
                    copied.update(moved)
                    return copied
                except TypeError:
                    pass
            return type(obj)(moved)  # type: ignore[call-arg]
        if isinstance(obj, tuple) and hasattr(obj, "_fields"):
            return type(obj)(*(move(v) for v in obj))
        if isinstance(obj, list) and type(obj) is not list:
            items = [move(v) for v in obj]
            try:  # (a subclass: its attributes kept, as a mapping's; or made by its type)
                new_list = copy.copy(obj)
                new_list[:] = items
                return new_list
            except TypeError:
                return type(obj)(items)
        if isinstance(obj, tuple | list):
            return type(obj)(move(v) for v in obj)
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            # A new instance with every attribute moved (fields, and tensors __post_init__
            # derived from them), without running __init__ / __post_init__ again, which
            # dataclasses.replace would (a __post_init__ that scales a field would scale it
            # twice). Nothing moved: the batch itself.
            attrs = _attributes(obj)
            moved = {name: move(value) for name, value in attrs.items()}
            if all(moved[name] is value for name, value in attrs.items()):
                return obj
            cls = type(obj)
            new = cls.__new__(cls)
            for name, value in moved.items():
                object.__setattr__(new, name, value)  # frozen dataclasses too
            return new
        return obj

    return move(batch)


def _attributes(obj: Any) -> dict[str, Any]:
    """The instance attributes of ``obj``: its ``__dict__`` and the slots that are set.

    Private slot names are mangled as Python stores them (``__x`` of class ``Base``:
    ``_Base__x``). In eager mode they are read past any ``__getattr__`` of the class;
    ``torch.compile`` traces plain attribute reads only.
    """
    compiling = torch.compiler.is_compiling()
    attrs: dict[str, Any] = {}
    if compiling:
        attrs.update(getattr(obj, "__dict__", {}))
    else:
        with contextlib.suppress(AttributeError):  # slots only: no __dict__
            attrs.update(object.__getattribute__(obj, "__dict__"))
    for cls in type(obj).__mro__:
        slots = cls.__dict__.get("__slots__", ())
        for name in (slots,) if isinstance(slots, str) else slots:
            if name in ("__dict__", "__weakref__"):
                continue
            if name.startswith("__") and not name.endswith("__"):
                name = f"_{cls.__name__.lstrip('_')}{name}"
            with contextlib.suppress(AttributeError):  # a slot that is not set
                if compiling:
                    attrs[name] = getattr(obj, name)
                else:
                    attrs[name] = cls.__dict__[name].__get__(obj, cls)
    return attrs


def _first_size(obj: Any) -> int | None:
    """The leading dimension of the first tensor in ``obj`` that has one (0-d tensors are
    skipped); a ``PackedSequence`` counts its sequences, not their steps."""
    if isinstance(obj, torch.Tensor):  # size(0): a strided nested tensor has no shape
        return int(obj.size(0)) if obj.dim() > 0 else None
    if isinstance(obj, PackedSequence):  # batch_sizes: on the CPU, its first entry the most
        return int(obj.batch_sizes[0])
    if isinstance(obj, Mapping):
        children: Any = obj.values()
    elif isinstance(obj, tuple | list):
        children = obj
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        # (A field declared init=False may not be set: a cache filled on first use.)
        children = (getattr(obj, f.name, None) for f in dataclasses.fields(obj))
    else:
        return None
    for child in children:
        found = _first_size(child)
        if found is not None:
            return found
    return None


NO_TENSOR_MSG = (
    "cannot find the batch size of a {kind} batch: it holds no tensor with a leading "
    "dimension. Pass batch_size=<int or callable(batch) -> int> to fit, train_epoch or "
    "validate_epoch (override=... to fl.batch_size)."
)


def _checked_size(size: Any) -> int:
    """What a ``batch -> size`` function returned, as an int >= 0 (0: a batch of no
    examples, which weighs nothing), or an error that names it."""
    if isinstance(size, torch.Tensor):
        raise TypeError(
            "the batch_size function returned a tensor; return an int (a tensor would be "
            "read on the host at every batch, waiting for the device): a length or a "
            "shape entry, such as len(batch[0]) or batch[0].shape[1]."
        )
    if isinstance(size, bool) or not isinstance(size, numbers.Integral):
        raise TypeError(
            f"the batch_size function returned a {type(size).__name__} ({size!r}); it must "
            f"return the number of examples as an int."
        )
    if size < 0:
        raise ValueError(f"the batch_size function returned {size}; a batch size is >= 0.")
    return int(size)


def batch_size(batch: Batch, override: int | Callable[[Batch], int] | None = None) -> int:
    """The number of examples in ``batch``: the leading dimension of its first tensor
    that has one (0-d tensors, such as a per-batch scale, are skipped), or the number of
    sequences of a ``PackedSequence``.

    Args:
      batch: any nesting of tensors.
      override: a fixed size, or a function ``batch -> size``, for batches whose first
        tensor is not batch-major.

    Raises:
      TypeError: a fixed size or a function's result that is not an int (a tensor too).
      ValueError: a fixed size below 1 or a function's result below 0; a batch without a
        tensor with a leading dimension and no ``override``.

    >>> import torch
    >>> batch_size((torch.zeros(8, 3), torch.zeros(8)))
    8
    >>> batch_size({"tokens": torch.zeros(4, 16)}, override=lambda b: 64)
    64
    """
    if override is not None:
        if callable(override):
            return _checked_size(override(batch))
        if isinstance(override, bool) or not isinstance(override, numbers.Integral):
            raise TypeError(f"batch_size={override!r} must be an int (or a function batch -> int).")
        if override < 1:
            raise ValueError(f"batch_size={override!r}: a fixed batch size must be positive.")
        return int(override)
    size = _first_size(batch)
    if size is None:
        raise ValueError(NO_TENSOR_MSG.format(kind=type(batch).__name__))
    return size
