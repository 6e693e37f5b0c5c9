"""Claims of the guide's prose that no other test checks (docs/guide.md, section 6):
which normalization layers train and evaluate under ``vmap`` with ``precision=``, what
a ``PackedSequence`` in the batch meets there, and how many graphs the step options add
to a compiled train step."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fnloop as fl
from fnloop import optim


def _classify(model, batch):
    x, y = batch
    return {"loss": F.cross_entropy(model(x), y)}


@pytest.mark.parametrize(
    ("norm", "make_step"),
    [
        (lambda: nn.GroupNorm(2, 6), fl.make_train_step),
        (lambda: nn.GroupNorm(2, 6), fl.make_eval_step),
        (lambda: nn.LayerNorm(6), fl.make_eval_step),
    ],
    ids=["groupnorm-train", "groupnorm-eval", "layernorm-eval"],
)
def test_vmapped_bf16_runs_through_the_normalization_layers_the_guide_says_work(norm, make_step):
    """Section 6: under ``vmap`` with ``precision=`` torch's batched BatchNorm (training
    and evaluation), LayerNorm and InstanceNorm (training) fail on the CPU, while
    GroupNorm works (and LayerNorm evaluates): each stacked model gets what its own step
    gives it alone."""
    states = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        module = nn.Sequential(nn.Linear(6, 6), norm(), nn.Linear(6, 3))
        states.append(fl.TrainState.create(module, tx=optim.sgd(0.1), device="cpu"))
    batch = (torch.randn(8, 6), torch.randint(0, 3, (8,)))
    step = make_step(_classify, precision="bf16")
    many = torch.func.vmap(step, in_dims=(0, None), randomness="different")
    out = many(fl.stack_states(states), batch)
    metrics = out[1] if isinstance(out, tuple) else out
    for i, state in enumerate(states):
        alone = step(state, batch)
        alone = alone[1] if isinstance(alone, tuple) else alone
        torch.testing.assert_close(metrics["loss"][i], alone["loss"], rtol=2e-2, atol=2e-2)


class _LastHidden(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(4, 3, batch_first=True)

    def forward(self, packed):
        return self.rnn(packed)[1][0]


@pytest.mark.parametrize("make_step", [fl.make_train_step, fl.make_eval_step])
def test_a_packed_sequence_in_the_batch_fails_at_vmaps_entry_with_torchs_error(make_step):
    """Section 6: a ``PackedSequence`` in the batch fails before the step runs, at
    ``vmap``'s entry, with torch's own ``AttributeError`` (torch 2.13); one model at a
    time trains on it. When torch learns to take it, this test fails: the guide's
    sentence can go."""
    from torch.nn.utils.rnn import pack_padded_sequence

    torch.manual_seed(0)
    state = fl.TrainState.create(_LastHidden(), tx=optim.sgd(0.1), device="cpu")
    packed = pack_padded_sequence(torch.randn(4, 5, 4), [5, 4, 2, 1], batch_first=True)
    batch = (packed, torch.randint(0, 3, (4,)))
    step = make_step(_classify)
    alone = step(state, batch)
    assert torch.isfinite((alone[1] if isinstance(alone, tuple) else alone)["loss"])
    many = torch.func.vmap(step, in_dims=(0, None), randomness="different")
    with pytest.raises(AttributeError, match="'int' object has no attribute 'device'"):
        many(fl.stack_states([state, state]), batch)


def _graphs(start_step: int, **options) -> int:
    """The graphs dynamo makes of a train step made with ``options`` over 6 calls from a
    state at ``start_step``."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    state = fl.TrainState.create(module, tx=optim.adamw(1e-3), device="cpu").clone()
    state = state.replace(step=start_step)
    counter = CompileCounter()
    step = torch.compile(fl.make_train_step(_classify, **options), backend=counter)
    batch = (torch.randn(8, 4), torch.randint(0, 3, (8,)))
    for _ in range(6):
        state, _ = step(state, batch)
    return counter.frame_count


@pytest.mark.slow  # dynamo traces the step 8 times: 15-25 s on two CPU cores
@pytest.mark.parametrize("start_step", [0, 3])
def test_compiled_step_options_add_the_graphs_the_guide_counts(start_step):
    """Section 6: options add a few graphs, once each: ``accumulation_steps=k`` one or
    two (the window's first and last micro-batch; up to four on torch 2.11), fp16 at
    most one (the first call, which creates the loss scale; at step 0 before torch 2.14
    that call is step 0's graph anyway)."""
    plain = _graphs(start_step)
    fp16 = _graphs(start_step, precision="fp16")
    assert fp16 - plain in (0, 1)
    # torch 2.11's dynamo compiles the first window (at step 0) apart: up to four
    most = 4 if torch.__version__ < torch.torch_version.TorchVersion("2.12") else 2
    assert 1 <= _graphs(start_step, accumulation_steps=2) - plain <= most
    assert 1 <= _graphs(start_step, accumulation_steps=3) - plain <= most
    if start_step == 0 and torch.__version__ < torch.torch_version.TorchVersion("2.14"):
        assert fp16 == plain == 2


