"""The optimizer protocol: ``GradientTransformation(init, update)``, ``chain``,
``apply_updates``."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Protocol

import torch

from fnloop import _tree
from fnloop.optim import _foreach
from fnloop.typing import OptState, Params, Updates


def scalar_dtype(device: torch.device) -> torch.dtype:
    """The dtype fnloop keeps scalars in (learning rates, plateau and metric sums):
    float64, or float32 on MPS, which has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


class InitFn(Protocol):
    """``init(params) -> state``."""

    def __call__(self, params: Params, /) -> OptState: ...


class UpdateFn(Protocol):
    """``update(updates, state, params) -> (updates, state)``."""

    def __call__(
        self, updates: Updates, state: OptState, params: Params | None = None, /
    ) -> tuple[Updates, OptState]: ...


class ApplyFn(Protocol):
    """``apply_(grads, state, params) -> (params, state)``, written into its inputs."""

    def __call__(
        self, grads: Updates, state: OptState, params: Params, /
    ) -> tuple[Params, OptState]: ...


class GradientTransformation(NamedTuple):
    """A pure gradient transformation: a pair of functions, as in optax.

    ``init(params)`` builds the state; ``update(updates, state, params)`` returns the
    transformed updates and the new state. Neither changes its inputs.

    ``update_`` is the same computation done in place: it writes into ``updates`` and into
    the tensors of ``state`` keyed by parameter names (moments, momentum buffers), which
    the caller gives up; other state tensors (update counts, learning rates) it replaces
    with new ones. ``apply_`` goes one step further and also applies the result: it
    writes the new parameters into ``params`` (under ``torch.no_grad``, as
    ``torch.optim``'s ``step``) and returns ``(params, state)``. Training
    steps call ``apply_`` (a pure step on fresh copies of what it writes); fnloop's
    optimizers give it torch's fused kernels or operation order (fewer passes over memory
    than ``update_`` followed by :func:`apply_updates_`). Both are ``None`` for
    transformations without an in-place form; all of fnloop's own have them, and
    ``chain`` and ``partition`` have them when every member does.

    Example:
      >>> import torch
      >>> from fnloop import optim
      >>> params = {"w": torch.tensor([1.0, 2.0])}
      >>> tx = optim.sgd(0.1)
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": torch.tensor([1.0, 1.0])}, state, params)
      >>> optim.apply_updates(params, updates)["w"]
      tensor([0.9000, 1.9000])
    """

    init: InitFn
    update: UpdateFn
    update_: UpdateFn | None = None
    apply_: ApplyFn | None = None


class EmptyState(NamedTuple):
    """The state of a transformation that keeps none."""


def with_inplace(
    init_fn: InitFn,
    update: Callable[[Updates, OptState, Params | None, bool], tuple[Updates, OptState]],
    *,
    has_inplace: bool = True,
) -> GradientTransformation:
    """A transformation from one ``update(updates, state, params, inplace)`` function.

    With ``inplace=False`` the function must leave its inputs alone; with ``True`` it may
    write into ``updates`` and into ``state``'s tensors keyed by parameter names (not into
    counts or rates: return ``count + 1``), and must return updates that share no
    storage with the state (later transforms scale them in place).
    """

    def update_fn(
        updates: Updates, state: OptState, params: Params | None = None
    ) -> tuple[Updates, OptState]:
        return update(updates, state, params, False)

    def update_inplace(
        updates: Updates, state: OptState, params: Params | None = None
    ) -> tuple[Updates, OptState]:
        return update(updates, state, params, True)

    if not has_inplace:
        return GradientTransformation(init_fn, update_fn)
    return GradientTransformation(
        init_fn, update_fn, update_inplace, update_then_apply(update_inplace)
    )


def update_then_apply(update_: UpdateFn) -> ApplyFn:
    """The ``apply_`` made of an in-place ``update_`` followed by :func:`apply_updates_`."""

    def apply_(grads: Updates, state: OptState, params: Params) -> tuple[Params, OptState]:
        updates, state = update_(grads, state, params)
        return apply_updates_(params, updates), state

    return apply_


def _apply_fn(t: GradientTransformation) -> ApplyFn:
    if t.apply_ is not None:
        return t.apply_
    assert t.update_ is not None
    return update_then_apply(t.update_)


