"""Pure training and evaluation steps: ``(state, batch) -> (new_state, metrics)``.

The user writes ``training_step(model, batch) -> {"loss": loss, ...}``; the functions
here turn it into steps that compute gradients, apply the optimizer, keep the EMA and the
loss scale, and never change their inputs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import numbers
import os
import traceback
import uuid
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal, Protocol, TypeAlias, TypeVar, cast

import torch
from torch import nn
from torch._C import _functorch
from torch._C._functorch import TransformType
from torch._functorch.pyfunctorch import retrieve_current_functorch_interpreter
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.stateless import _reparametrize_module

from fnloop import _tree
from fnloop.batch import to_device
from fnloop.distributed import VMAP_MSG, mean_grads_and_buffers, true_everywhere, world_size
from fnloop.ensemble import check_one_model
from fnloop.optim import _foreach
from fnloop.optim.base import apply_updates, scalar_dtype
from fnloop.precision import (
    DynamicLossScale,
    LossScaleState,
    Precision,
    autocast,
    check_precision,
    warn_if_no_effect,
)
from fnloop.state import (
    MAKE_STATE_HINT,
    StateT,
    TrainState,
    check_ema,
    check_not_donated,
    in_mode,
    mark_donated,
)
from fnloop.typing import Batch, Metrics, Params

StepFn = Callable[["BoundModel", Batch], Mapping[str, Any]]
NonFinitePolicy = Literal["skip", "raise"] | None

NO_LOSS_MSG = (
    "{name} must return a mapping with a 'loss' entry; got {got}. "
    "Return {{'loss': loss, ...}} (other entries are logged as metrics)."
)
LOSS_SHAPE_MSG = (
    "the 'loss' returned by {name} must be a scalar (a tensor with one element); got "
    "shape {shape}. Reduce it, e.g. loss.mean()."
)
LOSS_GRAD_MSG = (
    "the 'loss' returned by {name} does not depend on any parameter (requires_grad is "
    "False). Compute it from model(...) and do not detach it or wrap it in torch.no_grad()."
)
SWAPPED_MSG = (
    "a BoundModel (the `model` argument of a step function) cannot be unpacked or "
    "indexed. Step functions are called as fn(model, batch), in that order: check the "
    "order of your function's arguments, and call model(x) to run the module."
)
WRAPPER_HINT = (
    "A function of (state, batch) that calls this step was taken for your function of "
    "(model, batch) and got its `model`: fnloop runs a wrapper of a made step as a step "
    "only when it keeps the step in __wrapped__. Decorate it with @functools.wraps(step)."
)
NOT_BOUND_MSG = (
    "the loss returned by {name} does not depend on the state's parameters: every "
    "gradient is missing. Compute it from the `model` argument (model(x)), which runs "
    "the module with the state's weights, not from your own module object."
)
NOT_CALLED_MSG = (
    "the loss returned by {name} does not depend on the state's parameters: {name} never "
    "called its `model` argument. A training step must compute its loss from the `model` "
    "it is given, model(x), which runs the module with the state's weights, not from your "
    "own module object (such as the one passed to TrainState.create, whose weights the "
    "step does not train)."
)
TRANSFORM_MSG = (
    "a train step cannot be differentiated (torch.func.grad, jacrev or jvp of a step): "
    "its optimizer updates write in place, so the derivative would be wrong. Of the "
    "torch.func transforms, train steps support vmap (many models or batches at once)."
)
METRIC_MSG = (
    "metric {key!r} returned by {name} must be a tensor or a number; got {kind}. "
    "Return values such as acc.float().mean() or 1.0."
)
INPLACE_MSG = (
    "the optimizer wrote in place into an optimizer-state tensor that is not keyed by "
    "parameter names (such as an update count or a learning rate), which would change "
    "the input state of a pure train step. A transform's update_ may write only into the "
    "updates and into state tensors keyed like the parameters; return new tensors for "
    "the others (count = state.count + 1, not state.count.add_(1))."
)
GRAD_NORM_CLASH_MSG = (
    "{name} returned a 'grad_norm' entry, and make_train_step(grad_norm=True) reports the "
    "gradient norm under that name. Rename your entry, or drop grad_norm=True."
)
SPARSE_MSG = (
    "the gradient of {name!r} is {layout} (nn.Embedding(sparse=True) or "
    "EmbeddingBag(sparse=True)); fnloop's optimizers take dense gradients. Build the "
    "module with sparse=False."
)
OPT_STATE_MSG = (
    "state.opt_state was not made by state.tx ({diff}; the first tree is state.opt_state, "
    "the second state.tx.init(state.params)): was tx replaced by another optimizer? Make "
    "its state too, state.replace(tx=new_tx, opt_state=new_tx.init(state.params)) (the "
    "optimizer starts afresh); to change only the learning rate, keep tx and use "
    "optim.with_learning_rates."
)
RAISE_VMAP_MSG = (
    "on_nonfinite='raise' reads the loss on the host, which torch.func.vmap cannot do. "
    "Make the step with on_nonfinite='skip' (per model, no host sync) to train stacked "
    "states."
)
TRAIN_STACKED_FIX = (
    'Run it under torch.func.vmap(train_step, in_dims=(0, None), randomness="different"), '
    "or pass one of fl.unstack_states(state)."
)
EVAL_STACKED_FIX = (
    "Run it under torch.func.vmap(eval_step, in_dims=(0, None)), or pass one of "
    "fl.unstack_states(state)."
)


WINDOW_MSG = (
    "{name}: the state holds an open gradient accumulation window of {n} micro-batch(es), "
    "which a step with accumulation_steps={k} cannot close (the window was opened by a "
    "step with a larger accumulation_steps). Finish it with that step, or drop its "
    "gradients: state.replace(grad_accum=None, micro_step=0)."
)
VMAP_OP_MSG = "{name} failed under torch.func.vmap: {error}\n{why}"
VMAP_MODEL_MSG = (
    "torch.func.vmap cannot run this model's forward or backward pass on stacked states: "
    "{why} "
    "Known cases: spectral_norm (its power iteration writes with out=), packed "
    "sequences through an RNN (pack_padded_sequence) and BatchNorm with momentum=None "
    "in training (its cumulative average reads the batch count on the host; a number "
    "momentum, such as the default 0.1, trains under vmap). Train and evaluate such models "
    "one at a time, in a loop over fl.unstack_states(state) (docs/guide.md, section 6)."
)
VMAP_AUTOCAST_MSG = (
    "torch.func.vmap cannot run this model on stacked states under autocast "
    "(precision={precision!r}): a batched kernel got the layer's float32 weights or "
    "statistics with {kind} inputs. Seen on the CPU with BatchNorm (training and "
    "evaluation) and with LayerNorm and InstanceNorm (training). Train the stacked models "
    "without precision=, or train them one at a time with it, in a loop over "
    "fl.unstack_states(state)."
)
VMAP_CUMULATIVE_BN_MSG = (
    "torch.func.vmap cannot train this model on stacked states: its {kind} {path!r} has "
    "momentum=None, a cumulative moving average of the batch statistics, whose forward "
    "reads the number of batches seen on the host (1.0 / float(num_batches_tracked)). "
    "Give the layer a number momentum (momentum=0.1, the default; a smaller one averages "
    "over more batches), which vmap batches; or, to keep the cumulative average, train the "
    "models one at a time, in a loop over fl.unstack_states(state) (docs/guide.md, "
    "section 6)."
)
VMAP_CODE_HOST_READ_MSG = (
    "{function} ({file}, line {line}) reads a tensor's value on the host: `{code}`. "
    "torch.func.vmap cannot, since there the tensor holds a value per model (or per "
    "batch): .item(), float(t), int(t), .tolist() or a tensor in an if fails. Keep the "
    "values tensors: return metrics as tensors ({{'acc': acc}}, not acc.item()), and choose "
    "with torch.where(cond, a, b) instead of an if on a tensor; where a Python number is "
    "needed, train the models one at a time, in a loop over fl.unstack_states(state)."
)
VMAP_NO_RULE = "torch has no batching rule for an operation it calls."
VMAP_SAVED_TENSOR_HOOKS = (
    "torch.func.vmap cannot train this model on stacked states: its forward pass uses "
    "activation checkpointing (torch.utils.checkpoint.checkpoint) or another saved-tensor "
    "hook, which torch.func's gradients (those of vmapped and compiled steps) cannot run. "
    "Train the models one at a time with eager steps, in a loop over "
    "fl.unstack_states(state), or without the checkpointing."
)
VMAP_HOST_READ = (
    "it reads a tensor's value on the host (.item(), int(t), a tensor as a size or in an "
    "if), as an RNN does with a PackedSequence's batch sizes."
)


MISSING_TENSOR_MSG = (
    "the state holds no tensor named {name!r}, which its module has: a TrainState keeps "
    "every parameter and buffer of its module (frozen parameters among the buffers). "
    "Was it made with state.replace(params=...) or buffers=... missing that entry? Keep "
    "every entry; to train only some parameters, freeze the others "
    "(requires_grad_(False)) before TrainState.create."
)
NONFINITE_MSG = (
    "non-finite {what} at step {step}. Lower the learning rate, add gradient clipping "
    "(optim.clip_by_global_norm), or use on_nonfinite='skip' to skip such updates."
)


class BoundModel:
    """The module template bound to a state's weights: ``model(x)`` runs the forward pass.

    Passed to the user's step function. ``model.module`` is the template (its weights
    live on the ``meta`` device) and ``model.params`` / ``model.buffers`` the tensors in
    use. ``model.called`` says whether ``model(...)`` ran, under ``torch.compile`` and
    ``vmap`` (an eager step does not record it: autograd tells it what it needs).
    """

    __slots__ = ("buffers", "called", "module", "params", "slots")

    def __init__(
        self,
        module: nn.Module,
        params: Params,
        buffers: Params,
        *,
        slots: list[tuple[dict[str, Any], str, str]] | None = None,
    ) -> None:
        self.module = module
        self.params = params
        self.buffers = buffers
        self.slots = slots
        self.called = False

    def __getattr__(self, name: str) -> Any:
        # Only called for names that are not attributes of the BoundModel itself.
        module = object.__getattribute__(self, "module")
        value = getattr(module, name, None)
        what = (
            "a submodule"
            if isinstance(value, nn.Module)
            else "a method"
            if callable(getattr(type(module), name, None))
            else "an attribute"
        )
        if name == "training" and hasattr(module, name):
            raise AttributeError(
                f"{type(module).__name__}.training is an attribute of your module, which a "
                f"step cannot reach through `model`. A train step runs the module in training "
                f"mode and an eval step in eval mode: to compute something in validation "
                f"only, give fit a validation_step of its own (validation_step=...)."
            )
        raise AttributeError(
            f"{type(module).__name__}.{name} is {what} of your module, which a training "
            f"step cannot reach through `model`: model(...) runs the module's forward with "
            f"the state's weights, and model.params / model.buffers hold them. Make forward "
            f"return what you need (for example a tuple or a dict)."
            if hasattr(module, name)
            else f"'BoundModel' object has no attribute {name!r}: model(...) runs the "
            f"forward pass; model.params, model.buffers and model.module are available."
        )

    def __iter__(self) -> Any:
        raise TypeError(SWAPPED_MSG)

    def __getitem__(self, key: Any) -> Any:
        module = object.__getattribute__(self, "module")
        if not hasattr(type(module), "__getitem__"):
            raise TypeError(SWAPPED_MSG)
        raise TypeError(
            f"a BoundModel (the `model` argument of a step function) cannot be indexed: "
            f"model[{key!r}] would be a submodule of your {type(module).__name__}, which a "
            f"step cannot reach through `model`. model(...) runs the whole module's forward "
            f"with the state's weights: make forward return what you need (a tuple or a "
            f"dict). If you meant to index the batch: step functions are called as "
            f"fn(model, batch), in that order."
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.slots is not None:  # eager: the step has put the tensors in the slots
            return self.module(*args, **kwargs)
        # Under torch.compile / vmap: the traceable way, reading back the buffers that
        # forward replaced (``self.n = self.n + 1``) as well as those it updated in place.
        self.called = True  # for the error when the loss has no gradient (traced away)
        tensors = {**self.params, **self.buffers}
        with _reparametrize_module(self.module, tensors, tie_weights=True, strict=False):
            out = self.module(*args, **kwargs)
            for name, old in list(self.buffers.items()):
                owner, _, attr = name.rpartition(".")
                table = self.module.get_submodule(owner)._buffers
                new = table.get(attr, old)  # frozen parameters are kept among the buffers
                if new is not old:
                    self.buffers[name] = _replaced_buffer(name, new)
        return out


def _replaced_buffer(name: str, new: Any) -> torch.Tensor:
    """The tensor forward left in buffer ``name``; anything else is a clear error."""
    if not isinstance(new, torch.Tensor):
        raise TypeError(
            f"forward set the buffer {name!r} to "
            f"{'None' if new is None else 'a ' + type(new).__name__}; a TrainState keeps "
            f"every buffer as a tensor. Update it in place or assign a tensor (a flag "
            f"such as torch.tensor(False) instead of None)."
        )
    return new


@contextlib.contextmanager
def _bound(
    slots: list[tuple[dict[str, Any], str, str]] | None, params: Params, buffers: Params
) -> Iterator[None]:
    """Eager: the state's tensors in the template's slots (what ``functional_call`` does,
    without its per-call walks over the module) for the whole step: the backward pass too,
    where activation checkpointing runs parts of forward again. Buffers that forward
    replaced (``self.n = self.n + 1``) are read back into ``buffers``."""
    if slots is None:
        yield
        return
    saved = []
    try:
        for table, key, name in slots:
            value = params.get(name)
            if value is None:
                value = buffers.get(name)
                if value is None:
                    raise ValueError(MISSING_TENSOR_MSG.format(name=name))
            saved.append((table, key, name, table[key], value))
            table[key] = value
        yield
        for table, key, name, _, value in saved:
            if name in buffers and table[key] is not value:
                buffers[name] = _replaced_buffer(name, table[key])
    finally:
        for table, key, _, old, _ in reversed(saved):
            table[key] = old


@contextlib.contextmanager
def _clear_vmap_errors(name: str, module: nn.Module, precision: Precision) -> Iterator[None]:
    """Under ``vmap``: torch's errors for operations it cannot batch say what hit them (a
    layer of ``module``, the template, where known) and what to do instead."""
    try:
        yield
    except RuntimeError as e:
        text = str(e)
        if "Batching rule not implemented" in text:
            why = VMAP_MODEL_MSG.format(why=VMAP_NO_RULE)
        elif precision is not None and text.startswith(
            f"expected scalar type {'BFloat16' if precision == 'bf16' else 'Half'}"
        ):
            kind = "bfloat16" if precision == "bf16" else "float16"
            why = VMAP_AUTOCAST_MSG.format(precision=precision, kind=kind)
        elif "don't yet support saved tensor hooks" in text or "over _NoopSaveInputs" in text:
            # (torch 2.11 fails earlier, at the checkpoint's own autograd Function)
            why = VMAP_SAVED_TENSOR_HOOKS
        elif text.startswith("vmap: It looks like you're either (1) calling .item()"):
            why = _host_read_why(e, module)
        else:
            raise
        raise RuntimeError(VMAP_OP_MSG.format(name=name, error=text, why=why)) from e


def _host_read_why(error: BaseException, module: nn.Module) -> str:
    """Why a vmapped step read a tensor on the host, from where ``error`` was raised: the
    innermost Python frame, which called ``.item()``, ``float(t)`` or ``bool(t)``. Code
    of the user's (their step function, their forward) is named with the fix."""
    frame = list(traceback.walk_tb(error.__traceback__))[-1][0]  # raised: never empty
    owner = frame.f_locals.get("self")
    if isinstance(owner, _BatchNorm) and owner.training and owner.momentum is None:
        path = next((n for n, m in module.named_modules() if m is owner), "")
        return VMAP_CUMULATIVE_BN_MSG.format(kind=type(owner).__name__, path=path)
    where = os.path.realpath(frame.f_code.co_filename)
    libraries = [os.path.realpath(os.path.dirname(f)) for f in (torch.__file__, __file__)]
    if not any(where.startswith(os.path.join(lib, "")) for lib in libraries):
        summary = traceback.extract_tb(error.__traceback__)[-1]
        return VMAP_CODE_HOST_READ_MSG.format(
            function=summary.name,
            file=os.path.basename(summary.filename),
            line=summary.lineno,
            code=(summary.line or "").strip(),
        )
    return VMAP_MODEL_MSG.format(why=VMAP_HOST_READ)


