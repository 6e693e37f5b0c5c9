"""Stacking and unstacking states (fnloop/ensemble.py) and batches (fnloop/batch.py):
inputs that differ in ways a stacked state cannot hold, and batch shapes."""

from __future__ import annotations

import dataclasses
import enum
import functools
import operator
import re

import pytest
import torch
from torch import nn

import fnloop as fl
from fnloop import optim


def make(seed: int = 0, device: str = "cpu", **kwargs) -> fl.TrainState:
    torch.manual_seed(seed)
    return fl.TrainState.create(nn.Linear(3, 2), tx=optim.sgd(0.1), device=device, **kwargs)


def test_stacking_states_on_different_devices_names_the_tensor_and_the_devices():
    """``torch.stack`` of tensors on two devices raised torch's own error, naming neither
    the state nor the tensor (meta stands in for a second accelerator)."""
    with pytest.raises(ValueError, match=r"states\[1\] leaf 'params\.\w+'.*meta.*cpu"):
        fl.stack_states([make(0), make(1, device="meta")])


def test_stacking_no_states_is_a_clear_error():
    with pytest.raises(ValueError, match=r"one or more TrainStates; got none"):
        fl.stack_states([])


class Scale(nn.Module):
    """A module whose size no attribute records: only its parameter's shape shows it."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w


def test_states_whose_tensors_have_other_shapes_are_refused_naming_the_leaf():
    """The module templates compare alike here, so the leaves' shapes are what tells
    the states apart (torch.stack's own error names neither state nor tensor)."""
    states = [fl.TrainState.create(Scale(n), tx=optim.sgd(0.1), device="cpu") for n in (3, 4)]
    with pytest.raises(
        ValueError,
        match=r"states\[1\] leaf 'params\.w' has shape \(4,\) .* states\[0\] has \(3,\) .*"
        r"one architecture",
    ):
        fl.stack_states(states)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Scored(fl.TrainState):
    best: object = None  # a leaf: stacked when it is a tensor
    tag: str = dataclasses.field(default="", metadata={"static": True})


def test_a_field_that_is_no_tensor_in_a_later_state_is_named():
    """Only ``states[0]``'s leaves were checked to be tensors: a float in ``states[1]``
    failed with ``AttributeError: 'float' object has no attribute 'shape'``."""
    one = Scored.create(nn.Linear(3, 2), tx=optim.sgd(0.1), device="cpu", best=torch.tensor(1.0))
    two = one.replace(best=2.0)
    with pytest.raises(TypeError, match=r"states\[1\]'s leaf 'best' is a float"):
        fl.stack_states([one, two])
    with pytest.raises(TypeError, match=r"leaf 'best' is a float"):
        fl.stack_states([two, one])


def test_states_with_other_histories_or_static_fields_are_refused_not_overwritten():
    """The static parts of a stacked state are ``states[0]``'s: two models fitted apart
    for as many epochs stacked, and each one unstacked reported ``states[0]``'s history
    (and a subclass's static field) as its own."""
    history = fl.state.append_history(fl.state.freeze_history({}), "valid", {"acc": 0.5})
    one, two = make(0).replace(epoch=1, history=history), make(1).replace(epoch=1)
    with pytest.raises(ValueError, match=r"states\[1\]\.history differs from states\[0\]"):
        fl.stack_states([one, two])
    got = fl.unstack_states(fl.stack_states([one, two.replace(history=one.history)]))
    assert [s.history for s in got] == [history, history]
    best = torch.tensor(0.0)
    a = Scored.create(nn.Linear(3, 2), tx=optim.sgd(0.1), device="cpu", best=best, tag="a")
    b = Scored.create(nn.Linear(3, 2), tx=optim.sgd(0.1), device="cpu", best=best, tag="b")
    with pytest.raises(
        ValueError,
        match=r"states\[1\]\.tag is 'b' but states\[0\]\.tag is 'a'.*s\.replace\(tag=states",
    ):
        fl.stack_states([a, b])
    plain = fl.TrainState.create(nn.Linear(3, 2), tx=optim.sgd(0.1), device="cpu")

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Named(fl.TrainState):  # no fields of its own: the same leaves as a TrainState
        pass

    named = Named.create(nn.Linear(3, 2), tx=optim.sgd(0.1), device="cpu")
    with pytest.raises(TypeError, match=r"states\[1\] is a Named but states\[0\] is a TrainState"):
        fl.stack_states([plain, named])


@dataclasses.dataclass(frozen=True, kw_only=True)
class Masked(fl.TrainState):
    mask: object = dataclasses.field(default=None, metadata={"static": True})


def test_static_fields_whose_values_cannot_be_compared_are_refused():
    """``==`` of two tensors is no yes or no: such static values count as different
    (unless they are one object), not as equal, which gave every model states[0]'s."""
    a = Masked.create(nn.Linear(3, 2), tx=optim.sgd(0.1), device="cpu", mask=torch.ones(2))
    b = a.replace(mask=torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match=r"states\[1\]\.mask is tensor\(\[1\., 0\.\]\) but"):
        fl.stack_states([a, b])
    assert fl.unstack_states(fl.stack_states([a, a]))[1].mask is a.mask


def test_unstacking_a_stack_gives_back_the_states_exactly():
    """Every field, tensors (with their dtypes: BatchNorm's int64 count) and the rest,
    but the module template and ``tx``, which are ``states[0]``'s (documented)."""
    states = []
    for seed, lr in ((0, 0.1), (1, 0.01)):
        torch.manual_seed(seed)
        module = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
        state = fl.TrainState.create(module, tx=optim.adamw(lr), ema_decay=0.9, device="cpu")
        x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        step = fl.make_train_step(lambda m, b: {"loss": nn.functional.cross_entropy(m(b[0]), b[1])})
        state, _ = step(state, (x, y))
        states.append(state.replace(epoch=2))
    got = fl.unstack_states(fl.stack_states(states))
    for one, want in zip(got, states, strict=True):
        assert type(one) is type(want)
        assert one.module is states[0].module and one.tx is states[0].tx
        for f in dataclasses.fields(want):
            if f.name in ("module", "tx"):
                continue
            a, b = getattr(one, f.name), getattr(want, f.name)
            leaves_a, leaves_b = fl._tree.tree_leaves(a), fl._tree.tree_leaves(b)
            assert len(leaves_a) == len(leaves_b), f.name
            for x, y in zip(leaves_a, leaves_b):
                if isinstance(y, torch.Tensor):
                    assert x.dtype == y.dtype and torch.equal(x, y), f.name
                else:
                    assert x is y or x == y, f.name
    assert got[1].buffers["1.num_batches_tracked"].dtype == torch.int64


def _norm_scaled_sgd(lr: float) -> optim.GradientTransformation:
    """SGD whose init reads the parameters' values (each update scaled by the initial
    largest magnitude of its parameter): its init cannot run on the meta device."""

    def init(params):
        return {n: torch.tensor(float(p.abs().max()), dtype=p.dtype) for n, p in params.items()}

    def update(updates, state, params=None):
        return {n: -lr * u / state[n] for n, u in updates.items()}, state

    return optim.GradientTransformation(init, update)


def test_unstacking_a_state_whose_optimizer_init_reads_values_gives_back_the_states():
    """unstack_states finds one model's optimizer state shapes by tx.init on the meta
    device; an init that reads values raises there, and the states are split without
    that check, each as it was stacked."""
    states = [make(seed).replace(tx=_norm_scaled_sgd(0.1)) for seed in (0, 1)]
    states = [s.replace(opt_state=s.tx.init(s.params)) for s in states]
    with pytest.raises(RuntimeError, match="meta"):
        states[0].tx.init(
            {n: torch.empty_like(p, device="meta") for n, p in states[0].params.items()}
        )
    got = fl.unstack_states(fl.stack_states(states))
    for one, want in zip(got, states, strict=True):
        for name in want.params:
            assert torch.equal(one.params[name], want.params[name])
            assert torch.equal(one.opt_state[name], want.opt_state[name])


def test_unstacked_states_are_views_of_the_stack():
    """As documented: unstacking copies nothing (``state.clone()`` makes a copy)."""
    stacked = fl.stack_states([make(0, ema_decay=0.9), make(1, ema_decay=0.9)])
    for i, one in enumerate(fl.unstack_states(stacked)):
        for part, whole in zip(fl._tree.tree_leaves(one), fl._tree.tree_leaves(stacked)):
            assert part.untyped_storage().data_ptr() == whole.untyped_storage().data_ptr()
            assert torch.equal(part, whole[i])


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("layout", [torch.strided, torch.jagged])
def test_the_size_of_a_nested_tensor_batch_is_its_number_of_sequences(layout):
    """A nested tensor of the default (strided) layout has no ``shape``: reading its
    ``shape[0]`` raised "NestedTensorImpl doesn't support sizes"."""
    seqs = [torch.ones(2, 3), torch.ones(4, 3), torch.ones(1, 3)]
    nested = torch.nested.nested_tensor(seqs, layout=layout)
    assert fl.batch_size(nested) == len(seqs)
    assert fl.batch_size({"x": nested, "y": torch.zeros(3)}) == len(seqs)
    assert fl.to_device((nested,), "cpu")[0] is nested


class _Act(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _leaky(slope: float) -> nn.Module:
    torch.manual_seed(0)
    one = torch.ones(())  # captured too: a tensor, equal in every model
    return nn.Sequential(nn.Linear(2, 2), _Act(lambda x: nn.functional.leaky_relu(x, slope) * one))


def test_modules_whose_functions_capture_other_values_are_refused():
    """An activation kept as a lambda was compared by its code alone: two models whose
    lambdas capture other slopes stacked, and the vmapped step ran states[0]'s slope
    for both (the same setting given through functools.partial was refused)."""
    states = [fl.TrainState.create(_leaky(s), tx=optim.sgd(0.1), device="cpu") for s in (0.01, 0.5)]
    x = -torch.ones(4, 2)
    evaluate = fl.make_eval_step(lambda m, b: {"out": m(b).sum()})
    alone = [float(evaluate(s, x)["out"]) for s in states]
    assert alone[0] != alone[1]
    with pytest.raises(
        ValueError,
        match=r"1\.fn is _leaky.<locals>.<lambda> in both.* to \[tensor\(1\.\), 0\.01\] in one an",
    ):
        fl.stack_states(states)
    # Functions of other code are named as such (not as one function capturing others).
    with pytest.raises(
        ValueError, match=r"1\.fn is <function _tanh_of .* in one and <function _sig"
    ):
        fl.stack_states(
            [fl.TrainState.create(_with(f), tx=optim.sgd(0.1)) for f in (_tanh_of, _sigmoid_of)]
        )
    # The same code capturing the same values (equal tensors too) still stacks.
    same = [fl.TrainState.create(_leaky(0.1), tx=optim.sgd(0.1), device="cpu") for _ in range(2)]
    stacked = fl.stack_states(same)
    many = torch.func.vmap(evaluate, in_dims=(0, None))(stacked, x)["out"]
    torch.testing.assert_close(many, torch.stack([evaluate(s, x)["out"] for s in same]))


class _Slope:
    """An activation's settings in an object of one's own, used through a bound method."""

    def __init__(self, slope: float) -> None:
        self.slope = slope

    def apply(self, x):
        return nn.functional.leaky_relu(x, self.slope)


class _GentleSlope:
    slope = 0.01

    @classmethod
    def act(cls, x):
        return nn.functional.leaky_relu(x, cls.slope)


class _SteepSlope(_GentleSlope):
    slope = 0.5


def _tanh_of(x):
    return torch.tanh(x)


def _sigmoid_of(x):
    return torch.sigmoid(x)


def _unfilled():
    """A function whose closure cell is never filled (compared as capturing nothing)."""

    def act(x):
        return later(x)

    return act
    later = torch.relu  # unreachable: only makes `later` a cell of act


def _scaled_leaky(s):
    """One code for every slope and scale: only the captured tuple tells them apart."""
    return lambda x: nn.functional.leaky_relu(x, s[0]) * s[1]


def _twice(f):
    """One code for every function captured: only ``f`` tells them apart."""
    return lambda x: f(x) * 2


def _times(t: torch.Tensor):
    """One code for every tensor captured: only ``t``'s values tell them apart."""
    return lambda x: x * t


def _times_first(ts: tuple[torch.Tensor, ...]):
    """One code for every tuple of tensors captured: only the tensors tell them apart."""
    return lambda x: x * ts[0]


def _leaky_default(slope: float):
    def act(x, s=slope):
        return nn.functional.leaky_relu(x, s)

    return act


def _leaky_keyword_default(slope: float):
    def act(x, *, s=slope):
        return nn.functional.leaky_relu(x, s)

    return act


def _scale(factor: float, x: torch.Tensor) -> torch.Tensor:
    return x * factor


class _Halver:
    """A class attribute of the owner's class, not the owner's own, sets the scale."""

    factor = 0.5

    def apply(self, x):
        return x * self.factor


class _Doubler(_Halver):
    factor = 2.0


class _GentleAct(nn.Module):
    """A module used through its forward (not a submodule): its class sets the slope."""

    slope = 0.01

    def forward(self, x):
        return nn.functional.leaky_relu(x, self.slope)


class _SteepAct(_GentleAct):
    slope = 0.5


def _with(fn) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 2), _Act(fn))


