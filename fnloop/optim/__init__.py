"""Functional optimizers in the style of optax, with ``torch.optim``'s update rules.

>>> import torch
>>> from fnloop import optim
>>> params = {"w": torch.tensor([1.0, -1.0])}
>>> tx = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-2))
>>> opt_state = tx.init(params)
>>> updates, opt_state = tx.update({"w": torch.tensor([0.3, -0.2])}, opt_state, params)
>>> params = optim.apply_updates(params, updates)
"""

from fnloop.optim.alias import adagrad as adagrad
from fnloop.optim.alias import adam as adam
from fnloop.optim.alias import adamw as adamw
from fnloop.optim.alias import rmsprop as rmsprop
from fnloop.optim.alias import sgd as sgd
from fnloop.optim.base import EmptyState as EmptyState
from fnloop.optim.base import GradientTransformation as GradientTransformation
from fnloop.optim.base import apply_updates as apply_updates
from fnloop.optim.base import chain as chain
from fnloop.optim.base import identity as identity
from fnloop.optim.base import partition as partition
from fnloop.optim.plateau import ReduceOnPlateau as ReduceOnPlateau
from fnloop.optim.plateau import ReduceOnPlateauState as ReduceOnPlateauState
from fnloop.optim.plateau import has_plateau as has_plateau
from fnloop.optim.plateau import observe_metric as observe_metric
from fnloop.optim.plateau import reduce_on_plateau as reduce_on_plateau
from fnloop.optim.schedule import constant_schedule as constant_schedule
from fnloop.optim.schedule import cosine_schedule as cosine_schedule
from fnloop.optim.schedule import exponential_schedule as exponential_schedule
from fnloop.optim.schedule import join_schedules as join_schedules
from fnloop.optim.schedule import linear_schedule as linear_schedule
from fnloop.optim.schedule import multistep_schedule as multistep_schedule
from fnloop.optim.schedule import onecycle_schedule as onecycle_schedule
from fnloop.optim.schedule import polynomial_schedule as polynomial_schedule
from fnloop.optim.schedule import step_schedule as step_schedule
from fnloop.optim.transform import ScaleByAdagradState as ScaleByAdagradState
from fnloop.optim.transform import ScaleByAdamState as ScaleByAdamState
from fnloop.optim.transform import ScaleByLearningRateState as ScaleByLearningRateState
from fnloop.optim.transform import ScaleByRmsState as ScaleByRmsState
from fnloop.optim.transform import TraceState as TraceState
from fnloop.optim.transform import add_decayed_weights as add_decayed_weights
from fnloop.optim.transform import clip as clip
from fnloop.optim.transform import clip_by_global_norm as clip_by_global_norm
from fnloop.optim.transform import learning_rates as learning_rates
from fnloop.optim.transform import scale as scale
from fnloop.optim.transform import scale_by_adagrad as scale_by_adagrad
from fnloop.optim.transform import scale_by_adam as scale_by_adam
from fnloop.optim.transform import scale_by_learning_rate as scale_by_learning_rate
from fnloop.optim.transform import scale_by_rms as scale_by_rms
from fnloop.optim.transform import trace as trace
from fnloop.optim.transform import with_learning_rates as with_learning_rates

__all__ = [
    "EmptyState",
    "GradientTransformation",
    "ReduceOnPlateau",
    "ReduceOnPlateauState",
    "ScaleByAdagradState",
    "ScaleByAdamState",
    "ScaleByLearningRateState",
    "ScaleByRmsState",
    "TraceState",
    "adagrad",
    "adam",
    "adamw",
    "add_decayed_weights",
    "apply_updates",
    "chain",
    "clip",
    "clip_by_global_norm",
    "constant_schedule",
    "cosine_schedule",
    "exponential_schedule",
    "has_plateau",
    "identity",
    "join_schedules",
    "learning_rates",
    "linear_schedule",
    "multistep_schedule",
    "observe_metric",
    "onecycle_schedule",
    "partition",
    "polynomial_schedule",
    "reduce_on_plateau",
    "rmsprop",
    "scale",
    "scale_by_adagrad",
    "scale_by_adam",
    "scale_by_learning_rate",
    "scale_by_rms",
    "sgd",
    "step_schedule",
    "trace",
    "with_learning_rates",
]