@contextlib.contextmanager
def _no_mha_fastpath() -> Iterator[None]:
    """``nn.MultiheadAttention`` and ``nn.TransformerEncoder(Layer)`` without their
    inference fast path (fused kernels and nested tensors, which vmap cannot batch)."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def _decomposed(fn: Callable[[], Any]) -> Any:
    """``fn()`` (a forward pass under ``no_grad``) inside a ``torch.func.grad`` level.

    Under ``vmap`` alone, torch runs composite operations such as ``aten::lstm`` /
    ``aten::gru`` as one kernel, which has no batching rule; inside a grad level it runs
    them as the operations they are made of, which vmap batches (as in a vmapped train
    step). The tensors ``fn`` returns as entries of a mapping come out of the level; the
    level differentiates nothing.
    """
    outs: list[Any] = []  # fn's output: what stays in the level is taken from it

    def inner(dummy: torch.Tensor) -> tuple[torch.Tensor, Any]:
        with torch.no_grad():
            outs.append(fn())
        out = outs[0]
        if not isinstance(out, Mapping):  # an error for the caller to raise
            return dummy.sum(), {}
        return dummy.sum(), {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}

    _, tensors = torch.func.grad(inner, has_aux=True)(torch.zeros(()))
    out = outs[0]
    if not isinstance(out, Mapping):
        return out
    return {k: tensors.get(k, v) for k, v in out.items()}


_nothing = contextlib.nullcontext()


def _in_transform(params: Params, compiling: bool, *, train: bool = True) -> bool:
    """True under ``torch.compile`` (``compiling``, the caller's
    ``torch.compiler.is_compiling()``) or a ``torch.func`` transform (``vmap`` of the
    states, of the batches only, or both), where steps run on ``torch.func``.

    The step's own frame says whether it is compiled: dynamo may compile a helper as a
    frame of its own while the step runs eagerly (after a compile of the step raised),
    and the helper's ``is_compiling()`` then answers for the helper alone.

    Raises:
      ValueError: for a train step (``train``) under a transform other than ``vmap``
        (``torch.func.grad`` of a step).
    """
    if compiling:
        return True
    first = next(iter(params.values()))
    if _functorch.is_batchedtensor(first):
        return True
    if _functorch.maybe_current_level() is None:
        return False
    if train and retrieve_current_functorch_interpreter().key() != TransformType.Vmap:
        raise ValueError(TRANSFORM_MSG)
    return True


_Template: TypeAlias = tuple[
    nn.Module, list[tuple[dict[str, Any], str, str]] | None, frozenset[str], tuple[str, int]
]


class _Templates:
    """The state's module template in train or eval mode, and what eager calls need of it.

    Kept per module template (weakly), so one step used on several states in turn (an
    ensemble in a Python loop) copies each template once, on its first call.
    """

    def __init__(self, training: bool) -> None:
        self.training = training
        self.known: weakref.WeakKeyDictionary[nn.Module, _Template] = weakref.WeakKeyDictionary()

    def get(self, module: nn.Module, compiling: bool) -> _Template:
        """``(template, its tensor slots or None when traced, names of frozen params, the
        name and number of dims of its first trainable parameter)``; ``compiling`` is the
        step's ``torch.compiler.is_compiling()`` (see :func:`_in_transform`)."""
        if compiling:
            # Nothing cached: dynamo guards on what the trace reads, so a cache that the
            # first call fills would make the second call recompile the step.
            template = in_mode(module, training=self.training)
            return template, None, _frozen(template), ("", -1)
        entry = self.known.get(module)
        if entry is None:
            template = in_mode(module, training=self.training, refresh=True)
            first = next(
                ((n, p.dim()) for n, p in template.named_parameters() if p.requires_grad), ("", -1)
            )
            entry = (template, _tensor_slots(template), _frozen(template), first)
            self.known[module] = entry
        return entry


