"""Many models at once: stack states along a new leading dimension for ``torch.func.vmap`` (B1)."""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import math
import types
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.nn.utils import parametrize

from fnloop import _tree
from fnloop.optim.plateau import plateau_nodes
from fnloop.optim.transform import learning_rates
from fnloop.state import _STATIC, StateT, TrainState
from fnloop.typing import Params


def stack_states(states: Sequence[StateT]) -> StateT:
    """Stacks states of identically shaped models into one batched state.

    Every tensor leaf gets a new leading dimension of size ``len(states)``. The static
    parts are held once for every model: the counters, the history and a subclass's
    static fields must be equal in every state, and the module template and optimizer
    are ``states[0]``'s (the templates must not differ in what forward computes). The
    optimizer's hyper-parameters that live in the state, such as each model's learning
    rate, stay per model, while those fixed in ``tx`` (weight decay, betas, momentum, and a
    learning-rate schedule, which sets every model's rate from the step count) would be
    ``states[0]``'s for every model, so they must be equal too. Train the stack with
    ``torch.func.vmap(train_step, in_dims=(0, None), randomness="different")``.

    Args:
      states: states of one class on one device with the same parameter names, shapes,
        dtypes and optimizer structure, and the same ``step``, ``epoch``, ``micro_step``,
        ``ema_decay`` and ``history``.

    Returns:
      The stacked state.

    Raises:
      TypeError: a state is no ``TrainState``, of another class than ``states[0]``, or
        holds a leaf that is no tensor.
      ValueError: no states, a state that holds stacked models already, or states
        that differ in any of the above, in their module, or in their optimizer's rules
        (a schedule, weight decay, betas: what ``tx`` fixes rather than the state;
        found by running each ``tx`` against ``states[0]``'s for the next few updates
        on small stand-in tensors, or on tensors of the parameters' shapes where it
        fails on those, and an error where it fails on both; states that share one
        ``tx`` object are not compared), or in a ``reduce_on_plateau``'s settings
        (``factor``, ``patience``, ...; its initial rate may differ).

    Example:
      >>> import torch
      >>> import fnloop as fl
      >>> from fnloop import optim
      >>> states = [
      ...     fl.TrainState.create(torch.nn.Linear(3, 1), tx=optim.sgd(lr), device="cpu")
      ...     for lr in (0.1, 0.01)
      ... ]
      >>> stacked = fl.stack_states(states)
      >>> stacked.params["weight"].shape
      torch.Size([2, 1, 3])
      >>> [float(s.opt_state[-1].lr) for s in fl.unstack_states(stacked)]
      [0.1, 0.01]
    """
    if not states:
        raise ValueError("stack_states needs a list of one or more TrainStates; got none.")
    for i, state in enumerate(states):
        if not isinstance(state, TrainState):
            raise TypeError(f"states[{i}] is a {type(state).__name__}, not a TrainState")
        n = stacked_models(state)
        if n is not None:
            raise ValueError(
                f"states[{i}] holds {n} stacked models; stack_states stacks states of one "
                f"model each (a vmapped step trains one level of stacking). To join "
                f"stacked states a and b: fl.stack_states(fl.unstack_states(a) + "
                f"fl.unstack_states(b))."
            )
    first = states[0]
    paths0, leaves0, treedef0 = _tree.tree_flatten_with_keys(first)
    columns: list[list[torch.Tensor]] = [[leaf] for leaf in leaves0]
    _check_tensors(0, paths0, leaves0)
    statics = [
        f.name
        for f in dataclasses.fields(first)
        if (f.name in _STATIC or f.metadata.get("static")) and f.name not in ("module", "tx")
    ]
    alike: list[Any] = [first.tx]  # the optimizers found to update like states[0]'s
    probe = _Probe(first.params)
    for i, state in enumerate(states[1:], start=1):
        if type(state) is not type(first):
            raise TypeError(
                f"states[{i}] is a {type(state).__name__} but states[0] is a "
                f"{type(first).__name__}; a stacked state is of one class: stack states of one."
            )
        for attr in statics:  # one value for every model: the counters, the history, ...
            mine, theirs = getattr(state, attr), getattr(first, attr)
            if _same(mine, theirs):
                continue
            if attr == "history":
                raise ValueError(
                    f"states[{i}].history differs from states[0]'s; a stacked state keeps one "
                    f"history for every model. Keep each model's history apart and give the "
                    f"states one before stacking, s.replace(history=states[0].history)."
                )
            raise ValueError(
                f"states[{i}].{attr} is {mine!r} but states[0].{attr} is {theirs!r}; a "
                f"stacked state holds one {attr} for every model: "
                + _STATIC_FIX.get(attr, _STATIC_FIX[""]).format(attr=attr)
            )
        diff = _module_difference(first.module, state.module)
        if diff is not None:
            raise ValueError(
                f"states[{i}] was made from another module than states[0] ({diff}); a "
                f"stacked state runs states[0]'s module for every model. Stack states of "
                f"one architecture, or train the others apart."
            )
        paths, leaves, _ = _tree.tree_flatten_with_keys(state)
        if paths != paths0:
            raise ValueError(_structure_difference(i, paths0, paths))
        _check_tensors(i, paths, leaves)
        diff = _plateau_difference(first.opt_state, state.opt_state)
        if diff is not None:
            raise ValueError(
                f"states[{i}]'s reduce_on_plateau has {diff}; a stacked state keeps "
                f"states[0]'s plateau settings for every model (only the rate each starts "
                f"from and its progress stay per model). Make the plateaus alike, or train "
                f"models that differ in them apart."
            )
        for j, (path, leaf) in enumerate(zip(paths, leaves)):
            ref = leaves0[j]
            if leaf.shape != ref.shape or leaf.dtype != ref.dtype:
                fix = (
                    "make the states' modules in one dtype (module.to(dtype) before "
                    "TrainState.create)"
                    if leaf.dtype != ref.dtype
                    else "stack states of one architecture"
                )
                raise ValueError(
                    f"states[{i}] leaf '{path}' has shape {tuple(leaf.shape)} "
                    f"and dtype {leaf.dtype}; states[0] has {tuple(ref.shape)} and "
                    f"{ref.dtype}: a stacked tensor holds one shape and dtype, so {fix}."
                )
            if leaf.device != ref.device:
                raise ValueError(
                    f"states[{i}] leaf '{path}' is on {leaf.device} but states[0]'s is on "
                    f"{ref.device}; create the states on one device (TrainState.create(..., "
                    f"device=...)) to stack them."
                )
            columns[j].append(leaf)
        if not any(tx is state.tx for tx in alike):
            diff = _update_difference(i, first.tx, state, probe)
            if diff is not None:
                raise ValueError(
                    f"states[{i}] was made with another optimizer than states[0] ({diff}); a "
                    f"stacked state runs states[0]'s tx for every model, and only what the "
                    f"optimizer state holds (a number or tensor learning rate, a plateau's "
                    f"progress) stays per model. A schedule, weight decay or betas are tx's: "
                    f"train models that differ in them apart, or stack each group alike."
                )
            alike.append(state.tx)
    return _tree.tree_unflatten(treedef0, [torch.stack(col) for col in columns])


