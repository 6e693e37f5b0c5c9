"""fnloop: functional, stateless training steps for PyTorch.

The whole training state is one immutable :class:`TrainState`; pure functions turn a
state and a batch into the next state; :func:`fit` composes them.
"""

from fnloop import optim as optim
from fnloop.state import TrainState as TrainState

__version__ = "0.1.0"
