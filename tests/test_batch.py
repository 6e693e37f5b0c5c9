"""Moving batches to a device and finding their size (fnloop/batch.py)."""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterator, Mapping, MutableMapping

import numpy as np
import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_sequence
from torch.overrides import TorchFunctionMode

import fnloop as fl


def test_a_packed_sequence_moves_with_its_batch_sizes_on_the_cpu():
    """``PackedSequence`` is a namedtuple, but its ``batch_sizes`` must stay on the CPU:
    rebuilding it field by field on an accelerator raised."""
    packed = pack_sequence([torch.ones(3, 2), torch.ones(2, 2)])
    moved = fl.to_device((packed, torch.zeros(2)), "meta")[0]
    assert type(moved) is PackedSequence and moved.data.device.type == "meta"
    assert moved.batch_sizes.device.type == "cpu"
    assert torch.equal(moved.batch_sizes, packed.batch_sizes)
    assert fl.to_device(packed, "cpu") is packed


def test_the_size_of_a_packed_sequence_batch_is_its_number_of_sequences():
    """Its ``data`` holds every sequence's steps end to end: 3 + 2 rows for 2 examples."""
    packed = pack_sequence([torch.ones(3, 2), torch.ones(2, 2)])
    assert fl.batch_size(packed) == 2
    assert fl.batch_size({"x": packed, "y": torch.zeros(2)}) == 2


@pytest.mark.parametrize(
    "override, error, match",
    [
        (lambda b: -1, ValueError, r"batch_size function returned -1.*>= 0"),
        (lambda b: 2.5, TypeError, r"batch_size function returned a float.*int"),
        (lambda b: True, TypeError, r"batch_size function returned a bool"),
        (lambda b: None, TypeError, r"batch_size function returned a NoneType"),
        (lambda b: torch.tensor(3), TypeError, r"returned a tensor.*host"),
        (-4, ValueError, r"batch_size=-4.*positive"),
        (0, ValueError, r"batch_size=0.*positive"),
        (2.0, TypeError, r"batch_size=2.0.*int"),
    ],
)
def test_a_bad_batch_size_override_is_named(override, error, match):
    """A fixed size must be a positive int; a function's result an int >= 0 (an empty
    batch weighs nothing): a float would be truncated, a negative size would turn the
    epoch means around, and a tensor would be read on the host every batch."""
    batch = (torch.zeros(4, 3), torch.zeros(4))
    with pytest.raises(error, match=match):
        fl.batch_size(batch, override=override)


def test_a_batch_size_function_may_return_any_integer():
    batch = (torch.zeros(4, 3), torch.zeros(4))
    assert fl.batch_size(batch, override=lambda b: 0) == 0
    assert fl.batch_size(batch, override=lambda b: np.int64(7)) == 7
    assert type(fl.batch_size(batch, override=lambda b: np.int64(7))) is int
    assert fl.batch_size(batch, override=3) == 3


class _RecordTo(TorchFunctionMode):
    """Records each ``Tensor.to(device, non_blocking=...)`` and returns an empty tensor on
    the target device in its place (no copy runs: meta stands in for an accelerator)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to:
            target = torch.device(args[1])
            self.calls.append((args[0].device.type, target.type, kwargs.get("non_blocking", False)))
            return torch.empty_like(args[0], device=target)
        return func(*args, **kwargs)


def test_copies_to_an_accelerator_are_asynchronous_and_copies_to_the_cpu_are_not():
    """As a hand loop does it: ``x.to("cuda", non_blocking=True)`` overlaps the copy with
    the work queued before it, while a copy to the CPU must be complete before the host
    reads it (non_blocking=True there can hand over a tensor still being written)."""
    batch = {"x": torch.ones(2, 3), "y": [torch.zeros(2, device="meta")], "n": 3}
    with _RecordTo() as to_meta:
        fl.to_device(batch, "meta")
    assert to_meta.calls == [("cpu", "meta", True)]  # the meta tensor is already there
    with _RecordTo() as to_cpu:
        fl.to_device(batch, torch.device("cpu"))
    assert to_cpu.calls == [("meta", "cpu", False)]
    packed = pack_sequence([torch.ones(3, 2), torch.ones(2, 2)])
    with _RecordTo() as packed_to_meta:
        fl.to_device(packed, "meta")
    assert packed_to_meta.calls == [("cpu", "meta", True)]  # its data, as a tensor's


class _Frozen(Mapping):
    """A read-only mapping that is no dict."""

    def __init__(self, items):
        self._items = dict(items)

    def __getitem__(self, key):
        return self._items[key]

    def __iter__(self) -> Iterator:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


def test_moving_a_batch_keeps_the_type_of_every_container():
    """Tuples stay tuples, a defaultdict keeps its default factory, and any Mapping (not
    only a dict) is rebuilt as its own type, its tensors moved."""
    x = torch.ones(2)
    batch = (
        [x, (x,)],
        collections.defaultdict(list, x=x),
        collections.OrderedDict(x=x),
        _Frozen({"x": x}),
    )
    moved = fl.to_device(batch, "meta")
    for before, after in zip(batch, moved, strict=True):
        assert type(after) is type(before)
    assert type(moved[0][1]) is tuple
    assert moved[1].default_factory is list and moved[1]["new"] == []
    tensors = [moved[0][0], moved[0][1][0], moved[1]["x"], moved[2]["x"], moved[3]["x"]]
    assert all(t.device.type == "meta" for t in tensors)


class _OneSlot:
    __slots__ = "mask"  # a single slot, named by a string


class _DunderSlot(_OneSlot):
    __slots__ = ("__mask__",)  # a dunder name: not mangled


@dataclasses.dataclass
class _SlottedBases(_DunderSlot):
    x: torch.Tensor

    def __post_init__(self):
        self.mask = self.x > 0
        self.__mask__ = self.x < 0


def test_moving_a_dataclass_batch_moves_a_slot_named_by_a_string_and_a_dunder_slot():
    moved = fl.to_device(_SlottedBases(torch.ones(2)), "meta")
    assert moved.x.device.type == "meta"
    assert moved.mask.device.type == "meta" and moved.__mask__.device.type == "meta"


@dataclasses.dataclass
class _Pair:
    tokens: torch.Tensor
    labels: torch.Tensor


def test_the_batch_size_is_that_of_the_first_tensor_in_the_batchs_own_order():
    """The first tensor of a mapping in its insertion order and of a dataclass in its
    field order decides, where later ones have another leading dimension."""
    tokens, labels = torch.zeros(5, 7), torch.zeros(3)
    for batch in ({"tokens": tokens, "labels": labels}, {"labels": labels, "tokens": tokens}):
        assert fl.batch_size(batch) == next(iter(batch.values())).shape[0]
    assert fl.batch_size(_Pair(tokens, labels)) == tokens.shape[0]
    assert fl.batch_size(_Pair(labels, tokens)) == labels.shape[0]


def test_a_fixed_batch_size_of_any_integer_type_is_returned_as_an_int():
    batch = (torch.zeros(4, 3), torch.zeros(4))
    size = fl.batch_size(batch, override=np.int64(16))
    assert size == 16 and type(size) is int


class _Encoding(dict):
    """A mapping with attributes of its own and an __init__ of its own, as a tokenizer's
    ``BatchEncoding``: DataLoader's collate copies such a batch and keeps both."""

    def __init__(self, data, words):
        super().__init__(data)
        self.words = words