_STATIC_FIX = {
    "step": "stack states that are at the same point.",
    "epoch": "stack states that are at the same point.",
    "micro_step": "stack states that are at the same point (of an accumulation window too).",
    "ema_decay": "make every state with one ema_decay (TrainState.create(..., ema_decay=...)), "
    "or none for all.",
    "": "give the states one value before stacking, s.replace({attr}=states[0].{attr}), or "
    "make the field a tensor, a leaf that is stacked per model.",
}

_FIELD_FIX = {
    "opt_state": "the states were made with optimizers of other kinds or settings (tx); "
    "build each tx alike (the learning rates may differ)",
    "loss_scale": "one state holds an fp16 loss scale and the other none; stack states "
    "trained with the same precision",
    "grad_accum": "one state is inside a gradient accumulation window; stack states at the "
    "same micro_step",
}


def _structure_difference(i: int, paths0: list[str], paths: list[str]) -> str:
    """Names the first leaf that ``states[i]`` and ``states[0]`` do not share, and why."""
    only0, only_i = _tree.key_differences(paths0, paths)
    if only0:
        where = f"'{only0[0]}' is in states[0] but not in states[{i}]"
    elif only_i:
        where = f"'{only_i[0]}' is in states[{i}] but not in states[0]"
    else:
        where = "their leaves come in another order"
    field = (only0 or only_i or [""])[0].split(".")[0]
    fix = _FIELD_FIX.get(field, "stack states built alike")
    return f"states[{i}] differs in structure from states[0]: {where}; {fix}."