def _maybe_stacked(state: TrainState, first: tuple[str, int]) -> bool:
    """Whether ``state`` may hold stacked models: its template's first trainable parameter
    has another number of dims (one dict lookup; :func:`check_one_model` then says)."""
    name, ndim = first
    param = state.params.get(name)
    return param is None or param.dim() != ndim


def _buffer_copies(buffers: Params, frozen: frozenset[str]) -> Params:
    """Copies of the buffers forward may update in place (BatchNorm statistics), so the
    input state stays as it was; not of the ``frozen`` parameters kept among them."""
    return {n: b if n in frozen else b.clone() for n, b in buffers.items()}


def _frozen(module: nn.Module) -> frozenset[str]:
    return frozenset(n for n, p in module.named_parameters() if not p.requires_grad)


def _tensor_slots(module: nn.Module) -> list[tuple[dict[str, Any], str, str]]:
    """``(owner's _parameters or _buffers dict, key, state name)`` for every tensor slot.

    A tensor tied under several names (shared embeddings) fills each of its slots from
    the one name the state keeps it under: the first, as ``named_parameters()`` lists it.
    """
    first: dict[int, str] = {}
    slots = []
    for table_name, named in (
        ("_parameters", module.named_parameters(remove_duplicate=False)),
        ("_buffers", module.named_buffers(remove_duplicate=False)),
    ):
        for name, tensor in named:
            state_name = first.setdefault(id(tensor), name)
            prefix, _, key = name.rpartition(".")
            slots.append((getattr(module.get_submodule(prefix), table_name), key, state_name))
    return slots


def _check_output(out: Any, name: str) -> torch.Tensor:
    if not isinstance(out, Mapping) or "loss" not in out:
        got = f"keys {sorted(out)}" if isinstance(out, Mapping) else type(out).__name__
        raise ValueError(NO_LOSS_MSG.format(name=name, got=got))
    loss = out["loss"]
    if not isinstance(loss, torch.Tensor):
        raise TypeError(
            f"the 'loss' returned by {name} must be a tensor; got {type(loss).__name__}. "
            "Return the loss tensor itself (not loss.item() or float(loss)), so that its "
            "gradient can be taken."
        )
    if loss.numel() != 1:  # one element, of any shape, as loss.backward() accepts
        raise ValueError(LOSS_SHAPE_MSG.format(name=name, shape=tuple(loss.shape)))
    return loss if loss.dim() == 0 else loss.reshape(())


def _metrics(out: Mapping[str, Any], name: str, device: torch.device) -> Metrics:
    metrics: Metrics = {}
    for key, value in out.items():
        if isinstance(value, torch.Tensor):
            # As returned: MetricMeans averages the one-element entries over the epoch,
            # unless a key had more elements in another batch (predictions, also those of
            # a last batch of one). The loss is reported 0-d.
            metrics[key] = value.detach()
        elif isinstance(value, numbers.Real):  # Python and NumPy numbers
            # No host copy; float64 (on the CPU and CUDA) keeps the number as given.
            metrics[key] = torch.full((), float(value), dtype=scalar_dtype(device), device=device)
        else:
            raise TypeError(METRIC_MSG.format(key=key, name=name, kind=type(value).__name__))
    return metrics


_Fn = TypeVar("_Fn", bound=Callable[..., Any])


def _eager_only(fn: _Fn) -> _Fn:
    """Keeps dynamo from compiling ``fn``, a helper only eager steps call.

    A step whose compile raised (a ``training_step`` returning no mapping, say) runs
    eagerly under later ``torch.compile`` calls, and dynamo then compiles the helpers it
    calls as frames of their own; torch 2.12's dynamo crashes on some of them (comparing
    tree structures or dict keys) instead of leaving them to Python.
    """
    return cast(_Fn, torch.compiler.disable(fn))


