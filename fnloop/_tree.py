"""Pytree helpers: the one place that knows fnloop's optree namespace.

fnloop's own containers (``TrainState`` and its subclasses, ``reduce_on_plateau``'s state)
are registered with optree under the ``"fnloop"`` namespace and with
``torch.utils._pytree`` (which ``torch.func.vmap`` and ``torch.compile`` use). Every tree
operation inside fnloop goes through the functions here, or passes :data:`NAMESPACE` to
optree where it needs an option they lack, so a ``TrainState`` is never flattened as a
single leaf.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import optree
import torch
import torch.utils._pytree as torch_pytree

NAMESPACE = "fnloop"

T = TypeVar("T")


def register_dataclass(cls: type[T], *, static: Sequence[str]) -> type[T]:
    """Registers a frozen dataclass as a pytree node for optree and torch.

    Fields named in ``static`` or declared ``dataclasses.field(metadata={"static":
    True})`` go into the tree's context (they are compared, never mapped over); all
    other fields are children. The fields are read when the first instance is
    flattened, so a class may be registered before the dataclass decorator has run on it
    (from ``__init_subclass__``).
    """
    layout: list[tuple[tuple[str, ...], tuple[str, ...]]] = []

    # Run as it is while torch.compile traces (its result a constant there): the first
    # flatten may be traced (a fresh state given to a compiled vmap), and dynamo cannot
    # trace dataclasses.fields of a class.
    @torch.compiler.assume_constant_result  # type: ignore[untyped-decorator]
    def fields() -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(children, statics), worked out once."""
        if not layout:
            found = dataclasses.fields(cls)  # type: ignore[arg-type]
            names = [f.name for f in found]
            fixed = set(static) | {f.name for f in found if f.metadata.get("static")}
            layout.append(
                (tuple(n for n in names if n not in fixed), tuple(n for n in names if n in fixed))
            )
        return layout[0]

    def flatten_optree(obj: Any) -> tuple[list[Any], tuple[Any, ...], tuple[str, ...]]:
        children, statics = fields()
        leaves = [getattr(obj, n) for n in children]
        return leaves, tuple(getattr(obj, n) for n in statics), children

    def build(values: dict[str, Any]) -> Any:
        # Field by field, past __init__ (as TrainState.replace makes states): __init__
        # rejects a field declared init=False, and a __post_init__ would run on every map.
        new = object.__new__(cls)
        for name, value in values.items():
            object.__setattr__(new, name, value)
        return new

    def unflatten_optree(context: Any, values: Any) -> Any:
        children, statics = fields()
        return build({**dict(zip(children, values)), **dict(zip(statics, context))})

    # torch.utils._pytree treats None as a leaf, which torch.func.vmap rejects; absent
    # (None) children therefore go into the context there.
    def flatten_torch(obj: Any) -> tuple[list[Any], tuple[Any, ...]]:
        children, statics = fields()
        present = tuple(n for n in children if getattr(obj, n) is not None)
        statics_ = tuple(getattr(obj, n) for n in statics)
        return [getattr(obj, n) for n in present], (statics_, present)

    def unflatten_torch(values: Any, context: tuple[Any, ...]) -> Any:
        children, statics = fields()
        statics_, present = context
        values_ = dict.fromkeys(children)
        values_.update(zip(present, values))
        return build({**values_, **dict(zip(statics, statics_))})

    def flatten_with_keys(obj: Any) -> tuple[list[tuple[Any, Any]], tuple[Any, ...]]:
        leaves, context = flatten_torch(obj)
        keys = [torch_pytree.GetAttrKey(n) for n in context[1]]
        return list(zip(keys, leaves)), context

    if "__dataclass_fields__" in vars(cls):  # decorated already: its fields are known
        fields()
    optree.register_pytree_node(
        cls,  # type: ignore[arg-type]
        flatten_optree,
        unflatten_optree,
        namespace=NAMESPACE,
    )
    torch_pytree.register_pytree_node(
        cls,
        flatten_torch,
        unflatten_torch,
        serialized_type_name=f"{cls.__module__}.{cls.__qualname__}",
        flatten_with_keys_fn=flatten_with_keys,
    )
    return cls


# While torch.compile traces, the helpers below use torch.utils._pytree, which every
# supported torch version traces natively (its optree support varies by version).


