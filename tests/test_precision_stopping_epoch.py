"""fnloop.precision, fnloop.stopping and fnloop.epoch against references
(torch.amp.GradScaler, a written-out early-stopping rule, hand computations)."""

from __future__ import annotations

import contextlib
import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fnloop as fl
from fnloop import optim
from fnloop.epoch import MetricMeans
from fnloop.precision import autocast


@pytest.mark.parametrize(
    ("init_scale", "growth_factor", "backoff_factor", "growth_interval"),
    [(1000.0, 1.0001, 0.5, 1), (3.7, 1.1, 0.9, 1), (1000.0, 1.5, 0.123, 2), (2.0**16, 2.0, 0.3, 3)],
)
def test_loss_scale_follows_grad_scaler_with_any_factors(
    init_scale, growth_factor, backoff_factor, growth_interval
):
    """GradScaler multiplies the float32 scale by its float64 factors in float64 and rounds
    once; with factors that are not powers of two the scale must stay equal to its, bit
    for bit, over many updates (a float32 product rounds the factor first and drifts)."""
    module = nn.Linear(1, 1)
    opt = torch.optim.SGD(module.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler(
        "cpu",
        init_scale=init_scale,
        growth_factor=growth_factor,
        backoff_factor=backoff_factor,
        growth_interval=growth_interval,
    )
    rules = fl.DynamicLossScale(
        init_scale=init_scale,
        growth_factor=growth_factor,
        backoff_factor=backoff_factor,
        growth_interval=growth_interval,
    )
    state = rules.init(torch.device("cpu"))
    overflows = [i % 5 == 3 or i % 7 == 6 for i in range(40)]
    for i, overflow in enumerate(overflows):
        opt.zero_grad()
        loss = module(torch.ones(1, 1)).sum() * (float("inf") if overflow else 1.0)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        state = rules.update(state, torch.tensor(overflow))
        assert state.scale.dtype == torch.float32
        assert state.growth_tracker.dtype == torch.int32
        assert (float(state.scale), int(state.growth_tracker)) == (
            scaler.get_scale(),
            int(scaler._growth_tracker),
        ), f"update {i}"


def test_loss_scale_defaults_are_grad_scalers():
    """DynamicLossScale() (what precision="fp16" uses) follows GradScaler() as made with
    no arguments: the same initial scale, factors and growth interval."""
    scaler = torch.amp.GradScaler("cpu")
    rules = fl.DynamicLossScale()
    assert (
        rules.init_scale,
        rules.growth_factor,
        rules.backoff_factor,
        rules.growth_interval,
    ) == (
        scaler.get_scale(),
        scaler.get_growth_factor(),
        scaler.get_backoff_factor(),
        scaler.get_growth_interval(),
    )


def test_a_fresh_loss_scale_holds_grad_scalers_tensors():
    """Before the first step: GradScaler's scale and growth tracker, values, shapes and
    dtypes (a float32 scale, an int32 tracker), as every update keeps them."""
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    scaler.scale(nn.Linear(1, 1)(torch.ones(1, 1)).sum())  # makes its scale and tracker
    state = fl.DynamicLossScale(init_scale=8.0).init(torch.device("cpu"))
    for ours, theirs in [
        (state.scale, scaler._scale),
        (state.growth_tracker, scaler._growth_tracker),
    ]:
        assert (ours.dtype, ours.shape, ours.item()) == (theirs.dtype, theirs.shape, theirs.item())


def test_a_scale_that_would_grow_to_inf_stays_put_as_grad_scalers():
    """GradScaler keeps the scale when growing it would overflow float32 (and restarts the
    growth count): near float32's largest value the scale must not become inf, which
    would skip every later fp16 step."""
    init = 2.0**127
    module = nn.Linear(1, 1)
    opt = torch.optim.SGD(module.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=init, growth_interval=1)
    rules = fl.DynamicLossScale(init_scale=init, growth_interval=1)
    state = rules.init(torch.device("cpu"))
    for overflow in [False, False, True, False, False]:
        opt.zero_grad()
        loss = module(torch.ones(1, 1)).sum() * (float("inf") if overflow else 1e-38)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        state = rules.update(state, torch.tensor(overflow))
        assert math.isfinite(float(state.scale))
        assert (float(state.scale), int(state.growth_tracker)) == (
            scaler.get_scale(),
            int(scaler._growth_tracker),
        )


def test_a_loss_scale_resumed_under_a_shorter_growth_interval_grows_at_its_next_step():
    """A state that counted 5 finite steps (a run with growth_interval=2000, say) resumed
    by a step whose interval is 2 grows at its next finite step and starts counting
    afresh: an equality test never fired again until an overflow reset the count."""
    rules = fl.DynamicLossScale(init_scale=8.0, growth_interval=2)
    state = fl.precision.LossScaleState(
        scale=torch.tensor(8.0), growth_tracker=torch.tensor(5, dtype=torch.int32)
    )
    scales = []
    for _ in range(3):
        state = rules.update(state, torch.tensor(False))
        scales.append((float(state.scale), int(state.growth_tracker)))
    assert scales == [(16.0, 0), (16.0, 1), (32.0, 0)]


@pytest.mark.parametrize("growth_interval", [2**31 - 1, 2**31, 10**12])
def test_a_growth_interval_past_int32_never_grows_the_scale_as_grad_scalers(growth_interval):
    """The int32 growth count compared with 2**31 compared with -2**31 (it wrapped), so a
    scale meant never to grow doubled at every finite step; GradScaler keeps it."""
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0, growth_interval=growth_interval)
    rules = fl.DynamicLossScale(init_scale=8.0, growth_interval=growth_interval)
    state = rules.init(torch.device("cpu"))
    module = nn.Linear(1, 1)
    opt = torch.optim.SGD(module.parameters(), lr=0.0)
    for _ in range(3):
        scaler.scale(module(torch.ones(1, 1)).sum()).backward()
        scaler.step(opt)
        scaler.update()
        state = rules.update(state, torch.tensor(False))
    assert (float(state.scale), int(state.growth_tracker)) == (8.0, 3)
    assert (scaler.get_scale(), int(scaler._growth_tracker)) == (8.0, 3)


