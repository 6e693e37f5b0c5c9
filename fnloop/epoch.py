"""One pass over a loader: ``train_epoch`` and ``validate_epoch``.

Metrics are reduced on the device as batch-size-weighted means (S11) and read back to
the host once per epoch, and when a progress bar redraws.
"""

from __future__ import annotations

import inspect
import math
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeAlias, cast

import torch
from tqdm.auto import tqdm

from fnloop.batch import batch_size as find_batch_size
from fnloop.callbacks.base import Callback, CallbackList, as_list
from fnloop.distributed import gather, mean_over_processes, world_size
from fnloop.ensemble import stacked_models
from fnloop.optim.base import scalar_dtype
from fnloop.state import StateT, TrainState
from fnloop.step import EvalStep, EvalStepFn, TrainStep, TrainStepFn, made_step
from fnloop.typing import Batch, EpochMeans, Metrics

BatchSize = int | Callable[[Batch], int] | None

EMPTY_LOADER_MSG = (
    "the {split} loader yielded no batches. Check the dataset length, batch_size and "
    "drop_last (a dataset smaller than one batch with drop_last=True yields nothing)."
)
EMPTY_UNSIZED_LOADER_MSG = (
    "the {split} loader yielded no batches. It has no len() (a DataLoader of an "
    "IterableDataset, or an iterable of your own), so this shows only once it is "
    "iterated. Check that its dataset yields examples, and that iterating it again "
    "starts over: an __iter__ that returns an iterator made once (in __init__), or reads "
    "a file opened there, is used up by the first epoch."
)

NOT_A_MADE_STEP_MSG = (
    "{fn} called the state it got as its model: {arg} takes a step of (state, batch), "
    "made from your function of (model, batch) by fl.{maker}(fn) (vmap that step, not fn, "
    "for a stacked state). fit is the one that takes your function as it is."
)

UNEQUAL_TRAIN_LENGTHS_MSG = (
    "the train loaders of the processes have different lengths ({lengths} batches, by "
    "rank), and every train step averages its gradients over the processes (a collective "
    "call), so the process with more batches would wait forever for the others. Give "
    "each process as many batches: a DistributedSampler over one data set (it pads the "
    "shares to equal size), or shares of equal size with the same batch_size and "
    "drop_last."
)


def _check_equal_lengths(loader: Iterable[Any]) -> None:
    """Raises in every process of a distributed run whose train loaders have different
    known lengths (a collective call); nothing outside one."""
    if world_size() == 1:
        return
    lengths = gather(loader_length(loader))
    if None not in lengths and len(set(lengths)) > 1:
        raise ValueError(UNEQUAL_TRAIN_LENGTHS_MSG.format(lengths=lengths))


def _callback_list(callbacks: Any) -> CallbackList:
    """``CallbackList`` of one callback, several (any iterable, as ``fit`` takes them), or
    None."""
    if isinstance(callbacks, CallbackList):
        return callbacks
    return CallbackList(as_list(callbacks, Callback))


_Totals: TypeAlias = tuple[dict[str, torch.Tensor], dict[str, int], dict[str, torch.Tensor]]