def _plateau_difference(opt_state0: Any, opt_state: Any) -> str | None:
    """The first setting in which a ``reduce_on_plateau`` of ``opt_state`` differs from
    ``opt_state0``'s (the initial learning rate aside, which each state holds), or ``None``.

    The settings are the plateau state's static part, which the probe of the updates
    cannot see (only metric observations use them)."""
    for node0, node in zip(plateau_nodes(opt_state0), plateau_nodes(opt_state)):
        for f in dataclasses.fields(node0.config):
            if f.name == "learning_rate":
                continue
            mine, theirs = getattr(node.config, f.name), getattr(node0.config, f.name)
            if not _same(mine, theirs):
                return f"{f.name}={mine!r} but states[0]'s has {f.name}={theirs!r}"
    return None


_PROBE_UPDATES = 10

COMPARE_FAILED_MSG = (
    "stack_states could not compare states[{i}]'s optimizer with states[0]'s: running "
    "them for a few updates on random gradients shaped like the parameters raised "
    "{error}. A stacked state runs states[0]'s tx for every model; if the optimizers do "
    "update alike, give every state that one (s.replace(tx=states[0].tx): one tx object "
    "is not compared), or train the models apart."
)


def _probe_scale(k: int) -> float:
    """The size of the probe's gradients at update ``k``: 1, 10, 100, 1000, 0.1, ..., so
    that clipping thresholds (by norm or value) of any usual size clip some updates and
    not others."""
    return 10.0 ** ((k + 1) % 5 - 1)


class _Probe:
    """The inputs of the optimizer probe: small stand-ins for ``params`` (the same names,
    dims and dtypes, two entries per dim, on the CPU) and ``_PROBE_UPDATES`` gradients
    for them, made once per :func:`stack_states` call; or, for an optimizer that does
    not run on those, gradients of ``params``' shapes on their device, made one update
    at a time (they may be large)."""

    def __init__(self, params: Params) -> None:
        self._params = params
        self._small: tuple[Params, list[Params]] | None = None

    def small(self) -> tuple[Params, list[Params]]:
        """``(stand-in params, [the stand-in gradients of each update])``."""
        if self._small is None:
            gen = torch.Generator().manual_seed(0)
            shapes = {name: (2,) * p.dim() for name, p in self._params.items()}
            self._small = (
                self._random(shapes, gen, small=True),
                [
                    self._random(shapes, gen, small=True, scale=_probe_scale(k))
                    for k in range(_PROBE_UPDATES)
                ],
            )
        return self._small

    def full_grads(self) -> Iterator[Params]:
        """The gradients of each update, shaped like ``params`` and on their devices."""
        gen = torch.Generator().manual_seed(0)
        shapes = {name: tuple(p.shape) for name, p in self._params.items()}
        for k in range(_PROBE_UPDATES):
            yield self._random(shapes, gen, small=False, scale=_probe_scale(k))

    def _random(
        self,
        shapes: dict[str, tuple[int, ...]],
        gen: torch.Generator,
        *,
        small: bool,
        scale: float = 1.0,
    ) -> Params:
        """Normal values of ``shapes``: one draw per dtype and device, cut into tensors,
        times ``scale`` where the dtype's range allows (not float16's)."""
        groups: dict[tuple[torch.dtype, torch.device], list[str]] = {}
        for name, p in self._params.items():
            device = torch.device("cpu") if small else p.device
            groups.setdefault((p.dtype, device), []).append(name)
        out: dict[str, torch.Tensor] = {}
        for (dtype, device), names in groups.items():
            sizes = [math.prod(shapes[name]) for name in names]
            values = torch.randn(sum(sizes), generator=gen, dtype=dtype)
            if scale != 1.0 and dtype.is_floating_point and torch.finfo(dtype).max > 1e30:
                values = values * scale
            values = values.to(device)
            for name, part in zip(names, values.split(sizes)):
                out[name] = part.view(shapes[name])
        return {name: out[name] for name in self._params}


def _update_difference(i: int, tx0: Any, state: TrainState, probe: _Probe) -> str | None:
    """How ``tx0`` (``states[0]``'s optimizer) would update ``state`` otherwise than its
    own ``tx`` does, or ``None`` where they agree.

    Both run ``_PROBE_UPDATES`` updates from ``state``'s optimizer state on the same
    random gradients, which tells schedules, weight decay or betas apart, not the rates
    kept in the state. They run on small stand-ins for the parameters, whose optimizer
    state is made by ``tx.init`` and given ``state``'s 0-d entries (update counts, rates:
    the next updates are compared, from where the states are); an optimizer that fails
    on those (one holding tensors shaped like the parameters) runs on the parameters
    and ``state``'s own optimizer state instead, and one that fails there too is a
    ``ValueError``.
    """
    try:
        params, grads = probe.small()
        opt_state = _with_scalars(state.tx.init(params), state.opt_state)
        return _run_probe(tx0, state.tx, opt_state, params, grads)
    except Exception:
        pass
    try:
        return _run_probe(tx0, state.tx, state.opt_state, state.params, probe.full_grads())
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
        raise ValueError(COMPARE_FAILED_MSG.format(i=i, error=error)) from e