@pytest.mark.parametrize("device", ["cpu", "cuda:1"])
@pytest.mark.parametrize(
    ("precision", "dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16)]
)
def test_autocast_is_torchs_for_the_devices_type_in_the_precisions_dtype(device, precision, dtype):
    """Autocast on another device type than the model's leaves its operations alone: a
    CUDA model under CPU autocast trains in float32, without a word. The context is made,
    not entered (torch disables a CUDA one, with a warning, where CUDA is missing)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        context = autocast(precision, torch.device(device))
    assert isinstance(context, torch.autocast)
    assert (context.device, context.fast_dtype) == (torch.device(device).type, dtype)
    assert isinstance(autocast(None, torch.device(device)), contextlib.nullcontext)


@pytest.mark.parametrize(("init_scale", "becomes"), [(1e39, "inf"), (1e-46, "0")])
def test_an_init_scale_float32_cannot_hold_is_refused(init_scale, becomes):
    """The scale is kept in float32: 1e39 would become inf (every fp16 step skipped, the
    scale inf forever) and 1e-46 zero (no gradient at all), silently. The error says which."""
    assert float(torch.tensor(init_scale, dtype=torch.float32)) == float(becomes)
    with pytest.raises(ValueError, match=re.escape(f"float32, where {init_scale} is {becomes};")):
        fl.DynamicLossScale(init_scale=init_scale)
    fl.DynamicLossScale(init_scale=3e38)  # the largest float32 is about 3.4e38


def test_metric_means_does_not_keep_every_step_of_an_epoch_alive():
    """Without a progress bar (a job with no terminal) nothing reads the means until the
    epoch ends: the step metrics must still be folded into the device sums as they
    come, not all kept (memory that grows with the epoch's length, 512 bytes of GPU
    memory per metric and step, and without end for an endless loader)."""
    import weakref

    means = fl.MetricMeans()
    refs = []
    total, count = 0.0, 0
    for i in range(5000):
        loss = torch.tensor(float(i % 97) / 7, dtype=torch.float32)
        n = 1 + i % 5
        refs.append(weakref.ref(loss))
        means.add({"loss": loss, "acc": torch.tensor(i % 3 == 0)}, n)
        total += float(loss) * n
        count += n
        del loss
    alive = sum(r() is not None for r in refs)
    assert alive <= 2048, f"{alive} of 5000 step metrics are still held"
    got = means.means()
    assert got["loss"] == pytest.approx(total / count, rel=1e-12)
    assert got["acc"] == pytest.approx(
        sum((1 + i % 5) for i in range(5000) if i % 3 == 0) / count, rel=1e-12
    )


def test_a_batch_of_no_examples_has_no_weight_in_the_epoch_means():
    """A collate_fn that drops unreadable samples can yield an empty batch, whose mean
    loss is 0/0 = NaN. Its weight is 0: the batch-size-weighted epoch mean is that of
    the other batches (NaN * 0 is NaN in the device sum, which made the epoch's loss
    NaN, and fit then stopped training as diverged)."""
    from fnloop import optim

    torch.manual_seed(0)
    module = nn.Linear(2, 1)
    g = torch.Generator().manual_seed(1)
    loader = [torch.randn(4, 2, generator=g), torch.zeros(0, 2), torch.randn(2, 2, generator=g)]

    def step_fn(model, x):
        return {"loss": (model(x) ** 2).mean(), "size": model(x).abs().mean()}

    with torch.no_grad():
        per_batch = [((module(x) ** 2).mean(), module(x).abs().mean()) for x in loader]
    want = {
        "loss": (4 * float(per_batch[0][0]) + 2 * float(per_batch[2][0])) / 6,
        "size": (4 * float(per_batch[0][1]) + 2 * float(per_batch[2][1])) / 6,
    }
    state = fl.TrainState.create(module, tx=optim.sgd(0.0), device="cpu")
    _, got = fl.validate_epoch(state, fl.make_eval_step(step_fn), loader)
    assert got == pytest.approx(want, rel=1e-6)
    _, got = fl.train_epoch(state, fl.make_train_step(step_fn), loader)
    assert got == pytest.approx(want, rel=1e-6)


def test_a_metric_only_batches_of_no_examples_reported_has_no_mean():
    """Such a metric (an entry a step returns for empty batches only) weighs nothing in
    any batch: it is left out of the means, the others' means are those of the batches
    with examples, as a hand-written weighted mean gives them."""
    means = fl.MetricMeans()
    means.add({"loss": torch.tensor(2.0), "empty_frac": torch.tensor(1.0)}, 0)
    means.add({"loss": torch.tensor(1.0)}, 3)
    means.add({"loss": torch.tensor(4.0)}, 1)
    assert means.means() == {"loss": (3 * 1.0 + 1 * 4.0) / 4}
    only_empty = fl.MetricMeans()
    only_empty.add({"loss": torch.tensor(float("nan"))}, 0)
    assert only_empty.means() == {}


@pytest.mark.parametrize("finite_only", [False, True])
def test_reading_the_means_mid_epoch_leaves_the_final_means_bit_for_bit(finite_only):
    """A progress bar reads the means when it redraws, at times that depend on the wall
    clock; each read folded the steps so far into the sums, so where the additions were
    grouped, and a float64 mean's last bit, depended on timing (a resumed run's history
    differed from the uninterrupted run's in 2 of 8 seeds)."""
    g = torch.Generator().manual_seed(0)
    values = torch.randn(40, dtype=torch.float64, generator=g) * 10.0 ** torch.randint(
        -3, 4, (40,), generator=g
    )
    quiet, read = MetricMeans(finite_only=finite_only), MetricMeans(finite_only=finite_only)
    for i, value in enumerate(values):
        quiet.add({"loss": value}, 3)
        read.add({"loss": value}, 3)
        if i in (2, 3, 11, 29):  # the epoch's own reads, and a progress bar's
            want = pytest.approx(float(values[: i + 1].mean()))
            assert read.means()["loss"] == want
            assert read._running_means()["loss"] == want
        if i in (5, 6, 20):
            assert read._running_means()["loss"] == pytest.approx(float(values[: i + 1].mean()))
    assert read.means()["loss"] == quiet.means()["loss"]  # exactly, not approximately
    # A checkpoint folds at a fixed step (as in both runs): the means stay the same.
    restored = MetricMeans(finite_only=finite_only)
    restored.load_state_dict(quiet.state_dict())
    assert restored.means() == quiet.means()


def test_metric_means_options_of_the_wrong_type_are_refused():
    with pytest.raises(TypeError, match=r"^finite_only takes True or False; got 1\.$"):
        fl.MetricMeans(finite_only=1)


def _reference_stop_epoch(values, mode, patience, min_delta, target):
    """Keras' / Lightning's EarlyStopping written out: an epoch improves if it beats the
    best so far by more than min_delta (a NaN never does), the wait counter restarts on
    an improvement, and training stops once it reaches patience (or at a target)."""
    best = float("inf") if mode == "min" else float("-inf")
    wait = 0
    for epoch, value in enumerate(values, start=1):
        better = value < best - min_delta if mode == "min" else value > best + min_delta
        if better:
            best, wait = value, 0
        else:
            wait += 1
        reached = target is not None and (value <= target if mode == "min" else value >= target)
        if reached or (wait >= patience and wait > 0):
            return epoch, best
    return None, best


@pytest.mark.parametrize("mode", ["min", "max"])
@pytest.mark.parametrize("min_delta", [0.0, 0.05])
@pytest.mark.parametrize("patience", [0, 1, 3])
def test_early_stopping_matches_the_reference_rule_with_nan_values(mode, min_delta, patience):
    """Pins the rule on random sequences with NaN epochs (a NaN counts as an epoch
    without improvement and never becomes the best) and inf values."""
    import random

    rng = random.Random(f"{mode}{min_delta}{patience}")
    for trial in range(200):
        values = [
            rng.choice([float("nan"), float("inf"), -float("inf")])
            if rng.random() < 0.1
            else round(rng.uniform(0, 1), 2)
            for _ in range(12)
        ]
        target = rng.choice([None, None, 0.05 if mode == "min" else 0.95])
        rule = fl.EarlyStopping(
            "valid/x", mode=mode, patience=patience, min_delta=min_delta, target=target
        )
        state = rule.init()
        stopped = None
        for epoch, value in enumerate(values, start=1):
            state = rule.update(state, {"valid/x": value, "train/loss": 0.0}, epoch)
            if state.should_stop:
                stopped = epoch
                break
        want_epoch, want_best = _reference_stop_epoch(values, mode, patience, min_delta, target)
        assert stopped == want_epoch, (trial, values, target)
        assert state.best == want_best, (trial, values, target)


@pytest.mark.parametrize(
    ("min_delta", "reason"),
    [
        (0.25, "did not improve by more than min_delta=0.25 on 1 (epoch 1) for 1 epoch"),
        (0.0, "did not improve for 1 epoch (best 1 at epoch 1)"),
    ],
)
def test_early_stopping_stops_at_exactly_patience_bad_epochs(min_delta, reason):
    """Hand-computed, patience=1: 0.75 beats 1.0 by exactly min_delta=0.25, which is no
    improvement (nor is 1.0 again with min_delta=0), so the second epoch stops the run and
    the reason says '1 epoch'."""
    rule = fl.EarlyStopping("valid/loss", patience=1, min_delta=min_delta)
    s = rule.update(rule.init(), {"valid/loss": 1.0}, 1)
    assert (s.best, s.best_epoch, s.bad_epochs, s.should_stop) == (1.0, 1, 0, False)
    s = rule.update(s, {"valid/loss": 0.75 if min_delta else 1.0}, 2)
    assert (s.best, s.best_epoch, s.bad_epochs) == (1.0, 1, 1)
    assert s.stop_reason == f"valid/loss {reason}"


def test_early_stopping_before_any_improvement_has_no_best_epoch():
    """best_epoch is 0 until an epoch improves: a run whose first epoch is NaN stops with
    patience=1 naming no epoch as the best."""
    rule = fl.EarlyStopping("valid/loss", patience=1, min_delta=0.0)
    assert (rule.init().best, rule.init().best_epoch, rule.init().bad_epochs) == (math.inf, 0, 0)
    s = rule.update(rule.init(), {"valid/loss": float("nan")}, 1)
    assert (s.best, s.best_epoch, s.bad_epochs) == (math.inf, 0, 1)
    assert s.stop_reason == "valid/loss did not improve for 1 epoch (best inf at epoch 0)"


def test_early_stopping_on_per_model_means_says_what_to_pass():
    """train_epoch over a stacked state (the way to train an ensemble, which fit refuses)
    gives a list of one mean per model; EarlyStopping needs one number and must say so
    (float() of the list raised "float() argument must be ... not 'list'")."""
    from fnloop import optim

    torch.manual_seed(0)
    states = [
        fl.TrainState.create(nn.Linear(2, 1), tx=optim.sgd(0.1), device="cpu") for _ in range(2)
    ]
    step = fl.make_train_step(lambda m, x: {"loss": (m(x) ** 2).mean()})
    many = torch.func.vmap(step, in_dims=(0, None), randomness="different")
    _, means = fl.train_epoch(fl.stack_states(states), many, [torch.ones(3, 2)])
    assert isinstance(means["loss"], list) and len(means["loss"]) == 2
    rule = fl.EarlyStopping("train/loss", patience=1)
    metrics = {f"train/{k}": v for k, v in means.items()}
    with pytest.raises(TypeError, match=r"'train/loss'.*one value per model.*\[i\]"):
        rule.update(rule.init(), metrics, 1)
    with pytest.raises(TypeError, match=r"'train/loss'.*one value per model \(2, .*\[i\]"):
        rule.update(rule.init(), {"train/loss": tuple(metrics["train/loss"])}, 1)
    with pytest.raises(TypeError, match=r"'train/loss'.*a number.*'abc'"):
        rule.update(rule.init(), {"train/loss": "abc"}, 1)
    # One model's value, picked out, is watched as usual.
    state = rule.update(rule.init(), {"train/loss": metrics["train/loss"][1]}, 1)
    assert state.best == means["loss"][1]


def test_early_stopping_on_a_metric_the_epoch_lacks_names_the_known_ones_and_the_metric():
    """The KeyError lists the epoch's metrics and says which name to return from the step
    function: the metric's own, without the split prefix."""
    rule = fl.EarlyStopping("valid/f1", patience=1)
    with pytest.raises(KeyError) as info:
        rule.update(rule.init(), {"valid/loss": 1.0, "train/loss": 2.0}, 1)
    message = info.value.args[0]
    assert "produced only ['train/loss', 'valid/loss']" in message
    assert message.endswith("or return 'f1' from your step function.")


def test_loss_scale_survives_a_checkpoint_into_a_fresh_state(tmp_path):
    """The scale and its growth counter (mid-interval, after an overflow) come back from
    a checkpoint loaded into a state made anew (which has no loss scale yet) with their
    dtypes, and the run goes on as if never stopped (the existing round-trip test used a
    stand-in dict, not a LossScaleState)."""
    from fnloop import optim

    def make():
        torch.manual_seed(0)
        return fl.TrainState.create(nn.Linear(3, 1), tx=optim.adam(0.1), device="cpu")

    def step_fn(model, batch):
        x, bad = batch
        return {"loss": (model(x) ** 2).mean() * torch.where(bad, float("inf"), 1.0)}

    step = fl.make_train_step(
        step_fn, precision="fp16", loss_scale=fl.DynamicLossScale(init_scale=8.0, growth_interval=3)
    )
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(2))
    overflows = [False, True, False, False, False, False, True, False]
    state = make()
    for bad in overflows[:4]:
        state, _ = step(state, (x, torch.tensor(bad)))
    assert (float(state.loss_scale.scale), int(state.loss_scale.growth_tracker)) == (4.0, 2)
    fl.save_checkpoint(tmp_path / "c.pt", state)
    back = fl.load_checkpoint(tmp_path / "c.pt", like=make())
    assert back.loss_scale.scale.dtype == torch.float32
    assert back.loss_scale.growth_tracker.dtype == torch.int32
    for bad in overflows[4:]:
        state, _ = step(state, (x, torch.tensor(bad)))
        back, _ = step(back, (x, torch.tensor(bad)))
        assert torch.equal(back.loss_scale.scale, state.loss_scale.scale)
        assert torch.equal(back.loss_scale.growth_tracker, state.loss_scale.growth_tracker)
    assert (float(back.loss_scale.scale), int(back.loss_scale.growth_tracker)) == (4.0, 1)
    for name, p in state.params.items():
        assert torch.equal(back.params[name], p)