OTHER_ACTIVATIONS = {
    "partial": (
        lambda: functools.partial(nn.functional.leaky_relu, negative_slope=0.01),
        lambda: functools.partial(nn.functional.leaky_relu, negative_slope=0.5),
    ),
    "builtin": (lambda: torch.relu, lambda: torch.tanh),
    "bound method": (lambda: _Slope(0.01).apply, lambda: _Slope(0.5).apply),
    "module method": (lambda: nn.LeakyReLU(0.01).forward, lambda: nn.LeakyReLU(0.5).forward),
    "classmethod": (lambda: _GentleSlope.act, lambda: _SteepSlope.act),
    # Each pair below shares one code object, so only what it names tells them apart.
    "captured tuple": (lambda: _scaled_leaky((0.5, 1.0)), lambda: _scaled_leaky((0.5, 2.0))),
    "captured function": (lambda: _twice(_tanh_of), lambda: _twice(_sigmoid_of)),
    "captured builtin": (lambda: _twice(torch.tanh), lambda: _twice(torch.sigmoid)),
    "captured tensor": (lambda: _times(torch.tensor(0.5)), lambda: _times(torch.tensor(2.0))),
    "captured tensors in a tuple": (
        lambda: _times_first((torch.tensor(0.5),)),
        lambda: _times_first((torch.tensor(2.0),)),
    ),
    "default": (lambda: _leaky_default(0.01), lambda: _leaky_default(0.5)),
    "keyword default": (lambda: _leaky_keyword_default(0.01), lambda: _leaky_keyword_default(0.5)),
    "partial argument": (
        lambda: functools.partial(_scale, 0.5),
        lambda: functools.partial(_scale, 2.0),
    ),
    "partial function": (
        lambda: functools.partial(_tanh_of),
        lambda: functools.partial(_sigmoid_of),
    ),
    "subclass's method": (lambda: _Halver().apply, lambda: _Doubler().apply),
    "subclass module's method": (lambda: _GentleAct().forward, lambda: _SteepAct().forward),
    # A module outside the model keeps its own mode (the steps set the model's only).
    "method of a module in another mode": (
        lambda: nn.Dropout(1.0).forward,
        lambda: nn.Dropout(1.0).eval().forward,
    ),
}