def _with_scalars(opt_state: Any, like: Any) -> Any:
    """``opt_state`` with its 0-d tensors (update counts, learning rates) replaced by
    those of ``like``, an optimizer state of the same structure for other shapes."""
    leaves, treedef = _tree.tree_flatten(opt_state)
    leaves_like, treedef_like = _tree.tree_flatten(like)
    if treedef != treedef_like:
        return opt_state
    return _tree.tree_unflatten(
        treedef,
        [
            theirs.to(device=mine.device, dtype=mine.dtype)
            if isinstance(mine, torch.Tensor)
            and isinstance(theirs, torch.Tensor)
            and mine.dim() == 0
            and theirs.dim() == 0
            else mine
            for mine, theirs in zip(leaves, leaves_like)
        ],
    )


def _run_probe(
    tx0: Any, tx: Any, opt_state: Any, params: Params, grads: Iterable[Params]
) -> str | None:
    """Runs ``tx0`` and ``tx`` from ``opt_state`` on ``grads``; their first difference."""
    state0 = state = opt_state
    for k, g in enumerate(grads, start=1):
        updates0, state0 = tx0.update(g, state0, params)
        updates, state = tx.update(g, state, params)
        if not _equal_trees((updates0, state0), (updates, state)):
            rates0, rates = learning_rates(state0), learning_rates(state)
            for r0, r in zip(rates0, rates):
                if not torch.equal(r0, r):
                    return (
                        f"after {k} update{'s' if k > 1 else ''} its learning rate is "
                        f"{float(r):.4g}, states[0]'s optimizer would make it {float(r0):.4g}"
                    )
            return f"its update {k} differs from the one states[0]'s optimizer makes"
    return None


def _equal_trees(a: Any, b: Any) -> bool:
    """Whether two trees have equal leaves: tensors of the same dtypes, shapes and values
    (compared in one ``torch.equal`` per dtype, device and shape), and equal others."""
    leaves_a, leaves_b = _tree.tree_leaves(a), _tree.tree_leaves(b)
    if len(leaves_a) != len(leaves_b):
        return False
    groups: dict[tuple[Any, ...], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for x, y in zip(leaves_a, leaves_b):
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            kind = (x.dtype, x.device, x.shape)
            if kind != (y.dtype, y.device, y.shape):
                return False
            xs, ys = groups.setdefault(kind, ([], []))
            xs.append(x)
            ys.append(y)
        elif isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor) or not _same(x, y):
            return False
    return all(torch.equal(torch.stack(xs), torch.stack(ys)) for xs, ys in groups.values())


def _same(a: Any, b: Any) -> bool:
    """Whether two static values are equal (values that cannot be compared are not); a
    NaN equals a NaN (a history's, as two loads of one checkpoint hold them)."""
    if a is b:
        return True
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, tuple | list) and type(a) is type(b):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except Exception:
        return False


def _check_tensors(i: int, paths: list[str], leaves: list[Any]) -> None:
    """Raises ``TypeError`` naming the first leaf of ``states[i]`` that is no tensor."""
    for path, leaf in zip(paths, leaves):
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"stack_states stacks tensors, but states[{i}]'s leaf '{path}' is a "
                f"{type(leaf).__name__}: hold it in a tensor, or declare the field "
                f"dataclasses.field(metadata={{'static': True}}) to keep it as it is."
            )


# Classes too: a module may keep the class of the activation it makes in forward.
_PLAIN = (bool, int, float, str, type(None), enum.Enum, torch.dtype, torch.device, type)
_IGNORED = {"training", "inplace"}  # the mode fit sets; a memory choice, not the math
# The module's weights and submodules: compared as the state's tensors and module by module.
_OWN = {"_parameters", "_buffers", "_modules"}
_HOOKS = {
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
}
# Which of those hooks were registered with an option: keyed by the hooks' handle ids,
# which differ between identical models; compared as flags of the hooks in order.
_HOOK_OPTIONS = {
    "_forward_hooks_with_kwargs": "_forward_hooks",
    "_forward_hooks_always_called": "_forward_hooks",
    "_forward_pre_hooks_with_kwargs": "_forward_pre_hooks",
}