def test_finite_only_means_leave_out_non_finite_values():
    """Per metric and per model; a metric with no finite value is NaN; the left-out
    examples survive a state_dict round trip (a mid-epoch checkpoint)."""
    nan, inf = float("nan"), float("inf")
    means = MetricMeans(finite_only=True)
    means.add({"loss": torch.tensor(1.0), "acc": torch.tensor(0.5)}, 3)
    means.add({"loss": torch.tensor(nan), "acc": torch.tensor(1.0)}, 2)
    means.add({"loss": torch.tensor(inf), "acc": torch.tensor(nan)}, 4)
    means.add({"loss": torch.tensor(4.0), "bad": torch.tensor(nan)}, 1)
    want = {"loss": (3 * 1.0 + 4.0) / 4, "acc": (3 * 0.5 + 2 * 1.0) / 5}
    got = means.means()
    assert {k: got[k] for k in want} == pytest.approx(want) and math.isnan(got["bad"])
    restored = MetricMeans(finite_only=True)
    restored.load_state_dict(means.state_dict())
    restored.add({"loss": torch.tensor(nan), "acc": torch.tensor(0.0)}, 5)
    assert restored.means()["loss"] == pytest.approx(want["loss"])
    assert restored.means()["acc"] == pytest.approx((3 * 0.5 + 2 * 1.0) / 10)
    per_model = MetricMeans(models=2, finite_only=True)
    per_model.add({"loss": torch.tensor([1.0, nan])}, 3)
    per_model.add({"loss": torch.tensor([3.0, 2.0])}, 1)
    assert per_model.means() == {"loss": [1.5, 2.0]}
    keeping = MetricMeans()  # the default: a NaN shows (fit stops a diverged run on it)
    keeping.add({"loss": torch.tensor(1.0)}, 3)
    keeping.add({"loss": torch.tensor(nan)}, 1)
    assert math.isnan(keeping.means()["loss"])