def no_state(params: Params) -> EmptyState:
    """``init`` of a transformation that keeps no state."""
    del params
    return EmptyState()


def identity() -> GradientTransformation:
    """A transformation that returns the updates unchanged.

    >>> from fnloop import optim
    >>> optim.identity().update({"w": 1.0}, optim.EmptyState())[0]
    {'w': 1.0}
    """

    def update_fn(
        updates: Updates, state: OptState, params: Params | None = None
    ) -> tuple[Updates, OptState]:
        del params
        check_no_state(state, "identity")
        return updates, state

    return GradientTransformation(no_state, update_fn, update_fn, update_then_apply(update_fn))


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Applies ``transforms`` one after the other; the state is a tuple of their states.

    >>> import torch
    >>> from fnloop import optim
    >>> tx = optim.chain(optim.clip(1.0), optim.scale_by_learning_rate(0.5))
    >>> params = {"w": torch.zeros(2)}
    >>> u, _ = tx.update({"w": torch.tensor([3.0, -0.5])}, tx.init(params), params)
    >>> u["w"]
    tensor([-0.5000,  0.2500])
    """
    for i, t in enumerate(transforms):
        if not isinstance(t, GradientTransformation):
            raise TypeError(
                f"chain() argument {i} is a {type(t).__name__}, not a GradientTransformation; "
                f"pass fnloop.optim transforms such as optim.clip_by_global_norm(1.0)."
            )

    def init_fn(params: Params) -> tuple[OptState, ...]:
        return tuple(t.init(params) for t in transforms)

    def check(state: OptState) -> None:
        check_chain_state(state, len(transforms))

    def run(
        updates: Updates, state: OptState, params: Params | None, inplace: bool
    ) -> tuple[Updates, OptState]:
        check(state)
        new_states = []
        for t, s in zip(transforms, state, strict=True):
            fn = t.update_ if inplace else t.update
            updates, s = fn(updates, s, params)  # type: ignore[misc]
            new_states.append(s)
        return updates, tuple(new_states)

    tx = with_inplace(init_fn, run, has_inplace=all(t.update_ is not None for t in transforms))
    if tx.update_ is None or not transforms:
        return tx
    last = _apply_fn(transforms[-1])

    def apply_(grads: Updates, state: OptState, params: Params) -> tuple[Params, OptState]:
        # The members' in-place updates, then the last one's apply_ (which may be fused).
        check(state)
        new_states = []
        for t, s in zip(transforms[:-1], state[:-1]):
            grads, s = t.update_(grads, s, params)  # type: ignore[misc]
            new_states.append(s)
        params, s = last(grads, state[-1], params)
        return params, (*new_states, s)

    return tx._replace(apply_=apply_)


def check_chain_state(state: OptState, n: int) -> None:
    """Raises ``ValueError`` unless ``state`` is the tuple of ``n`` entries of a chain of
    ``n``."""
    if not isinstance(state, tuple):
        raise ValueError(
            STATE_MSG.format(
                name=f"chain of {n} transforms", got=_a(type(state).__name__), expected="a tuple"
            )
        )
    if len(state) != n:
        raise ValueError(
            f"chain of {n} transforms got a state with {len(state)} "
            f"entries; was the state made by this optimizer's init?"
        )


STATE_MSG = (
    "{name} got {got} as its state, where its init makes {expected}; was the state made by "
    "this optimizer's init?"
)


def _a(noun: str) -> str:
    return f"an {noun}" if noun[0] in "AEIOUaeiou" else f"a {noun}"


def check_state(state: OptState, expected: type, name: str) -> None:
    """Raises ``ValueError`` unless ``state`` is an ``expected``, the state ``name``'s init
    makes (a state made by another optimizer failed on a missing attribute, or ran)."""
    if not isinstance(state, expected):
        raise ValueError(
            STATE_MSG.format(
                name=name, got=_a(type(state).__name__), expected=_a(expected.__name__)
            )
        )


def check_no_state(state: OptState, name: str) -> None:
    """Raises ``ValueError`` unless ``state`` is empty (``EmptyState()``, ``()`` or
    ``None``), the state of a transformation that keeps none."""
    if state is not None and not (isinstance(state, tuple) and not state):
        raise ValueError(
            STATE_MSG.format(name=name, got=_a(type(state).__name__), expected="an EmptyState")
        )


def check_same_structure(updates: Any, params: Any) -> None:
    """Raises ``ValueError`` naming the first key where ``updates`` and ``params`` differ,
    or ``TypeError`` naming an update that is ``None`` (a tree holds no leaf there, so the
    key would seem missing) where ``params`` has a leaf."""
    keys, leaves, _ = _tree.tree_flatten_with_keys(updates, none_is_leaf=True)
    if any(leaf is None for leaf in leaves):
        param_keys = set(_tree.tree_flatten_with_keys(params)[0])
        for key, leaf in zip(keys, leaves, strict=True):
            if leaf is None and key in param_keys:
                raise TypeError(_NOT_TENSOR_MSG.format(key=key, kind="NoneType"))
    diff = _tree.first_difference(updates, params)
    if diff is not None:
        raise ValueError(
            f"updates and params must have the same structure, but {diff} "
            f"(first tree: updates, second: params). Compute gradients for exactly the "
            f"params the optimizer was initialised with."
        )


def flatten_like(
    updates: Updates, *others: Any, same_dtype: bool = True
) -> tuple[list[torch.Tensor], Any, list[Any]]:
    """Leaves of ``updates`` and of each tree in ``others``, checking they match: the same
    structure, and the same shape leaf by leaf (gradients, updates, params and optimizer
    buffers are all shaped like the params) and, with ``same_dtype``, the same dtype (as
    ``torch.optim`` requires of a ``.grad``: its fused kernels refuse other dtypes, and a
    pure update would turn the optimizer state into the gradient's dtype)."""
    check = not torch.compiler.is_compiling()  # treedefs are not traceable everywhere
    flat = _tree.flat_dict_leaves(updates, *others)
    if flat is not None:
        leaves, treedef, other_leaves = flat
    else:
        leaves, treedef = _tree.tree_flatten(updates)
        # With other trees, the shape check below names a number among the leaves.
        if check and not others and not all(isinstance(x, torch.Tensor) for x in leaves):
            _raise_not_tensor(updates)
        other_leaves = []
        for other in others:
            o_leaves, o_def = _tree.tree_flatten(other)
            if check and o_def != treedef:
                check_same_structure(updates, other)
                raise ValueError(f"tree structures differ: {treedef} vs {o_def}")
            other_leaves.append(o_leaves)
    if other_leaves:  # also while compiling: static shapes and dtypes, checked when traced
        shape = _shape_of if flat is None else torch.Tensor.size  # flat: all tensors
        shapes = list(map(shape, leaves))
        for o_leaves in other_leaves:
            if list(map(shape, o_leaves)) != shapes:
                _raise_shape_mismatch(updates, treedef, leaves, o_leaves)
        if same_dtype:
            dtypes = _dtypes(leaves, flat is not None)
            for o_leaves in other_leaves:
                if _dtypes(o_leaves, flat is not None) != dtypes:
                    _raise_dtype_mismatch(updates, treedef, leaves, o_leaves)
    return leaves, treedef, other_leaves


def _raise_not_tensor(updates: Any) -> None:
    keys, leaves, _ = _tree.tree_flatten_with_keys(updates)
    for key, leaf in zip(keys, leaves, strict=True):
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(_NOT_TENSOR_MSG.format(key=key, kind=type(leaf).__name__))


_NOT_TENSOR_MSG = (
    "the update (gradient) at {key!r} is a {kind}, not a tensor. Pass one tensor per "
    "parameter, shaped like it, as torch.autograd.grad returns them; for a parameter "
    "without a gradient, pass torch.zeros_like(param)."
)


def _shape_of(x: Any) -> torch.Size | None:
    return x.shape if isinstance(x, torch.Tensor) else None


def _raise_shape_mismatch(updates: Any, treedef: Any, leaves: list[Any], others: list[Any]) -> None:
    keys = list(treedef) if isinstance(treedef, _tree.FlatDictDef) else None
    if keys is None:
        keys = _tree.tree_flatten_with_keys(updates)[0]
    for key, a, b in zip(keys, leaves, others, strict=True):
        shape_a, shape_b = _shape_of(a), _shape_of(b)
        if shape_a != shape_b:
            raise ValueError(
                f"shape mismatch at {key!r}: {_shape(shape_a)} is paired with "
                f"{_shape(shape_b)}. Gradients, updates, params and optimizer state must all "
                f"have each parameter's shape: compute the gradients of these params, and "
                f"make the optimizer state with tx.init(params)."
            )


def _shape(shape: Any) -> str:
    return "a non-tensor" if shape is None else f"a tensor of shape {tuple(shape)}"


def _dtype_of(x: Any) -> torch.dtype | None:
    return x.dtype if isinstance(x, torch.Tensor) else None


def _dtypes(leaves: list[Any], all_tensors: bool) -> list[torch.dtype | None]:
    if all_tensors:  # (the common case, without a call per leaf)
        return [x.dtype for x in leaves]
    return [_dtype_of(x) for x in leaves]


def _raise_dtype_mismatch(updates: Any, treedef: Any, leaves: list[Any], others: list[Any]) -> None:
    keys = list(treedef) if isinstance(treedef, _tree.FlatDictDef) else None
    if keys is None:
        keys = _tree.tree_flatten_with_keys(updates)[0]
    for key, a, b in zip(keys, leaves, others, strict=True):
        if _dtype_of(a) != _dtype_of(b):
            raise ValueError(_DTYPE_MISMATCH_MSG.format(key=key, a=a.dtype, b=b.dtype))


_DTYPE_MISMATCH_MSG = (
    "dtype mismatch at {key!r}: the update (gradient) is {a}, paired with {b} (its "
    "parameter or optimizer state). Gradients must have their parameters' dtypes, as "
    "torch.optim requires of .grad: cast them, grads = {{k: g.to(params[k].dtype) for k, g "
    "in grads.items()}}; after changing the params' dtypes, make the optimizer state with "
    "tx.init(params)."
)


def map_flat(fn: Callable[..., list[torch.Tensor]], updates: Updates, *others: Any) -> Updates:
    """Applies ``fn(leaves, *other_leaves) -> new_leaves`` and rebuilds the tree."""
    leaves, treedef, other_leaves = flatten_like(updates, *others)
    return _tree.tree_unflatten(treedef, fn(leaves, *other_leaves))


def apply_updates(params: Params, updates: Updates) -> Params:
    """Returns ``params + updates`` as new tensors (the inputs are unchanged).

    Each result keeps its parameter's dtype.

    >>> import torch
    >>> from fnloop import optim
    >>> optim.apply_updates({"w": torch.ones(2)}, {"w": torch.tensor([0.5, -1.0])})
    {'w': tensor([1.5000, 0.0000])}
    """
    p_leaves, u_leaves, treedef = _aligned_leaves(params, updates)
    return _tree.tree_unflatten(treedef, _foreach.add(p_leaves, u_leaves))


def apply_updates_(params: Params, updates: Updates) -> Params:
    """Like :func:`apply_updates` but writes into ``params``, which the caller gives up
    (under ``torch.no_grad``, as ``torch.optim``'s ``step``: params that require grad, a
    module's own, are written too)."""
    p_leaves, u_leaves, treedef = _aligned_leaves(params, updates)
    with torch.no_grad():
        return _tree.tree_unflatten(treedef, _foreach.add_(p_leaves, u_leaves))


def _aligned_leaves(params: Params, updates: Updates) -> tuple[list[Any], list[Any], Any]:
    """Leaves of ``params`` and ``updates`` (cast to the params' dtypes) and the treedef."""
    try:
        p_leaves, treedef, (u_leaves,) = flatten_like(params, updates, same_dtype=False)
    except ValueError:
        check_same_structure(updates, params)  # names the two trees the right way round
        raise
    u_leaves = [
        u if u.dtype == p.dtype else u.to(p.dtype) for p, u in zip(p_leaves, u_leaves, strict=True)
    ]
    return p_leaves, u_leaves, treedef


def partition(
    transforms: Mapping[str, GradientTransformation], labels: Callable[[str], str]
) -> GradientTransformation:
    """Parameter groups: a different transformation for each label.

    ``labels(name)`` gives the label of each parameter name (params are the flat
    ``{name: tensor}`` dicts of a ``TrainState``, keyed like ``named_parameters()``;
    frozen parameters are not among them). Each group's learning rate is listed
    separately by ``optim.learning_rates`` and logged per group by ``fit``.

    Args:
      transforms: the transformation of each label, e.g. a smaller learning rate for a
        pretrained backbone: ``{"backbone": optim.adamw(1e-4), "head": optim.adamw(1e-3)}``.
      labels: ``name -> label``, e.g. ``lambda n: "backbone" if n.startswith("backbone.")
        else "head"``.

    Returns:
      The transformation; its state is a dict of the groups' states.

    >>> import torch
    >>> from fnloop import optim
    >>> tx = optim.partition(
    ...     {"decay": optim.adamw(1e-3), "no_decay": optim.adamw(1e-3, weight_decay=0.0)},
    ...     lambda name: "no_decay" if name.endswith("bias") else "decay",
    ... )
    >>> state = tx.init({"fc.weight": torch.ones(2), "fc.bias": torch.zeros(1)})
    >>> sorted(state)
    ['decay', 'no_decay']
    """
    if not transforms:
        raise ValueError("partition needs at least one labelled transform")
    for label, t in transforms.items():
        if not isinstance(t, GradientTransformation):
            raise TypeError(
                f"partition() transform {label!r} is a {type(t).__name__}, not a "
                f"GradientTransformation; pass fnloop.optim transforms such as "
                f"optim.adamw(1e-3)."
            )

    def split(tree: Any) -> dict[str, dict[str, Any]]:
        if not isinstance(tree, dict):
            raise TypeError(
                f"partition works on flat {{name: tensor}} dicts; got {type(tree).__name__}"
            )
        groups: dict[str, dict[str, Any]] = {label: {} for label in transforms}
        for name, value in tree.items():
            label = labels(name)
            if label not in groups:
                raise ValueError(
                    f"labels({name!r}) returned {label!r}, which is not one of "
                    f"{sorted(transforms)}; add a transform for it."
                )
            groups[label][name] = value
        return groups

    def init_fn(params: Params) -> dict[str, OptState]:
        groups = split(params)
        return {label: t.init(groups[label]) for label, t in transforms.items() if groups[label]}

    def check(state: OptState, groups: dict[str, dict[str, Any]]) -> None:
        """``state`` must hold the states of the groups with parameters (as init made it)."""
        labels = [label for label, group in groups.items() if group]
        if not isinstance(state, dict) or state.keys() != set(labels):
            got = _a(type(state).__name__)
            if isinstance(state, dict):
                got = f"a dict of the groups {sorted(map(str, state))}"
            expected = f"a dict of the groups {sorted(labels)}"
            raise ValueError(STATE_MSG.format(name="partition", got=got, expected=expected))

    def run(
        updates: Updates, state: OptState, params: Params | None, inplace: bool
    ) -> tuple[Updates, OptState]:
        u_groups = split(updates)
        check(state, u_groups)
        p_groups = split(params) if params is not None else None
        new_updates: dict[str, Any] = {}
        new_state = {}
        for label, s in state.items():
            p = p_groups[label] if p_groups is not None else None
            t = transforms[label]
            fn = t.update_ if inplace else t.update
            u, new_state[label] = fn(u_groups[label], s, p)  # type: ignore[misc]
            new_updates.update(u)
        return _merged(updates, new_updates), new_state

    has_inplace = all(t.update_ is not None for t in transforms.values())
    tx = with_inplace(init_fn, run, has_inplace=has_inplace)
    if not has_inplace:
        return tx

    def apply_(grads: Updates, state: OptState, params: Params) -> tuple[Params, OptState]:
        g_groups, p_groups = split(grads), split(params)
        check(state, g_groups)
        new_params: dict[str, Any] = {}
        new_state = {}
        for label, s in state.items():
            p, new_state[label] = _apply_fn(transforms[label])(g_groups[label], s, p_groups[label])
            new_params.update(p)
        return _merged(params, new_params), new_state

    return tx._replace(apply_=apply_)


def _merged(tree: dict[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of the flat dict ``tree``, of its type (an ``OrderedDict`` state_dict stays
    one, as every transform keeps its input's node types), holding ``values[name]`` at
    each of its names."""
    if type(tree) is dict:  # (torch.compile traces this; copy.copy broke the graph)
        return {name: values[name] for name in tree}
    out = copy.copy(tree)
    for name in out:
        out[name] = values[name]
    return out