class _TensorSetting:
    """A tensor kept outside the parameters and buffers (an unregistered ``self.scale =
    torch.tensor(2.0)``, or one a closure captures), compared by dtype, shape, device and
    values (NaN equal to NaN); on the ``meta`` device, which holds no values, by the
    first three."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _TensorSetting):
            return NotImplemented
        a, b = self.tensor, other.tensor
        if (a.dtype, a.shape, a.device) != (b.dtype, b.shape, b.device):
            return False
        if a.is_meta:
            return True
        try:
            with torch.no_grad():
                if a.layout != torch.strided:  # sparse: by the values they stand for
                    a, b = a.to_dense(), b.to_dense()
                return bool(((a == b) | (a.isnan() & b.isnan())).all())
        except (RuntimeError, NotImplementedError):  # a layout without these ops
            return a is b

    __hash__ = None  # type: ignore[assignment]


def _data(value: Any, depth: int = 0) -> Any:
    """Plain values and tensors, alone or in tuples, lists and dicts of them (a few
    levels deep), in a comparable form (tensors by their values); ``None`` for anything
    else."""
    if isinstance(value, _PLAIN):
        return ("value", value)
    if isinstance(value, torch.Tensor):
        return ("tensor", _TensorSetting(value))
    if depth >= 8 or not isinstance(value, tuple | list | dict):
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value)
    data = []
    for key, item in items:
        form = _data(item, depth + 1) if isinstance(key, _PLAIN) else None
        if form is None:
            return None
        data.append((key, form))
    return ("data", type(value), tuple(data))


def _class(module: torch.nn.Module) -> type:
    """The module's class (``parametrize`` subclasses each module it changes: its base)."""
    cls = type(module)
    return cls.__bases__[0] if parametrize.is_parametrized(module) else cls


def _setting(value: Any, inner: frozenset[int], seen: frozenset[int] = frozenset()) -> Any:
    """A comparable form of an attribute that may change what forward computes: plain
    values (classes included) and tensors, alone or in tuples, lists and dicts of them,
    by their values, functions by their code, callable objects and dataclass instances
    (a config) by their class and settings (and a method by its code and its object's),
    builtins by identity, a plain dict, list or tuple of functions (and plain values) item
    by item; ``None`` for what is not compared (other containers: torch's hook registries,
    an LSTM's weakrefs; other objects). ``inner``: the ids of the models' own modules, whose
    mode the steps set; ``seen``: the objects whose settings are being taken (an object
    reached again from its own settings compares as a cycle)."""
    data = _data(value)
    if data is not None:
        return data
    if type(value) in (dict, list, tuple):
        return _functions(value, inner, seen)
    if isinstance(value, types.FunctionType):
        # By its code (a lambda made per instance too) and the plain values it captures
        # or defaults to: a lambda closing over a slope is another activation per slope.
        captured = tuple(map(_captured, value.__closure__ or ()))
        defaults = tuple(map(_plain, value.__defaults__ or ()))
        kwdefaults = tuple(sorted((k, _plain(v)) for k, v in (value.__kwdefaults__ or {}).items()))
        return ("function", value.__code__, captured, defaults, kwdefaults)
    if isinstance(value, types.MethodType):
        owner, code = value.__self__, value.__func__.__code__
        if isinstance(owner, type):  # a classmethod
            return ("function", code, owner)
        if isinstance(owner, torch.nn.Module):
            # A module's method (nn.LeakyReLU(0.1).forward): the module's class and plain
            # settings (not the rest: a method of the model's own modules would lead back
            # here; their tensors and submodules are compared as the model's). The mode
            # of a module outside the models is its own: the steps do not set it.
            ignored = _IGNORED if id(owner) in inner else _IGNORED - {"training"}
            plain = [(k, v) for k, v in vars(owner).items() if isinstance(v, _PLAIN)]
            settings = tuple(
                sorted((kv for kv in plain if kv[0] not in ignored), key=lambda kv: kv[0])
            )
            return ("module method", code, _class(owner), settings)
        # A method of an object of one's own: the object's settings are the method's.
        return ("method", code, _object_setting(owner, inner, seen))
    if isinstance(value, functools.partial):
        keywords = tuple(sorted((k, _setting(v, inner, seen)) for k, v in value.keywords.items()))
        args = tuple(_setting(v, inner, seen) for v in value.args)
        return ("partial", _setting(value.func, inner, seen), args, keywords)
    if isinstance(value, torch.nn.Module):
        return None
    if callable(value) or (dataclasses.is_dataclass(value) and not isinstance(value, type)):
        return _object_setting(value, inner, seen)
    return None