@pytest.mark.parametrize("kind", list(OTHER_ACTIVATIONS))
def test_modules_whose_activations_differ_in_settings_are_refused(kind):
    """The activation kept as an attribute computes otherwise in each model (checked
    by evaluating them alone): a stacked state would run states[0]'s for both."""
    first, second = OTHER_ACTIVATIONS[kind]
    states = [
        fl.TrainState.create(_with(f()), tx=optim.sgd(0.1), device="cpu") for f in (first, second)
    ]
    x = -torch.ones(4, 2)
    evaluate = fl.make_eval_step(lambda m, b: {"out": m(b).sum()})
    assert float(evaluate(states[0], x)["out"]) != float(evaluate(states[1], x)["out"])
    with pytest.raises(ValueError, match=r"1\.fn (is|hold) .* in one and .* in the other"):
        fl.stack_states(states)


@pytest.mark.parametrize("kind", [*OTHER_ACTIVATIONS, "unfilled cell"])
def test_modules_whose_activations_are_alike_stack_and_run_as_alone(kind):
    """Made twice alike (other objects of the same settings), they stack, and the
    vmapped evaluation of the stacked state is each model's own."""
    make_act = _unfilled if kind == "unfilled cell" else OTHER_ACTIVATIONS[kind][1]
    states = [
        fl.TrainState.create(_with(make_act()), tx=optim.sgd(0.1), device="cpu") for _ in "ab"
    ]
    stacked = fl.stack_states(states)
    if kind == "unfilled cell":
        return  # (its forward cannot run)
    x = -torch.ones(4, 2)
    evaluate = fl.make_eval_step(lambda m, b: {"out": m(b).sum()})
    many = torch.func.vmap(evaluate, in_dims=(0, None))(stacked, x)["out"]
    torch.testing.assert_close(many, torch.stack([evaluate(s, x)["out"] for s in states]))


class _Kind(enum.Enum):
    RELU = 1
    TANH = 2


class _Branch(nn.Module):
    """A layer whose forward branches on a plain setting (set only where it is given)."""

    def __init__(self, value=None) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)
        if value is not None:
            self.value = value

    def forward(self, x):
        tanh = getattr(self, "value", "relu") in ("tanh", _Kind.TANH, torch.float64)
        return torch.tanh(self.fc(x)) if tanh else torch.relu(self.fc(x))


def _seeded_states(make, values) -> list[fl.TrainState]:
    """One state per value, each module made by ``make(value)`` from the seed 0."""
    states = []
    for value in values:
        torch.manual_seed(0)
        states.append(fl.TrainState.create(make(value), tx=optim.sgd(0.1), device="cpu"))
    return states


@pytest.mark.parametrize(
    ("one", "other"),
    [("relu", "tanh"), (_Kind.RELU, _Kind.TANH), (torch.float32, torch.float64), (None, "tanh")],
    ids=["str", "enum", "dtype", "only in one"],
)
def test_modules_whose_plain_settings_differ_are_refused(one, other):
    """A str, an enum member or a dtype kept as an attribute is a setting like a float,
    and so is one that only one of the modules has."""
    states = _seeded_states(_Branch, (one, other))
    x = -torch.ones(4, 2)
    evaluate = fl.make_eval_step(lambda m, b: {"out": m(b).sum()})
    assert float(evaluate(states[0], x)["out"]) != float(evaluate(states[1], x)["out"])
    with pytest.raises(ValueError, match=r"value is .* in one and .* in the other"):
        fl.stack_states(states)


@pytest.mark.parametrize("cell", [nn.GRU, nn.LSTM, nn.RNN])
def test_recurrent_layers_of_other_sizes_are_named_by_the_size(cell):
    """A sweep over an RNN's hidden size named the first differing attribute in sorted
    order, the private ``_flat_weights``: a list of four meta Parameters printed whole,
    for each model, in place of ``hidden_size``."""
    states = _seeded_states(lambda h: cell(2, h), (4, 8))
    with pytest.raises(
        ValueError, match=r"\.hidden_size is 4 in one and 8 in the other\); a stacked state"
    ):
        fl.stack_states(states)


class _Scaled(nn.Module):
    """Keeps a tensor outside its parameters and buffers (not registered)."""

    def __init__(self, scale: torch.Tensor) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.scale = scale

    def forward(self, x):
        return self.fc(x) * self.scale


@pytest.mark.parametrize(
    ("one", "other"),
    [
        (torch.tensor(1.0), torch.tensor(3.0)),
        (torch.tensor([1.0, 2.0]), torch.tensor([1.0, float("nan")])),
        (torch.tensor([1.0]), torch.tensor([1.0], dtype=torch.float64)),
    ],
    ids=["value", "nan", "dtype"],
)
def test_modules_that_keep_other_tensors_are_refused(one, other):
    """A tensor kept as a plain attribute is a setting like a float: stacked, both models
    ran the first one's (the scale 1 for the model that multiplies by 3)."""
    states = _seeded_states(_Scaled, (one, other))
    x = -torch.ones(4, 2)
    evaluate = fl.make_eval_step(lambda m, b: {"out": m(b).sum()})
    outs = [evaluate(s, x)["out"] for s in states]
    assert outs[0].dtype != outs[1].dtype or not torch.equal(outs[0], outs[1])
    with pytest.raises(
        ValueError,
        match=r"root module\.scale is a tensor kept outside the parameters and buffers, "
        r"tensor\(.* in one and tensor\(.* in the other; to give each model its own, "
        r"register it as a buffer \(in __init__, self\.register_buffer\('scale', tensor\) in "
        r"place of self\.scale = tensor\)",
    ):
        fl.stack_states(states)


class _ScaledIn(nn.Module):
    """Keeps its scale, a tensor, in a container (not registered)."""

    def __init__(self, scales) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.scales = scales

    def forward(self, x):
        scale = self.scales["a"] if isinstance(self.scales, dict) else self.scales[-1]
        return self.fc(x) * scale


@pytest.mark.parametrize(
    "wrap",
    [lambda t: (t,), lambda t: [t], lambda t: {"a": t}, lambda t: (2, t)],
    ids=["tuple", "list", "dict", "with a number"],
)
def test_modules_that_keep_other_tensors_in_containers_are_refused(wrap):
    """Tensors in a tuple, list or dict were not compared (a container was compared only
    when it held plain values alone): stacked, the model scaling by 3 ran with 1."""
    states = _seeded_states(_ScaledIn, (wrap(torch.tensor(1.0)), wrap(torch.tensor(3.0))))
    x = -torch.ones(4, 2)
    evaluate = fl.make_eval_step(lambda m, b: {"out": m(b).sum()})
    assert float(evaluate(states[0], x)["out"]) != float(evaluate(states[1], x)["out"])
    with pytest.raises(ValueError, match=r"root module\.scales is .*tensor\(1\.\).* in one and"):
        fl.stack_states(states)
    alike = _seeded_states(_ScaledIn, (wrap(torch.tensor(3.0)), wrap(torch.tensor(3.0))))
    many = torch.func.vmap(evaluate, in_dims=(0, None))(fl.stack_states(alike), x)["out"]
    torch.testing.assert_close(many, torch.stack([evaluate(s, x)["out"] for s in alike]))