@_eager_only
def _check_opt_state(state: TrainState) -> None:
    """Raises ``ValueError`` when ``state.opt_state`` differs in structure from the state
    ``state.tx`` makes (made on the ``meta`` device: no memory)."""
    try:
        made = state.tx.init(
            {n: torch.empty_like(p, device="meta") for n, p in state.params.items()}
        )
    except Exception:  # an optimizer that cannot init on meta: its own errors will show
        return
    diff = _tree.first_difference(state.opt_state, made)
    if diff is not None:
        raise ValueError(OPT_STATE_MSG.format(diff=diff))


def _scalar_floats(metrics: Metrics, device: torch.device) -> list[str]:
    """The metrics on ``device`` that an epoch mean averages and that can be non-finite
    (one floating-point element)."""
    return [
        k
        for k, v in metrics.items()
        if v.numel() == 1 and v.is_floating_point() and v.device == device
    ]


# Several processes tell each other which metrics are not finite in a vector of this
# many slots, one per name hash: the same size in every process whatever names its
# step returned (the collectives need equal sizes). Names that share a slot are left
# out together; that only drops a finite value where another metric was not finite.
_METRIC_SLOTS = 61


def _metric_slot(name: str) -> int:
    """The slot of a metric's name: a hash that is the same in every process (Python's
    ``hash`` of a string is not) and that ``torch.compile`` folds to a constant."""
    slot = 0
    for char in name:
        slot = (slot * 256 + ord(char)) % _METRIC_SLOTS
    return slot


def _nonfinite_slots(metrics: Metrics, names: list[str]) -> tuple[torch.Tensor, list[int]]:
    """How many of the metrics ``names`` are not finite, per slot of their names
    (``_METRIC_SLOTS`` floats), and the slot of each name. Built on the device from
    comparisons with Python numbers: no host data is copied in (a host sync on CUDA)."""
    device = metrics[names[0]].device
    slot_of = [_metric_slot(k) for k in names]
    slots = torch.arange(_METRIC_SLOTS, device=device)
    counts = torch.zeros(_METRIC_SLOTS, device=device)
    for k, slot in zip(names, slot_of):
        bad = ~torch.isfinite(metrics[k]).reshape(())
        counts = counts + ((slots == slot) & bad).to(counts.dtype)
    return counts, slot_of


def _per_name(slot_flags: torch.Tensor, slot_of: list[int]) -> torch.Tensor:
    """The flag of each name's slot (indexed by Python numbers: no index tensor)."""
    return torch.stack([slot_flags[slot] for slot in slot_of])


def _nan_where_not(finite: torch.Tensor, names: list[str], metrics: Metrics) -> Metrics:
    """Several processes skipping non-finite steps: the metrics ``names`` made NaN where
    ``finite`` (one flag each, true in every process) is false, so that the epoch means
    leave the whole global batch out, as one process on it would; not only the share of
    the process whose value was not finite."""
    nan = {k: torch.where(f, metrics[k], math.nan) for k, f in zip(names, finite.unbind())}
    return {**metrics, **nan}


def _metric_dtype(loss: torch.Tensor) -> torch.Tensor:
    """A loss as a metric: float32 at least (a bf16/fp16 loss is upcast), float64 kept."""
    return loss if loss.dtype == torch.float64 else loss.float()


def _fn_name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def _check_user_function(fn: Any, arg: str) -> None:
    """Raises ``TypeError`` unless ``fn`` can be the user's ``(model, batch)`` function:
    callable, and not a step made already (which takes ``(state, batch)``)."""
    if not callable(fn):
        raise TypeError(f"{arg} must be callable; got {type(fn).__name__}.")
    made = made_step(fn, TrainStep) or made_step(fn, EvalStep)
    if made is not None:
        maker = "make_train_step" if isinstance(made, TrainStep) else "make_eval_step"
        raise TypeError(
            f"{arg} is a step made by {maker} already, a function of (state, batch); "
            f"make_train_step and make_eval_step take your own function of (model, batch). "
            f"Pass the made step to fit as it is, or call it as step(state, batch)."
        )