def test_fit_stops_when_the_weights_are_not_finite_though_the_loss_is(tmp_path):
    """Section 2, the default policy ("stop"): ``fit`` stops the run without writing a
    checkpoint when an epoch's loss, or the weights after it, are not finite. Here the
    loss is finite and the update overflows the weights to inf."""
    torch.manual_seed(0)
    state = fl.TrainState.create(nn.Linear(4, 1), tx=optim.sgd(1e36), device="cpu")
    batch = (torch.randn(8, 4), torch.randn(8, 1) * 1e3)
    mse = lambda model, b: {"loss": F.mse_loss(model(b[0]), b[1])}  # noqa: E731
    out = fl.fit(
        state, mse, [batch], max_epochs=3, out_dir=tmp_path, progress=False, log_to_console=False
    )
    assert out.epoch == 1
    assert all(torch.isfinite(torch.tensor(v)) for v in out.history["train"]["loss"])
    assert not all(torch.isfinite(p).all() for p in out.params.values())
    assert not list((tmp_path / "checkpoints").glob("ckpt-*.pt"))
    assert "training diverged" in (tmp_path / "run_training.log").read_text()


def test_with_learning_rates_on_a_constant_a_plateau_and_a_schedule():
    """Section 3: a rate set with ``with_learning_rates`` is the one the next update uses;
    a constant rate keeps it, a ``reduce_on_plateau`` rate too (its next reduction scales
    it, as torch's scheduler reduces the ``lr`` of a param group), and a schedule sets
    the rate from the update count after that update."""
    params = {"w": torch.ones(3)}
    grads = {"w": torch.ones(3)}
    for tx, after in [
        (optim.sgd(0.1), 0.0),
        (optim.sgd(optim.reduce_on_plateau(0.1, patience=0, factor=0.5)), 0.0),
        (optim.sgd(optim.step_schedule(0.1, 2, 0.5)), 0.1),
    ]:
        opt_state = optim.with_learning_rates(tx.init(params), 0.0)
        updates, opt_state = tx.update(grads, opt_state, params)
        assert torch.equal(optim.apply_updates(params, updates)["w"], params["w"])
        assert [float(r) for r in optim.learning_rates(opt_state)] == [after]
    tx = optim.sgd(optim.reduce_on_plateau(0.1, patience=0, factor=0.5))
    opt_state = optim.with_learning_rates(tx.init(params), 1e-3)
    for metric in (1.0, 2.0):
        opt_state = optim.observe_metric(opt_state, metric)
    assert [float(r) for r in optim.learning_rates(opt_state)] == [pytest.approx(5e-4)]


@pytest.mark.slow  # dynamo traces the step: ~6 s for both on 2 cores (first import included)
@pytest.mark.parametrize("error", ["python", "torch"])
def test_a_compiled_step_after_a_first_call_that_raised_ci_subset(error):
    """Section 6: a first call that raises a Python exception while dynamo traces the
    step leaves that step running its own code eagerly, its inner functions compiled one
    by one (many small graphs); a torch operation's error does not: the next call compiles
    the step whole (one graph, as a step that never failed)."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    failed = []

    def classify(model, batch):
        out = _classify(model, batch)
        if error == "python" and not failed:
            failed.append(True)
            raise ValueError("the first call fails")
        return out

    state = fl.TrainState.create(nn.Linear(4, 3), tx=optim.sgd(0.1), device="cpu").clone()
    counter = CompileCounter()
    step = torch.compile(fl.make_train_step(classify), backend=counter)
    batch = (torch.randn(8, 4), torch.randint(0, 3, (8,)))
    first = (torch.randn(8, 5), batch[1]) if error == "torch" else batch
    with pytest.raises(Exception, match="first call fails" if error == "python" else "size"):
        step(state, first)
    step(state, batch)
    if error == "python":
        assert counter.frame_count > 2  # the inner functions, each a graph of its own
    else:
        assert counter.frame_count == 1


def test_fit_warns_when_a_score_is_followed_with_mode_min():
    """Section 4: ``fit`` logs a warning when it, or an early-stopping rule, follows a
    metric named like a score (``acc``, ``f1``, ...) with ``"min"``; not with ``"max"``."""

    def classify(model, batch):
        x, y = batch
        logits = model(x)
        return {"loss": F.cross_entropy(logits, y), "acc": (logits.argmax(-1) == y).float().mean()}

    class Records(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.warnings: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno == logging.WARNING:
                self.warnings.append(record.getMessage())

    state = fl.TrainState.create(nn.Linear(4, 3), tx=optim.sgd(0.1), device="cpu")
    batch = (torch.randn(8, 4), torch.randint(0, 3, (8,)))
    runs = {
        "fit": {"monitor": "train/acc"},
        "rule": {"early_stopping": [fl.EarlyStopping("train/acc"), fl.EarlyStopping("train/loss")]},
        "max": {"early_stopping": fl.EarlyStopping("train/acc", mode="max")},
    }
    logger = logging.getLogger("fnloop.run.run")  # fit's logger: handlers of yours stay
    warned = {}
    for name, options in runs.items():
        records = Records()
        logger.addHandler(records)
        try:
            fl.fit(state, classify, [batch], max_epochs=1, progress=False, log_to_console=False,
                   **options)  # fmt: skip
        finally:
            logger.removeHandler(records)
        warned[name] = [m for m in records.warnings if "reads like a score" in m]
    assert len(warned["fit"]) == 1 and warned["fit"][0].startswith("fit follows train/acc")
    assert len(warned["rule"]) == 1
    assert warned["rule"][0].startswith("EarlyStopping(monitor='train/acc'")
    assert warned["max"] == []