def test_equal_sparse_tensors_kept_outside_the_parameters_stack():
    """Compared by the values they stand for (== has no sparse kernel: they were refused)."""
    eye = torch.eye(2).to_sparse()
    states = _seeded_states(_Scaled, (eye, eye.clone()))
    fl.stack_states(states)
    other = _seeded_states(_Scaled, (eye, (2 * torch.eye(2)).to_sparse()))
    with pytest.raises(ValueError, match=r"root module\.scale is a tensor kept outside"):
        fl.stack_states(other)


def test_a_large_tensor_kept_outside_the_parameters_is_named_by_dtype_and_shape():
    scales = [torch.full((3, 3), value, dtype=torch.float64) for value in (0.0, 1.0)]
    states = _seeded_states(_Scaled, scales)
    with pytest.raises(
        ValueError,
        match=r"a float64 tensor of shape \(3, 3\) in one and a float64 tensor of shape "
        r"\(3, 3\) in the other with other values; to give",
    ):
        fl.stack_states(states)


@pytest.mark.parametrize(
    "scale", [torch.tensor(3.0), torch.tensor([1.0, float("nan")])], ids=["value", "nan"]
)
def test_modules_that_keep_equal_tensors_stack_and_run_as_alone(scale):
    """Equal tensors (other objects, NaN equal to NaN) stack, and each model runs as it
    does alone."""
    states = _seeded_states(_Scaled, (scale.clone(), scale.clone()))
    x = -torch.ones(4, 2)
    evaluate = fl.make_eval_step(lambda m, b: {"out": m(b)[:, 0].sum()})
    many = torch.func.vmap(evaluate, in_dims=(0, None))(fl.stack_states(states), x)["out"]
    torch.testing.assert_close(many, torch.stack([evaluate(s, x)["out"] for s in states]))


def test_an_activation_bound_to_a_module_in_another_mode_is_named_by_its_mode():
    """The two methods print alike: the message names the setting that differs."""
    states = [
        fl.TrainState.create(_with(drop.forward), tx=optim.sgd(0.1), device="cpu")
        for drop in (nn.Dropout(0.5), nn.Dropout(0.5).eval())
    ]
    with pytest.raises(ValueError, match=r"modules' training is True in one and False in"):
        fl.stack_states(states)


class _MakesAct(nn.Module):
    """Keeps the class of the activation it makes in forward."""

    def __init__(self, cls: type[nn.Module]) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.cls = cls

    def forward(self, x):
        return self.cls()(self.fc(x))


def test_modules_that_keep_other_activation_classes_are_refused():
    """A class kept as an attribute is a setting: stacked, both models ran the first
    one's class (ReLU for the Tanh model too); of one class, they stack."""
    evaluate = fl.make_eval_step(lambda m, b: {"out": m(b).sum()})
    x = -torch.ones(4, 2)

    relu, tanh = _seeded_states(_MakesAct, (nn.ReLU, nn.Tanh))
    assert float(evaluate(relu, x)["out"]) != float(evaluate(tanh, x)["out"])
    with pytest.raises(ValueError, match=r"module\.cls is <class '.*ReLU'> in one and <class"):
        fl.stack_states([relu, tanh])
    alike = _seeded_states(_MakesAct, (nn.Tanh, nn.Tanh))
    many = torch.func.vmap(evaluate, in_dims=(0, None))(fl.stack_states(alike), x)["out"]
    torch.testing.assert_close(many, torch.stack([evaluate(s, x)["out"] for s in alike]))


def test_modules_alike_but_for_their_mode_or_an_inplace_activation_stack():
    """The steps set train or eval mode, and ``inplace`` is a memory choice: neither is
    a setting that tells the models apart, also on the module an activation is a method
    of."""
    evaluate = fl.make_eval_step(lambda m, b: {"out": m(b).sum()})
    x = -torch.ones(4, 2)
    pairs = [
        (_with(nn.LeakyReLU(0.1).forward), _with(nn.LeakyReLU(0.1).forward).eval()),
        (_with(nn.ReLU().forward), _with(nn.ReLU(inplace=True).forward)),
    ]
    for modules in pairs:
        states = [fl.TrainState.create(m, tx=optim.sgd(0.1), device="cpu") for m in modules]
        many = torch.func.vmap(evaluate, in_dims=(0, None))(fl.stack_states(states), x)["out"]
        torch.testing.assert_close(many, torch.stack([evaluate(s, x)["out"] for s in states]))


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("kind", ["backward_pre_hook", "backward_hook"])
def test_modules_with_other_backward_hooks_are_refused(kind):
    """A backward hook on the second layer that zeroes the gradient it passes on changes
    how the model trains (checked alone): a stacked state would run states[0]'s hooks
    for every model."""

    def net(hooked: bool) -> fl.TrainState:
        torch.manual_seed(0)
        module = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
        if hooked:
            getattr(module[1], f"register_full_{kind}")(
                lambda m, *grads: tuple(None if g is None else g * 0 for g in grads[0])
            )
        return fl.TrainState.create(module, tx=optim.sgd(0.1), device="cpu")

    states = [net(False), net(True)]
    step = fl.make_train_step(lambda m, b: {"loss": m(b).square().mean()})
    alone = [step(s, torch.ones(4, 3))[0].params["0.weight"] for s in states]
    assert not torch.equal(alone[0], alone[1])
    with pytest.raises(ValueError, match=rf"1\._{kind}s hold .* in one and"):
        fl.stack_states(states)


def test_modules_with_another_parameterless_submodule_are_refused():
    """One model with a Dropout the other lacks: the same parameters, another forward
    (in training); the message names both lists of submodules."""
    from collections import OrderedDict

    def net(dropout: bool) -> nn.Module:
        torch.manual_seed(0)
        layers = [("fc", nn.Linear(2, 2)), *([("drop", nn.Dropout(0.5))] if dropout else [])]
        return nn.Sequential(OrderedDict([*layers, ("act", nn.ReLU())]))

    states = [fl.TrainState.create(net(d), tx=optim.sgd(0.1), device="cpu") for d in (True, False)]
    assert states[0].params.keys() == states[1].params.keys()
    says = "submodules ['', 'fc', 'drop', 'act'] and ['', 'fc', 'act']"
    with pytest.raises(ValueError, match=re.escape(says)):
        fl.stack_states(states)


def test_states_made_with_another_kind_of_optimizer_are_named_as_such():
    """The message said a key "is present in the second tree but not in the first",
    naming neither state nor the optimizer that made the difference."""
    plain = make(0)
    torch.manual_seed(1)
    momentum = fl.TrainState.create(nn.Linear(3, 2), tx=optim.sgd(0.1, momentum=0.9), device="cpu")
    with pytest.raises(
        ValueError, match=r"'opt_state\.[\w.]+' is in states\[1\] but not in states\[0\].*\(tx\)"
    ):
        fl.stack_states([plain, momentum])
    with pytest.raises(
        ValueError, match=r"'opt_state\.1\.count' is in states\[0\] but not in states\[2\].*\(tx\)"
    ):
        fl.stack_states([momentum, momentum, plain])