class _BatchEncoding(collections.UserDict):
    """As transformers' BatchEncoding: a UserDict with an __init__ and state of its own."""

    def __init__(self, data=None, encoding=None):
        super().__init__(data)
        self._encodings = encoding

    def __getattr__(self, name):
        try:
            return self.data[name]
        except KeyError:
            raise AttributeError(name) from None


class _Tokens(list):
    pass


def test_a_mapping_or_list_of_a_type_of_its_own_keeps_its_attributes():
    """``to_device`` rebuilt such a batch with ``type(batch)(moved_items)``: the mapping's
    ``__init__`` failed (a missing argument), inside every train step, on the CPU too,
    and a subclass made by its items lost its attributes."""
    x = torch.ones(2)
    moved = fl.to_device(_Encoding({"x": x}, words=["a", "b"]), "meta")
    assert type(moved) is _Encoding and moved.words == ["a", "b"]
    assert moved["x"].device.type == "meta"
    encoded = _BatchEncoding({"input_ids": x}, encoding=["e"])
    moved_encoded = fl.to_device(encoded, "meta")
    assert type(moved_encoded) is _BatchEncoding and moved_encoded._encodings == ["e"]
    assert moved_encoded.input_ids.device.type == "meta" and encoded["input_ids"] is x
    tokens = _Tokens([x])
    tokens.lengths = [2]
    moved_tokens = fl.to_device(tokens, "meta")
    assert type(moved_tokens) is _Tokens and moved_tokens.lengths == [2]
    assert moved_tokens[0].device.type == "meta" and tokens[0] is x
    # A mapping that is no dict (nor UserDict) is made by its type: a copy of it may share
    # its items, which moving them would change under the caller's feet.
    batch = _Store({"x": x})
    assert fl.to_device(batch, "meta")["x"].device.type == "meta" and batch["x"] is x


class _Store(MutableMapping):
    def __init__(self, items):
        self._items = dict(items)

    def __getitem__(self, key):
        return self._items[key]

    def __setitem__(self, key, value):
        self._items[key] = value

    def __delitem__(self, key):
        del self._items[key]

    def __iter__(self) -> Iterator:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


@dataclasses.dataclass
class _Cached:
    cache: torch.Tensor = dataclasses.field(init=False)  # set on first use, if ever
    x: torch.Tensor | None = None


def test_the_size_of_a_dataclass_batch_passes_over_a_field_that_is_not_set():
    """A field declared ``init=False`` and not set yet has no attribute: finding the
    batch size raised ``AttributeError`` where moving the batch works."""
    batch = _Cached(x=torch.zeros(5, 2))
    assert fl.batch_size(batch) == 5
    assert fl.to_device(batch, "meta").x.device.type == "meta"


class _FrozenDict(dict):
    """A mapping that refuses changes (torch.fx's immutable_dict, a frozen config)."""

    def __setitem__(self, key, value):
        raise TypeError("frozen")

    def update(self, *args, **kwargs):
        raise TypeError("frozen")


class _FrozenList(list):
    def __setitem__(self, index, value):
        raise TypeError("frozen")


def test_a_mapping_or_list_that_refuses_changes_is_made_by_its_type():
    """Copying and updating such a batch raised its TypeError, where it was made by its
    type before (DataLoader's collate falls back on that TypeError too)."""
    x = torch.ones(2)
    moved = fl.to_device(_FrozenDict(x=x), "meta")
    assert type(moved) is _FrozenDict and moved["x"].device.type == "meta"
    moved_list = fl.to_device(_FrozenList([x]), "meta")
    assert type(moved_list) is _FrozenList and moved_list[0].device.type == "meta"