_FUNCTION_TYPES = (
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
    functools.partial,
)


def _functions(value: Any, inner: frozenset[int], seen: frozenset[int]) -> Any:
    """A plain dict, list or tuple of functions and plain values (``{"act": torch.tanh}``)
    item by item, else ``None``. Only these: torch's own containers are not compared (it
    keeps hooks in OrderedDicts keyed by handle ids, which differ between identical
    models, and an LSTM keeps weak references to its weights in a list)."""
    items = value.items() if isinstance(value, dict) else enumerate(value)
    forms = []
    for key, item in items:
        if not isinstance(key, _PLAIN):
            return None
        form = _data(item)
        if form is None and isinstance(item, _FUNCTION_TYPES):
            form = _setting(item, inner, seen)
        if form is None:
            return None
        forms.append((key, form))
    return ("functions", type(value), tuple(forms))


def _object_setting(value: Any, inner: frozenset[int], seen: frozenset[int]) -> Any:
    """An object made per module (spectral_norm's hook, the owner of a bound method, a
    config) by its class and settings: its ``__dict__``, else its slots, else what it
    pickles from (``operator.itemgetter(0)``: its class and ``0``); a builtin such as
    torch.relu, and anything else, by identity."""
    settings = getattr(value, "__dict__", None)
    if settings is None:
        if isinstance(value, types.BuiltinFunctionType):
            return ("callable", id(value))
        slots = [
            name
            for klass in type(value).__mro__
            for name in vars(klass).get("__slots__", ())
            if isinstance(name, str)
        ]
        if slots:
            if id(value) in seen:
                return ("cycle", type(value))
            seen = seen | {id(value)}
            slotted = tuple((n, _setting(getattr(value, n, None), inner, seen)) for n in slots)
            return ("slots", type(value), slotted)
        try:
            made_by, args = value.__reduce__()[:2]
        except Exception:
            return ("callable", id(value))
        data = _data(args) if made_by is type(value) and isinstance(args, tuple) else None
        return ("callable", id(value)) if data is None else ("reduced", type(value), data)
    if id(value) in seen:
        return ("cycle", type(value))
    seen = seen | {id(value)}
    items = sorted((k, _setting(v, inner, seen)) for k, v in settings.items())
    return ("object", type(value), tuple(items))


def _plain(value: Any) -> Any:
    """Plain values and tensors (alone or in tuples, lists and dicts of them) by their
    values, a function by its code (not what it captures: no recursion), ``None`` for
    anything else."""
    data = _data(value)
    if data is not None:
        return data
    if isinstance(value, types.FunctionType):
        return ("function", value.__code__)
    if isinstance(value, types.BuiltinFunctionType):
        return ("callable", id(value))
    return None


def _captured(cell: Any) -> Any:
    """:func:`_plain` of what a closure cell holds (``None`` for an empty cell)."""
    try:
        return _plain(cell.cell_contents)
    except ValueError:  # a cell not yet filled
        return None