def test_states_trained_in_other_precisions_are_named_as_such():
    """A state trained in fp16 holds a loss scale that one trained in fp32 lacks: the
    message names it and the fix, not the optimizer."""
    step = fl.make_train_step(lambda m, b: {"loss": m(b).square().mean()}, precision="fp16")
    half, _ = step(make(0), torch.ones(4, 3))
    with pytest.raises(
        ValueError, match=r"'loss_scale\.\w+' is in states\[1\] .* fp16 loss scale and the other"
    ):
        fl.stack_states([make(1).replace(step=1), half])


def trained(make_tx, seed: int, steps: int = 5) -> dict[str, torch.Tensor]:
    """One model trained alone with ``make_tx()`` (the reference for a stacked run)."""
    state = make(seed).replace(tx=make_tx(), opt_state=make_tx().init(make(seed).params))
    step = fl.make_train_step(lambda m, b: {"loss": m(b).square().mean()})
    for k in range(steps):
        state, _ = step(state, torch.full((4, 3), 0.1 * k + 0.5))
    return state.params


def states_with(*txs) -> list[fl.TrainState]:
    out = []
    for seed, make_tx in enumerate(txs):
        base = make(seed)
        out.append(base.replace(tx=make_tx(), opt_state=make_tx().init(base.params)))
    return out


@pytest.mark.parametrize(
    ("first", "other", "match"),
    [
        (
            lambda: optim.adamw(optim.cosine_schedule(1e-4, 100)),
            lambda: optim.adamw(optim.cosine_schedule(1e-1, 100)),
            r"after 1 update its learning rate is 0\.09998, states\[0\]'s optimizer would "
            r"make it 9\.998e-05",
        ),
        (
            lambda: optim.adamw(1e-2, weight_decay=0.0),
            lambda: optim.adamw(1e-2, weight_decay=0.1),
            r"its update 1 differs",
        ),
        (
            lambda: optim.sgd(1e-2, momentum=0.9),
            lambda: optim.sgd(1e-2, momentum=0.5),
            r"its update 2 differs",  # the first update copies the gradient either way
        ),
        (
            lambda: optim.chain(optim.clip_by_global_norm(1.0), optim.sgd(1e-2)),
            lambda: optim.chain(optim.clip_by_global_norm(1e-3), optim.sgd(1e-2)),
            r"its update 1 differs",
        ),
        (
            lambda: optim.adamw(1e-2, weight_decay=0.0),
            lambda: optim.adamw(1e-2, weight_decay=1e-4),
            r"its update 1 differs",  # by about 1e-4 of the update: exact, not close
        ),
        (
            lambda: optim.adam(1e-2, b1=0.9),
            lambda: optim.adam(1e-2, b1=0.5),
            r"its update 1 differs",  # (in the moments it keeps: the first step is alike)
        ),
    ],
    ids=["schedule peak", "weight decay", "momentum", "clipping", "small weight decay", "betas"],
)
def test_states_whose_optimizers_update_otherwise_are_refused(first, other, match):
    """A stacked state runs states[0]'s tx for every model: vmapped, the second model
    trained with the first's schedule or settings, not its own (the schedule's own rate
    for the first update only), with no error."""
    stacked_txs = states_with(first, other)
    assert not torch.equal(trained(other, 1)["weight"], trained(first, 1)["weight"])
    with pytest.raises(ValueError, match=r"states\[1\] was made with another optimizer.*" + match):
        fl.stack_states(stacked_txs)


def test_a_sweep_of_rates_the_state_holds_stacks_and_trains_as_apart():
    """Learning rates kept in the optimizer state (numbers, tensors, plateaus) stay per
    model: such optimizers stack, and each stacked model trains as it does alone."""
    txs = [
        lambda: optim.adamw(1e-3),
        lambda: optim.adamw(3e-2),
        lambda: optim.adamw(torch.tensor(1e-1)),
    ]
    stacked = fl.stack_states(states_with(*txs))
    step = torch.func.vmap(
        fl.make_train_step(lambda m, b: {"loss": m(b).square().mean()}), in_dims=(0, None)
    )
    for k in range(5):
        stacked, _ = step(stacked, torch.full((4, 3), 0.1 * k + 0.5))
    for i, (one, make_tx) in enumerate(zip(fl.unstack_states(stacked), txs)):
        torch.testing.assert_close(one.params, trained(make_tx, i))
    plateaus = [lambda lr=lr: optim.sgd(optim.reduce_on_plateau(lr)) for lr in (0.1, 0.3)]
    rates = optim.learning_rates(fl.stack_states(states_with(*plateaus)).opt_state)
    assert rates[0].tolist() == [0.1, 0.3]


