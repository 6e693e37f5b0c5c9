"""``TrainState``: frozen, a pytree for optree and torch, built from a module by ``create``."""

from __future__ import annotations

import copy
import dataclasses
import pickle
from collections.abc import Mapping

import optree
import pytest
import torch
import torch.nn.functional as F
import torch.utils._pytree as torch_pytree
from torch import nn

import fnloop as fl
from fnloop import _tree, optim
from fnloop.state import append_history, freeze_history

STATIC_FIELDS = ("step", "epoch", "micro_step", "history", "module", "tx", "ema_decay")


class Net(nn.Module):
    """Parameters, BatchNorm buffers, a non-persistent buffer and a parameter-free layer."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(4, 2)
        self.register_buffer("scratch", torch.ones(2), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.bn(self.fc1(x)))) * self.scratch


class Tied(nn.Module):
    """An embedding whose weight is shared with the output layer."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 3)
        self.out = nn.Linear(3, 5, bias=False)
        self.out.weight = self.emb.weight


@pytest.fixture
def module() -> Net:
    torch.manual_seed(0)
    return Net()


@pytest.fixture
def state(module: Net) -> fl.TrainState:
    return fl.TrainState.create(module, tx=optim.adamw(1e-3), device="cpu")


def non_trivial(state: fl.TrainState) -> fl.TrainState:
    """A state with counters and history that must all stay static."""
    history = freeze_history({"train": {"loss": [1.0, 0.5]}, "valid": {"acc": [0.25, 0.75]}})
    return state.replace(step=7, epoch=2, micro_step=1, history=history)


# ----------------------------------------------------------------------------- immutability


@pytest.mark.parametrize("field", ["params", "step", "epoch", "history", "opt_state", "ema"])
def test_assigning_a_field_raises(state: fl.TrainState, field: str) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(state, field, getattr(state, field))


def test_the_history_is_read_only(state: fl.TrainState) -> None:
    """Neither its entries nor its attributes can be set: only append_history makes a
    history with more values, and the state's history is left as it was."""
    history = non_trivial(state).history
    with pytest.raises(TypeError):
        history["test"] = {"acc": (1.0,)}  # type: ignore[index]
    says = "^a history is read-only; make a new one with append_history$"
    for name in ("_splits", "train"):
        with pytest.raises(AttributeError, match=says):
            setattr(history, name, {})
    assert history == {"train": {"loss": (1.0, 0.5)}, "valid": {"acc": (0.25, 0.75)}}


def test_replace_returns_a_new_state_and_leaves_the_old_one(state: fl.TrainState) -> None:
    new_params = {n: p + 1 for n, p in state.params.items()}
    new = state.replace(step=3, epoch=1, params=new_params)
    assert new is not state and isinstance(new, fl.TrainState)
    assert (state.step, state.epoch) == (0, 0)
    assert (new.step, new.epoch) == (3, 1)
    assert new.params is new_params and state.params is not new_params
    for name, p in state.params.items():
        assert torch.equal(new.params[name], p + 1)
    assert new.opt_state is state.opt_state and new.module is state.module and new.tx is state.tx