def _module_difference(a: torch.nn.Module, b: torch.nn.Module) -> str | None:
    """Where two module templates differ (a submodule's class, or a setting such as
    ``Dropout.p``, ``Conv2d.stride`` or an activation function kept as an attribute),
    or ``None``."""
    if a is b:
        return None
    subs_a, subs_b = dict(a.named_modules()), dict(b.named_modules())
    inner = frozenset(map(id, [*subs_a.values(), *subs_b.values()]))
    if list(subs_a) != list(subs_b):
        return f"submodules {list(subs_a)} and {list(subs_b)}"
    for name, ma in subs_a.items():
        mb = subs_b[name]
        where = name or "the root module"
        if _class(ma) is not _class(mb):
            kind_a, kind_b = _class(ma).__qualname__, _class(mb).__qualname__
            if kind_a == kind_b:
                kind_b += " (another class of that name: define the class once)"
            return f"{where} is a {kind_a} in one and a {kind_b} in the other"
        va_all, vb_all = vars(ma), vars(mb)
        recomputed = _recomputed(ma) | _recomputed(mb)
        keys = (va_all.keys() | vb_all.keys()) - _IGNORED - _OWN
        # Public settings first: the one the user set (GRU.hidden_size), not the
        # private state torch derives from it (GRU._flat_weights, a list of Parameters).
        for key in sorted(keys, key=lambda k: (k.startswith("_"), k)):
            if key in _HOOKS:  # what forward runs around the module (nn.Module.__init__ sets them)
                ha, hb = tuple(va_all[key].values()), tuple(vb_all[key].values())
                if [_setting(h, inner) for h in ha] != [_setting(h, inner) for h in hb]:
                    return f"{where}.{key} hold {ha!r} in one and {hb!r} in the other"
                continue
            if key in _HOOK_OPTIONS:
                hooks = _HOOK_OPTIONS[key]
                fa = [i in va_all.get(key, {}) for i in va_all.get(hooks, {})]
                fb = [i in vb_all.get(key, {}) for i in vb_all.get(hooks, {})]
                if fa != fb:
                    return f"{where}.{hooks} were registered with other options ({key})"
                continue
            va, vb = va_all.get(key), vb_all.get(key)
            if key in recomputed and isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor):
                continue
            form_a, form_b = _setting(va, inner), _setting(vb, inner)
            if form_a != form_b:
                if isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor):
                    values = "" if _describe(va) != _describe(vb) else " with other values"
                    return (
                        f"{where}.{key} is a tensor kept outside the parameters and buffers, "
                        f"{_describe(va)} in one and {_describe(vb)} in the other{values}; "
                        f"to give each model its own, register it as a buffer (in __init__, "
                        f"self.register_buffer({key!r}, tensor) in place of self.{key} = "
                        f"tensor)"
                    )
                if (
                    isinstance(va, types.FunctionType)
                    and isinstance(vb, types.FunctionType)
                    and va.__code__ is vb.__code__
                ):
                    return (
                        f"{where}.{key} is {va.__qualname__} in both, capturing or defaulting "
                        f"to {_values(va)} in one and {_values(vb)} in the other"
                    )
                owners = _owner_difference(form_a, form_b)
                return f"{where}.{key} is {va!r} in one and {vb!r} in the other{owners}"
    return None


def _recomputed(module: torch.nn.Module) -> set[str]:
    """The attributes a forward pre-hook sets from the parameters before each forward
    (the weight of ``torch.nn.utils.spectral_norm``): their values are no setting."""
    names = (getattr(hook, "name", None) for hook in module._forward_pre_hooks.values())
    return {name for name in names if isinstance(name, str)}


def _describe(t: torch.Tensor) -> str:
    """A tensor for a message: its values when few, else its dtype and shape."""
    if t.numel() <= 8 and not t.is_meta:
        return repr(t)
    where = "" if t.device.type == "cpu" else f" on {t.device}"
    return f"a {str(t.dtype).removeprefix('torch.')} tensor of shape {tuple(t.shape)}{where}"


def _owner_difference(a: Any, b: Any) -> str:
    """For two methods of modules of one class (:func:`_setting` forms), the first setting
    in which their modules differ (their ``repr`` may not show it), else ``""``."""
    if (
        not (isinstance(a, tuple) and isinstance(b, tuple))
        or a[0] != "module method"
        or a[:3] != b[:3]
    ):
        return ""
    sa, sb = dict(a[3]), dict(b[3])
    key = next(k for k in sorted(sa.keys() | sb.keys()) if sa.get(k) != sb.get(k))
    return f" (their modules' {key} is {sa.get(key)!r} in one and {sb.get(key)!r} in the other)"


def _values(fn: types.FunctionType) -> list[Any]:
    """What ``fn`` captures and defaults to that :func:`_plain` compares (for messages)."""
    values = []
    for cell in fn.__closure__ or ():
        with contextlib.suppress(ValueError):  # a cell not yet filled
            values.append(cell.cell_contents)
    values += [*(fn.__defaults__ or ()), *(fn.__kwdefaults__ or {}).values()]
    return [v for v in values if _plain(v) is not None]


def stacked_models(state: TrainState) -> int | None:
    """How many models ``state`` holds stacked, or ``None`` for a state of one model.

    A stacked state's parameters have one more leading dimension than the module's.
    """
    if not state.params:
        return None
    name, param = next(iter(state.params.items()))
    shape = state.module.get_parameter(name).shape
    if param.dim() == len(shape) + 1 and param.shape[1:] == shape:
        return int(param.shape[0])
    return None


STACKED_LOOP_FIX = (
    "Train a stacked state with fl.train_epoch and fl.validate_epoch over "
    "torch.func.vmap(train_step, in_dims=(0, None), randomness='different') "
    "(docs/guide.md, section 6), or fit each model of fl.unstack_states(state)."
)