def tree_map(
    fn: Callable[..., Any],
    tree: Any,
    *rests: Any,
    is_leaf: Callable[[Any], bool] | None = None,
) -> Any:
    """``optree.tree_map`` in fnloop's namespace (``None`` is an empty subtree)."""
    if torch.compiler.is_compiling():
        return torch_pytree.tree_map(fn, tree, *rests, is_leaf=is_leaf)
    return optree.tree_map(fn, tree, *rests, is_leaf=is_leaf, namespace=NAMESPACE)


def tree_leaves(tree: Any) -> list[Any]:
    """The leaves of ``tree`` in fnloop's namespace."""
    if torch.compiler.is_compiling():
        return torch_pytree.tree_leaves(tree)
    return optree.tree_leaves(tree, namespace=NAMESPACE)


def tree_flatten(tree: Any) -> tuple[list[Any], Any]:
    """Leaves and treedef of ``tree`` in fnloop's namespace."""
    if torch.compiler.is_compiling():
        return torch_pytree.tree_flatten(tree)
    return optree.tree_flatten(tree, namespace=NAMESPACE)


class FlatDictDef(tuple[Any, ...]):
    """The treedef of a flat ``{name: tensor}`` dict: its keys, in order.

    The optimizer code aligns such dicts (params, gradients, moments) by key directly,
    which costs far less per step than flattening them as general trees.
    """


def flat_dict_leaves(
    tree: Any, *others: Any
) -> tuple[list[Any], FlatDictDef, list[list[Any]]] | None:
    """Leaves of flat tensor dicts with the same keys, aligned by key; else ``None``."""
    if type(tree) is not dict:
        return None
    leaves = list(tree.values())
    if not all(isinstance(x, torch.Tensor) for x in leaves):
        return None
    other_leaves = []
    for other in others:
        if type(other) is not dict or len(other) != len(tree):
            return None
        try:
            values = [other[k] for k in tree]
        except KeyError:
            return None
        if not all(isinstance(x, torch.Tensor) for x in values):
            return None
        other_leaves.append(values)
    return leaves, FlatDictDef(tree), other_leaves


def tree_unflatten(treedef: Any, leaves: Sequence[Any]) -> Any:
    """Inverse of :func:`tree_flatten` and :func:`flat_dict_leaves` (any kind of treedef)."""
    if isinstance(treedef, FlatDictDef):
        return dict(zip(treedef, leaves, strict=True))
    if isinstance(treedef, torch_pytree.TreeSpec):
        return torch_pytree.tree_unflatten(list(leaves), treedef)
    return optree.tree_unflatten(treedef, leaves)


def tree_flatten_with_keys(
    tree: Any, *, none_is_leaf: bool = False
) -> tuple[list[str], list[Any], Any]:
    """Readable leaf keys (``opt_state.1.mu.0.weight``: field, dict key and tuple index
    names joined by dots), leaves and treedef of ``tree`` in fnloop's namespace (with
    ``none_is_leaf``, a ``None`` is a leaf too, not an empty subtree)."""
    accessors, leaves, treedef = optree.tree_flatten_with_accessor(
        tree, none_is_leaf=none_is_leaf, namespace=NAMESPACE
    )
    keys = [".".join(_entry_name(e) for e in accessor) or "<root>" for accessor in accessors]
    return keys, leaves, treedef


def _entry_name(entry: Any) -> str:
    for attr in ("field", "key", "name", "index"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry.entry)


def key_differences(a: Iterable[Any], b: Iterable[Any]) -> tuple[list[Any], list[Any]]:
    """The keys only in ``a`` and those only in ``b``, each in its sequence's order (the
    first of each is what a mismatch message names)."""
    a, b = list(a), list(b)
    set_a, set_b = set(a), set(b)
    return [k for k in a if k not in set_b], [k for k in b if k not in set_a]


def first_difference(a: Any, b: Any) -> str | None:
    """Describes the first structural difference between two trees, or ``None``."""
    keys_a, _, treedef_a = tree_flatten_with_keys(a)
    keys_b, _, treedef_b = tree_flatten_with_keys(b)
    only_a, only_b = key_differences(keys_a, keys_b)
    if only_a:
        return f"'{only_a[0]}' is present in the first tree but not in the second"
    if only_b:
        return f"'{only_b[0]}' is present in the second tree but not in the first"
    if treedef_a != treedef_b:
        return "the trees have the same keys but different node types"
    return None