def test_unstacking_a_state_whose_tensors_are_not_all_stacked_names_the_tensor():
    """Only the first parameter's shape was checked: a state whose other tensors were
    not stacked (an optimizer state made again with ``tx.init(stacked.params)``, whose
    update counts are 0-d) failed with torch's "invalid index of a 0-dim tensor", and a
    tensor of one model whose first size happens to be the number of models was split
    along its own first dimension, silently."""
    with pytest.raises(ValueError, match=r"holds one model.*fl\.stack_states"):
        fl.unstack_states(make(0))
    stacked = fl.stack_states([make(0), make(1)])
    reset = stacked.replace(opt_state=stacked.tx.init(stacked.params))  # count: 0-d
    with pytest.raises(
        ValueError, match=r"2 models.*'opt_state\.2\.count' has shape \(\).*tx\.init"
    ):
        fl.unstack_states(reset)
    one_bias = stacked.replace(params={**stacked.params, "bias": torch.zeros(2)})  # (2,): 2 models?
    with pytest.raises(ValueError, match=r"'params\.bias' has shape \(2,\); .* \(2, 2\)"):
        fl.unstack_states(one_bias)
    three = stacked.replace(params={**stacked.params, "bias": torch.zeros(3, 2)})
    with pytest.raises(ValueError, match=r"'params\.bias' has shape \(3, 2\); .* \(2, 2\)"):
        fl.unstack_states(three)
    momentum = fl.stack_states(
        [
            fl.TrainState.create(nn.Linear(3, 2), tx=optim.sgd(0.1, momentum=0.9), device="cpu")
            for _ in range(2)
        ]
    )
    buf = momentum.opt_state[1].momentum_buffer
    short = momentum.replace(
        opt_state=(
            momentum.opt_state[0],
            momentum.opt_state[1]._replace(momentum_buffer={**buf, "weight": buf["weight"][0]}),
            momentum.opt_state[2],
        )
    )
    with pytest.raises(ValueError, match=r"momentum_buffer\.weight' has shape \(2, 3\)"):
        fl.unstack_states(short)
    # The EMA and accumulated gradients are checked as the parameters are.
    averaged = fl.stack_states([make(0, ema_decay=0.9), make(1, ema_decay=0.9)])
    one_ema = averaged.replace(ema={**averaged.ema, "weight": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match=r"'ema\.weight' has shape \(2, 3\); one model's is"):
        fl.unstack_states(one_ema)
    one_accum = stacked.replace(grad_accum={"weight": torch.zeros(2, 3), "bias": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match=r"'grad_accum\.weight' has shape \(2, 3\); one model's"):
        fl.unstack_states(one_accum)
    # And the buffers: one model's BatchNorm1d(2) mean has as many entries as the models.
    normed = fl.stack_states(
        [
            fl.TrainState.create(
                nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)), tx=optim.sgd(0.1), device="cpu"
            )
            for _ in range(2)
        ]
    )
    one_mean = normed.replace(buffers={**normed.buffers, "1.running_mean": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"'buffers\.1\.running_mean' has shape \(2,\); one model"):
        fl.unstack_states(one_mean)
    # A leaf replaced by no tensor is named, not met as torch's or Python's own error.
    best = torch.tensor(0.0)
    scored = Scored.create(nn.Linear(3, 2), tx=optim.sgd(0.1), device="cpu", best=best)
    replaced = fl.stack_states([scored, scored]).replace(best=1.0)
    with pytest.raises(ValueError, match=r"leaf 'best' has shape none \(a float\)"):
        fl.unstack_states(replaced)


def test_states_whose_plateaus_reduce_otherwise_are_refused():
    """A ``reduce_on_plateau``'s settings are static in the optimizer state: the stacked
    state kept states[0]'s, so a sweep over plateau factors (or patience) stacked and
    every model's rate dropped by states[0]'s factor after its own patience ran out."""
    txs = [lambda: optim.sgd(optim.reduce_on_plateau(0.1, factor=0.5, patience=0))]
    txs.append(lambda: optim.sgd(optim.reduce_on_plateau(0.1, factor=0.1, patience=0)))
    alone = []
    for state in states_with(*txs):
        for metric in (1.0, 1.0):
            state = state.replace(opt_state=optim.observe_metric(state.opt_state, metric))
        alone.append(float(optim.learning_rates(state.opt_state)[0]))
    assert alone == [0.05, pytest.approx(0.01)]
    with pytest.raises(
        ValueError,
        match=r"states\[1\]'s reduce_on_plateau has factor=0\.1 but states\[0\]'s has "
        r"factor=0\.5",
    ):
        fl.stack_states(states_with(*txs))
    patience = [lambda p=p: optim.adam(optim.reduce_on_plateau(1e-3, patience=p)) for p in (2, 5)]
    with pytest.raises(ValueError, match=r"has patience=5 but states\[0\]'s has patience=2"):
        fl.stack_states(states_with(*patience))
    # The initial rate is the state's, per model: a sweep over it stacks (tested above).
    rates = [lambda lr=lr: optim.sgd(optim.reduce_on_plateau(lr, factor=0.5)) for lr in (0.1, 0.3)]
    stacked = fl.stack_states(states_with(*rates))
    for metric in ([1.0, 1.0], [2.0, 2.0]) * 6:
        stacked = stacked.replace(opt_state=optim.observe_metric(stacked.opt_state, metric))
    assert optim.learning_rates(stacked.opt_state)[0].tolist() == [0.05, 0.15]


def masked_sgd(mask: dict[str, torch.Tensor], lr=0.1) -> optim.GradientTransformation:
    """A user's transform holding tensors shaped like the parameters (a sparsity mask),
    which the small stand-ins of the optimizer probe do not fit."""

    def update(updates, state, params=None):
        return {name: u * mask[name] for name, u in updates.items()}, state

    return optim.chain(optim.GradientTransformation(optim.base.no_state, update), optim.sgd(lr))


def test_optimizers_the_stand_ins_do_not_fit_are_compared_on_the_parameters_shapes():
    """An optimizer whose update failed on the probe's small stand-ins was taken to
    update like states[0]'s: two models pruned with other masks stacked, and both
    trained with states[0]'s mask. Now the probe runs again on the parameters' shapes;
    an optimizer that fails there too is refused with its error, unless every state
    holds the same tx object (which is not compared)."""
    keep = {"weight": torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]), "bias": torch.ones(2)}
    other = {**keep, "weight": 1 - keep["weight"]}
    same = {name: m.clone() for name, m in keep.items()}
    with pytest.raises(ValueError, match=r"states\[1\] was made with another optimizer.*update 1"):
        fl.stack_states(states_with(lambda: masked_sgd(keep), lambda: masked_sgd(other)))
    fl.stack_states(states_with(lambda: masked_sgd(keep), lambda: masked_sgd(same)))
    # On the parameters' shapes too, the probe runs its updates from where the states
    # are: step schedules of step sizes 20 and 50, 15 steps in, part at the 5th update.
    scheduled = [
        lambda size=size: masked_sgd(keep, optim.step_schedule(0.1, step_size=size))
        for size in (20, 50)
    ]
    step = fl.make_train_step(lambda m, b: {"loss": m(b).square().mean()})
    states = []
    for state in states_with(*scheduled):
        for _ in range(15):
            state, _ = step(state, torch.ones(4, 3))
        states.append(state)
    with pytest.raises(ValueError, match=r"after 5 updates its learning rate is 0\.1, .* it 0\.01"):
        fl.stack_states(states)

    def cuda_only(tag: str) -> optim.GradientTransformation:  # fails on the CPU
        def update(updates, state, params=None):
            raise RuntimeError(f"{tag} runs on CUDA only")

        return optim.GradientTransformation(optim.base.no_state, update)

    bad = [make(i).replace(tx=cuda_only(tag)) for i, tag in enumerate("ab")]
    bad = [s.replace(opt_state=s.tx.init(s.params)) for s in bad]
    with pytest.raises(
        ValueError, match=r"could not compare states\[1\]'s optimizer.*CUDA only.*tx=states"
    ):
        fl.stack_states(bad)
    fl.stack_states([s.replace(tx=bad[0].tx) for s in bad])


def normalized_sgd(dim: int | None) -> optim.GradientTransformation:
    """A user's transform that scales each gradient to unit norm, along ``dim`` (each
    row) or over the whole tensor: alike on tensors of one element per dim only."""

    def update(updates, state, params=None):
        def unit(u):
            norm = u.norm() if dim is None or u.dim() < 2 else u.norm(dim=dim, keepdim=True)
            return u / norm

        return {name: unit(u) for name, u in updates.items()}, state

    return optim.chain(optim.GradientTransformation(optim.base.no_state, update), optim.sgd(0.1))


def test_optimizers_that_differ_along_a_dimension_are_told_apart():
    """The probe's stand-ins have two entries per dim, so an update taken per row
    differs from one taken over the whole tensor (on one entry per dim both are the
    gradient's sign)."""
    assert not torch.equal(
        trained(lambda: normalized_sgd(-1), 1)["weight"],
        trained(lambda: normalized_sgd(None), 1)["weight"],
    )
    with pytest.raises(ValueError, match=r"states\[1\] was made with another optimizer.*update 1"):
        fl.stack_states(states_with(lambda: normalized_sgd(-1), lambda: normalized_sgd(None)))
    fl.stack_states(states_with(lambda: normalized_sgd(-1), lambda: normalized_sgd(-1)))


def test_optimizers_are_compared_from_the_point_where_the_states_are():
    """The probe ran from a fresh optimizer state (update count 0): two states trained
    15 steps with step schedules of step sizes 20 and 50 part at update 20, the 5th
    after stacking, but looked alike for the probe's 10 updates and stacked."""
    first = lambda: optim.sgd(optim.step_schedule(0.1, step_size=20))  # noqa: E731
    other = lambda: optim.sgd(optim.step_schedule(0.1, step_size=50))  # noqa: E731
    step = fl.make_train_step(lambda m, b: {"loss": m(b).square().mean()})
    states = []
    for state in states_with(first, other):
        for _ in range(15):
            state, _ = step(state, torch.ones(4, 3))
        states.append(state)
    with pytest.raises(
        ValueError, match=r"after 5 updates its learning rate is 0\.1, .* make it 0\.01"
    ):
        fl.stack_states(states)
    fl.stack_states(states_with(first, other))  # from step 0 they part after 20: not seen


def test_the_repr_of_a_stacked_state_says_how_many_models_it_holds():
    """A stacked state printed as one model, with every model's values counted as its
    own: "TrainState(Linear, step=0, epoch=0, params: 2 tensors, 16 values, ...)"."""
    text = repr(fl.stack_states([make(0), make(1)]))
    assert "2 stacked models" in text and "8 values each" in text, text
    assert "stacked" not in repr(make(0))


