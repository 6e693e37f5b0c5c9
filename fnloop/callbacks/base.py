"""The callback protocol: ten hooks of an object-oriented trainer as events of ``fit``."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from fnloop.state import TrainState
from fnloop.typing import Batch, History

EVENTS = (
    "on_fit_start",
    "on_fit_end",
    "on_train_epoch_start",
    "on_train_epoch_end",
    "on_train_batch_start",
    "on_train_batch_end",
    "on_validation_epoch_start",
    "on_validation_epoch_end",
    "on_validation_batch_start",
    "on_validation_batch_end",
)

# The events whose returned state may add to the history: one value per epoch.
HISTORY_EVENTS = ("on_train_epoch_end", "on_validation_epoch_end")
HISTORY_EVENT_MSG = (
    "{owner}.{event} returned a state with a changed history; the history holds one "
    "value per epoch, appended at on_train_epoch_end or on_validation_epoch_end "
    "(state.replace(history=fl.state.append_history(state.history, 'valid', {{'name': "
    "value}}))). Keep per-batch values in the callback and append their epoch summary "
    "at the epoch's end."
)

TEARDOWN_FAILED_MSG = (
    "{owner} failed while releasing what it holds after the run ended by an exception: "
    "{error}. What it writes at the end (a plot, a last log row) may be missing; the "
    "exception that ended the run is raised as it was."
)


class Callback:
    """Base class for ``fit`` callbacks: override the events you need.

    Every event receives the current :class:`~fnloop.TrainState` first and may return a
    new state (which ``fit`` then continues with) or ``None`` to keep it; only the
    epoch-end events may add to its history (one value per epoch). Epoch-end
    events receive the epoch's metrics as host floats keyed ``"train/loss"``,
    ``"valid/acc"``, ...; batch-end events receive the step's outputs as device tensors
    (reading them with ``float()`` forces a host sync, so do it sparingly).

    ``fit`` trains with a donating step (unless it is given a compiled made step, or one in
    a wrapper of yours, which it runs as given), which writes each new state into the
    previous one's memory: a state a callback receives holds its values only until the
    next training step. To keep one (a snapshot of the weights at some epoch), store
    ``state.clone()``, not ``state``.

    Events fire in this order in each epoch: ``on_train_epoch_start``, then per batch
    ``on_train_batch_start`` / ``on_train_batch_end``, ``on_train_epoch_end``, then (with
    a validation loader) ``on_validation_epoch_start``, per batch
    ``on_validation_batch_start`` / ``on_validation_batch_end``, and
    ``on_validation_epoch_end``. ``on_fit_start`` and ``on_fit_end`` enclose the run.

    Example:
      >>> import fnloop as fl
      >>> class PrintLoss(fl.callbacks.Callback):
      ...     def on_train_epoch_end(self, state, metrics):
      ...         print(f"epoch {state.epoch}: {metrics['train/loss']:.3f}")
    """

    def teardown(self) -> None:
        """Releases what the callback holds (files, writers, a profiler) when ``fit`` ends
        by an exception, where ``on_fit_end`` does not run. Not an event: it gets no
        state and returns nothing."""

    def on_fit_start(self, state: TrainState, /) -> TrainState | None:
        """Before the first epoch of this ``fit`` call (after any resume)."""

    def on_fit_end(self, state: TrainState, /) -> TrainState | None:
        """After the last epoch, also when early stopping ended the run; with ``out_dir``,
        ``fit`` has written ``best_model.pt`` by then."""

    def on_train_epoch_start(self, state: TrainState, /) -> TrainState | None:
        """Before the first training batch of an epoch.

        When ``fit`` resumes from a checkpoint taken in the middle of an epoch, this event
        fires again for that epoch (so a callback can set itself up), but the state it
        returns then is not used: the checkpoint holds what it returned the first time.
        """

    def on_train_epoch_end(
        self, state: TrainState, metrics: Mapping[str, float], /
    ) -> TrainState | None:
        """After the last training batch; ``metrics`` are the epoch's ``train/...`` means."""

    def on_train_batch_start(
        self, state: TrainState, batch: Batch, batch_idx: int, /
    ) -> TrainState | None:
        """Before each training step."""

    def on_train_batch_end(
        self,
        state: TrainState,
        outputs: Mapping[str, torch.Tensor],
        batch: Batch,
        batch_idx: int,
        /,
    ) -> TrainState | None:
        """After each training step; ``state`` is the state after the step."""

    def on_validation_epoch_start(self, state: TrainState, /) -> TrainState | None:
        """Before the first validation batch of an epoch."""

    def on_validation_epoch_end(
        self, state: TrainState, metrics: Mapping[str, float], /
    ) -> TrainState | None:
        """After the last validation batch; ``metrics`` are the epoch's ``valid/...`` means."""

    def on_validation_batch_start(
        self, state: TrainState, batch: Batch, batch_idx: int, /
    ) -> TrainState | None:
        """Before each validation step."""

    def on_validation_batch_end(
        self,
        state: TrainState,
        outputs: Mapping[str, torch.Tensor],
        batch: Batch,
        batch_idx: int,
        /,
    ) -> TrainState | None:
        """After each validation step."""