def test_replace_rejects_unknown_fields(state: fl.TrainState) -> None:
    with pytest.raises(TypeError, match="global_step"):
        state.replace(global_step=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.replace(step=1).step = 2  # type: ignore[misc]


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Tagged(fl.TrainState):
    """A state with a field of its own."""

    tag: str = dataclasses.field(default="none", metadata={"static": True})
    seen: torch.Tensor = dataclasses.field(default_factory=lambda: torch.zeros(()))


def test_replace_keeps_and_changes_a_subclass_field(module: Net) -> None:
    """Eager ``replace`` takes a subclass's own fields, as the compiled path does."""
    state = _Tagged.create(module, tx=optim.sgd(0.1), device="cpu")
    new = state.replace(tag="best", step=3)
    assert type(new) is _Tagged and (new.tag, new.step) == ("best", 3)
    assert state.tag == "none" and new.replace(epoch=1).tag == "best"
    with pytest.raises(TypeError, match="global_step"):
        state.replace(global_step=1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _WithRequired(fl.TrainState):
    """A state with a field of its own that has no default."""

    best: torch.Tensor


def test_create_takes_a_subclass_fields(module: Net) -> None:
    """``create`` passes a subclass's own fields on, as flax's ``create(**kwargs)`` does."""
    state = _WithRequired.create(module, tx=optim.sgd(0.1), device="cpu", best=torch.ones(()))
    assert type(state) is _WithRequired and torch.equal(state.best, torch.ones(()))
    assert _Tagged.create(module, tx=optim.sgd(0.1), device="cpu", tag="t").tag == "t"
    with pytest.raises(TypeError, match="'step'"):
        _Tagged.create(module, tx=optim.sgd(0.1), device="cpu", step=3)
    with pytest.raises(TypeError, match="'best'"):
        fl.TrainState.create(module, tx=optim.sgd(0.1), device="cpu", best=torch.ones(()))


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Checked(fl.TrainState):
    """A subclass with a ``__post_init__`` of its own that does not call ``super()``'s."""

    seen: torch.Tensor = dataclasses.field(default_factory=lambda: torch.zeros(()))

    def __post_init__(self) -> None:
        if self.seen.dim() != 0:
            raise ValueError("seen must be 0-d")


def test_a_subclass_post_init_does_not_stop_its_registration(module: Net) -> None:
    state = _Checked.create(module, tx=optim.sgd(0.1), device="cpu")
    copied = state.clone()
    assert type(copied) is _Checked and copied.seen.data_ptr() != state.seen.data_ptr()
    assert "seen" in _tree.tree_flatten_with_keys(state)[0]
    with pytest.raises(ValueError, match="0-d"):
        state.clone().__class__(**{**state.__dict__, "seen": torch.zeros(2)})


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Best(fl.TrainState):
    """A subclass whose own field is a float leaf (not declared static)."""

    best: float = float("inf")


def test_a_subclass_float_leaf_clones_saves_and_refuses_stacking(module: Net, tmp_path) -> None:
    state = _Best.create(module, tx=optim.sgd(0.1), device="cpu").replace(best=1.5)
    assert state.clone().best == 1.5
    path = fl.checkpoint.save_checkpoint(tmp_path / "c.pt", state)
    assert fl.checkpoint.load_checkpoint(path, like=state.replace(best=0.0)).best == 1.5
    with pytest.raises(TypeError, match="'best' is a float"):
        fl.stack_states([state, state])


def test_clone_stack_and_steps_keep_a_subclass_and_its_fields(module: Net) -> None:
    """A subclass is a pytree too: its own tensors are leaves, its static fields context."""
    states = [
        _Tagged.create(module, tx=optim.sgd(lr), device="cpu").replace(tag="t", seen=torch.ones(()))
        for lr in (0.1, 0.2)
    ]
    copied = states[0].clone()
    assert (
        type(copied) is _Tagged and copied.tag == "t" and torch.equal(copied.seen, states[0].seen)
    )
    assert copied.seen.data_ptr() != states[0].seen.data_ptr()
    stacked = fl.stack_states(states)
    assert type(stacked) is _Tagged and stacked.tag == "t" and stacked.seen.shape == (2,)
    assert [(type(s), s.tag) for s in fl.unstack_states(stacked)] == [(_Tagged, "t")] * 2
    step = fl.make_train_step(lambda model, x: {"loss": model(x).square().mean()})
    new, _ = step(states[0], torch.randn(4, 3))
    assert type(new) is _Tagged and new.tag == "t" and new.step == 1


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class _Slotted(fl.TrainState):
    """A subclass whose fields live in slots (no instance __dict__ entries)."""

    seen: torch.Tensor


def test_a_slotted_subclass_replaces_clones_and_steps(module: Net) -> None:
    state = _Slotted.create(module, tx=optim.sgd(0.1), device="cpu", seen=torch.ones(()))
    moved = state.replace(epoch=2)
    assert type(moved) is _Slotted and moved.epoch == 2 and moved.seen is state.seen
    assert moved.tx is state.tx and state.epoch == 0
    with pytest.raises(TypeError, match="global_step"):
        state.replace(global_step=1)
    assert torch.equal(state.clone().seen, state.seen)
    new, _ = fl.make_train_step(lambda model, x: {"loss": model(x).square().mean()})(
        state, torch.randn(4, 3)
    )
    assert type(new) is _Slotted and new.step == 1 and new.seen is state.seen


@dataclasses.dataclass(frozen=True, kw_only=True)
class _OwnEq(fl.TrainState):
    """A subclass that defines its own comparison."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _OwnEq) and self.step == other.step

    __hash__ = None  # type: ignore[assignment]


@pytest.mark.parametrize("cls", [fl.TrainState, _Tagged, _Slotted])
def test_states_compare_and_hash_by_identity(module: Net, cls: type[fl.TrainState]) -> None:
    """As nn.Module: a field-by-field ``==`` raised on the tensors (no single bool), and a
    subclass declared as the guide does (dataclass eq=True by default) did the same."""
    extra = {"seen": torch.ones(())} if cls is _Slotted else {}
    state = cls.create(module, tx=optim.sgd(0.1), device="cpu", **extra)
    copy_ = state.clone()
    assert state == state and state != copy_ and state not in [copy_]
    assert len({state, copy_, state}) == 2 and hash(state) == hash(state)
    own = _OwnEq.create(module, tx=optim.sgd(0.1), device="cpu")
    assert own == own.clone() and own != own.replace(step=1)


class _OwnEqChild(_OwnEq):
    """A plain subclass: it inherits its parent's comparison, as Python's subclasses do."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class _OwnEqDataclassChild(_OwnEq):
    """Its decorator would write a field-by-field __eq__, which raises on the tensors."""


@pytest.mark.parametrize("cls", [_OwnEqChild, _OwnEqDataclassChild])
def test_a_subclass_inherits_its_parents_own_comparison(
    module: Net, cls: type[fl.TrainState]
) -> None:
    """__init_subclass__ gave every subclass defining no __eq__ the identity one, so the
    subclass of a subclass with its own __eq__ compared by identity instead."""
    state = cls.create(module, tx=optim.sgd(0.1), device="cpu")
    assert cls.__eq__ is _OwnEq.__eq__
    assert state == state.clone() and state != state.replace(step=1)


def test_a_state_first_flattened_while_compiling_traces_in_one_graph() -> None:
    """A subclass's fields are read at its first flatten, which may happen while
    torch.compile traces (a fresh state given to a compiled vmap over batches): that is
    one graph, not an error that dynamo cannot trace dataclasses.fields of a class."""

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Fresh(fl.TrainState):  # never flattened before the compiled call
        best: torch.Tensor
        tag: str = dataclasses.field(default="t", metadata={"static": True})

    torch.manual_seed(0)
    state = Fresh.create(nn.Linear(3, 2), tx=optim.sgd(0.1), device="cpu", best=torch.zeros(()))
    step = torch.func.vmap(
        fl.make_train_step(lambda model, x: {"loss": model(x).square().mean()}),
        in_dims=(None, 0),
    )
    xs = torch.randn(2, 4, 3)
    torch._dynamo.reset()
    got, _ = torch.compile(step, backend="eager", fullgraph=True)(state, xs)
    want, _ = step(state, xs)
    assert type(got) is Fresh and got.tag == "t" and got.best.shape == (2,)
    for a, b in zip(_tree.tree_leaves(got), _tree.tree_leaves(want), strict=True):
        torch.testing.assert_close(a, b)


def test_replace_rejects_unknown_fields_while_compiling(state: fl.TrainState) -> None:
    torch._dynamo.reset()
    with pytest.raises(Exception, match="global_step"):
        torch.compile(lambda s: s.replace(global_step=1), backend="eager")(state)
    torch._dynamo.reset()
    new = torch.compile(lambda s: s.replace(step=s.step + 1), backend="eager")(state)
    assert new.step == state.step + 1 and new.history is state.history


def test_history_pickles_and_copies(state: fl.TrainState) -> None:
    history = append_history(state.history, "train", {"loss": 1.0, "acc": 0.5})
    assert (
        pickle.loads(pickle.dumps(history)) == history == {"train": {"loss": (1.0,), "acc": (0.5,)}}
    )
    copied = copy.deepcopy(state.replace(history=history))
    assert copied.history == history and repr(copied.history) == repr(history)


def test_history_is_immutable(state: fl.TrainState) -> None:
    history = append_history(
        append_history(state.history, "train", {"loss": 1.0}), "train", {"loss": 0.5}
    )
    assert history["train"]["loss"] == (1.0, 0.5)
    assert state.history == {}
    with pytest.raises(TypeError):
        history["train"]["loss"] = (0.0,)  # type: ignore[index]
    with pytest.raises(TypeError):
        history["valid"] = {}  # type: ignore[index]


# ----------------------------------------------------------------------------- pytree


def test_optree_round_trip_keeps_static_fields_in_the_context(state: fl.TrainState) -> None:
    state = non_trivial(state)
    leaves, treedef = optree.tree_flatten(state, namespace="fnloop")
    assert leaves and all(isinstance(x, torch.Tensor) for x in leaves)
    expected = (
        len(state.params)
        + len(state.buffers)
        + len(optree.tree_leaves(state.opt_state, namespace="fnloop"))
        + 1  # skipped_steps
    )
    assert len(leaves) == expected
    back = optree.tree_unflatten(treedef, leaves)
    assert isinstance(back, fl.TrainState)
    for name in STATIC_FIELDS:
        assert getattr(back, name) == getattr(state, name), name
    assert back.params.keys() == state.params.keys()
    for a, b in zip(optree.tree_leaves(back, namespace="fnloop"), leaves, strict=True):
        assert a is b
    # Counters are part of the structure: a different step is a different treedef.
    assert optree.tree_structure(state.replace(step=8), namespace="fnloop") != treedef


def test_optree_without_the_namespace_sees_one_leaf(state: fl.TrainState) -> None:
    """Why every fnloop tree op passes namespace="fnloop"."""
    assert optree.tree_leaves(state) == [state]


def test_tree_map_keeps_counters_and_history(state: fl.TrainState) -> None:
    state = non_trivial(state)
    doubled = optree.tree_map(lambda x: x * 2, state, namespace="fnloop")
    assert (doubled.step, doubled.epoch, doubled.micro_step) == (7, 2, 1)
    assert doubled.history == state.history
    for name, p in state.params.items():
        assert torch.equal(doubled.params[name], p * 2)


def test_torch_pytree_round_trip_keeps_static_fields_in_the_context(state: fl.TrainState) -> None:
    state = non_trivial(state)
    leaves, spec = torch_pytree.tree_flatten(state)
    for leaf in leaves:
        assert isinstance(leaf, torch.Tensor), f"non-tensor leaf {leaf!r} would break vmap"
    assert len(leaves) == len(optree.tree_leaves(state, namespace="fnloop"))
    back = torch_pytree.tree_unflatten(leaves, spec)
    assert isinstance(back, fl.TrainState)
    for name in STATIC_FIELDS:
        assert getattr(back, name) == getattr(state, name), name
    assert back.ema is None and back.loss_scale is None and back.grad_accum is None
    for a, b in zip(torch_pytree.tree_leaves(back), leaves, strict=True):
        assert a is b


def test_torch_pytree_key_paths_name_each_leafs_own_field(state: fl.TrainState) -> None:
    """torch.utils._pytree's key paths (read by torch.compile and torch.export) pair each
    leaf with its field: absent fields (ema, loss_scale, grad_accum are None here) have
    neither leaf nor key, so the fields after them keep their own names."""
    assert state.ema is None and state.loss_scale is None and state.grad_accum is None
    paths, _ = torch_pytree.tree_flatten_with_path(state)
    fields = [path[0].name for path, _ in paths]
    assert "skipped_steps" in fields
    for (path, leaf), field in zip(paths, fields, strict=True):
        assert any(leaf is x for x in torch_pytree.tree_leaves(getattr(state, field))), path


@pytest.mark.parametrize("cls", [_WithRequired, _Best])
def test_torch_pytree_round_trip_keeps_a_subclass_field_that_is_none(
    module: Net, cls: type[fl.TrainState]
) -> None:
    """An absent (None) field is no leaf for torch.utils._pytree: it comes back None, not
    as the field's default (_Best's inf) nor as a missing argument (_WithRequired)."""
    state = cls.create(module, tx=optim.sgd(0.1), device="cpu", best=None)
    leaves, spec = torch_pytree.tree_flatten(state)
    back = torch_pytree.tree_unflatten(leaves, spec)
    assert type(back) is cls and back.best is None


def test_torch_pytree_round_trip_with_ema(module: Net) -> None:
    state = fl.TrainState.create(module, tx=optim.sgd(0.1), ema_decay=0.9, device="cpu")
    leaves, spec = torch_pytree.tree_flatten(state)
    assert all(isinstance(x, torch.Tensor) for x in leaves)
    back = torch_pytree.tree_unflatten(leaves, spec)
    assert back.ema.keys() == state.params.keys()
    assert back.ema_decay == 0.9


@pytest.mark.parametrize(
    "tx",
    [
        optim.adam(1e-3),  # nu_max absent
        optim.adam(1e-3, amsgrad=True),
        optim.rmsprop(1e-3),  # grad_avg absent
        optim.rmsprop(1e-3, centered=True, momentum=0.9),
        optim.sgd(optim.reduce_on_plateau(0.1)),
    ],
    ids=["adam", "amsgrad", "rmsprop", "rmsprop-centered", "plateau"],
)
def test_vmap_accepts_a_stacked_state(module: Net, tx: optim.GradientTransformation) -> None:
    """No ``None`` or ``int`` leaf anywhere: ``vmap(in_dims=0)`` takes the whole state."""
    state = fl.TrainState.create(module, tx=tx, device="cpu")
    leaves, treedef = optree.tree_flatten(state, namespace="fnloop")
    stacked = optree.tree_unflatten(treedef, [torch.stack([x, x, x]) for x in leaves])
    out = torch.func.vmap(lambda s: (s.params["fc1.weight"].sum(), s))(stacked)
    assert out[0].shape == (3,)
    assert isinstance(out[1], fl.TrainState) and out[1].step == state.step


# ----------------------------------------------------------------------------- create


def test_keys_match_named_parameters_and_buffers(module: Net, state: fl.TrainState) -> None:
    assert list(state.params) == [n for n, _ in module.named_parameters()]
    assert list(state.buffers) == [n for n, _ in module.named_buffers()]
    for name, p in module.named_parameters():
        assert torch.equal(state.params[name], p.detach())
        assert not state.params[name].requires_grad
    assert (state.step, state.epoch, state.micro_step) == (0, 0, 0)
    assert state.history == {} and state.ema is None
    assert state.skipped_steps.item() == 0


def test_module_template_holds_no_weights(module: Net, state: fl.TrainState) -> None:
    assert state.module is not module
    tensors = [*state.module.parameters(), *state.module.buffers()]
    assert tensors and all(t.device.type == "meta" for t in tensors)
    # The template keeps the architecture; the user's module is untouched.
    assert [n for n, _ in state.module.named_parameters()] == list(state.params)
    assert all(p.device.type == "cpu" for p in module.parameters())
    assert all(p.device.type == "cpu" for p in module.buffers())


def test_template_keeps_tied_weights_tied() -> None:
    state = fl.TrainState.create(Tied(), tx=optim.sgd(0.1), device="cpu")
    assert list(state.params) == ["emb.weight"]
    assert state.module.out.weight is state.module.emb.weight


def test_opt_state_is_made_by_tx_init(state: fl.TrainState) -> None:
    expected = state.tx.init(state.params)
    assert optree.tree_structure(state.opt_state, namespace="fnloop") == optree.tree_structure(
        expected, namespace="fnloop"
    )
    assert [lr.item() for lr in optim.learning_rates(state.opt_state)] == [1e-3]


def test_ema_starts_as_a_copy_of_the_params(module: Net) -> None:
    state = fl.TrainState.create(module, tx=optim.sgd(0.1), ema_decay=0.99, device="cpu")
    assert state.ema_decay == 0.99
    for name, p in state.params.items():
        assert torch.equal(state.ema[name], p)
        assert state.ema[name].data_ptr() != p.data_ptr()


def test_a_new_state_has_no_skipped_steps_counted_in_int64(module: Net) -> None:
    """The skip counter is a 0-d int64 tensor (like torch's step counts, and the dtype
    checkpoints of earlier runs hold), on the state's device, starting at zero."""
    state = fl.TrainState.create(module, tx=optim.sgd(0.1), device="cpu")
    skipped = state.skipped_steps
    assert (skipped.dtype, skipped.shape, skipped.device.type) == (torch.int64, (), "cpu")
    assert int(skipped) == 0 and (state.step, state.micro_step, state.epoch) == (0, 0, 0)


@pytest.mark.parametrize("not_a_module", [{"w": torch.zeros(1)}, nn.Linear, "resnet"])
def test_create_rejects_a_non_module(not_a_module: object) -> None:
    with pytest.raises(TypeError, match=r"nn\.Module"):
        fl.TrainState.create(not_a_module, tx=optim.sgd(0.1))  # type: ignore[arg-type]


def test_create_rejects_a_torch_optimizer(module: Net) -> None:
    torch_opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
    with pytest.raises(TypeError, match=r"AdamW.*torch\.optim"):
        fl.TrainState.create(module, tx=torch_opt)  # type: ignore[arg-type]


@pytest.mark.parametrize("decay", [1.0, -0.1, 1.5])
def test_create_rejects_ema_decay_out_of_range(module: Net, decay: float) -> None:
    with pytest.raises(ValueError, match=rf"ema_decay.*{decay}"):
        fl.TrainState.create(module, tx=optim.sgd(0.1), ema_decay=decay)


def test_create_rejects_a_module_without_parameters() -> None:
    with pytest.raises(ValueError, match="no parameters"):
        fl.TrainState.create(nn.ReLU(), tx=optim.sgd(0.1), device="cpu")


# ----------------------------------------------------------------------------- state_dict


def assert_loaded(fresh: nn.Module, expected: Mapping[str, torch.Tensor]) -> None:
    loaded = fresh.state_dict()
    for name, value in expected.items():
        assert torch.equal(loaded[name], value), name


def test_state_dict_loads_strictly_into_a_fresh_module(state: fl.TrainState) -> None:
    trained = state.replace(
        params={n: p + 1 for n, p in state.params.items()},
        buffers={n: b + 2 for n, b in state.buffers.items()},
    )
    sd = trained.state_dict()
    assert "scratch" not in sd  # non-persistent buffers are not part of a state_dict
    torch.manual_seed(1)
    fresh = Net()
    fresh.load_state_dict(sd, strict=True)
    assert_loaded(
        fresh, {**trained.params, **{n: b for n, b in trained.buffers.items() if n != "scratch"}}
    )


def test_state_dict_with_ema(module: Net) -> None:
    state = fl.TrainState.create(module, tx=optim.sgd(0.1), ema_decay=0.5, device="cpu")
    state = state.replace(ema={n: p * 0 for n, p in state.params.items()})
    fresh = Net()
    fresh.load_state_dict(state.state_dict(use_ema=True), strict=True)
    assert_loaded(fresh, state.ema)
    fresh.load_state_dict(state.state_dict(), strict=True)
    assert_loaded(fresh, state.params)


def test_state_dict_of_tied_weights_loads_strictly() -> None:
    torch.manual_seed(0)
    state = fl.TrainState.create(Tied(), tx=optim.sgd(0.1), device="cpu")
    sd = state.state_dict()
    assert set(sd) == {"emb.weight", "out.weight"}
    fresh = Tied()
    fresh.load_state_dict(sd, strict=True)
    assert torch.equal(fresh.emb.weight, state.params["emb.weight"])
    assert fresh.out.weight is fresh.emb.weight


@pytest.mark.parametrize("use_ema", [False, True])
def test_state_dict_of_a_stacked_state_is_an_error_naming_unstack(
    module: Net, use_ema: bool
) -> None:
    """It returned the stacked tensors, which load_state_dict refused with a size
    mismatch (or, for a 0-d parameter stacked once, loaded without a word)."""
    state = fl.TrainState.create(module, tx=optim.sgd(0.1), ema_decay=0.5, device="cpu")
    stacked = fl.stack_states([state, state])
    call = r"state_dict\(use_ema=True\)" if use_ema else r"state_dict\(\)"
    with pytest.raises(
        ValueError,
        match=r"holds 2 stacked models \(parameter 'fc1\.weight' has shape \(2, 4, 3\); the "
        r"module's is \(4, 3\)\).*fl\.unstack_states\(state\)\[i\]\." + call,
    ):
        stacked.state_dict(use_ema=use_ema)
    Net().load_state_dict(fl.unstack_states(stacked)[1].state_dict(use_ema=use_ema))


def test_clone_copies_every_tensor_and_lays_out_each_group_in_one_buffer() -> None:
    from fnloop.optim import _foreach

    module = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    state = fl.TrainState.create(module, tx=optim.adamw(1e-3), ema_decay=0.9, device="cpu")
    copy = state.clone()
    assert isinstance(copy, fl.TrainState)
    assert optree.tree_structure(copy, namespace="fnloop") == optree.tree_structure(
        state, namespace="fnloop"
    )
    ours = optree.tree_leaves(copy, namespace="fnloop")
    theirs = optree.tree_leaves(state, namespace="fnloop")
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b) and a.dtype == b.dtype and a.shape == b.shape
    storages = {t.untyped_storage().data_ptr() for t in theirs}
    assert not any(t.untyped_storage().data_ptr() in storages for t in ours)
    adam = copy.opt_state[0]
    for group in (copy.params, copy.ema, adam.mu, adam.nu):
        assert _foreach.flat(list(group.values())) is not None
    # BatchNorm's buffers mix float and int64 tensors: copied one by one.
    assert _foreach.flat(list(copy.buffers.values())) is None


def test_clone_keeps_channels_last_layouts_and_a_donating_step_trains_them() -> None:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(16, 3)).double()
    module[0].to(memory_format=torch.channels_last)
    state = fl.TrainState.create(module, tx=optim.adamw(1e-2), ema_decay=0.9, device="cpu")
    assert state.params["0.weight"].is_contiguous(memory_format=torch.channels_last)
    copy = state.clone()
    for group in (copy.params, copy.ema, copy.opt_state[0].mu, copy.opt_state[0].nu):
        weight = group["0.weight"]
        assert weight.is_contiguous(memory_format=torch.channels_last)
        assert not weight.is_contiguous()
    assert torch.equal(copy.params["0.weight"], state.params["0.weight"])

    def step_fn(model, batch):
        x, y = batch
        return {"loss": F.cross_entropy(model(x), y)}

    g = torch.Generator().manual_seed(1)
    data = [
        (torch.randn(8, 2, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,)))
        for _ in range(3)
    ]
    pure, donating = fl.make_train_step(step_fn), fl.make_train_step(step_fn, donate=True)
    for batch in data:
        state, _ = pure(state, batch)
        copy, _ = donating(copy, batch)
    for a, b in zip(fl._tree.tree_leaves(state), fl._tree.tree_leaves(copy), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert copy.params["0.weight"].is_contiguous(memory_format=torch.channels_last)


def test_tensors_of_separate_storages_are_never_joined():
    # Back-to-back addresses in two storages (here two numpy-backed tensors; on CUDA the
    # caching allocator can place blocks so) must not be viewed as one tensor.
    from fnloop.optim import _foreach

    np = pytest.importorskip("numpy")
    array = np.zeros(8, dtype=np.float32)
    a, b = torch.from_numpy(array[:4]), torch.from_numpy(array[4:])
    assert b.data_ptr() == a.data_ptr() + 16
    assert _foreach.flat([a, b]) is None
    whole = torch.zeros(8)
    assert _foreach.flat([whole[:4], whole[4:]]).shape == (8,)


def test_lazy_and_uncopyable_modules_are_clear_errors():
    import torch.nn.utils.prune as prune

    with pytest.raises(ValueError, match=r"'weight' is not initialized yet.*forward pass"):
        fl.TrainState.create(nn.LazyLinear(3), tx=optim.sgd(0.1), device="cpu")
    pruned = nn.Linear(3, 3)
    prune.l1_unstructured(pruned, "weight", 0.5)
    with pytest.raises(TypeError, match=r"deepcopy of it failed.*prune.remove"):
        fl.TrainState.create(pruned, tx=optim.sgd(0.1), device="cpu")


def test_clone_copies_a_4d_tensor_of_another_strided_layout_into_its_group() -> None:
    """Only channels-last layouts are kept: a 4-d weight that is a slice of a larger
    tensor (every other column) is copied contiguous, as its strides would reach past
    its part of the group's buffer."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 4, 3)
    conv.weight = nn.Parameter(torch.randn(4, 2, 3, 6)[..., ::2])
    assert not conv.weight.is_contiguous()
    state = fl.TrainState.create(conv, tx=optim.adamw(1e-3), ema_decay=0.9, device="cpu")
    copy = state.clone()
    want = conv.state_dict()
    for group in (copy.params, copy.ema):
        for name, t in group.items():
            assert torch.equal(t, want[name])


def test_a_state_without_params_says_so_instead_of_stopiteration() -> None:
    """``state.device`` of an empty ``params`` (a ``replace`` whose filter kept nothing)
    raised a bare ``StopIteration``, which a train step, an eval step and ``fit`` let out
    with no message."""
    state = fl.TrainState.create(nn.Linear(2, 1), tx=optim.sgd(0.1), device="cpu")
    empty = state.replace(params={k: v for k, v in state.params.items() if k == "head"})
    with pytest.raises(ValueError, match=r"no parameters \(state.params is empty\)"):
        _ = empty.device
    step = fl.make_train_step(lambda model, batch: {"loss": model(batch).sum()})
    with pytest.raises(ValueError, match="no parameters"):
        step(empty, torch.ones(1, 2))