def test_stacking_stacked_states_is_refused_with_how_to_join_them():
    """Stacking two stacked states (to join two sweeps) made a state of 2 x 2 models
    that unstack_states called "one model", and that a vmapped step cannot train."""
    a, b = fl.stack_states([make(0), make(1)]), fl.stack_states([make(2), make(3)])
    fix = r"fl\.stack_states\(fl\.unstack_states\(a\) \+ fl\.unstack_states\(b\)\)"
    with pytest.raises(ValueError, match=r"states\[1\] holds 2 stacked models.*" + fix):
        fl.stack_states([make(0), b])
    with pytest.raises(ValueError, match=r"states\[0\] holds 2 stacked models"):
        fl.stack_states([a, b])
    joined = fl.stack_states(fl.unstack_states(a) + fl.unstack_states(b))
    assert joined.params["weight"].shape == (4, 2, 3)


def test_states_with_other_ema_decays_are_refused_with_the_fix_for_that():
    """The message for every static field said "stack states that are at the same
    point", which is no fix for another EMA decay (or a subclass's static field)."""
    fix = r"with one ema_decay \(TrainState\.create"
    with pytest.raises(ValueError, match=r"ema_decay is None but .* 0\.9.*" + fix):
        fl.stack_states([make(0, ema_decay=0.9), make(1)])
    with pytest.raises(ValueError, match=r"ema_decay is 0\.99 but .* 0\.9.*" + fix):
        fl.stack_states([make(0, ema_decay=0.9), make(1, ema_decay=0.99)])
    with pytest.raises(ValueError, match=r"step is 0 but .* 3.*same point"):
        fl.stack_states([make(0).replace(step=3), make(1)])


def test_models_unstacked_after_vmapped_training_continue_as_if_trained_alone():
    """Per-model rates, EMA, BatchNorm statistics, skipped-step counts and an
    accumulation window left open at the split: each model trained 3 micro-batches
    stacked, unstacked, then 4 alone (a donating step on a copy), ends where 7 alone
    end, to float64 rounding (the vmapped path rounds in other places)."""
    data = torch.Generator().manual_seed(0)
    batches = [(torch.randn(6, 3, generator=data, dtype=torch.float64),) for _ in range(7)]

    def states() -> list[fl.TrainState]:
        out = []
        for seed, lr in enumerate((0.1, 0.03, 0.01)):
            torch.manual_seed(seed)
            # (Not Linear -> BatchNorm: that bias's gradient is 0 but for rounding, which
            # Adam scales up to the rate: the two paths' rounding would show.)
            module = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.BatchNorm1d(4), nn.Linear(4, 1))
            tx = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(lr))
            out.append(fl.TrainState.create(module.double(), tx=tx, ema_decay=0.9, device="cpu"))
        return out

    def loss(m, b):
        return {"loss": m(b[0]).square().mean()}

    options = {"accumulation_steps": 2, "on_nonfinite": "skip"}
    step = fl.make_train_step(loss, **options)
    alone = []
    for state in states():
        for batch in batches:
            state, _ = step(state, batch)
        alone.append(state)
    many = torch.func.vmap(fl.make_train_step(loss, **options), in_dims=(0, None))
    stacked = fl.stack_states(states())
    for batch in batches[:3]:
        stacked, _ = many(stacked, batch)
    assert stacked.micro_step == 1
    donating = fl.make_train_step(loss, donate=True, **options)
    for i, state in enumerate(fl.unstack_states(stacked)):
        state = state.clone()
        for batch in batches[3:]:
            state, _ = donating(state, batch)
        want = alone[i]
        assert (state.step, state.micro_step) == (want.step, want.micro_step) == (3, 1)
        for field in ("params", "buffers", "ema", "opt_state", "grad_accum", "skipped_steps"):
            torch.testing.assert_close(
                getattr(state, field),
                getattr(want, field),
                rtol=1e-12,
                atol=1e-14,
                msg=lambda m, f=field: f"{f}: {m}",
            )


def test_states_in_other_dtypes_are_refused_with_the_fix():
    """The message named the two dtypes but not what to do."""
    torch.manual_seed(1)
    double = fl.TrainState.create(nn.Linear(3, 2).double(), tx=optim.sgd(0.1), device="cpu")
    with pytest.raises(
        ValueError,
        match=r"torch\.float64; states\[0\] has .* torch\.float32: .*module\.to\(dtype\)",
    ):
        fl.stack_states([make(0), double])


def test_optimizers_alike_but_for_a_later_member_of_a_chain_are_probed():
    """The likeness check remembered pairs of objects it had met by their ids, including
    tuples it made and freed: a later pair that reused those ids counted as alike, so
    chains equal but in their second member were not probed and stacked."""

    def clipped(value: float) -> optim.GradientTransformation:
        return optim.chain(optim.clip(1.0), optim.clip(value), optim.sgd(0.1))

    with pytest.raises(ValueError, match=r"another optimizer.*update 1 differs"):
        fl.stack_states(states_with(lambda: clipped(0.1), lambda: clipped(0.2)))
    fl.stack_states(states_with(lambda: clipped(0.1), lambda: clipped(0.1)))


@pytest.mark.parametrize(
    ("norm", "make_step"),
    [
        (lambda: nn.BatchNorm1d(6), fl.make_train_step),
        (lambda: nn.BatchNorm1d(6), fl.make_eval_step),
        (lambda: nn.LayerNorm(4), fl.make_train_step),
    ],
    ids=["batchnorm-train", "batchnorm-eval", "layernorm-train"],
)
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_vmapped_mixed_precision_through_normalization_runs_or_says_what_to_do(
    norm, make_step, precision
):
    """On the CPU torch's batched normalization kernels meet float32 statistics or
    weights with low-precision inputs under autocast and raise "expected scalar type
    BFloat16 but found Float", which said nothing of vmap or precision; where a torch
    version runs it, each model is its own."""
    fn = lambda model, b: {"loss": nn.functional.cross_entropy(model(b[0]), b[1])}  # noqa: E731
    states = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        module = nn.Sequential(nn.Conv1d(6, 6, 1), norm(), nn.Flatten(), nn.Linear(24, 3))
        states.append(fl.TrainState.create(module, tx=optim.sgd(0.1), device="cpu"))
    batch = (torch.randn(8, 6, 4), torch.randint(0, 3, (8,)))
    step = make_step(fn, precision=precision)
    many = torch.func.vmap(step, in_dims=(0, None), randomness="different")
    try:
        out = many(fl.stack_states(states), batch)
    except RuntimeError as e:
        assert "failed under torch.func.vmap: expected scalar type" in str(e)
        assert f"under autocast (precision={precision!r})" in str(e)
        assert "without precision=, or train them one at a time" in str(e)
        return
    metrics = out[1] if isinstance(out, tuple) else out
    for i, state in enumerate(states):
        alone = step(state, batch)
        alone = alone[1] if isinstance(alone, tuple) else alone
        torch.testing.assert_close(metrics["loss"][i], alone["loss"], rtol=2e-2, atol=2e-2)