class MetricMeans:
    """Batch-size-weighted running means of step metrics, summed on the device.

    ``add`` only records the step's tensors; ``means`` adds them up with the device-side
    sums for its answer (once per epoch, or when a progress bar redraws), which is the
    only place a value is read back to the host. They are folded into the sums every
    ``FOLD_EVERY`` steps (on the device, without reading it), so memory does not grow
    with the epoch's length, and at a mid-epoch checkpoint, never at a read: the order of
    the additions, and so a float64 mean's last bit, does not depend on when a bar
    redraws (a resumed run's means are the uninterrupted run's).
    Entries with one element are metrics; a key that has more elements in any batch
    (predictions) is an output, never averaged, also in a batch where it has one (the
    last batch of one example). A batch of no examples weighs nothing (its NaN means
    are left out); a metric only such batches had has no mean.

    With ``models=n`` (the metrics of a vmapped step over ``n`` stacked models), the
    metrics are the entries with one element per model (shape ``(n,)``, or ``(n, 1)``
    from a step's one-element metric), and each mean is a list of ``n`` floats.

    With ``finite_only`` a non-finite value (the loss of a step that
    ``on_nonfinite="skip"`` skipped) is left out of its metric's mean, on the device; a
    metric with no finite value has the mean NaN.

    Args:
      models: how many stacked models each metric holds a value for, or ``None`` for
        one model and scalar metrics.
      finite_only: leave non-finite values out of the means.

    >>> import torch
    >>> m = MetricMeans()
    >>> m.add({"loss": torch.tensor(1.0)}, 3)
    >>> m.add({"loss": torch.tensor(3.0)}, 1)
    >>> m.means()
    {'loss': 1.5}
    >>> per_model = MetricMeans(models=2)
    >>> per_model.add({"loss": torch.tensor([1.0, 2.0])}, 3)
    >>> per_model.add({"loss": torch.tensor([3.0, 6.0])}, 1)
    >>> per_model.means()
    {'loss': [1.5, 3.0]}
    >>> skipping = MetricMeans(finite_only=True)
    >>> skipping.add({"loss": torch.tensor(1.0)}, 3)
    >>> skipping.add({"loss": torch.tensor(float("nan"))}, 1)
    >>> skipping.means()
    {'loss': 1.0}
    """

    FOLD_EVERY = 256

    def __init__(self, *, models: int | None = None, finite_only: bool = False) -> None:
        if models is not None and (type(models) is not int or models < 1):
            raise ValueError(f"models must be None or a positive int; got {models!r}.")
        if not isinstance(finite_only, bool):
            raise TypeError(f"finite_only takes True or False; got {finite_only!r}.")
        self.models = models
        self.finite_only = finite_only
        self._shape = torch.Size(() if models is None else (models,))
        self._pending: list[tuple[Metrics, int]] = []
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}
        # finite_only: the examples whose non-finite values were left out, on the device.
        self._dropped: dict[str, torch.Tensor] = {}
        self._outputs: set[str] = set()
        # A progress bar's running view: the first j pending steps added to the sums.
        self._view: tuple[int, _Totals] | None = None

    def _is_metric(self, value: torch.Tensor) -> bool:
        if self.models is None:
            return value.numel() == 1
        # One element per model: (n,), or (n, 1) from a step whose metric has shape (1,).
        return value.dim() >= 1 and value.shape[0] == self.models and value.numel() == self.models

    def add(self, metrics: Mapping[str, torch.Tensor], n: int) -> None:
        """Records one step's metrics for a batch of ``n`` examples (one element each, or
        one per model with ``models``: larger outputs, such as predictions for a
        callback, are not kept)."""
        self._outputs.update(k for k, v in metrics.items() if not self._is_metric(v))
        kept = {k: v for k, v in metrics.items() if k not in self._outputs}
        self._pending.append((kept, n))
        if len(self._pending) >= self.FOLD_EVERY:
            self._fold()

    def _metric_keys(self, sums: Mapping[str, torch.Tensor]) -> list[str]:
        """The names summed so far that are metrics (not outputs)."""
        return [k for k in sums if k not in self._outputs]

    def _fold(self) -> None:
        """Adds the pending steps into the sums: every ``FOLD_EVERY`` steps and at a
        checkpoint, never at a read (see the class docstring)."""
        if self._pending:
            self._sums, self._counts, self._dropped = self._folded(self._pending, self._totals())
            self._pending.clear()
        self._view = None

    def _totals(self) -> _Totals:
        return self._sums, self._counts, self._dropped

    def _folded(self, pending: list[tuple[Metrics, int]], base: _Totals) -> _Totals:
        """``base`` (sums, counts and left-out counts) with the ``pending`` steps added,
        as new dicts: this accumulator is unchanged."""
        sums, counts, dropped_all = dict(base[0]), dict(base[1]), dict(base[2])
        keys: dict[str, None] = {}
        for metrics, _ in pending:
            keys.update(dict.fromkeys(k for k in metrics if k not in self._outputs))
        for key in keys:
            # A batch of no examples weighs nothing: its mean (0/0, NaN) is left out, as
            # NaN * 0 would make the sum NaN.
            values = [(m[key], n) for m, n in pending if key in m and n != 0]
            if not values:
                continue
            stacked = torch.stack([v.reshape(self._shape) for v, _ in values])
            acc_dtype = scalar_dtype(stacked.device)
            # Folding between reads must not wait for the device: a CUDA copy from
            # pageable memory may, one from pinned memory does not.
            weights = torch.tensor([n for _, n in values], dtype=acc_dtype)
            if stacked.device.type == "cuda":
                weights = weights.pin_memory()
            weights = weights.to(stacked.device, non_blocking=True)
            weights = weights.reshape(-1, *[1] * len(self._shape))
            weighted = stacked.to(acc_dtype) * weights
            if self.finite_only:
                finite = torch.isfinite(stacked)
                weighted = torch.where(finite, weighted, 0)
                dropped = (weights * ~finite).sum(0)
                if key in dropped_all:  # restored ones too are on the CPU
                    dropped = dropped_all[key].to(dropped.device, dropped.dtype) + dropped
                dropped_all[key] = dropped
            total = weighted.sum(0)
            if key in sums:  # restored sums are on the CPU: add on the step's device
                total = sums[key].to(total.device, total.dtype) + total
            sums[key] = total
            counts[key] = counts.get(key, 0) + sum(n for _, n in values)
        return sums, counts, dropped_all

    def means(self, *, all_processes: bool = False) -> EpochMeans:
        """The weighted mean of every metric so far (reads the device once): a float per
        name, or with ``models`` a list of one float per model.

        With ``all_processes`` and an initialized ``torch.distributed`` group of several
        processes, the means are over every process's examples: a collective call, which
        every process must make. Metrics are matched by name; one that only some
        processes report is averaged over their examples.
        """
        folded = self._folded(self._pending, self._totals())
        if all_processes and world_size() > 1:
            return self._means_over_processes(folded)
        return self._means_of(folded)

    def _running_means(self) -> EpochMeans:
        """:meth:`means` for a progress bar, which reads them often: only the steps since
        its last read are added, to a copy of the sums kept for it (the sums themselves,
        and so the epoch's means, are not changed by when it reads)."""
        start, base = self._view if self._view is not None else (0, self._totals())
        view = self._folded(self._pending[start:], base)
        self._view = (len(self._pending), view)
        return self._means_of(view)

    def _means_of(self, totals: _Totals) -> EpochMeans:
        sum_of, count_of, dropped = totals
        keys = self._metric_keys(sum_of)
        if not keys:
            return {}
        # A restored sum no batch added to is on the CPU, in the CPU's dtype.
        device = sum_of[keys[0]].device
        dtype = scalar_dtype(device)
        sums = torch.stack([sum_of[k].to(device, dtype) for k in keys])
        counts = self._count_tensor(keys, device, dtype, count_of, dropped)
        values, counts_read = torch.stack([sums, counts]).tolist()
        return {k: _divide(v, n) for k, v, n in zip(keys, values, counts_read)}

    def _count_tensor(
        self,
        keys: list[str],
        device: torch.device,
        dtype: torch.dtype,
        count_of: Mapping[str, int],
        dropped: Mapping[str, torch.Tensor],
    ) -> Any:
        """The examples each of ``keys``'s mean is over, shaped as the sums (one row per
        key): the batch sizes added, less those of the values ``finite_only`` left out."""
        counts = (
            torch.tensor([float(count_of.get(k, 0)) for k in keys], dtype=dtype, device=device)
            .reshape(-1, *[1] * len(self._shape))
            .expand(len(keys), *self._shape)
        )
        if dropped:
            zero = torch.zeros(self._shape, dtype=dtype, device=device)
            left_out = [dropped.get(k, zero).to(device, dtype) for k in keys]
            counts = counts - torch.stack(left_out)
        return counts

    def _means_over_processes(self, totals: _Totals) -> EpochMeans:
        """Means over every process's examples, matched by name (a metric some processes
        did not report counts as zero examples there; an output in any process is a
        metric in none)."""
        sum_of, count_of, dropped = totals
        # The same order everywhere: rank 0's names first, as its steps returned them.
        ours = self._metric_keys(sum_of)
        everyone = gather((ours, sorted(self._outputs)))
        outputs = {k for _, keys in everyone for k in keys}
        names = list(dict.fromkeys(k for keys, _ in everyone for k in keys if k not in outputs))
        if not names:
            return {}
        like = next(iter(sum_of.values()), torch.zeros((), dtype=torch.float64))
        dtype = scalar_dtype(like.device)
        zero = torch.zeros(self._shape, dtype=dtype, device=like.device)
        sums = torch.stack([sum_of.get(k, zero).to(like.device, dtype) for k in names])
        # The examples added (a metric no process has examples of has no mean), and
        # those the means are over (less the values finite_only left out).
        added = torch.tensor(
            [float(count_of.get(k, 0)) for k in names], dtype=dtype, device=like.device
        )
        counts = self._count_tensor(names, like.device, dtype, count_of, dropped)
        both = mean_over_processes({"both": torch.cat([sums.flatten(), counts.flatten(), added])})[
            "both"
        ]
        size = sums.numel()
        sums_all = both[:size].reshape(sums.shape).tolist()
        counts_all = both[size : 2 * size].reshape(sums.shape).tolist()
        added_all = both[2 * size :].tolist()
        return {
            k: _divide(v, n) for k, v, n, a in zip(names, sums_all, counts_all, added_all) if a > 0
        }

    def state_dict(self) -> dict[str, Any]:
        """Sums and counts, for a mid-epoch checkpoint."""
        self._fold()
        keys = self._metric_keys(self._sums)
        return {
            "sums": {k: self._sums[k] for k in keys},
            "counts": {k: self._counts[k] for k in keys},
            # finite_only: the examples whose values were left out (absent: none).
            "dropped": {k: self._dropped[k] for k in keys if k in self._dropped},
            "outputs": sorted(self._outputs),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores what :meth:`state_dict` returned (by a ``MetricMeans`` of as many
        models)."""
        for key, total in state["sums"].items():
            if tuple(total.shape) != tuple(self._shape):
                raise ValueError(
                    f"the sums of {key!r} have shape {tuple(total.shape)}, but this "
                    f"MetricMeans(models={self.models}) keeps shape {tuple(self._shape)}: "
                    f"load them into a MetricMeans made with as many models as they hold."
                )
        self._pending.clear()
        self._view = None
        self._sums = dict(state["sums"])
        self._counts = {k: int(v) for k, v in state["counts"].items()}
        self._dropped = dict(state.get("dropped", {}))
        self._outputs = set(state.get("outputs", ()))


def _divide(total: float | list[float], count: float | list[float]) -> float | list[float]:
    """A sum over its count of examples, or one sum per model over one count per model
    (the counts are shaped as the sums); NaN over none (every value left out)."""
    if isinstance(total, list):
        assert isinstance(count, list)
        return [v / n if n else math.nan for v, n in zip(total, count)]
    assert not isinstance(count, list)
    return total / count if count else math.nan


def _format(means: Mapping[str, float | list[float]]) -> str:
    """``loss:0.25 acc:0.9``; per-model means as their range, ``loss:0.21..0.45``, where
    a NaN (a model that diverged) is the top, ``loss:0.21..nan``."""
    return " ".join(
        f"{k}:{min(v, key=_nan_last):.4g}..{max(v, key=_nan_last):.4g}"
        if isinstance(v, list)
        else f"{k}:{v:.4g}"
        for k, v in means.items()
    )


def _nan_last(value: float) -> tuple[bool, float]:
    # min and max of floats with a NaN depend on where it is (every comparison is False).
    return math.isnan(value), value


def loader_length(loader: Iterable[Any]) -> int | None:
    """``len(loader)``, or None where the length is not known: the loader has no
    ``__len__``, or its ``__len__`` raises ``TypeError`` (a DataLoader over an
    IterableDataset without one) or ``NotImplementedError`` (a stream that says so)."""
    try:
        return len(loader)  # type: ignore[arg-type]
    except (TypeError, NotImplementedError):
        return None


def _empty_loader_error(loader: Iterable[Any], split: str) -> ValueError:
    """The error for a loader that yielded no batches, with what to check for its kind."""
    msg = EMPTY_LOADER_MSG if loader_length(loader) is not None else EMPTY_UNSIZED_LOADER_MSG
    return ValueError(msg.format(split=split))


def _call_step(step: Callable[..., Any], state: TrainState, batch: Batch, arg: str) -> Any:
    """``step(state, batch)``; a user's ``(model, batch)`` function passed in place of a
    made step fails calling the state as a module, and the error says what to pass (a
    made step's own function calling a state, a teacher's say, is another mistake)."""
    try:
        return step(state, batch)
    except TypeError as e:
        made = made_step(step, TrainStep) is not None or made_step(step, EvalStep) is not None
        if made or str(e) != f"'{type(state).__name__}' object is not callable":
            raise
        maker = "make_train_step" if arg == "train_epoch" else "make_eval_step"
        fn = getattr(step, "__qualname__", None) or type(step).__name__
        raise TypeError(NOT_A_MADE_STEP_MSG.format(fn=fn, arg=arg, maker=maker)) from e


class _Bar:
    """A tqdm bar whose postfix (running means) is refreshed only when it redraws."""

    def __init__(self, loader: Iterable[Any], desc: str, enabled: bool, initial: int) -> None:
        total = loader_length(loader)
        self.bar = (
            tqdm(
                total=total,
                desc=desc,
                leave=False,
                initial=initial,
                file=sys.stderr,
                dynamic_ncols=True,
                mininterval=0.2,
            )
            if enabled
            else None
        )
        self.last = 0.0

    def update(self, means: MetricMeans) -> None:
        if self.bar is None:
            return
        now = time.monotonic()
        if now - self.last >= 0.5:
            self.bar.set_postfix_str(_format(means._running_means()), refresh=False)
            self.last = now
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _means_for(state: TrainState, means: MetricMeans | None, step: TrainStepFn) -> MetricMeans:
    """``means``, or a new accumulator, for the models ``state`` holds (leaving out the
    non-finite values of the steps that a made ``step`` with ``on_nonfinite="skip"``
    skipped, vmapped or compiled too)."""
    models = stacked_models(state)
    if means is None:
        skips = getattr(inspect.unwrap(step), "on_nonfinite", None) == "skip"
        return MetricMeans(models=models, finite_only=skips)
    if means.models != models:
        held = "one model" if models is None else f"{models} stacked model"
        raise ValueError(
            f"means was made with MetricMeans(models={means.models}) but the state holds "
            f"{held}{'s' if models and models > 1 else ''}; pass "
            f"MetricMeans(models={models}) or none."
        )
    return means


def train_epoch(
    state: StateT,
    train_step: TrainStepFn,
    loader: Iterable[Batch],
    *,
    callbacks: Any = None,
    batch_size: BatchSize = None,
    progress: bool = False,
    desc: str = "train",
    start_batch: int = 0,
    after_skip: Callable[[], None] | None = None,
    means: MetricMeans | None = None,
) -> tuple[StateT, EpochMeans]:
    """Runs ``train_step`` over every batch of ``loader``.

    A stacked state (:func:`fnloop.stack_states`) trains all its models at once with a
    vmapped step, ``torch.func.vmap(train_step, in_dims=(0, None),
    randomness="different")``; each metric's mean is then a list of one float per model.

    Args:
      state: the state to start from (not changed).
      train_step: a step made by :func:`fnloop.make_train_step` (vmapped for a stacked
        state).
      loader: any iterable of batches. In a ``torch.distributed`` run every process's
        must yield as many batches: loaders with ``len()`` of different lengths raise
        ``ValueError`` in every process (an unsized one cannot be checked up front, and
        a process with more batches than the others waits for them forever).
      callbacks: a callback or several (a list or any iterable, as ``fit`` takes them; or
        a ``CallbackList``) whose batch events fire.
      batch_size: fixed size or ``batch -> size`` when the first tensor is not
        batch-major.
      progress: show a tqdm bar with running means.
      desc: the bar's label.
      start_batch: skip this many batches first (resuming in the middle of an epoch);
        skipped batches are loaded but not trained on.
      after_skip: called once the skipped batches are loaded, before the next one is
        (``fit`` restores the random generators there).
      means: the accumulator to add to (``fit`` passes one restored from a checkpoint).

    Returns:
      The state after the epoch and the epoch's batch-size-weighted metric means (over
      every process's batches in a ``torch.distributed`` run): a float per name, or a
      list of one float per model for a stacked state. With a step made with
      ``on_nonfinite="skip"``, non-finite values (of the steps it skipped) are left out.

    Example:
      >>> import torch
      >>> import fnloop as fl
      >>> from fnloop import optim
      >>> state = fl.TrainState.create(torch.nn.Linear(2, 1), tx=optim.sgd(0.1), device="cpu")
      >>> step = fl.make_train_step(lambda m, b: {"loss": (m(b) ** 2).mean()})
      >>> state, metrics = fl.train_epoch(state, step, [torch.ones(4, 2), torch.ones(2, 2)])
      >>> state.step, sorted(metrics)
      (2, ['loss'])
    """
    callbacks = _callback_list(callbacks)
    means = _means_for(state, means, train_step)
    _check_equal_lengths(loader)
    batch_start = callbacks.handles("on_train_batch_start")
    batch_end = callbacks.handles("on_train_batch_end")
    bar = _Bar(loader, desc, progress, start_batch)
    seen = 0
    pending_skip = after_skip if start_batch > 0 else None
    try:
        for batch_idx, batch in enumerate(loader):
            seen += 1
            if batch_idx < start_batch:
                # Before the next batch is loaded: a dataset may draw random numbers there.
                if batch_idx == start_batch - 1 and pending_skip is not None:
                    pending_skip()
                    pending_skip = None
                continue
            if batch_start:
                state = callbacks("on_train_batch_start", state, batch, batch_idx)
            n = find_batch_size(batch, batch_size)
            new_state, outputs = _call_step(train_step, state, batch, "train_epoch")
            state = cast(StateT, new_state)  # a step keeps the state's class
            means.add(outputs, n)
            if batch_end:
                state = callbacks("on_train_batch_end", state, outputs, batch, batch_idx)
            bar.update(means)
    finally:
        bar.close()
    if seen == 0:
        raise _empty_loader_error(loader, "train")
    if pending_skip is not None:  # the loader has fewer than start_batch batches now
        pending_skip()
    return state, means.means(all_processes=True)


def validate_epoch(
    state: StateT,
    eval_step: EvalStepFn,
    loader: Iterable[Batch],
    *,
    callbacks: Any = None,
    batch_size: BatchSize = None,
    progress: bool = False,
    desc: str = "valid",
) -> tuple[StateT, EpochMeans]:
    """Runs ``eval_step`` over every batch of ``loader``; the state is only changed by callbacks.

    The arguments are :func:`train_epoch`'s. A stacked state is evaluated with a vmapped
    step, ``torch.func.vmap(eval_step, in_dims=(0, None))``. In a ``torch.distributed``
    run each process validates its own share, of any size: a loader that yields nothing
    is an error only when every process's does.

    Returns:
      The state (as callbacks left it) and the batch-size-weighted metric means (over
      every process's batches in a ``torch.distributed`` run): a float per name, or a
      list of one float per model for a stacked state.

    Example:
      >>> import torch
      >>> import fnloop as fl
      >>> from fnloop import optim
      >>> state = fl.TrainState.create(torch.nn.Linear(2, 1), tx=optim.sgd(0.1), device="cpu")
      >>> step = fl.make_eval_step(lambda m, b: {"loss": (m(b) * 0).mean()})
      >>> fl.validate_epoch(state, step, [torch.ones(4, 2)])[1]
      {'loss': 0.0}
    """
    callbacks = _callback_list(callbacks)
    means = MetricMeans(models=stacked_models(state))
    batch_start = callbacks.handles("on_validation_batch_start")
    batch_end = callbacks.handles("on_validation_batch_end")
    bar = _Bar(loader, desc, progress, 0)
    seen = 0
    try:
        for batch_idx, batch in enumerate(loader):
            seen += 1
            if batch_start:
                state = callbacks("on_validation_batch_start", state, batch, batch_idx)
            n = find_batch_size(batch, batch_size)
            outputs = _call_step(eval_step, state, batch, "validate_epoch")
            means.add(outputs, n)
            if batch_end:
                state = callbacks("on_validation_batch_end", state, outputs, batch, batch_idx)
            bar.update(means)
    finally:
        bar.close()
    # In a distributed run a process's share may be empty, as long as some are not.
    if (seen if world_size() == 1 else sum(gather(seen))) == 0:
        raise _empty_loader_error(loader, "valid")
    return state, means.means(all_processes=True)
