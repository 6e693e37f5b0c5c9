"""Moving batches to a device and finding their size (fnloop/batch.py)."""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import PackedSequence, pack_sequence

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