def _not_a_state(call: str, state: Any, batch: Any) -> TypeError:
    """The error for a step called with something else than a state first."""
    if isinstance(batch, TrainState):
        hint = " Did you swap the arguments?"
    elif isinstance(state, nn.Module):
        hint = f" {MAKE_STATE_HINT}"
    elif isinstance(state, BoundModel):  # a wrapper of a made step, taken for the user's fn
        hint = f" {WRAPPER_HINT}"
    else:
        hint = ""
    return TypeError(
        f"{call}(state, batch) needs a TrainState first; got {type(state).__name__}.{hint}"
    )


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """A pure training step made by :func:`make_train_step`; call it as ``step(state, batch)``."""

    training_step: StepFn
    accumulation_steps: int = 1
    precision: Precision = None
    loss_scale: DynamicLossScale | None = None
    on_nonfinite: NonFinitePolicy = None
    donate: bool = False
    grad_norm: bool = False
    _templates: _Templates = dataclasses.field(
        default_factory=lambda: _Templates(True), init=False, repr=False, compare=False
    )
    # training_step's name for errors, read once: while torch.compile traces a step,
    # dynamo (torch 2.13) reads a function's __qualname__ as "<attribute '__qualname__' of
    # 'function' objects>", which fullgraph=True then reports.
    _name: str = dataclasses.field(default="", init=False, repr=False, compare=False)
    _checked: weakref.WeakSet[Callable[..., Any]] = dataclasses.field(
        default_factory=weakref.WeakSet, init=False, repr=False, compare=False
    )
    # The optimizers (their update functions) whose state this step has checked, held
    # weakly: a sweep that makes a new optimizer per run does not keep the old ones alive.
    _known_tx: weakref.WeakSet[Callable[..., Any]] = dataclasses.field(
        default_factory=weakref.WeakSet, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        _check_user_function(self.training_step, "training_step")
        object.__setattr__(self, "_name", _fn_name(self.training_step))
        k = self.accumulation_steps
        if (
            isinstance(k, bool)
            or not isinstance(k, numbers.Real)
            or not math.isfinite(k)
            or k < 1
            or int(k) != k
        ):
            raise ValueError(f"accumulation_steps must be an integer >= 1; got {k!r}.")
        object.__setattr__(self, "accumulation_steps", int(k))
        check_precision(self.precision)
        if self.on_nonfinite not in (None, "skip", "raise"):
            raise ValueError(
                f"on_nonfinite must be None, 'skip' or 'raise'; got {self.on_nonfinite!r}."
            )
        if self.loss_scale is not None and self.precision != "fp16":
            raise ValueError(
                f"loss_scale is only used with precision='fp16'; got precision={self.precision!r}."
            )
        if self.precision == "fp16" and self.loss_scale is None:
            object.__setattr__(self, "loss_scale", DynamicLossScale())
        if self.loss_scale is not None and not isinstance(self.loss_scale, DynamicLossScale):
            raise TypeError(
                f"loss_scale takes a fl.DynamicLossScale; got {self.loss_scale!r}. For "
                f"another initial scale (GradScaler's init_scale), pass "
                f"fl.DynamicLossScale(init_scale=...)."
            )
        for option in ("grad_norm", "donate"):
            if not isinstance(getattr(self, option), bool):
                raise TypeError(f"{option} takes True or False; got {getattr(self, option)!r}.")

    def __call__(self, state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        """Runs one (micro-)step; returns the new state and the step's metrics."""
        if not isinstance(state, TrainState):
            raise _not_a_state("train_step", state, batch)
        name = self._name
        device = state.device
        compiling = torch.compiler.is_compiling()
        transformed = _in_transform(state.params, compiling)  # or under torch.func.vmap
        module, slots, frozen, first = self._templates.get(state.module, compiling)
        # Under vmap of the state, compiled or not, a stacked state's tensors show one
        # model's shape; under vmap of the batches alone (in_dims=(None, 0)), its own.
        if _maybe_stacked(state, first):
            check_one_model(state, "train_step", TRAIN_STACKED_FIX)
        if transformed and not compiling and self.on_nonfinite == "raise":
            raise ValueError(RAISE_VMAP_MSG)
        if self.precision is not None and not compiling:
            warn_if_no_effect(self.precision, state.params.get(first[0]))
        # Donation works in eager mode and under torch.compile (where inductor then writes
        # into the donated buffers), not under vmap.
        donate = self.donate and (compiling or not transformed)
        check_not_donated(state, "this train step")
        check_ema(state)
        if state.micro_step >= self.accumulation_steps:
            raise ValueError(
                WINDOW_MSG.format(n=state.micro_step, k=self.accumulation_steps, name=name)
            )
        if not transformed and state.tx.update not in self._known_tx:
            _check_opt_state(state)  # a replace(tx=...) without its opt_state
            self._known_tx.add(state.tx.update)
        batch = to_device(batch, device)
        loss_scale = state.loss_scale
        # Only a step with a loss scale of its own scales the loss (and unscales the
        # gradients in _update); a state from an fp16 run keeps its scale untouched.
        scale = None
        if self.loss_scale is not None:
            if loss_scale is None:
                loss_scale = self.loss_scale.init(device)
            scale = loss_scale.scale

        grads, loss, metrics, buffers, params = self._gradients(
            state, module, slots, frozen, batch, scale, transformed, compiling, donate
        )
        if params is not state.params:  # a pure eager step's copies (forward may write)
            state = state.replace(params=params)
        if self.grad_norm and "grad_norm" in metrics:
            raise ValueError(GRAD_NORM_CLASH_MSG.format(name=name))

        distributed = world_size() > 1
        # Under vmap. Compiled, a functorch level is active while tracing; dynamo cannot
        # trace reading it, so only a distributed step asks (and reaches the error eagerly).
        if (
            distributed
            and transformed
            and (not compiling or _functorch.maybe_current_level() is not None)
        ):
            raise ValueError(VMAP_MSG.format(world=world_size()))
        # Several processes decide together: on the averaged loss and gradients at an
        # update (below), on every process's own at the other micro-batches (a non-finite
        # loss can have finite gradients, which the window's sum would not show).
        if self.on_nonfinite == "raise" and not distributed:
            self._raise_if_nonfinite(state, loss, grads)

        k = self.accumulation_steps
        if k > 1:
            if state.grad_accum is not None:
                grads = _tree.tree_map(torch.add, state.grad_accum, grads)
            if state.micro_step + 1 < k:
                if self.on_nonfinite == "raise" and distributed:
                    self._raise_if_nonfinite(state, loss, grads, everywhere=True)
                if self.on_nonfinite == "skip":
                    # Decided together: one process on the whole micro-batch would drop
                    # all of its statistics (integer counters, never averaged, too).
                    finite = torch.isfinite(loss)
                    if distributed:
                        names = _scalar_floats(metrics, loss.device)
                        counts, slot_of = _nonfinite_slots(metrics, names)
                        flags = true_everywhere(torch.cat([finite.reshape(1), counts == 0]))
                        finite = flags[0]
                        metrics = _nan_where_not(_per_name(flags[1:], slot_of), names, metrics)
                    buffers = _select_buffers(finite, buffers, state.buffers, frozen)
                    # A non-finite loss can have finite gradients (a mean over no
                    # element, 0/0): mark the window's sum, so its update is skipped.
                    grads = _tree.tree_map(lambda g: torch.where(finite, g, math.nan), grads)
                new_state = state.replace(
                    grad_accum=grads,
                    buffers=buffers,
                    micro_step=state.micro_step + 1,
                    loss_scale=loss_scale,
                )
                return new_state, metrics
            if scale is None:  # a scaled loss was divided by k already (_gradients)
                grads = _tree.tree_map(lambda g: g / k, grads)
        if distributed:
            # A skipped update keeps the buffers from before this micro-batch: with a window
            # of several, those are each process's own, so they are averaged too.
            fallback = state.buffers if k > 1 and self.on_nonfinite == "skip" else None
            extra = {"loss": loss.detach().float()}
            names = _scalar_floats(metrics, loss.device) if self.on_nonfinite == "skip" else []
            if names:  # in the same collective: which metrics are finite in every process
                # Sent as counts of non-finite ones: a mean of zeros is exactly 0 for any
                # number of processes, where a mean of ones need not round back to 1 (10,
                # 12, ...).
                extra["nonfinite"], slot_of = _nonfinite_slots(metrics, names)
            grads, buffers, fallback, mean = mean_grads_and_buffers(
                grads, buffers, frozen, kept=fallback, extra=extra
            )
            loss = mean["loss"].to(loss.dtype)
            if names:
                metrics = _nan_where_not(_per_name(mean["nonfinite"] == 0, slot_of), names, metrics)
            if fallback is not None:
                state = state.replace(buffers=fallback)
            if self.on_nonfinite == "raise":
                self._raise_if_nonfinite(state, loss, grads)
        if self.grad_norm:
            metrics["grad_norm"] = self._grad_norm(grads, scale)
        new_state = self._update(
            state, grads, loss, buffers, frozen, loss_scale, donate, transformed, compiling
        )
        return new_state, metrics

    def _grad_norm(self, grads: Params, scale: torch.Tensor | None) -> torch.Tensor:
        """The global 2-norm of the gradients the update uses (accumulated, averaged over
        processes, unscaled, before any clipping), as ``clip_grad_norm_`` returns it."""
        norm = _foreach.global_norm(list(grads.values()))
        if scale is not None:  # the fp16 loss scale this backward pass used
            norm = norm / scale
        return _metric_dtype(norm.detach())

    def _raise_if_nonfinite(
        self, state: TrainState, loss: torch.Tensor, grads: Params, *, everywhere: bool = False
    ) -> None:
        """``on_nonfinite="raise"``: a non-finite loss or gradient raises (reads the host).
        With an fp16 loss scale, overflowing gradients are the scale's to skip.
        ``everywhere``: a non-finite value in any process raises in all (a collective)."""
        finite = [torch.isfinite(loss)]
        if self.loss_scale is None:
            finite.append(all_finite(grads.values()))
        flags = torch.stack(finite)
        if everywhere:
            flags = true_everywhere(flags)
        for what, ok in zip(("loss", "gradient"), flags.tolist()):
            if not ok:
                raise FloatingPointError(NONFINITE_MSG.format(what=what, step=state.step))

    def _gradients(
        self,
        state: TrainState,
        module: nn.Module,
        slots: list[tuple[dict[str, Any], str, str]] | None,
        frozen: frozenset[str],
        batch: Batch,
        scale: torch.Tensor | None,
        transformed: bool,
        compiling: bool,
        donate: bool,
    ) -> tuple[Params, torch.Tensor, Metrics, Params, Params]:
        """Gradients of the loss (with a loss scale: of ``loss / k * scale``, as
        ``scaler.scale(loss / k)``), the loss, metrics, the new buffers and the parameters
        forward ran on (the state's, or a pure eager step's copies of them)."""
        name = self._name
        device = state.device
        if transformed:  # compile, vmap: torch.func's traceable functional_call and grad
            slots = None
        vmapping = transformed and not compiling  # under an eager torch.func.vmap

        eager_buffers = None if transformed else _buffer_copies(state.buffers, frozen)
        k = self.accumulation_steps

        def loss_fn(params: Params) -> tuple[torch.Tensor, tuple[torch.Tensor, Metrics, Params]]:
            # Made inside torch.func.grad when traced (it forbids writes into tensors from
            # outside). ``buffers`` gets the tensors forward put in place of the state's:
            # read back by BoundModel when traced, by _bound when it ends in eager mode.
            buffers = eager_buffers
            if buffers is None:
                buffers = _buffer_copies(state.buffers, frozen)
            with autocast(self.precision, device):
                model = BoundModel(module, params, buffers, slots=slots)
                out = self.training_step(model, batch)
            loss = _check_output(out, name)
            metrics = _metrics(out, name, device)
            metrics["loss"] = _metric_dtype(loss.detach())
            if not loss.requires_grad:  # metadata only: also checked under vmap and compile
                # Traced, a loss from the user's own module has no gradient at all either.
                bad = LOSS_GRAD_MSG if model.called or slots is not None else NOT_CALLED_MSG
                raise ValueError(bad.format(name=name))
            if scale is None:
                scaled = loss
            elif k > 1:  # as scaler.scale(loss / k): the scale's overflows are GradScaler's
                scaled = (loss.float() / k) * scale
            else:
                scaled = loss.float() * scale
            return scaled, (loss.detach(), metrics, buffers)

        if eager_buffers is None:
            # Under vmap, torch's errors in the forward or backward pass are explained.
            with _clear_vmap_errors(name, module, self.precision) if vmapping else _nothing:
                grads, (loss, metrics, new) = torch.func.grad(loss_fn, has_aux=True)(state.params)
            if donate:  # compiled: the update is written into the parameters (see _unaliased)
                metrics = {k: v.clone() for k, v in metrics.items()}
            return grads, loss, metrics, {n: b.detach() for n, b in new.items()}, state.params

        # The forward pass may write into the weights it is given (nn.Embedding(max_norm)
        # renormalizes rows in place): a pure step gives it copies, which the optimizer
        # then updates (see _update), so the input state stays as it was.
        source = state.params if donate else _copy_group(state.params)
        params = {n: p.detach().requires_grad_() for n, p in source.items()}
        # (An outer torch.no_grad does not stop the step, as it does not stop torch.func.grad.)
        with _bound(slots, params, eager_buffers), torch.enable_grad():
            scaled, (loss, metrics, _) = loss_fn(params)
            names = list(params)
            grad_list = torch.autograd.grad(scaled, [params[n] for n in names], allow_unused=True)
        if all(g is None for g in grad_list):
            raise ValueError(NOT_BOUND_MSG.format(name=name))
        grads = _writable_grads(params, names, grad_list)
        metrics = _unaliased(metrics, source)
        return grads, loss, metrics, {n: b.detach() for n, b in eager_buffers.items()}, source

    def _apply_to_copies(self, state: TrainState, grads: Params) -> tuple[Params, Any]:
        """``state.tx.apply_`` on the step's own params (the copies ``_gradients`` made)
        and on fresh copies of the optimizer buffers it writes.

        ``update_`` / ``apply_`` may write only into the updates, the params and state
        tensors keyed by parameter names. The first call with an optimizer checks that
        on copies of every tensor, so a transform that breaks the rule fails with a clear
        error and leaves the input state intact.
        """
        tx = state.tx
        opt_state = _copy_groups(state.opt_state, state.params.keys())
        if tx.apply_ in self._checked:
            return tx.apply_(grads, opt_state, state.params)  # type: ignore[misc]
        # First call with this optimizer: copy every other tensor too, and check that
        # those copies were not written.
        leaves, treedef = _tree.tree_flatten(opt_state)
        versions = []
        for i, (leaf, old) in enumerate(zip(leaves, _tree.tree_leaves(state.opt_state))):
            if leaf is old and isinstance(leaf, torch.Tensor):
                leaves[i] = leaf.clone()
                versions.append((leaves[i], leaves[i]._version))
        out = tx.apply_(grads, _tree.tree_unflatten(treedef, leaves), state.params)  # type: ignore[misc]
        if any(copy._version != version for copy, version in versions):
            raise RuntimeError(INPLACE_MSG)
        self._checked.add(tx.apply_)  # type: ignore[arg-type]
        return out

    def _update(
        self,
        state: TrainState,
        grads: Params,
        loss: torch.Tensor,
        buffers: Params,
        frozen: frozenset[str],
        loss_scale: LossScaleState | None,
        donate: bool,
        transformed: bool,
        compiling: bool,
    ) -> TrainState:
        """Applies the optimizer (skipping non-finite updates as configured) and the EMA.

        With ``donate``, the optimizer state, the parameters and the EMA are updated in the
        input state's storage: compiled always; eager with an optimizer that has ``apply_``
        and where no update may be skipped (no ``"skip"``, no fp16 loss scale).
        """
        ok: torch.Tensor | None = None
        if loss_scale is not None and self.loss_scale is not None:
            names = list(grads)
            inv = torch.reciprocal(loss_scale.scale.double()).float()
            unscaled = _foreach.mul([grads[n] for n in names], inv)
            finite = all_finite(unscaled)
            grads = dict(zip(names, unscaled))
            loss_scale = self.loss_scale.update(loss_scale, ~finite)
            ok = finite
        if self.on_nonfinite == "skip":
            # The gradients too: a finite loss can have non-finite gradients, and with
            # accumulation an earlier micro-batch's NaN is in the sum, not in this loss.
            ok = torch.isfinite(loss) & (ok if ok is not None else all_finite(grads.values()))
            # A non-finite forward pass (a NaN in the batch) would also leave non-finite
            # running statistics: keep the previous ones. (Only gradients that overflow the
            # fp16 loss scale keep the batch's statistics, as with torch.amp.GradScaler.)
            buffers = _select_buffers(torch.isfinite(loss), buffers, state.buffers, frozen)

        # Donated, eager: the optimizer's fused in-place step. Donated, compiled: the pure
        # update, written back into the donated tensors at the end (inductor turns those
        # copies into in-place stores, so no new buffers are allocated per step). Compiled
        # as the step's frame says (see _in_transform), not as this helper's would.
        write_back = donate and compiling
        inplace = donate and ok is None and not write_back and state.tx.apply_ is not None
        # Pure, eager: the same fused step, on fresh copies of the parameters and of the
        # optimizer buffers keyed like them (the tensors it writes into): a copy and one
        # fused pass cost less than the pure update's many out-of-place passes.
        fresh = not donate and ok is None and state.tx.apply_ is not None and not transformed
        if inplace:
            params, opt_state = state.tx.apply_(grads, state.opt_state, state.params)  # type: ignore[misc]
        elif fresh:
            params, opt_state = self._apply_to_copies(state, grads)
        else:
            updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
            params = apply_updates(state.params, updates)
        skipped = state.skipped_steps
        if ok is not None:
            params = _select(ok, params, state.params)
            opt_state = _select(ok, opt_state, state.opt_state)
            skipped = skipped + (~ok).to(skipped.dtype)

        ema = state.ema
        if ema is not None and state.ema_decay is not None:
            names = list(ema)
            old, new = [ema[n] for n in names], [params[n] for n in names]
            if state.step == 0:  # like AveragedModel: the first average is the weights
                averaged = _foreach.copy_(old, new) if inplace else [p.clone() for p in new]
            elif ok is not None:
                # A skipped update is not an update: while all so far were skipped, the
                # first one applied still starts the average at the weights.
                averaged = _foreach.where(
                    state.skipped_steps == state.step,
                    new,
                    _foreach.lerp(old, new, 1.0 - state.ema_decay),
                )
            elif inplace:
                averaged = _foreach.lerp_(old, new, 1.0 - state.ema_decay)
            else:
                averaged = _foreach.lerp(old, new, 1.0 - state.ema_decay)
            new_ema = dict(zip(names, averaged))
            ema = _select(ok, new_ema, ema) if ok is not None else new_ema

        if write_back:
            params = _write_into(state.params, params)
            opt_state = _write_into(state.opt_state, opt_state)
            ema = _write_into(state.ema, ema) if ema is not None else None
        elif donate:
            params = mark_donated(state.params, params)
        return state.replace(
            params=params,
            opt_state=opt_state,
            buffers=buffers,
            ema=ema,
            loss_scale=loss_scale,
            grad_accum=None,
            skipped_steps=skipped,
            step=state.step + 1,
            micro_step=0,
        )


def all_finite(tensors: Any) -> torch.Tensor:
    """A 0-d bool tensor: every element of every tensor is finite (no host sync)."""
    return torch.stack([torch.isfinite(t).all() for t in tensors]).all()


def _writable_grads(
    params: Params, names: list[str], grad_list: tuple[torch.Tensor | None, ...]
) -> Params:
    """Gradients the optimizer may update in place, each laid out like its parameter.

    ``autograd.grad`` may return one tensor for several parameters (``(p + q) * x``), an
    expanded stride-0 view (``p.sum()``) or another layout than the parameter's (a
    channels-last weight times a contiguous tensor); those get their own copy in the
    parameter's layout, as ``.grad`` does (torch's fused kernels pair elements by memory
    position), and a parameter the loss does not use gets zeros.
    """
    grads: Params = {}
    seen: set[int] = set()
    for name, g in zip(names, grad_list):
        p = params[name]
        if g is None:
            g = torch.zeros_like(p)
        elif g.layout != torch.strided:
            raise ValueError(SPARSE_MSG.format(name=name, layout=g.layout))
        elif g.data_ptr() in seen or not _foreach.same_layout(g, p):
            g = torch.empty_like(p).copy_(g)
        seen.add(g.data_ptr())
        grads[name] = g
    return grads


def _unaliased(metrics: Metrics, params: Params) -> Metrics:
    """``metrics`` with copies of the entries that share memory with ``params`` (a
    parameter, or a view of one, returned as a metric): the optimizer then updates
    ``params`` in place, and with donation so do the next steps, which would change the
    value the forward pass saw (an epoch's mean would be the last step's value)."""
    storages = {p.untyped_storage().data_ptr() for p in params.values()}
    return {
        k: v.clone() if v.untyped_storage().data_ptr() in storages else v
        for k, v in metrics.items()
    }


def _copy_group(group: Params) -> Params:
    """Fresh copies of a dict of tensors (one by one: cheaper per step than the one-buffer
    layout of ``TrainState.clone``, which only the foreach path off the CPU uses)."""
    src = list(group.values())
    dst = [torch.empty_like(t) for t in src]
    return dict(zip(group, _foreach.copy_(dst, src)))


@_eager_only
def _copy_groups(tree: Any, names: Any) -> Any:
    """``tree`` with fresh copies of every dict of tensors keyed by parameter names.

    Those are the optimizer buffers that ``apply_`` writes into (moments, momentum; a
    ``partition`` group's are keyed by a subset of the names); other leaves, such as
    update counts and learning rates, it replaces.
    """

    def is_group(node: Any) -> bool:
        return (
            type(node) is dict
            and bool(node)
            and node.keys() <= names
            and all(isinstance(t, torch.Tensor) for t in node.values())
        )

    return _tree.tree_map(
        lambda node: _copy_group(node) if is_group(node) else node, tree, is_leaf=is_group
    )


def _write_into(old: Any, new: Any) -> Any:
    """Copies each leaf of ``new`` into the matching (donated) leaf of ``old``.

    Returns ``old`` itself where every leaf has at least one dimension (the compiled code
    then hands back the donated containers instead of rebuilding them after the graph),
    else a tree of ``old``'s leaves and ``new``'s 0-d ones.
    """
    old_leaves, treedef = _tree.tree_flatten(old)
    leaves = []
    for o, n in zip(old_leaves, _tree.tree_leaves(new), strict=True):
        if o.dim() == 0:
            # A 0-d leaf (a count, a learning rate) comes back new: dynamo silently drops
            # writes into 0-d float64 CPU inputs (torch 2.11-2.13: a schedule's rate
            # stayed put), and donating a scalar saves nothing.
            leaves.append(n)
        else:
            leaves.append(o.copy_(n) if o is not n else o)
    if all(a is b for a, b in zip(leaves, old_leaves)):
        return old
    return _tree.tree_unflatten(treedef, leaves)


def _select(ok: torch.Tensor, new: Any, old: Any) -> Any:
    """``new`` where ``ok`` else ``old``, leaf by leaf, without a host sync."""
    new_leaves, treedef = _tree.tree_flatten(new)
    old_leaves = _tree.tree_leaves(old)
    return _tree.tree_unflatten(treedef, _foreach.where(ok, new_leaves, old_leaves))


def _select_buffers(ok: torch.Tensor, new: Params, old: Params, frozen: frozenset[str]) -> Params:
    """The buffers forward left where ``ok`` else the old ones, without a host sync.

    The ``frozen`` parameters among them are passed on as they are (a ``torch.where``
    would copy a frozen backbone every step). A buffer that forward replaced by one of
    another shape (a cache filled on first use) cannot be chosen by ``torch.where``; it
    keeps forward's value.
    """
    names = [n for n, b in new.items() if n not in frozen and b.shape == old[n].shape]
    chosen = _select(ok, {n: new[n] for n in names}, {n: old[n] for n in names})
    return {n: chosen.get(n, b) for n, b in new.items()}


TrainStepFn: TypeAlias = Callable[[TrainState, Batch], tuple[TrainState, Metrics]]
"""A train step as ``fit`` and ``train_epoch`` take it: ``new_state, metrics =
train_step(state, batch)``; a made step, compiled or vmapped too."""
EvalStepFn: TypeAlias = Callable[[TrainState, Batch], Metrics]
"""An eval step as ``fit`` and ``validate_epoch`` take it: ``metrics = eval_step(state, batch)``."""


class MadeTrainStep(Protocol):
    """What :func:`make_train_step` returns: a function of ``(state, batch)`` that
    returns a state of the same class, with the step's options as read-only attributes."""

    @property
    def training_step(self) -> StepFn: ...
    @property
    def accumulation_steps(self) -> int: ...
    @property
    def precision(self) -> Precision: ...
    @property
    def loss_scale(self) -> DynamicLossScale | None: ...
    @property
    def on_nonfinite(self) -> NonFinitePolicy: ...
    @property
    def donate(self) -> bool: ...
    @property
    def grad_norm(self) -> bool: ...
    def __call__(self, state: StateT, batch: Batch, /) -> tuple[StateT, Metrics]: ...


class MadeEvalStep(Protocol):
    """What :func:`make_eval_step` returns: a function of ``(state, batch)`` that returns
    the metrics, with the step's options as read-only attributes."""

    @property
    def validation_step(self) -> StepFn: ...
    @property
    def use_ema(self) -> bool: ...
    @property
    def precision(self) -> Precision: ...
    def __call__(self, state: TrainState, batch: Batch, /) -> Metrics: ...


def _as_function(step: Any, name: str) -> Any:
    """``step`` as a plain function with a code object of its own.

    ``torch.compile`` wraps a callable object in one function shared by all of them, so
    every compiled step of a process would share one cache of compiled graphs (8 by
    default, after which dynamo silently runs eagerly) and one record of the shapes it
    has seen (a validation batch size would make the train step trace dynamic shapes,
    which dropout under ``torch.func`` cannot). A function compiles as itself; its code
    object, named after this step, is its own, so each made step has its own cache and
    shape record, as a hand-written function has.
    """

    def call(state: TrainState, batch: Batch) -> Any:
        return step(state, batch)

    # co_name keys dynamo's shape record (with the file and line), which outlives the step:
    # a random name, not id(step), which a later step may reuse. co_extra keys its cache.
    call.__code__ = call.__code__.replace(co_name=f"{name}_{uuid.uuid4().hex[:16]}")
    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"{step!r}, as a function."
    call.__wrapped__ = step  # type: ignore[attr-defined]  # inspect.unwrap(step) finds it
    for field in dataclasses.fields(step):  # the options, readable as before: step.donate
        if not field.name.startswith("_"):
            setattr(call, field.name, getattr(step, field.name))
    return call


def make_train_step(
    training_step: StepFn,
    *,
    accumulation_steps: int = 1,
    precision: Precision = None,
    loss_scale: DynamicLossScale | None = None,
    on_nonfinite: NonFinitePolicy = None,
    donate: bool = False,
    grad_norm: bool = False,
) -> MadeTrainStep:
    """Turns ``training_step(model, batch) -> {"loss": ...}`` into a pure training step.

    The result is called as ``new_state, metrics = train_step(state, batch)``. ``state``
    is left unchanged (BatchNorm statistics included: the new ones are in
    ``new_state.buffers``; a forward pass that writes into the weights themselves, as
    ``nn.Embedding(max_norm=...)`` does, is given copies in eager mode, but reaches frozen
    parameters, and all weights under ``torch.compile`` or ``vmap``). ``metrics`` holds
    ``"loss"`` (0-d) and every other entry that ``training_step`` returned, as detached
    tensors (numbers become tensors on the state's device; tensors stay on theirs):
    nothing is read back to the host.

    Gradients come from ``torch.autograd.grad`` in eager mode, and from
    ``torch.func.grad`` under ``torch.compile`` and ``torch.func.vmap`` (chosen
    automatically; both give the same numbers). Gradient clipping is part of the
    optimizer: ``optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-3))``.

    Args:
      training_step: ``(model, batch) -> Mapping`` with a scalar ``"loss"`` tensor; other
        entries with one element (tensors or numbers) are metrics, averaged per epoch,
        unless they have more elements in another batch of the epoch (predictions, also
        of a last batch of one); larger entries go to the batch-end callbacks.
      accumulation_steps: average gradients over this many calls (micro-batches) and
        update once; ``state.step`` counts updates, ``state.micro_step`` micro-batches.
      precision: ``None``, ``"bf16"`` or ``"fp16"``: autocast on the state's device.
        ``"fp16"`` also scales the loss dynamically (see ``loss_scale``).
      loss_scale: the dynamic loss-scale rules; defaults to ``DynamicLossScale()`` with
        ``"fp16"``. Steps whose gradients are not finite are skipped without a host sync.
      on_nonfinite: what to do when the loss or a gradient is inf or NaN: ``None``
        applies the update as computed; ``"skip"`` leaves params, EMA and optimizer state
        unchanged (and, for a non-finite loss, the buffers such as BatchNorm statistics)
        and counts the step in ``state.skipped_steps`` (no host sync; with several
        processes, a one-element floating-point metric that is not finite in one process
        is returned NaN in all, so the epoch means leave out the whole global batch, as
        one process would); ``"raise"`` raises
        ``FloatingPointError`` (reads the loss and a gradient check on the host every
        step; with fp16, gradients that overflow the loss scale are skipped by it).
      donate: the caller gives up the input state: the step writes the new parameters,
        optimizer state and EMA into its storage instead of allocating new tensors (as a
        hand-written loop does), which saves memory and allocation time. A state fresh
        from ``TrainState.create`` shares the module's tensors, so those would change
        too: start from ``state.clone()`` (see :meth:`TrainState.clone`).
        Using a donated state again (in a train or eval step, ``clone()``,
        ``state_dict()`` or ``save_checkpoint``) raises ``RuntimeError`` (after an eager
        step; a compiled one cannot mark the state it consumed). Works in eager mode and
        under ``torch.compile`` (a compiled ``vmap`` of the step too, and with ``"skip"``
        or fp16); in eager mode, a step under ``vmap`` or one that may skip an update
        (``"skip"``, fp16) computes out of place. ``fit`` donates the states it makes itself.
      grad_norm: also report ``"grad_norm"``: the global 2-norm of the gradients each
        update uses (accumulated over the window, averaged over processes, unscaled from
        the fp16 loss scale, before the optimizer clips them), the value
        ``torch.nn.utils.clip_grad_norm_`` returns in a hand loop; with accumulation only
        the call that updates reports it. It stays on the device like the other metrics
        (``fit`` shows and records its epoch mean as ``train/grad_norm``; a callback can
        read ``outputs["grad_norm"]`` to warn on a large one, at the cost of a host sync).

    Returns:
      The step, a function. ``torch.compile`` it as it is; each step made compiles on
      its own (its own graphs and recompile limit). ``inspect.unwrap(train_step)`` is the
      :class:`TrainStep` that describes it.

    Example:
      >>> import torch
      >>> import torch.nn.functional as F
      >>> import fnloop as fl
      >>> from fnloop import optim
      >>> def training_step(model, batch):
      ...     x, y = batch
      ...     return {"loss": F.mse_loss(model(x), y)}
      >>> state = fl.TrainState.create(torch.nn.Linear(3, 1), tx=optim.sgd(0.1), device="cpu")
      >>> train_step = fl.make_train_step(training_step)
      >>> batch = (torch.randn(8, 3), torch.randn(8, 1))
      >>> new_state, metrics = train_step(state, batch)
      >>> new_state.step, state.step, sorted(metrics)
      (1, 0, ['loss'])
    """
    spec = TrainStep(
        training_step=training_step,
        accumulation_steps=accumulation_steps,
        precision=precision,
        loss_scale=loss_scale,
        on_nonfinite=on_nonfinite,
        donate=donate,
        grad_norm=grad_norm,
    )
    return _as_function(spec, "train_step")


@dataclasses.dataclass(frozen=True)
class EvalStep:
    """A pure evaluation step made by :func:`make_eval_step`; call it as ``step(state, batch)``."""

    validation_step: StepFn
    use_ema: bool = True
    precision: Precision = None
    _templates: _Templates = dataclasses.field(
        default_factory=lambda: _Templates(False), init=False, repr=False, compare=False
    )
    _name: str = dataclasses.field(default="", init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_user_function(self.validation_step, "validation_step")
        object.__setattr__(self, "_name", _fn_name(self.validation_step))  # see TrainStep
        check_precision(self.precision)

    def __call__(self, state: TrainState, batch: Batch) -> Metrics:
        """Runs the step in eval mode without gradients; returns its metrics."""
        if not isinstance(state, TrainState):
            raise _not_a_state("eval_step", state, batch)
        check_not_donated(state, "this eval step")
        name = self._name
        device = state.device
        batch = to_device(batch, device)
        params = state.ema if self.use_ema and state.ema is not None else state.params
        compiling = torch.compiler.is_compiling()
        module, slots, frozen, first = self._templates.get(state.module, compiling)
        transformed = _in_transform(params, compiling, train=False)
        if _maybe_stacked(state, first):  # (see TrainStep)
            check_one_model(state, "eval_step", EVAL_STACKED_FIX)
        if self.precision is not None and not compiling:
            warn_if_no_effect(self.precision, params.get(first[0]))
        # Forward may write buffers in eval mode too (counters, observers); the weights
        # are not copied (see make_eval_step).
        buffers = _buffer_copies(state.buffers, frozen)
        model = BoundModel(module, params, buffers, slots=None if transformed else slots)
        if transformed and not compiling:  # under an eager torch.func.vmap
            # Batched: composite kernels (RNNs) decomposed, without attention's fast path.
            with (
                _clear_vmap_errors(name, module, self.precision),
                _no_mha_fastpath(),
                autocast(self.precision, device),
            ):
                out = _decomposed(lambda: self.validation_step(model, batch))
        else:
            with (
                torch.no_grad(),
                autocast(self.precision, device),
                _bound(model.slots, params, buffers),
            ):
                out = self.validation_step(model, batch)
        if not isinstance(out, Mapping):
            raise ValueError(
                f"{name} must return a mapping of metrics such as {{'loss': loss}}; got "
                f"{type(out).__name__}."
            )
        metrics = _metrics(out, name, device)
        if "loss" in metrics and metrics["loss"].numel() == 1:  # one element: reported 0-d
            metrics["loss"] = _metric_dtype(metrics["loss"].reshape(()))
        return metrics


_Step = TypeVar("_Step", TrainStep, EvalStep)


def made_step(fn: Any, kind: type[_Step]) -> _Step | None:
    """The ``kind`` that describes ``fn``, a made step (compiled or not), or None."""
    try:
        inner = inspect.unwrap(fn)  # torch.compile's wrapper has __wrapped__ too
    except ValueError:  # a __wrapped__ chain without end (a mock)
        return None
    return inner if isinstance(inner, kind) else None


def make_eval_step(
    validation_step: StepFn, *, use_ema: bool = True, precision: Precision = None
) -> MadeEvalStep:
    """Turns ``validation_step(model, batch) -> {...}`` into a pure evaluation step.

    The step runs the module in eval mode under ``torch.no_grad`` and returns its
    outputs as detached tensors (the loss 0-d). The state is not changed (buffers that forward
    writes are copies), unless forward writes into the weights themselves, as
    ``nn.Embedding(max_norm=...)`` does in eval mode too: the evaluated weights then
    change, as the module's would in a hand-written loop.

    Args:
      validation_step: ``(model, batch) -> Mapping`` of metrics (usually the training
        step itself).
      use_ema: evaluate the EMA weights when the state keeps them.
      precision: ``None``, ``"bf16"`` or ``"fp16"`` autocast.

    Returns:
      The step, a function (compiled on its own like a train step); ``inspect.unwrap``
      of it is the :class:`EvalStep` that describes it.

    Example:
      >>> import torch
      >>> import fnloop as fl
      >>> from fnloop import optim
      >>> state = fl.TrainState.create(torch.nn.Linear(3, 1), tx=optim.sgd(0.1), device="cpu")
      >>> eval_step = fl.make_eval_step(lambda model, x: {"mean": model(x).mean()})
      >>> sorted(eval_step(state, torch.randn(4, 3)))
      ['mean']
    """
    spec = EvalStep(validation_step=validation_step, use_ema=use_ema, precision=precision)
    return _as_function(spec, "eval_step")