class _Float64Norm(nn.Module):
    """Normalizes in float64 of its own with float32 statistics: a dtype error of the
    user's, with or without precision."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.register_buffer("mean", torch.zeros(4))
        self.register_buffer("var", torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x).double()
        return nn.functional.batch_norm(h, self.mean, self.var, training=False).float()


@pytest.mark.parametrize("precision", [None, "bf16"])
def test_a_vmapped_dtype_error_of_the_users_is_torchs_own(precision):
    """The autocast explanation is for steps with precision whose error names the low
    precision: without it, or for another dtype (float64 of the user's), torch's "expected
    scalar type" error is the user's own and passes through as it is."""
    states = [fl.TrainState.create(_Float64Norm(), tx=optim.sgd(0.1), device="cpu")] * 2
    fn = lambda model, x: {"loss": model(x).sum()}  # noqa: E731
    for make_step in (fl.make_train_step, fl.make_eval_step):
        step = make_step(fn, precision=precision)
        many = torch.func.vmap(step, in_dims=(0, None), randomness="different")
        with pytest.raises(RuntimeError) as info:
            many(fl.stack_states(states), torch.randn(2, 3))
        assert "autocast" not in str(info.value) and "vmap" not in str(info.value)


def _kwargs_hook(module, args, kwargs, output):
    return output * 2


def _plain_hook(module, args, output):
    return output * 2


def _kwargs_pre_hook(module, args, kwargs):
    return args, kwargs


@pytest.mark.parametrize(
    "register",
    [
        lambda m: m.register_forward_hook(_kwargs_hook, with_kwargs=True),
        lambda m: m.register_forward_hook(_plain_hook, always_call=True),
        lambda m: m.register_forward_pre_hook(_kwargs_pre_hook, with_kwargs=True),
    ],
    ids=["with_kwargs", "always_call", "pre_with_kwargs"],
)
def test_identical_models_with_hooks_registered_with_options_stack(register):
    def build(seed: int) -> fl.TrainState:
        torch.manual_seed(seed)
        module = nn.Linear(3, 2)
        register(module)
        return fl.TrainState.create(module, tx=optim.sgd(0.1), device="cpu")

    assert fl.stack_states([build(0), build(1)]).params["weight"].shape == (2, 2, 3)


def test_states_loaded_from_one_checkpoint_with_a_nan_in_their_history_stack(tmp_path):
    from fnloop.checkpoint import load_checkpoint, save_checkpoint
    from fnloop.state import freeze_history

    history = freeze_history({"train": {"loss": [0.5]}, "valid": {"loss": [float("nan")]}})
    state = make(0).replace(epoch=1, history=history)
    path = save_checkpoint(tmp_path / "c.pt", state)
    a, b = load_checkpoint(path, like=state), load_checkpoint(path, like=state)
    assert fl.stack_states([a, b]).epoch == 1


class _PickedActivation:
    """A plain callable (no module) that picks its implementation once: its attribute
    is one of its own bound methods, so its settings lead back to itself."""

    def __init__(self) -> None:
        self.impl = self._relu

    def _relu(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.impl(x)


class _NetWithPickedActivation(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.act = _PickedActivation()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.lin(x))


def test_identical_models_holding_a_self_referring_callable_stack():
    def build(seed: int) -> fl.TrainState:
        torch.manual_seed(seed)
        return fl.TrainState.create(_NetWithPickedActivation(), tx=optim.sgd(0.1), device="cpu")

    assert fl.stack_states([build(0), build(1)]).params["lin.weight"].shape == (2, 2, 3)


class _SlotsScale:
    """A callable without a ``__dict__`` (its one setting in a slot)."""

    __slots__ = ("k",)

    def __init__(self) -> None:
        self.k = 2.0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.k


class _NetWithCallables(nn.Module):
    def __init__(self, make_callable) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.pick = make_callable()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


@pytest.mark.parametrize(
    "make_callable",
    [lambda: operator.itemgetter(0), _SlotsScale],
    ids=["itemgetter", "slots"],
)
def test_identical_models_holding_callables_without_a_dict_stack(make_callable):
    def build(seed: int) -> fl.TrainState:
        torch.manual_seed(seed)
        module = _NetWithCallables(make_callable)
        return fl.TrainState.create(module, tx=optim.sgd(0.1), device="cpu")

    assert fl.stack_states([build(0), build(1)]).params["lin.weight"].shape == (2, 2, 3)


def _slots_scale(k: float) -> _SlotsScale:
    scale = _SlotsScale()
    scale.k = k
    return scale


@pytest.mark.parametrize(
    "make_callables",
    [
        (lambda: operator.itemgetter(0), lambda: operator.itemgetter(1)),
        (lambda: _slots_scale(2.0), lambda: _slots_scale(3.0)),
    ],
    ids=["itemgetter", "slots"],
)
def test_models_holding_callables_without_a_dict_that_differ_are_refused(make_callables):
    states = []
    for make_callable in make_callables:
        torch.manual_seed(0)
        module = _NetWithCallables(make_callable)
        states.append(fl.TrainState.create(module, tx=optim.sgd(0.1), device="cpu"))
    with pytest.raises(ValueError, match=r"another module.*pick"):
        fl.stack_states(states)


@dataclasses.dataclass
class _ScaleConfig:
    scale: float


class _NetWithSettingsInObjects(nn.Module):
    """Settings forward reads from a plain config object and from a dict of functions."""

    def __init__(self, scale: float, act) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.config = _ScaleConfig(scale)
        self.acts = {"act": act}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.acts["act"](self.lin(x)) * self.config.scale


@pytest.mark.parametrize(
    "other",
    [
        pytest.param((3.0, torch.sigmoid), id="config_object"),
        pytest.param((2.0, torch.tanh), id="dict_of_functions"),
    ],
)
def test_models_that_differ_in_a_setting_held_in_an_object_are_refused(other):
    def build(scale: float, act) -> fl.TrainState:
        torch.manual_seed(0)
        module = _NetWithSettingsInObjects(scale, act)
        return fl.TrainState.create(module, tx=optim.sgd(0.1), device="cpu")

    with pytest.raises(ValueError, match="another module"):
        fl.stack_states([build(2.0, torch.sigmoid), build(*other)])


class _NetWithFunctionList(nn.Module):
    """Activations kept in a plain list (one lambda made per model), a state-dict hook
    (kept by torch in an OrderedDict keyed by handle ids) and an LSTM (weakrefs)."""

    def __init__(self, first) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.rnn = nn.LSTM(3, 2)
        self.acts = [first, lambda t: t * 2.0]
        self._register_state_dict_hook(lambda *args: None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for act in self.acts:
            x = act(self.lin(x))
        return self.rnn(x)[0]


def test_a_list_of_functions_is_compared_item_by_item_and_torchs_registries_are_not():
    def build(first) -> fl.TrainState:
        torch.manual_seed(0)
        return fl.TrainState.create(_NetWithFunctionList(first), tx=optim.sgd(0.1), device="cpu")

    stacked = fl.stack_states([build(torch.tanh), build(torch.tanh)])
    assert stacked.params["lin.weight"].shape == (2, 3, 3)
    with pytest.raises(ValueError, match=r"another module.*acts"):
        fl.stack_states([build(torch.tanh), build(torch.sigmoid)])


@pytest.mark.parametrize(
    "clip",
    [optim.clip_by_global_norm, optim.clip],
    ids=["clip_by_global_norm", "clip_by_value"],
)
def test_states_whose_clipping_thresholds_differ_are_refused(clip):
    def build(threshold: float, seed: int) -> fl.TrainState:
        torch.manual_seed(seed)
        tx = optim.chain(clip(threshold), optim.sgd(0.1))
        return fl.TrainState.create(nn.Linear(3, 2), tx=tx, device="cpu")

    with pytest.raises(ValueError, match="another optimizer"):
        fl.stack_states([build(5.0, 0), build(50.0, 1)])
