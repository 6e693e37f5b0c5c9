"""fnloop: functional, stateless training steps for PyTorch.

The whole training state is one immutable :class:`TrainState`; pure functions turn a
state and a batch into the next state; :func:`fit` composes them.
"""

from fnloop import callbacks as callbacks
from fnloop import checkpoint as checkpoint
from fnloop import distributed as distributed
from fnloop import optim as optim
from fnloop import state as state
from fnloop import typing as typing
from fnloop.batch import batch_size as batch_size
from fnloop.batch import to_device as to_device
from fnloop.checkpoint import CheckpointError as CheckpointError
from fnloop.checkpoint import CheckpointMismatchError as CheckpointMismatchError
from fnloop.checkpoint import load_checkpoint as load_checkpoint
from fnloop.checkpoint import load_model as load_model
from fnloop.checkpoint import save_checkpoint as save_checkpoint
from fnloop.checkpoint import save_model as save_model
from fnloop.ensemble import stack_states as stack_states
from fnloop.ensemble import unstack_states as unstack_states
from fnloop.epoch import MetricMeans as MetricMeans
from fnloop.epoch import train_epoch as train_epoch
from fnloop.epoch import validate_epoch as validate_epoch
from fnloop.fit import fit as fit
from fnloop.precision import DynamicLossScale as DynamicLossScale
from fnloop.precision import LossScaleState as LossScaleState
from fnloop.state import TrainState as TrainState
from fnloop.step import BoundModel as BoundModel
from fnloop.step import EvalStep as EvalStep
from fnloop.step import EvalStepFn as EvalStepFn
from fnloop.step import MadeEvalStep as MadeEvalStep
from fnloop.step import MadeTrainStep as MadeTrainStep
from fnloop.step import TrainStep as TrainStep
from fnloop.step import TrainStepFn as TrainStepFn
from fnloop.step import make_eval_step as make_eval_step
from fnloop.step import make_train_step as make_train_step
from fnloop.stopping import EarlyStopping as EarlyStopping
from fnloop.stopping import EarlyStoppingState as EarlyStoppingState

# `from fnloop import *` leaves out the modules `state` and `typing`: they would
# shadow the standard `typing` and the `state` every example names its TrainState.
__all__ = [
    "BoundModel",
    "CheckpointError",
    "CheckpointMismatchError",
    "DynamicLossScale",
    "EarlyStopping",
    "EarlyStoppingState",
    "EvalStep",
    "EvalStepFn",
    "LossScaleState",
    "MadeEvalStep",
    "MadeTrainStep",
    "MetricMeans",
    "TrainState",
    "TrainStep",
    "TrainStepFn",
    "batch_size",
    "callbacks",
    "checkpoint",
    "distributed",
    "fit",
    "load_checkpoint",
    "load_model",
    "make_eval_step",
    "make_train_step",
    "optim",
    "save_checkpoint",
    "save_model",
    "stack_states",
    "to_device",
    "train_epoch",
    "unstack_states",
    "validate_epoch",
]

__version__ = "0.1.0"