def check_one_model(state: TrainState, what: str, fix: str) -> None:
    """Raises ``ValueError`` naming ``what`` and ``fix`` if ``state`` holds stacked models."""
    n = stacked_models(state)
    if n is not None:
        if torch.compiler.is_compiling():
            # Dynamo does not carry a raise in traced code out as this error: break first.
            torch._dynamo.graph_break()
        name, tensor = next(iter(state.params.items()))
        expected = tuple(state.module.get_parameter(name).shape)
        raise ValueError(
            f"{what} runs one model, but this state holds {n} stacked models (parameter "
            f"{name!r} has shape {tuple(tensor.shape)}; the module's is {expected}). {fix}"
        )


UNSTACK_SHAPE_MSG = (
    "unstack_states splits every tensor of a stacked state along its first dimension, "
    "one entry per model: this state holds {n} models (parameter {name!r} has shape "
    "{stacked}; the module's is {own}), but its leaf {path!r} has shape {shape}; {want}. "
    "A tensor made for one model cannot be split: fields replaced "
    "after stacking need one entry per model (torch.stack of each model's), and an "
    "optimizer state made again with tx.init(stacked.params) has 0-d counts and rates: "
    "make the per-model states and fl.stack_states them instead."
)


def unstack_states(stacked: StateT) -> list[StateT]:
    """Splits a stacked state (from :func:`stack_states` or a vmapped step) into states.

    Args:
      stacked: a state whose tensors have a leading dimension of one entry per model.

    Returns:
      One state per model, each a view of the stacked tensors (``state.clone()`` for a
      copy of its own).

    Raises:
      ValueError: ``stacked`` holds one model, or a tensor of it has not one entry per
        model (one model's shape, another leading size), so that it cannot be split.

    Example:
      >>> import torch
      >>> import fnloop as fl
      >>> states = [fl.TrainState.create(torch.nn.Linear(2, 1), tx=fl.optim.sgd(lr),
      ...                                device="cpu") for lr in (0.1, 0.2)]
      >>> [s.params["weight"].shape for s in fl.unstack_states(fl.stack_states(states))]
      [torch.Size([1, 2]), torch.Size([1, 2])]
    """
    n = stacked_models(stacked)
    if n is None:
        raise ValueError(
            "unstack_states takes a stacked state (from fl.stack_states or a vmapped step); "
            "this one holds one model (its parameters have the module's shapes), so there "
            "is nothing to split: use it as it is, or fl.stack_states the states first."
        )
    paths, leaves, treedef = _tree.tree_flatten_with_keys(stacked)
    own = _one_model_shapes(stacked)
    for path, leaf in zip(paths, leaves):
        shape = tuple(leaf.shape) if isinstance(leaf, torch.Tensor) else None
        want = own.get(path)
        if shape is None or shape[:1] != (n,) or (want is not None and shape[1:] != want):
            name, param = next(iter(stacked.params.items()))
            raise ValueError(
                UNSTACK_SHAPE_MSG.format(
                    n=n,
                    name=name,
                    stacked=tuple(param.shape),
                    own=tuple(param.shape[1:]),
                    path=path,
                    shape=shape if shape is not None else f"none (a {type(leaf).__name__})",
                    want=f"one model's is {want}, so {n} models' is {(n, *want)}"
                    if want is not None
                    else f"it needs a first dimension of size {n}",
                )
            )
    return [_tree.tree_unflatten(treedef, [leaf[i] for leaf in leaves]) for i in range(n)]


def _one_model_shapes(stacked: TrainState) -> dict[str, tuple[int, ...]]:
    """The shape each leaf of ``stacked`` has in a state of one model, by key path, where
    it is known: the tensors keyed like the module's, and the optimizer state that ``tx``
    makes for the module's parameters (found on the ``meta`` device)."""
    module = stacked.module
    template = {n: tuple(t.shape) for n, t in module.named_parameters()}
    template.update({n: tuple(t.shape) for n, t in module.named_buffers()})
    shapes = {}
    for field in ("params", "buffers", "ema", "grad_accum"):
        for name in getattr(stacked, field) or {}:
            if name in template:
                shapes[f"{field}.{name}"] = template[name]
    meta = {
        name: torch.empty(template[name], dtype=p.dtype, device="meta")
        for name, p in stacked.params.items()
        if name in template
    }
    try:
        paths, leaves, _ = _tree.tree_flatten_with_keys(stacked.tx.init(meta))
    except Exception:  # an optimizer whose init reads values: its state is not checked
        return shapes
    for path, leaf in zip(paths, leaves):
        if isinstance(leaf, torch.Tensor):
            shapes[f"opt_state.{path}"] = tuple(leaf.shape)
    return shapes