def test_left_out_counts_restored_on_the_cpu_go_on_on_the_steps_device():
    """A mid-epoch state_dict loads onto the CPU (map_location="cpu") while the steps
    run on an accelerator (meta stands in for one): the restored sums move to the step's
    device, and so must the left-out counts; with models=n they are no 0-d tensors, so
    adding the CPU tensor to the device's one raised."""
    nan = float("nan")
    means = MetricMeans(models=2, finite_only=True)
    means.add({"loss": torch.tensor([1.0, nan])}, 3)
    saved = means.state_dict()
    assert saved["dropped"]["loss"].device.type == "cpu"
    restored = MetricMeans(models=2, finite_only=True)
    restored.load_state_dict(saved)
    restored.add({"loss": torch.tensor([nan, 2.0], device="meta")}, 1)
    folded = restored.state_dict()
    assert folded["dropped"]["loss"].device.type == "meta"
    assert folded["sums"]["loss"].device.type == "meta"


@pytest.mark.parametrize("stacked", [False, True])
def test_epoch_means_leave_out_the_steps_a_skipping_step_skipped(stacked):
    """With on_nonfinite="skip" a batch with a NaN leaves the weights as they were, so
    the epoch is the epoch without that batch: the same weights and the same means (it
    made the epoch's loss NaN, and fit's best model and early stopping saw NaN)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 4, generator=g), torch.randn(40, 1, generator=g)
    bad = x.clone()
    bad[13, 2] = float("nan")  # in the second batch of 8
    batches = lambda xs: [(xs[i : i + 8], y[i : i + 8]) for i in range(0, 40, 8)]  # noqa: E731
    step = fl.make_train_step(
        lambda m, b: {"loss": F.mse_loss(m(b[0]), b[1]), "abs": (m(b[0]) - b[1]).abs().mean()},
        on_nonfinite="skip",
    )
    torch.manual_seed(0)
    state = fl.TrainState.create(nn.Linear(4, 1), tx=optim.sgd(0.1), device="cpu")
    if stacked:
        state, step = fl.stack_states([state, state]), torch.func.vmap(step, in_dims=(0, None))
    skipped, with_nan = fl.train_epoch(state, step, batches(bad))
    kept = [b for i, b in enumerate(batches(x)) if i != 1]
    clean, without = fl.train_epoch(state, step, kept)
    assert with_nan == without
    assert int(skipped.skipped_steps.sum()) == (2 if stacked else 1)
    for name in state.params:
        assert torch.equal(skipped.params[name], clean.params[name])


@pytest.mark.parametrize(("batches", "start_batch", "trained"), [(3, 2, 1), (2, 2, 0), (2, 3, 0)])
def test_train_epoch_calls_after_skip_once_whether_or_not_batches_are_left(
    batches, start_batch, trained
):
    """Resuming mid-epoch, after_skip (fit restores the random generators there) runs once
    after the skipped batches were loaded, also when the loader has no more batches than
    that now (a shorter dataset on resume), so the generators are restored all the same."""
    state = fl.TrainState.create(nn.Linear(2, 1), tx=optim.sgd(0.1), device="cpu")
    step = fl.make_train_step(lambda m, x: {"loss": (m(x) ** 2).mean()})
    events = []

    def loader():
        for i in range(batches):
            events.append(f"load {i}")
            yield torch.ones(4, 2)

    state, _ = fl.train_epoch(
        state, step, loader(), start_batch=start_batch, after_skip=lambda: events.append("skip")
    )
    assert events.count("skip") == 1
    assert events.index("skip") == min(start_batch, batches)  # after the skipped batches
    assert state.step == trained


def test_an_empty_loader_is_a_clear_error_in_train_and_validate_epoch():
    """A loader that yields nothing (a dataset smaller than one batch with drop_last)
    would give empty means; both epochs say which loader and what to check instead."""
    state = fl.TrainState.create(nn.Linear(2, 1), tx=optim.sgd(0.1), device="cpu")
    step = fl.make_train_step(lambda m, x: {"loss": (m(x) ** 2).mean()})
    with pytest.raises(ValueError, match=r"the train loader yielded no batches.*drop_last"):
        fl.train_epoch(state, step, [])
    eval_step = fl.make_eval_step(lambda m, x: {"loss": (m(x) ** 2).mean()})
    with pytest.raises(ValueError, match=r"the valid loader yielded no batches.*drop_last"):
        fl.validate_epoch(state, eval_step, [])
    # Without len() (a stream), what to check is the stream itself.
    with pytest.raises(ValueError, match=r"the train loader yielded no batches\. It has no len"):
        fl.train_epoch(state, step, iter([]))
    with pytest.raises(ValueError, match=r"valid loader yielded no batches\. It has no len"):
        fl.validate_epoch(state, eval_step, iter([]))


def test_per_model_metrics_are_the_entries_with_one_element_per_model_along_dim_0():
    """With ``models=n`` an entry of shape ``(1, n)`` (one row of n values, such as a
    prediction for one example) is an output, not n models' metric, as ``(n, 2)`` is;
    ``(n,)`` and ``(n, 1)`` are metrics, weighted by batch size per model."""
    means = MetricMeans(models=2)
    batches = [
        ({"loss": torch.tensor([1.0, 2.0]), "acc": torch.tensor([[0.5], [1.0]])}, 3),
        ({"loss": torch.tensor([3.0, 6.0]), "acc": torch.tensor([[1.0], [0.0]])}, 1),
    ]
    for metrics, n in batches:
        means.add({**metrics, "row": torch.ones(1, 2), "pair": torch.ones(2, 2)}, n)
    weights = torch.tensor([n for _, n in batches], dtype=torch.float64)
    want = {
        key: (
            (torch.stack([m[key].reshape(2) for m, _ in batches]).double() * weights[:, None]).sum(
                0
            )
            / weights.sum()
        ).tolist()
        for key in ("loss", "acc")
    }
    got = means.means()
    assert got.keys() == want.keys()
    for key in want:  # (pytest 9.2's approx takes no dict of lists)
        assert got[key] == pytest.approx(want[key]), key


@pytest.mark.parametrize("event", ["on_validation_batch_start", "on_validation_batch_end"])
def test_validate_epoch_returns_the_state_its_batch_callbacks_returned(event):
    """Each batch event gets the state the one before it returned, and the epoch returns
    the last (a callback that counts batches in a field of the state sees them all)."""
    seen = []

    def count(self, state, *args):
        seen.append(state.micro_step)
        return state.replace(micro_step=state.micro_step + 1)

    counter = type("Counter", (fl.callbacks.Callback,), {event: count})()
    state = fl.TrainState.create(nn.Linear(2, 1), tx=optim.sgd(0.1), device="cpu")
    loader = [torch.ones(4, 2), torch.ones(2, 2), torch.ones(3, 2)]
    step = fl.make_eval_step(lambda m, x: {"loss": m(x).mean()})
    after, _ = fl.validate_epoch(state, step, loader, callbacks=counter)
    assert seen == list(range(len(loader)))
    assert after.micro_step == len(loader) and state.micro_step == 0


def test_the_epochs_take_callbacks_as_fit_does():
    """A generator of callbacks (any iterable, which fit accepts) was taken for one
    callback by train_epoch and validate_epoch: "generator is not a callback"."""
    seen = []

    class Count(fl.callbacks.Callback):
        def on_train_batch_end(self, state, *args):
            seen.append("train")

        def on_validation_batch_end(self, state, *args):
            seen.append("valid")

    state = fl.TrainState.create(nn.Linear(2, 1), tx=optim.sgd(0.1), device="cpu")
    loader = [torch.ones(4, 2), torch.ones(2, 2)]
    loss = lambda m, x: {"loss": m(x).mean()}  # noqa: E731
    fl.train_epoch(state, fl.make_train_step(loss), loader, callbacks=(c for c in [Count()]))
    fl.validate_epoch(state, fl.make_eval_step(loss), loader, callbacks=iter([Count()]))
    assert seen == ["train", "train", "valid", "valid"]
    with pytest.raises(TypeError, match="str is not a callback"):
        fl.train_epoch(state, fl.make_train_step(loss), loader, callbacks="Count")
