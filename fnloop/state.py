"""``TrainState``: the whole training state as one immutable value."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import Any, TypeVar

import torch
from torch import nn
from torch.nn.modules.module import _EXTRA_STATE_KEY_SUFFIX

from fnloop import _tree
from fnloop.optim.base import GradientTransformation
from fnloop.precision import LossScaleState
from fnloop.typing import History, OptState, Params

StateT = TypeVar("StateT", bound="TrainState")
"""A ``TrainState`` or a subclass of it: functions that take one return the same class."""


class _FrozenHistory(Mapping[str, Mapping[str, tuple[float, ...]]]):
    """A read-only ``{split: {metric: (one value per epoch, ...)}}``.

    Not a dict or ``mappingproxy``: torch.compile guards on the keys and lengths of those
    when a compiled step passes the state through, and would recompile the step each
    time ``fit`` adds an epoch. An object of a plain class is passed through unread.
    """

    __slots__ = ("_splits",)
    _splits: dict[str, Mapping[str, tuple[float, ...]]]

    def __init__(self, splits: dict[str, Mapping[str, tuple[float, ...]]]) -> None:
        object.__setattr__(self, "_splits", splits)

    def __getitem__(self, split: str) -> Mapping[str, tuple[float, ...]]:
        return self._splits[split]

    def __iter__(self) -> Iterator[str]:
        return iter(self._splits)

    def __len__(self) -> int:
        return len(self._splits)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("a history is read-only; make a new one with append_history")

    def __repr__(self) -> str:
        return repr({split: dict(metrics) for split, metrics in self._splits.items()})

    def __reduce__(self) -> tuple[Any, ...]:
        plain = {split: dict(metrics) for split, metrics in self._splits.items()}
        return (freeze_history, (plain,))


_EMPTY_HISTORY: History = _FrozenHistory({})


def freeze_history(history: Mapping[str, Mapping[str, Any]]) -> History:
    """Returns an immutable copy of ``{"train": {"loss": [...]}, ...}``.

    >>> h = freeze_history({"train": {"loss": [0.5, 0.25]}})
    >>> h["train"]["loss"]
    (0.5, 0.25)
    >>> h
    {'train': {'loss': (0.5, 0.25)}}
    """
    return _FrozenHistory(
        {
            split: MappingProxyType({k: tuple(float(v) for v in vs) for k, vs in metrics.items()})
            for split, metrics in history.items()
        }
    )


def append_history(history: History, split: str, metrics: Mapping[str, float]) -> History:
    """A new history with one more epoch of ``metrics`` under ``split``.

    >>> h = append_history(freeze_history({}), "train", {"loss": 1.0})
    >>> append_history(h, "train", {"loss": 0.5})["train"]["loss"]
    (1.0, 0.5)
    """
    merged = {s: dict(m) for s, m in history.items()}
    split_metrics = merged.setdefault(split, {})
    for key, value in metrics.items():
        split_metrics[key] = (*split_metrics.get(key, ()), float(value))
    return freeze_history(merged)


def history_growth(before: History, after: History) -> dict[str, tuple[float, ...]]:
    """The values appended to ``after`` since ``before``, as ``{"<split>/<name>": values}``.

    >>> h = append_history(freeze_history({}), "train", {"loss": 1.0})
    >>> history_growth(h, append_history(h, "valid", {"r2": 0.5}))
    {'valid/r2': (0.5,)}
    """
    grown = {}
    for split, metrics in after.items():
        for name, values in metrics.items():
            n = len(before.get(split, {}).get(name, ()))
            if len(values) > n:
                grown[f"{split}/{name}"] = values[n:]
    return grown


def history_added(before: History, after: History) -> dict[str, float]:
    """The epoch metrics appended to ``after`` since ``before``: the keys that got one
    value (a series appended per batch is not an epoch metric).

    >>> h = append_history(freeze_history({}), "train", {"loss": 1.0})
    >>> history_added(h, append_history(h, "valid", {"r2": 0.5}))
    {'valid/r2': 0.5}
    """
    return {k: v[0] for k, v in history_growth(before, after).items() if len(v) == 1}


def with_runtime_fields(
    like: StateT, leaves: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]
) -> StateT:
    """``like`` with the fields a step creates as it runs shaped as in another state
    whose leaves (by key path, ``"grad_accum.w"``) have the dtypes and shapes ``leaves``
    (a stacked state's fp16 loss scale holds one value per model).

    The fp16 loss scale appears at the first fp16 step and the accumulated gradients
    while an accumulation window is open, so a freshly made state lacks what the state
    of a running job holds (and the other way round). Values are left uninitialized:
    they are for a checkpoint or a broadcast to fill.
    """
    has_scale = any(k.startswith("loss_scale.") for k in leaves)
    has_accum = any(k.startswith("grad_accum.") for k in leaves)
    loss_scale = like.loss_scale
    if has_scale and loss_scale is None:
        loss_scale = LossScaleState(
            *(
                torch.empty(shape, dtype=dtype, device=like.device)
                for dtype, shape in (
                    leaves.get(f"loss_scale.{f}", (None, ())) for f in LossScaleState._fields
                )
            )
        )
    grad_accum = like.grad_accum
    if has_accum and grad_accum is None:
        grad_accum = {n: torch.empty_like(p) for n, p in like.params.items()}
    return like.replace(
        loss_scale=loss_scale if has_scale else None,
        grad_accum=grad_accum if has_accum else None,
    )


def _meta_template(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters and buffers live on the ``meta`` device.

    Nothing is copied but the Python objects: the template holds no weights.
    """
    memo: dict[int, Any] = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    try:
        template = copy.deepcopy(module, memo)
    except Exception as e:
        raise TypeError(
            f"fnloop keeps a copy of {type(module).__name__} (with weights on the meta "
            f"device), and copy.deepcopy of it failed: {e}. Modules that compute a weight "
            f"outside their parameters cannot be copied: make pruning permanent "
            f"(torch.nn.utils.prune.remove) and use torch.nn.utils.parametrizations."
            f"weight_norm instead of torch.nn.utils.weight_norm."
        ) from e
    # Made now, outside any torch.compile'd step: a step traced on a template without its
    # copy would have to copy the module inside the trace (a graph break).
    in_mode(template, training=True)
    in_mode(template, training=False)
    return template


_MODE_COPIES = "_fnloop_mode_copies"


def in_mode(module: nn.Module, *, training: bool, refresh: bool = False) -> nn.Module:
    """A copy of ``module`` after its ``train(training)``.

    The module's own ``train`` runs, so an override that keeps a part in eval mode (a
    frozen backbone's BatchNorm) is honoured, as in a loop that calls ``model.train()``.
    The copy is kept in ``module.__dict__``, not as a submodule, so later calls return
    the same object; on a state's template, whose weights live on the ``meta`` device,
    it copies no weights. ``refresh=True`` copies the module again (eager steps do on
    their first call, so hooks or attributes set on the template since it was made are
    in the copy; compiled steps use the kept copy, since a copy inside a trace is a graph
    break). Train steps use the ``training=True`` module, evaluation steps the other.
    """
    copies: dict[bool, nn.Module] = module.__dict__.get(_MODE_COPIES, {})
    if refresh or training not in copies:
        # The memo gives the copy an empty cache of its own (not a copy of this one).
        twin = copy.deepcopy(module, {id(copies): {}})
        twin.train(training)  # overrides need not return self
        module.__dict__[_MODE_COPIES] = {**copies, training: twin}
        return twin
    return copies[training]


_DONATED = "_fnloop_donated"
MAKE_STATE_HINT = "Make one from the module: fl.TrainState.create(module, tx=optim.adamw(1e-3))."
DONATED_MSG = (
    "this TrainState was donated to an earlier call of a train step made with donate=True: "
    "its tensors now hold a later state, so {what} would use the wrong values. Pass the "
    "state that call returned (or make the step without donate=True to keep every state "
    "intact). fit trains with a donating step: a callback that keeps a state from an event "
    "for later should keep state.clone()."
)


def mark_donated(consumed: Params, params: Params) -> Params:
    """A donating step took the parameters ``consumed`` and wrote ``params`` into their
    storage: marks ``consumed``'s first tensor object, so that every later use of the state
    that held it fails (:func:`check_not_donated`), and returns ``params`` with a new tensor
    object (an alias) for its first entry, so that the new state is not taken for the
    consumed one. The mark lives on the tensor object: it goes with the consumed state."""
    first = next(iter(consumed.values()))  # a state has parameters (create requires them)
    setattr(first, _DONATED, True)
    name, new_first = next(iter(params.items()))
    return {**params, name: new_first.detach()}


def donated(state: TrainState) -> bool:
    """Whether a donating train step consumed ``state`` (eager mode: a compiled one leaves
    no mark)."""
    first = next(iter(state.params.values()), None)
    return bool(getattr(first, _DONATED, False))


def check_not_donated(state: TrainState, what: str) -> None:
    """Raises ``RuntimeError`` if a donating train step consumed ``state`` (eager mode)."""
    if torch.compiler.is_compiling():
        return
    if donated(state):
        raise RuntimeError(DONATED_MSG.format(what=what))


def check_ema(state: TrainState) -> None:
    """Raises ``ValueError`` when ``ema`` and ``ema_decay`` disagree (one set by
    ``replace`` without the other) or ``ema_decay`` lies outside ``[0, 1)``."""
    decay = state.ema_decay
    if (state.ema is None) == (decay is None) and (decay is None or 0.0 <= decay < 1.0):
        return
    if state.ema is None:
        raise ValueError(
            f"this TrainState has ema_decay={decay} but no EMA weights (state.ema is None): "
            f"replace(ema_decay=...) does not make them. Start them from the current "
            f"weights: state.replace(ema_decay={decay}, ema={{n: p.clone() for n, p in "
            f"state.params.items()}}), or use TrainState.create(..., ema_decay=...)."
        )
    if decay is None:
        raise ValueError(
            "this TrainState holds EMA weights but has ema_decay=None: they would no longer "
            "be updated while evaluation still used them. To stop keeping an EMA, drop the "
            "weights too: state.replace(ema_decay=None, ema=None)."
        )
    raise ValueError(f"ema_decay must be in [0, 1); got {decay}.")


def _unknown_fields(cls: type, unknown: Iterable[str], fields: Iterable[str]) -> str:
    return f"{cls.__name__} has no fields {sorted(unknown)}; fields: {sorted(fields)}"


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class TrainState:
    """The whole training state: weights, optimizer state, counters and history.

    A ``TrainState`` is immutable and a pytree (for optree in the ``"fnloop"`` namespace
    and for ``torch.utils._pytree``). Its tensors are the leaves; the module template,
    the optimizer, the counters and the history are static context.

    States (of subclasses too) compare and hash by identity, as ``nn.Module`` does; compare
    their tensors with ``torch.equal``: ``all(torch.equal(p, b.params[n]) for n, p in
    a.params.items())`` for the parameters. A subclass that defines ``__eq__`` keeps it,
    and its own subclasses inherit it (their dataclass decorator does not replace it).

    Attributes:
      params: trainable tensors, keyed like ``module.named_parameters()``.
      buffers: buffers (e.g. BatchNorm statistics), keyed like ``module.named_buffers()``,
        and frozen parameters (``requires_grad=False``), which are never updated.
      opt_state: the optimizer state made by ``tx.init(params)``.
      ema: exponential moving average of ``params``, or ``None`` without ``ema_decay``.
      loss_scale: dynamic loss-scale state for fp16 training, or ``None``.
      grad_accum: gradients summed over the micro-batches of an accumulation window.
      skipped_steps: number of updates skipped (a non-finite loss or gradient under
        ``on_nonfinite="skip"``, an fp16 loss-scale overflow), a 0-d tensor.
      step: optimizer updates so far (``global_step`` in an object-oriented trainer).
      epoch: completed epochs (``global_epoch``).
      micro_step: micro-batches seen in the current accumulation window.
      history: ``{"train": {"loss": (one value per epoch, ...)}, "valid": {...}}``.
      module: the module template (weights on the ``meta`` device).
      tx: the optimizer, a :class:`fnloop.optim.GradientTransformation`.
      ema_decay: the EMA decay, or ``None``.

    Example:
      >>> import torch
      >>> from fnloop import TrainState, optim
      >>> state = TrainState.create(torch.nn.Linear(2, 1), tx=optim.sgd(0.1), device="cpu")
      >>> sorted(state.params), state.step, state.epoch
      (['bias', 'weight'], 0, 0)
      >>> state.replace(epoch=3).epoch, state.epoch
      (3, 0)
    """

    params: Params
    buffers: Params
    opt_state: OptState
    ema: Params | None = None
    loss_scale: LossScaleState | None = None
    grad_accum: Params | None = None
    skipped_steps: torch.Tensor
    step: int = 0
    epoch: int = 0
    micro_step: int = 0
    history: History = dataclasses.field(default_factory=lambda: _EMPTY_HISTORY)
    module: nn.Module
    tx: GradientTransformation
    ema_decay: float | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # A subclass is a pytree too: its own fields are leaves unless declared
        # dataclasses.field(metadata={"static": True}) (read at its first flatten, after
        # the dataclass decorator has run).
        super().__init_subclass__(**kwargs)
        _tree.register_dataclass(cls, static=_STATIC)
        # The comparison it inherits (TrainState's: by identity; a parent subclass's own),
        # set in its namespace before the dataclass decorator runs, which then keeps it
        # (its field-by-field __eq__ would raise on the tensors).
        if "__eq__" not in vars(cls) and "__hash__" not in vars(cls):
            cls.__eq__ = cls.__eq__  # type: ignore[method-assign]
            cls.__hash__ = cls.__hash__  # type: ignore[method-assign]

    @classmethod
    def create(
        cls: type[StateT],
        module: nn.Module,
        *,
        tx: GradientTransformation,
        ema_decay: float | None = None,
        device: str | torch.device | None = None,
        **fields: Any,
    ) -> StateT:
        """Builds the initial state of training ``module`` with the optimizer ``tx``.

        The module itself is not changed. Its parameters and buffers are moved to
        ``device`` (no copy is made when they are already there) and detached; the state
        keeps a template of the module whose weights live on the ``meta`` device, so no
        second copy of the weights is held.

        Args:
          module: any ``nn.Module``.
          tx: the optimizer, e.g. ``optim.adamw(1e-3)``.
          ema_decay: keep an exponential moving average of the parameters with this
            decay (e.g. ``0.999``); evaluation steps then use the average.
          device: where the state lives; ``None`` picks ``cuda`` when available, else
            ``cpu``.
          **fields: the fields a subclass of ``TrainState`` adds (``MyState.create(module,
            tx=tx, best=torch.tensor(0.0))``), given as they are.

        Returns:
          A state with ``step == epoch == 0`` and an empty history.

        Raises:
          TypeError: ``module`` is not an ``nn.Module``, ``tx`` is not a
            ``GradientTransformation``, or ``fields`` names a field that ``create`` sets
            or that the class does not have.
          ValueError: ``ema_decay`` is outside ``[0, 1)``, a parameter is not initialized
            yet (a Lazy module before its first forward pass) or has a gradient hook
            (which steps cannot run), or ``module`` has no parameter to train.
        """
        if not isinstance(module, nn.Module):
            raise TypeError(
                f"TrainState.create needs an nn.Module as its first argument; got "
                f"{type(module).__name__}. Pass the model you want to train."
            )
        if not isinstance(tx, GradientTransformation):
            raise TypeError(
                f"tx must be an fnloop.optim.GradientTransformation such as "
                f"optim.adamw(1e-3); got {type(tx).__name__}. torch.optim optimizers are "
                f"not accepted: use their fnloop.optim twin."
            )
        if ema_decay is not None and not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1); got {ema_decay}.")
        own = {f.name for f in dataclasses.fields(cls)}.difference(_FIELD_NAMES)
        wrong = sorted(fields.keys() - own)
        if wrong:
            raise TypeError(
                f"{cls.__name__}.create takes the fields a subclass adds ({sorted(own)}) as "
                f"keywords; got {wrong}. Set TrainState's own fields afterwards with "
                f"state.replace(...)."
            )
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dev = torch.device(device)
        named = dict(module.named_parameters())
        lazy = [n for n, p in named.items() if nn.parameter.is_lazy(p)]
        if lazy:
            raise ValueError(
                f"parameter {lazy[0]!r} is not initialized yet (a Lazy module): run one "
                f"forward pass on a batch, module(x), before TrainState.create."
            )
        hooked = [
            n
            for n, p in named.items()
            if p._backward_hooks or getattr(p, "_post_accumulate_grad_hooks", None)
        ]
        if hooked:
            raise ValueError(
                f"parameter {hooked[0]!r} has a gradient hook (register_hook), which fnloop "
                f"cannot run: steps differentiate the state's tensors, not the module's "
                f"parameters. Shape the gradient in training_step (e.g. scale or mask the "
                f"loss's inputs) or with an optimizer transform (optim.partition, "
                f"optim.clip)."
            )
        params = {n: p.detach().to(dev) for n, p in named.items() if p.requires_grad}
        # Frozen parameters (requires_grad=False) are held like buffers: used by the
        # forward pass, never differentiated or updated, and no optimizer state.
        buffers = {n: p.detach().to(dev) for n, p in named.items() if not p.requires_grad}
        buffers.update({n: b.detach().to(dev) for n, b in module.named_buffers()})
        if not params:
            raise ValueError(
                f"{type(module).__name__} has no parameters to train"
                + (
                    f": all {len(named)} have requires_grad=False. Unfreeze the ones to train."
                    if named
                    else "; check that its layers are registered as submodules "
                    "(nn.ModuleList, not a Python list)."
                )
            )
        ema = {n: p.clone() for n, p in params.items()} if ema_decay is not None else None
        return cls(
            params=params,
            buffers=buffers,
            opt_state=tx.init(params),
            ema=ema,
            skipped_steps=torch.zeros((), dtype=torch.int64, device=dev),
            module=_meta_template(module),
            tx=tx,
            ema_decay=ema_decay,
            **fields,
        )

    def replace(self: StateT, **changes: Any) -> StateT:
        """A new state with ``changes`` applied; this one is untouched."""
        names = (
            _FIELD_NAMES
            if type(self) is TrainState
            else tuple(f.name for f in dataclasses.fields(self))
        )
        missing = [name for name in changes if name not in names]
        if missing:
            raise TypeError(_unknown_fields(type(self), missing, names))
        # Past __init__ (a step calls this once per step: 3x faster than dataclasses.replace).
        new = object.__new__(type(self))
        if torch.compiler.is_compiling() or hasattr(type(self), "__slots__"):
            # Field by field: torch 2.11's dynamo cannot trace __dict__.update (the history
            # is passed through unread: see _FrozenHistory), and a subclass made with
            # dataclass(slots=True) holds its fields in slots, not in __dict__.
            for name in names:
                object.__setattr__(
                    new, name, changes[name] if name in changes else getattr(self, name)
                )
            return new
        if type(self) is TrainState:
            new.__dict__.update(self.__dict__, **changes)
        else:  # the fields alone: not what a subclass's cached_property kept of this one
            new.__dict__.update({n: v for n, v in self.__dict__.items() if n in names}, **changes)
        return new

    def clone(self: StateT) -> StateT:
        """A copy whose tensors share no memory with this state's, laid out for speed.

        Each dict of two or more tensors of one dtype and device (the params, the
        buffers, the EMA, each optimizer buffer such as Adam's moments) is copied back to
        back into one buffer, so that the ``foreach`` optimizer step of a donating
        training step (``sgd``/``adam``/``adamw`` where torch's fused kernels do not run,
        such as on devices other than CPU and CUDA) updates it as one tensor instead of
        one small tensor at a time; channels-last tensors keep their layout. ``fit`` makes
        this copy once before it donates; use it before a donating custom loop too, so
        that the step does not write into the module's own tensors.

        Example:
          >>> import torch
          >>> from fnloop import TrainState, optim
          >>> state = TrainState.create(torch.nn.Linear(3, 2), tx=optim.sgd(0.1), device="cpu")
          >>> copy = state.clone()
          >>> w, b = copy.params["weight"], copy.params["bias"]
          >>> b.data_ptr() == w.data_ptr() + w.numel() * w.element_size()
          True
          >>> original = state.params["weight"]
          >>> torch.equal(w, original), w.data_ptr() == original.data_ptr()
          (True, False)
        """
        check_not_donated(self, "clone()")
        return _tree.tree_map(_clone_group, self, is_leaf=_is_group)

    @property
    def device(self) -> torch.device:
        """The device of the parameters.

        Raises:
          ValueError: ``params`` is empty (a state made with ``replace`` or the
            constructor; ``create`` refuses a module with nothing to train).
        """
        first = next(iter(self.params.values()), None)
        if first is None:
            raise ValueError(NO_PARAMS_MSG)
        return first.device

    def __repr__(self) -> str:
        """A one-line summary; the tensors themselves are in ``params``, ``opt_state``, ...

        >>> from fnloop import optim
        >>> TrainState.create(torch.nn.Linear(3, 2), tx=optim.sgd(0.1), device="cpu")
        TrainState(Linear, step=0, epoch=0, params: 2 tensors, 8 values, torch.float32 on cpu)
        """
        from fnloop.ensemble import stacked_models  # (ensemble imports this module)

        models = stacked_models(self)
        values = sum(t.numel() for t in self.params.values()) // (models or 1)
        each = f" each, {models} stacked models" if models is not None else ""
        first = next(iter(self.params.values()), None)
        where = f", {first.dtype} on {first.device}" if first is not None else ""
        extras = [
            f"buffers: {len(self.buffers)}" if self.buffers else "",
            f"ema_decay={self.ema_decay}" if self.ema is not None else "",
            "fp16 loss scale" if self.loss_scale is not None else "",
            f"micro_step={self.micro_step}" if self.micro_step else "",
            f"history: {', '.join(self.history)}" if self.history else "",
        ]
        tail = "".join(f", {e}" for e in extras if e)
        return (
            f"TrainState({type(self.module).__name__}, step={self.step}, epoch={self.epoch}, "
            f"params: {len(self.params)} tensors, {values:,} values{each}{where}{tail})"
        )

    def state_dict(self, *, use_ema: bool = False) -> dict[str, Any]:
        """Parameters and buffers as a ``state_dict`` for ``module.load_state_dict``.

        Keyed as ``module.state_dict()`` keys them, extra state included: a submodule's
        ``get_extra_state()`` value (its ``"<name>._extra_state"`` entry) is the
        template's, as the module had it when the state was made (steps do not change it).

        Args:
          use_ema: export the EMA weights instead of the raw parameters.

        Raises:
          ValueError: the state holds stacked models (from :func:`fnloop.stack_states`):
            export one, ``fl.unstack_states(state)[i].state_dict()``.
          RuntimeError: the state was donated to a train step made with ``donate=True``.
        """
        check_not_donated(self, "state_dict()")
        from fnloop.ensemble import stacked_models  # (ensemble imports this module)

        models = stacked_models(self)
        if models is not None:
            name, param = next(iter(self.params.items()))
            raise ValueError(
                STACKED_STATE_DICT_MSG.format(
                    n=models,
                    name=name,
                    stacked=tuple(param.shape),
                    own=tuple(param.shape[1:]),
                    args="use_ema=True" if use_ema else "",
                )
            )
        params = self.ema if use_ema and self.ema is not None else self.params
        tensors = {**params, **self.buffers}
        # Tied weights appear once in named_parameters() but under every name in
        # state_dict(): map each template tensor back to the name the state keeps it under.
        canonical = {id(t): n for n, t in self.module.named_parameters()}
        canonical.update({id(t): n for n, t in self.module.named_buffers()})
        out = {}
        for name, t in self.module.state_dict(keep_vars=True).items():
            source = canonical.get(id(t), name)
            if source in tensors:
                out[name] = tensors[source]
            elif name.rpartition(".")[2] == _EXTRA_STATE_KEY_SUFFIX:
                out[name] = t
        return out


