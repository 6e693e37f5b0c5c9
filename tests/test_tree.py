"""fnloop's pytree helpers where the public functions reach their less common cases."""

from __future__ import annotations

import re

import optree
import pytest
import torch

from fnloop import _tree, optim


def test_updates_with_as_many_entries_under_another_name_are_named() -> None:
    """Flat dicts of the same length but other keys leave the aligned fast path; the
    general one names the key the updates have and the params lack."""
    params = {"w": torch.ones(2), "b": torch.ones(1)}
    updates = {"w": torch.ones(2), "c": torch.ones(1)}
    assert _tree.flat_dict_leaves(updates, params) is None
    says = "'c' is present in the first tree but not in the second (first tree: updates"
    with pytest.raises(ValueError, match=re.escape(f"same structure, but {says}")):
        optim.apply_updates(params, updates)


def test_updates_in_a_list_as_long_as_the_params_are_named() -> None:
    """The aligned fast path looks entries up by key: a list of updates leaves it for the
    general one's message, not list indexing's TypeError."""
    params = {"w": torch.ones(2), "b": torch.ones(1)}
    updates = [torch.ones(2), torch.ones(1)]
    with pytest.raises(ValueError, match=r"same structure, but '0' is present in the first tree"):
        optim.apply_updates(params, updates)


def test_updates_holding_a_number_for_a_parameter_are_named() -> None:
    params = {"w": torch.ones(2), "b": torch.ones(1)}
    updates = {"w": torch.ones(2), "b": 1.0}
    assert _tree.flat_dict_leaves(params, updates) is None
    with pytest.raises(ValueError, match=r"at 'b': a tensor of shape \(1,\) is paired with a non"):
        optim.apply_updates(params, updates)


@pytest.mark.parametrize("tx", [optim.sgd(0.1), optim.clip(0.5)], ids=["sgd", "clip"])
@pytest.mark.parametrize("method", ["update", "update_", "apply_"])
def test_gradients_holding_a_number_alone_are_named(
    tx: optim.GradientTransformation, method: str
) -> None:
    """Transforms that read the gradients alone (no state or params shaped like them)
    name the number too, instead of failing inside torch's foreach ops (pybind's
    "is_batchedtensor(): incompatible function arguments"); where params are paired with
    the gradients (sgd's apply_), the shape check names it."""
    params = {"w": torch.ones(2), "b": torch.ones(())}
    grads = {"w": torch.ones(2), "b": 1.0}
    named = r"at 'b'(: a non-tensor is paired| is a float, not a tensor)"
    with pytest.raises((TypeError, ValueError), match=named):
        getattr(tx, method)(grads, tx.init(params), params)


def test_params_holding_a_number_for_a_parameter_are_named() -> None:
    """The number in the first tree (the params apply_updates aligns the updates with)
    leaves the aligned fast path too, for the general one's message."""
    params = {"w": torch.ones(2), "b": 1.0}
    updates = {"w": torch.ones(2), "b": torch.ones(1)}
    with pytest.raises(ValueError, match=r"at 'b': a non-tensor is paired with a tensor of shape"):
        optim.apply_updates(params, updates)


def test_a_dict_and_a_list_with_the_same_keys_are_told_apart() -> None:
    """Keys '0' and '1' in both trees: the difference is the kind of container."""
    params = {"0": torch.ones(2), "1": torch.ones(1)}
    updates = [torch.ones(2), torch.ones(1)]
    with pytest.raises(
        ValueError, match="same structure, but the trees have the same keys but diff"
    ):
        optim.apply_updates(params, updates)


def test_a_tree_that_is_one_tensor_is_named_the_root() -> None:
    with pytest.raises(ValueError, match=r"shape mismatch at '<root>': a tensor of shape \(2,\)"):
        optim.apply_updates(torch.ones(2), torch.ones(3))
    keys, leaves, _ = _tree.tree_flatten_with_keys(torch.ones(2))
    assert keys == ["<root>"] and len(leaves) == 1


class _Pair:
    """A container of one's own, registered in fnloop's optree namespace (documented in
    the guide) without names for its children."""

    def __init__(self, first: torch.Tensor, second: torch.Tensor) -> None:
        self.first, self.second = first, second


def test_children_of_a_node_registered_without_names_are_keyed_by_position() -> None:
    optree.register_pytree_node(
        _Pair,
        lambda p: ((p.first, p.second), None),
        lambda _, children: _Pair(*children),
        namespace=_tree.NAMESPACE,
    )
    try:
        tree = {"state": _Pair(torch.zeros(1), torch.ones(2))}
        keys, leaves, _ = _tree.tree_flatten_with_keys(tree)
        assert keys == ["state.0", "state.1"]
        assert [t.shape for t in leaves] == [(1,), (2,)]
    finally:
        optree.unregister_pytree_node(_Pair, namespace=_tree.NAMESPACE)