def _overrides(callback: Any, event: str) -> bool:
    """Whether ``callback`` handles ``event``: a method of its own (on its class, or set
    on the instance), not ``Callback``'s no-op."""
    method = getattr(callback, event, None)
    return callable(method) and getattr(method, "__func__", None) is not getattr(Callback, event)


def as_list(items: Any, kind: type) -> list[Any]:
    """One item of ``kind``, several (any iterable), or None, as a list; anything else as
    a one-item list, for the caller's type check to name (a class, a string, another
    object). ``fit``, ``train_epoch`` and ``validate_epoch`` take their callbacks so."""
    if items is None:
        return []
    if isinstance(items, kind | str | type) or not isinstance(items, Iterable):
        return [items]
    return list(items)


def _same_history(a: History, b: History) -> bool:
    """Whether two histories hold the same values, a NaN equal to a NaN: a history
    rebuilt with equal values (a checkpoint's, loaded) holds other NaN objects, which
    ``==`` takes for other values."""
    if a is b:
        return True
    if a.keys() != b.keys() or any(a[s].keys() != b[s].keys() for s in a):
        return False
    return all(
        len(ours) == len(theirs)
        and all(x == y or (x != x and y != y) for x, y in zip(ours, theirs))  # (NaN: x != x)
        for s in a
        for ours, theirs in ((a[s][n], b[s][n]) for n in a[s])
    )


def check_callbacks(callbacks: Sequence[Any]) -> None:
    """Raises ``TypeError`` for anything in ``callbacks`` that is not a callback object."""
    for cb in callbacks:
        if isinstance(cb, type):
            raise TypeError(
                f"callbacks holds the class {cb.__name__}; pass an instance: {cb.__name__}(...)."
            )
        if not any(hasattr(cb, e) for e in EVENTS):
            raise TypeError(
                f"{type(cb).__name__} is not a callback: it has none of the events "
                f"{', '.join(EVENTS)}. Subclass fnloop.callbacks.Callback."
            )


class CallbackList:
    """Dispatches events to the callbacks that handle them; the driver's only view of them.

    Args:
      callbacks: the callbacks, in the order they run: a sequence (any iterable, read
        once) or one callback.
    """

    def __init__(self, callbacks: Sequence[Any]) -> None:
        # One callback is a list of one (as fit and train_epoch take it); an iterable is
        # read once (a generator checked first would leave no callback to run).
        if any(hasattr(callbacks, e) for e in EVENTS) or not isinstance(callbacks, Iterable):
            callbacks = [callbacks]
        self.callbacks = list(callbacks)
        check_callbacks(self.callbacks)
        # Each handler with its callback's class name, for errors (a hook set on an
        # instance is a plain function, which names no class).
        self._handlers = {
            e: [(type(cb).__name__, getattr(cb, e)) for cb in self.callbacks if _overrides(cb, e)]
            for e in EVENTS
        }

    def teardown(self, logger: logging.Logger | None = None) -> None:
        """Lets every callback release what it holds when ``fit`` ends by an exception
        (``on_fit_end`` does it otherwise); an error there does not hide the first one.

        A callback whose ``teardown`` raises (a plot that cannot be drawn, a log that
        cannot be written) is reported as a warning on ``logger`` (``fit`` passes the
        run's), or with ``warnings.warn`` without one; the other callbacks are still
        torn down.
        """
        for cb in self.callbacks:
            teardown = getattr(cb, "teardown", None)
            if not callable(teardown):
                continue
            try:
                teardown()
            except Exception as e:
                message = TEARDOWN_FAILED_MSG.format(
                    owner=type(cb).__name__, error=f"{type(e).__name__}: {e}"
                )
                if logger is not None:
                    logger.warning(message)
                else:
                    warnings.warn(message, RuntimeWarning, stacklevel=2)

    def handles(self, event: str) -> bool:
        """Whether any callback handles ``event`` (lets the driver skip work)."""
        return bool(self._handlers[event])

    def __call__(self, event: str, state: TrainState, *args: Any) -> TrainState:
        """Runs ``event`` on every callback; returns the (possibly replaced) state."""
        for owner, handler in self._handlers[event]:
            result = handler(state, *args)
            if result is None:
                continue
            if not isinstance(result, TrainState):
                raise TypeError(
                    f"{owner}.{event} returned a {type(result).__name__}; a callback must "
                    f"return a TrainState (e.g. state.replace(...)) or None to keep the state."
                )
            if event not in HISTORY_EVENTS and not _same_history(result.history, state.history):
                raise ValueError(HISTORY_EVENT_MSG.format(owner=owner, event=event))
            state = result
        return state