def _is_group(node: Any) -> bool:
    """A dict that :func:`_clone_group` lays out in one buffer: two or more tensors (one
    gains nothing) of one dtype on one device (what one buffer holds)."""
    return (
        type(node) is dict
        and len(node) > 1
        and all(isinstance(t, torch.Tensor) for t in node.values())
        and len({(t.dtype, t.device) for t in node.values()}) == 1
    )


def _clone_group(node: Any) -> Any:
    """A copy of a tensor, or of a group of same-dtype tensors laid out in one buffer (so
    that a ``foreach`` step updates it as one tensor; the step's own per-step copies,
    ``step._copy_group``, are one tensor each, which costs less to make)."""
    if isinstance(node, torch.Tensor):
        return node.clone()
    if type(node) is not dict:  # a subclass's non-tensor leaf (a float): immutable, kept
        return node
    first = next(iter(node.values()))
    buffer = torch.empty(
        sum(t.numel() for t in node.values()), dtype=first.dtype, device=first.device
    )
    out, offset = {}, 0
    for name, t in node.items():
        part = buffer[offset : offset + t.numel()]
        strides = _channels_last_strides(t)
        view = part.view(t.shape) if strides is None else part.as_strided(t.shape, strides)
        out[name] = view.copy_(t)
        offset += t.numel()
    return out


def _channels_last_strides(t: torch.Tensor) -> tuple[int, ...] | None:
    """``t``'s strides if it is laid out channels-last (kept by the copy), else ``None``."""
    if t.is_contiguous():
        return None
    for dim, memory_format in ((4, torch.channels_last), (5, torch.channels_last_3d)):
        if t.dim() == dim and t.is_contiguous(memory_format=memory_format):
            return t.stride()
    return None


NO_PARAMS_MSG = (
    "This TrainState has no parameters (state.params is empty), so it has no device and "
    "nothing to train. Keep at least one trainable tensor in params (check the filter of "
    "a state.replace(params=...)), or make the state with TrainState.create(module, ...)."
)

STACKED_STATE_DICT_MSG = (
    "state_dict() exports one model's weights for module.load_state_dict, but this state "
    "holds {n} stacked models (parameter {name!r} has shape {stacked}; the module's is "
    "{own}), so every tensor would keep the extra leading dimension. Export one model's: "
    "fl.unstack_states(state)[i].state_dict({args}); or keep them all with "
    "fl.save_checkpoint."
)

_STATIC = ("step", "epoch", "micro_step", "history", "module", "tx", "ema_decay")
_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(TrainState))

_tree.register_dataclass(TrainState, static=_STATIC)
