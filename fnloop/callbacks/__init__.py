"""Callbacks for ``fit``: the ten events of the seed's hooks, and built-in integrations."""

from fnloop.callbacks.base import EVENTS as EVENTS
from fnloop.callbacks.base import Callback as Callback
from fnloop.callbacks.base import CallbackList as CallbackList
