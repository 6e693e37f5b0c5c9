"""GPU checks in one run (<= 5 minutes on one GPU): correctness, AMP, no host syncs, speed.

Usage: python benchmarks/gpu.py [--out FILE.md] [--quick] [--no-compile] [--only CHECK ...]
[--device cpu]

1. CUDA correctness: fnloop's optimizers and train step against torch.optim and a
   hand-written loop on the GPU (float32, tight tolerances); the fused in-place update
   against ``torch.optim``'s ``fused=True``; ``fit`` resumed from a checkpoint against an
   uninterrupted run.
2. bf16 and fp16 steps: autocast runs; the fp16 loss scale backs off and grows as
   GradScaler's, scale for scale.
3. No host syncs: ``torch.cuda.set_sync_debug_mode("error")`` around steady-state steps
   with clipping, EMA, fp16 loss scaling and ``on_nonfinite="skip"``.
4. The step benchmark on the GPU: fnloop vs the hand loop, eager and compiled, on
   ``benchmarks/step.py``'s models (``_common.MODELS``, one definition), plus 32 models at
   once with vmap vs 32 sequential hand loops, and CUDA kernels per step. The correctness
   and sync checks train that CNN without its conv biases (``check_cnn``).

Each check is reported (``FAIL`` with the error) and the script goes on; it exits with
status 1 at the end if any check failed.

``--device cpu`` runs the same checks on the CPU, so that CI catches a renamed helper or
a changed signature before a GPU session does: everything but the CUDA-only parts, which
print ``SKIP`` rows (the sync debug mode: the steps run, unchecked; the compiled sync
config; the CUDA kernel count). With ``--quick`` the benchmarks there run one block of
two steps: their code, not a measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import itertools
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.append(str(Path(__file__).resolve().parent))  # _common, also when a test imports this

import _common as C

import fnloop as fl
from fnloop import optim
from fnloop.optim import _foreach

LINES: list[str] = []


def report(line: str = "") -> None:
    print(line, flush=True)
    LINES.append(line)


def classify(model, batch):
    x, y = batch
    logits = model(x)
    return {"loss": F.cross_entropy(logits, y), "acc": (logits.argmax(-1) == y).float().mean()}


def training_step(model, batch):
    """The benchmark's step: the loss only, like the hand loop (as benchmarks/step.py)."""
    x, y = batch
    return {"loss": F.cross_entropy(model(x), y)}


def check_cnn() -> nn.Module:
    """The correctness and sync checks' CNN: the benchmark's (``_common.cnn``) without the
    conv biases that BatchNorm cancels (their ~0 gradients make Adam's steps rounding
    noise, which no tight bound against another implementation could hold). The step
    benchmark (``bench_steps``) times ``_common.MODELS``, step.py's models, biases and all."""
    return C.cnn(conv_bias=False)


def make_batch(shape: tuple[int, ...], b: int, dev: torch.device, seed: int = 0):
    g = torch.Generator(device=dev).manual_seed(seed)
    return (
        torch.randn(b, *shape, device=dev, generator=g),
        torch.randint(0, 10, (b,), device=dev, generator=g),
    )


def _synchronize(dev: torch.device) -> None:
    """Wait for the device's queued work (CUDA); CPU work is done when the call returns."""
    if dev.type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- 1. correctness


def check_optimizers(dev: torch.device) -> None:
    torch.manual_seed(0)
    rows = [
        ("adamw", lambda: optim.adamw(1e-2), lambda p: torch.optim.AdamW(p, 1e-2, foreach=True)),
        (
            "adam amsgrad",
            lambda: optim.adam(1e-2, amsgrad=True),
            lambda p: torch.optim.Adam(p, 1e-2, amsgrad=True, foreach=True),
        ),
        (
            "sgd nesterov",
            lambda: optim.sgd(1e-2, momentum=0.9, nesterov=True),
            lambda p: torch.optim.SGD(p, 1e-2, momentum=0.9, nesterov=True, foreach=True),
        ),
        (
            "rmsprop centered",
            lambda: optim.rmsprop(1e-3, centered=True, momentum=0.5),
            lambda p: torch.optim.RMSprop(p, 1e-3, centered=True, momentum=0.5, foreach=True),
        ),
        (
            "adagrad",
            lambda: optim.adagrad(1e-2, lr_decay=1e-3),
            lambda p: torch.optim.Adagrad(p, 1e-2, lr_decay=1e-3, foreach=True),
        ),
    ]
    for name, mk, mk_torch in rows:
        p0 = {"w": torch.randn(64, 32, device=dev), "b": torch.randn(32, device=dev)}
        tp = [nn.Parameter(v.clone()) for v in p0.values()]
        opt = mk_torch(tp)
        tx = mk()
        params, state = dict(p0), tx.init(p0)
        worst = 0.0
        for _ in range(50):
            g = {k: torch.randn_like(v) for k, v in p0.items()}
            for t, k in zip(tp, g):
                t.grad = g[k].clone()
            opt.step()
            u, state = tx.update(g, state, params)
            params = optim.apply_updates(params, u)
        for t, k in zip(tp, p0):
            worst = max(worst, (params[k] - t.detach()).abs().max().item())
        ok = worst < 1e-4  # parameters are O(1): an absolute bound
        report(
            f"| optimizer {name} vs torch.optim (50 steps, fp32) | max abs diff {worst:.2e} | {'ok' if ok else 'FAIL'} |"
        )


def check_train_step(dev: torch.device) -> None:
    """CNN+BN with clipping and AdamW against hand loops (both torch.optim kernels), with
    cuDNN's deterministic algorithms: its default conv backward sums in a varying order,
    and 20 Adam steps magnify that noise past any tight bound."""
    flags = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        torch.manual_seed(0)
        module = check_cnn().to(dev)
        data = [make_batch((1, 8, 8), 64, dev, seed=i) for i in range(20)]
        state = fl.TrainState.create(
            module, tx=optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-3)), device=dev
        )
        step = fl.make_train_step(classify)
        for b in data:
            state, _ = step(state, b)
        for kernel in ("foreach", "fused"):
            ref = copy.deepcopy(module)
            opt = torch.optim.AdamW(ref.parameters(), 1e-3, **{kernel: True})
            for x, y in data:
                opt.zero_grad()
                F.cross_entropy(ref(x), y).backward()
                torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
                opt.step()
            worst = _max_diff(state.params, ref)
            worst_b = max(
                (state.buffers[n].float() - b.float()).abs().max().item()
                for n, b in ref.named_buffers()
            )
            # The fused kernel is fnloop's own: bit for bit. The foreach one rounds in another
            # order, and 20 Adam steps magnify that (1e-5 to 1e-4 measured).
            tol = 1e-6 if kernel == "fused" else 1e-4
            ok = worst < tol and worst_b < tol
            report(
                f"| train step (CNN+BN, clip, AdamW) vs hand loop, AdamW({kernel}=True), 20 steps | max abs diff params {worst:.2e}, buffers {worst_b:.2e} | {'ok' if ok else 'FAIL'} |"
            )
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags


def check_compiled_schedule(dev: torch.device) -> None:
    """A compiled donating step with a schedule advances the rate (0-d leaves come back new:
    on the CPU dynamo dropped writes into 0-d float64 inputs) and matches the eager pure
    step; compiled twice over 6 steps: two graphs (step 0, later steps), no more."""
    from torch._dynamo.testing import CompileCounter

    torch.manual_seed(0)
    tx = optim.adamw(optim.exponential_schedule(1e-2, 0.5))
    state = fl.TrainState.create(C.mlp().to(dev), tx=tx, ema_decay=0.9, device=dev).clone()
    counter = CompileCounter()
    compiled = torch.compile(fl.make_train_step(training_step, donate=True), backend=counter)
    eager_step, eager, donated = fl.make_train_step(training_step), state, state.clone()
    for i in range(6):
        b = make_batch((784,), 128, dev, seed=i)
        eager, _ = eager_step(eager, b)
        donated, _ = compiled(donated, b)
    lr = float(optim.learning_rates(donated.opt_state)[0])
    worst = max(
        (a.double() - b.double()).abs().max().item()
        for a, b in zip(fl._tree.tree_leaves(eager), fl._tree.tree_leaves(donated))
    )
    ok = abs(lr - 1e-2 * 0.5**6) < 1e-12 and worst < 1e-4 and counter.frame_count == 2
    report(
        f"| compiled donating step, exponential schedule, 6 steps vs eager pure | lr {lr:.3e} (expected {1e-2 * 0.5**6:.3e}), max abs diff {worst:.2e}, graphs {counter.frame_count} | {'ok' if ok else 'FAIL'} |"
    )


def _max_diff(a: dict[str, torch.Tensor], ref: nn.Module) -> float:
    return max((a[n] - p.detach()).abs().max().item() for n, p in ref.named_parameters())


def check_fused_update(dev: torch.device) -> None:
    """The in-place update (torch's fused CUDA or CPU kernels) against ``fused=True``
    torch.optim, pure and donating; and with a schedule against fnloop's foreach order."""
    rows = [
        (
            "adamw",
            lambda: optim.adamw(1e-2, weight_decay=0.1),
            torch.optim.AdamW,
            dict(lr=1e-2, weight_decay=0.1),
        ),
        (
            "adam amsgrad L2",
            lambda: optim.adam(1e-2, weight_decay=0.1, amsgrad=True),
            torch.optim.Adam,
            dict(lr=1e-2, weight_decay=0.1, amsgrad=True),
        ),
        (
            "sgd nesterov",
            lambda: optim.sgd(1e-2, momentum=0.9, nesterov=True, weight_decay=1e-3),
            torch.optim.SGD,
            dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=1e-3),
        ),
        ("sgd", lambda: optim.sgd(1e-1), torch.optim.SGD, dict(lr=1e-1)),
    ]
    data = [make_batch((784,), 128, dev, seed=i) for i in range(20)]
    for name, mk, opt_cls, kw in rows:
        for donate in (False, True):
            torch.manual_seed(0)
            module = C.mlp().to(dev)
            ref = copy.deepcopy(module)
            opt = opt_cls(ref.parameters(), fused=True, **kw)
            state = fl.TrainState.create(module, tx=mk(), device=dev)
            state = state.clone() if donate else state
            step = fl.make_train_step(training_step, donate=donate)
            for b in data:
                opt.zero_grad()
                training_step(ref, b)["loss"].backward()
                opt.step()
                state, _ = step(state, b)
            worst = _max_diff(state.params, ref)
            ok = worst < 1e-6
            report(
                f"| fused update {name}{', donate' if donate else ''} vs torch.optim fused=True, 20 steps | max abs diff {worst:.2e} | {'ok' if ok else 'FAIL'} |"
            )
    # A schedule's learning rate is a device tensor (float32 for the CUDA kernel): against
    # torch.optim with the same learning rate set before each step, both kernels.
    sched = optim.join_schedules(
        [optim.linear_schedule(1e-3, 0.1, 1.0, 5), optim.cosine_schedule(1e-2, 20)], [5]
    )
    lrs = [float(sched(torch.tensor(k))) for k in range(len(data))]
    torch.manual_seed(0)
    module = C.mlp().to(dev)
    tol = {"fused": 1e-6, "foreach": 1e-5}  # the same kernel; the same math, another order
    for kernel in ("fused", "foreach"):
        ref = copy.deepcopy(module)
        opt = torch.optim.AdamW(ref.parameters(), lrs[0], **{kernel: True})
        saved = _foreach._fusable
        if kernel == "foreach":  # fnloop's foreach order with host scalars
            _foreach._fusable = lambda *lists: False
        try:
            state = _side_by_side(module, optim.adamw(sched), ref, opt, data, lrs, dev)
        finally:
            _foreach._fusable = saved
        worst = _max_diff(state.params, ref)
        report(
            f"| {kernel} update adamw(schedule) vs torch.optim {kernel}=True, lr set per step, 20 steps | max abs diff {worst:.2e} | {'ok' if worst < tol[kernel] else 'FAIL'} |"
        )
    # SGD's fused kernel takes the schedule's rate as a tensor too (float32 on CUDA).
    ref = copy.deepcopy(module)
    opt = torch.optim.SGD(ref.parameters(), lrs[0], momentum=0.9, nesterov=True, fused=True)
    tx = optim.sgd(sched, momentum=0.9, nesterov=True)
    state = _side_by_side(module, tx, ref, opt, data, lrs, dev)
    worst = _max_diff(state.params, ref)
    report(
        f"| fused update sgd nesterov(schedule) vs torch.optim fused=True, lr set per step, 20 steps | max abs diff {worst:.2e} | {'ok' if worst < 1e-6 else 'FAIL'} |"
    )


def _side_by_side(module, tx, ref, opt, data, lrs, dev) -> fl.TrainState:
    """A donating fnloop step with ``tx`` on ``module`` and the hand loop on ``ref`` with
    ``opt`` (its rate set to ``lrs[k]`` before step ``k``), over ``data``; fnloop's state."""
    state = fl.TrainState.create(module, tx=tx, device=dev).clone()
    step = fl.make_train_step(training_step, donate=True)
    for k, b in enumerate(data):
        opt.param_groups[0]["lr"] = lrs[k]
        opt.zero_grad()
        training_step(ref, b)["loss"].backward()
        opt.step()
        state, _ = step(state, b)
    return state


def check_fit_resume(dev: torch.device) -> None:
    """``fit`` on ``dev``: 2 epochs straight vs 1 epoch, then a re-run resuming to 2."""
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    xs, ys = torch.randn(512, 1, 8, 8, generator=g), torch.randint(0, 10, (512,), generator=g)
    loaders = {
        "train": DataLoader(TensorDataset(xs[:384], ys[:384]), batch_size=64),
        "valid": DataLoader(TensorDataset(xs[384:], ys[384:]), batch_size=64),
    }

    def run(out_dir: Path, max_epochs: int) -> fl.TrainState:
        torch.manual_seed(0)
        state = fl.TrainState.create(check_cnn(), tx=optim.adamw(1e-3), device=dev, ema_decay=0.99)
        return fl.fit(
            state,
            fl.make_train_step(classify, precision="bf16"),
            loaders,
            max_epochs=max_epochs,
            out_dir=out_dir,
            progress=False,
            log_to_console=False,
            checkpoint_every_n_steps=4,
        )

    with tempfile.TemporaryDirectory() as tmp:
        straight = run(Path(tmp) / "straight", 2)
        run(Path(tmp) / "resumed", 1)
        resumed = run(Path(tmp) / "resumed", 2)
        same = resumed.step == straight.step and all(
            torch.equal(resumed.params[n], p) for n, p in straight.params.items()
        )
        on_dev = all(p.device.type == dev.type for p in resumed.params.values())
        files = sorted(p.name for p in (Path(tmp) / "resumed").iterdir())
    ok = same and on_dev
    where = "the GPU" if dev.type == "cuda" else dev.type
    report(
        f"| fit on {dev.type.upper()} (bf16, EMA): 1 epoch + resume to 2 vs 2 straight | params equal: {same}, on {where}: {on_dev}; run folder {files} | {'ok' if ok else 'FAIL'} |"
    )


# ----------------------------------------------------------------------------- 2. AMP


def check_amp(dev: torch.device) -> None:
    """bf16 and fp16 steps against ``torch.autocast`` loops; fp16 with a loss scale that
    starts too high (2**24: the first steps overflow and back off) and grows every 5 finite
    steps, against ``GradScaler`` with the same settings, scale for scale."""
    scaling = {"init_scale": 2.0**24, "growth_interval": 5}
    for precision in ("bf16", "fp16"):
        fp16 = precision == "fp16"
        torch.manual_seed(0)
        module = C.mlp().to(dev)
        state = fl.TrainState.create(module, tx=optim.adamw(1e-3), device=dev)
        loss_scale = fl.DynamicLossScale(**scaling) if fp16 else None
        step = fl.make_train_step(classify, precision=precision, loss_scale=loss_scale)
        ref = copy.deepcopy(module)
        opt = torch.optim.AdamW(ref.parameters(), 1e-3, foreach=True)
        dtype = torch.float16 if fp16 else torch.bfloat16
        scaler = torch.amp.GradScaler(dev.type, enabled=fp16, **scaling)
        losses, ref_losses, scales, ref_scales = [], [], [], []
        for i in range(30):
            b = make_batch((784,), 128, dev, seed=i)
            state, m = step(state, b)
            losses.append(m["loss"])
            opt.zero_grad()
            with torch.autocast(dev.type, dtype=dtype):
                loss = F.cross_entropy(ref(b[0]), b[1])
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            ref_losses.append(loss.detach().float())
            if fp16:
                scales.append(state.loss_scale.scale.clone())
                ref_scales.append(scaler.get_scale())  # (a host read, as GradScaler's)
        a, r = torch.stack(losses), torch.stack(ref_losses)
        diff = (a - r).abs().max().item()
        ok = bool(torch.isfinite(a).all()) and diff < 5e-2
        extra = ""
        if fp16:
            ours = [float(x) for x in scales]
            moves = list(itertools.pairwise(ours))
            grew, backed_off = any(b > a for a, b in moves), any(b < a for a, b in moves)
            ok = ok and ours == ref_scales and grew and backed_off
            extra = (
                f", scales equal to GradScaler's at every step: {ours == ref_scales} "
                f"({ours[0]:.0f} to {ours[-1]:.0f}; grew: {grew}, backed off: {backed_off})"
            )
        report(
            f"| {precision} autocast step, 30 steps vs torch.autocast loop | max loss diff {diff:.2e}{extra} | {'ok' if ok else 'FAIL'} |"
        )


# ----------------------------------------------------------------------------- 3. no syncs


def _sync_site(err: BaseException) -> str:
    """The innermost fnloop (or benchmark) frame of a sync error: where the sync came from."""
    import traceback

    frames = [f for f in traceback.extract_tb(err.__traceback__) if "fnloop" in f.filename]
    if not frames:
        return str(err).splitlines()[0][:100]
    f = frames[-1]
    return f"sync at {Path(f.filename).name}:{f.lineno} `{(f.line or '').strip()[:70]}`"


def check_no_sync(dev: torch.device) -> None:
    sched = optim.join_schedules(
        [optim.linear_schedule(1e-3, 0.1, 1.0, 10), optim.cosine_schedule(1e-3, 100)], [10]
    )
    configs = [
        ("adamw", dict(tx=optim.adamw(1e-3)), {}),
        (
            "adamw + clip",
            dict(tx=optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-3))),
            {},
        ),
        ("adamw(schedule)", dict(tx=optim.adamw(sched)), {}),
        ("sgd momentum + EMA", dict(tx=optim.sgd(0.1, momentum=0.9), ema_decay=0.99), {}),
        ("adamw, skip", dict(tx=optim.adamw(1e-3)), dict(on_nonfinite="skip")),
        ("adamw, fp16", dict(tx=optim.adamw(1e-3)), dict(precision="fp16")),
        ("adamw, bf16, donate", dict(tx=optim.adamw(1e-3)), dict(precision="bf16", donate=True)),
        (
            "all: clip, schedule, EMA, fp16, skip",
            dict(
                tx=optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(sched)), ema_decay=0.99
            ),
            dict(precision="fp16", on_nonfinite="skip"),
        ),
    ]
    batches = [make_batch((1, 8, 8), 64, dev, seed=i) for i in range(8)]
    everything = configs[-1]
    configs.append(("compiled, donate=True: " + everything[0], everything[1], everything[2]))
    for name, create_kw, step_kw in configs:
        skipped = f"| no host sync: {name} (train + eval steps) | skipped on {dev.type} | SKIP |"
        if name.startswith("compiled") and dev.type != "cuda":  # not worth a CPU inductor compile
            report(skipped)
            continue
        torch.manual_seed(0)
        state = fl.TrainState.create(check_cnn().to(dev), device=dev, **create_kw)
        state = state.clone()
        step = fl.make_train_step(classify, **step_kw)
        eval_step = fl.make_eval_step(classify)
        if name.startswith("compiled"):
            torch._dynamo.reset()
            step = torch.compile(fl.make_train_step(classify, donate=True, **step_kw))
            eval_step = torch.compile(eval_step)
        # fit's epoch means, folded on the device every 4 steps here (256 in fit).
        means = fl.MetricMeans(finite_only=step_kw.get("on_nonfinite") == "skip")
        means.FOLD_EVERY = 4
        for b in batches[:3]:  # warm-up: first calls read host values, compile
            state, m = step(state, b)
            eval_step(state, b)
        _synchronize(dev)
        ok, msg = True, "no sync"
        for phase in ("train step", "eval step"):
            try:
                with _sync_errors(dev):
                    for b in batches[3:]:
                        if phase == "train step":
                            state, m = step(state, b)
                            means.add(m, 64)
                        else:
                            means.add(eval_step(state, b), 64)
            except RuntimeError as e:
                # On CUDA the sync debug mode's error; elsewhere any error of the steps.
                site = _sync_site(e) if dev.type == "cuda" else str(e).splitlines()[0][:200]
                ok, msg = False, f"{phase}: {site}"
                break
        if dev.type != "cuda" and ok:  # the steps ran (API drift shows), unchecked for syncs
            report(skipped)
        else:
            report(
                f"| no host sync: {name} (train + eval steps) | {msg} | {'ok' if ok else 'FAIL'} |"
            )


@contextlib.contextmanager
def _sync_errors(dev: torch.device) -> Iterator[None]:
    """On CUDA, a host sync in the block raises a RuntimeError (the sync debug mode
    "error"); other devices have no such mode: the block just runs."""
    if dev.type != "cuda":
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


# ----------------------------------------------------------------------------- 4. speed


def time_blocks(
    fns: dict[str, Callable[[], None]], blocks: int, steps: int, dev: torch.device
) -> dict[str, float]:
    """The median µs per call of each of ``fns``, over ``blocks`` timed blocks of ``steps``
    calls each, synchronized (on CUDA) before and after. Every one first runs one untimed
    block (a warm-up of the same length for all), then the blocks interleave in ``_common.balanced_order``, as in
    ``benchmarks/step.py``."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for fn in fns.values():
        for _ in range(steps):
            fn()
    _synchronize(dev)
    for i in range(blocks):
        for name in C.balanced_order(i, names):
            fn = fns[name]
            _synchronize(dev)
            t = time.perf_counter()
            for _ in range(steps):
                fn()
            _synchronize(dev)
            times[name].append((time.perf_counter() - t) / steps * 1e6)
    return {k: statistics.median(v) for k, v in times.items()}


def hand_steps(module: nn.Module, batch: tuple) -> dict[str, Callable[[], None]]:
    """The hand loop's step on a copy of ``module``, with AdamW's foreach and fused kernels."""
    fns: dict[str, Callable[[], None]] = {}
    for kernel in ("foreach", "fused"):
        hand = copy.deepcopy(module)
        opt = torch.optim.AdamW(hand.parameters(), 1e-3, **{kernel: True})

        def hand_step(hand: nn.Module = hand, opt: torch.optim.Optimizer = opt) -> None:
            opt.zero_grad()
            F.cross_entropy(hand(batch[0]), batch[1]).backward()
            opt.step()

        fns[kernel] = hand_step
    return fns


def bench_steps(dev: torch.device, blocks: int, steps: int, compile_too: bool) -> None:
    report("")
    report(
        "Ratios are to the hand loop with `torch.optim.AdamW(foreach=True)`; the step is "
        "the loss only (`benchmarks/step.py`'s)."
    )
    report("")
    report(
        "| model | hand loop µs/step | hand loop, AdamW(fused=True) | fnloop eager | fnloop eager donate=True | fnloop compiled | fnloop compiled donate=True |"
    )
    report("|---|---|---|---|---|---|---|")
    for name, mk, b, shape in C.MODELS.values():
        torch._dynamo.reset()  # each model's two compiled steps get dynamo's full cache
        torch.manual_seed(0)
        module = mk().to(dev)
        batch = make_batch(shape, b, dev)
        fns = {f"hand {k}": fn for k, fn in hand_steps(module, batch).items()}
        holder: dict[str, fl.TrainState] = {}

        def add(key: str, donate: bool, compiled: bool) -> None:
            step = fl.make_train_step(training_step, donate=donate)
            step = torch.compile(step) if compiled else step
            state = fl.TrainState.create(module, tx=optim.adamw(1e-3), device=dev)
            holder[key] = state.clone() if donate else state

            def run() -> None:
                holder[key], _ = step(holder[key], batch)

            for _ in range(3):
                run()
            fns[key] = run

        add("eager", False, False)
        add("eager donate", True, False)
        if compile_too:
            add("compiled", False, True)
            add("compiled donate", True, True)
        med = time_blocks(fns, blocks, steps, dev)
        base = med["hand foreach"]
        cells = [f"{base:.0f}"] + [
            f"{med[k]:.0f} ({med[k] / base:.2f})" if k in med else "-"
            for k in ("hand fused", "eager", "eager donate", "compiled", "compiled donate")
        ]
        report(f"| {name} | {' | '.join(cells)} |")


def count_kernels(dev: torch.device) -> None:
    """CUDA kernels launched per step (tiny MLP), from the profiler: eager GPU steps of
    small models are launch-bound, so this count drives their time."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    module = C.tiny_mlp().to(dev)
    batch = make_batch((32,), 32, dev)
    fns = {f"hand loop, AdamW({k}=True)": fn for k, fn in hand_steps(module, batch).items()}
    for donate in (False, True):
        step = fl.make_train_step(training_step, donate=donate)
        box = {"s": fl.TrainState.create(module, tx=optim.adamw(1e-3), device=dev).clone()}

        def run(step: Callable = step, box: dict = box) -> None:
            box["s"], _ = step(box["s"], batch)

        fns[f"fnloop eager{' donate=True' if donate else ''}"] = run
    cells = []
    for name, fn in fns.items():
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                fn()
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        cells.append(f"{name}: {len(kernels) / 10:.0f}")
    report("")
    report(f"CUDA kernels per step, tiny MLP: {'; '.join(cells)}.")


def bench_vmap(dev: torch.device, blocks: int, steps: int) -> None:
    n = 32
    torch.manual_seed(0)
    modules = [C.tiny_mlp().to(dev) for _ in range(n)]
    batch = make_batch((32,), 32, dev)
    opts = [torch.optim.AdamW(m.parameters(), 1e-3, foreach=True) for m in modules]

    def hand() -> None:
        for m, o in zip(modules, opts):
            o.zero_grad()
            F.cross_entropy(m(batch[0]), batch[1]).backward()
            o.step()

    step = torch.func.vmap(
        fl.make_train_step(training_step), in_dims=(0, None), randomness="different"
    )
    holder = {
        "s": fl.stack_states(
            [fl.TrainState.create(m, tx=optim.adamw(1e-3), device=dev) for m in modules]
        )
    }

    def vm() -> None:
        holder["s"], _ = step(holder["s"], batch)

    med = time_blocks({"hand": hand, "vmap": vm}, blocks, steps, dev)
    report("")
    report(
        f"| {n} tiny MLPs | 32 sequential hand loops {med['hand']:.0f} µs | vmapped fnloop step {med['vmap']:.0f} µs | speed-up {med['hand'] / med['vmap']:.1f}x |"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--only", nargs="*", default=None, help="run only these checks (names)")
    ap.add_argument(
        "--device",
        default="cuda",
        choices=["cuda", "cpu"],
        help="cpu: every check that can run there (the CUDA-only ones print SKIP)",
    )
    args = ap.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py needs a CUDA GPU (or --device cpu)")
    blocks, steps, vmap_steps = (5 if args.quick else 15), 50, 10
    if dev.type == "cpu" and args.quick:  # the benchmarks' code paths, not a measurement
        blocks, steps, vmap_steps = 1, 2, 2
    checks: list[Callable[[torch.device], None]] = [
        check_optimizers,
        check_train_step,
        check_fused_update,
        check_compiled_schedule,
        check_fit_resume,
        check_amp,
        check_no_sync,
        functools.partial(bench_steps, blocks=blocks, steps=steps, compile_too=not args.no_compile),
        functools.partial(bench_vmap, blocks=blocks, steps=vmap_steps),
        count_kernels,
    ]
    cuda_only = (count_kernels,)  # from the CUDA profiler's kernel events
    names = [getattr(check, "func", check).__name__ for check in checks]
    if args.only and set(args.only) - set(names):
        ap.error(f"unknown checks {sorted(set(args.only) - set(names))}; the checks: {names}")
    if dev.type == "cuda":
        report(
            f"## GPU: {torch.cuda.get_device_name()} — torch {torch.__version__}, CUDA {torch.version.cuda}, Python {platform.python_version()}"
        )
    else:
        report(
            f"## CPU: {platform.processor() or platform.machine()} — torch {torch.__version__}, Python {platform.python_version()}"
        )
    report("")
    report("| check | result | status |")
    report("|---|---|---|")
    t0 = time.time()
    for name, check in zip(names, checks):
        if args.only and name not in args.only:
            continue
        if dev.type != "cuda" and check in cuda_only:
            report(f"| {name} | skipped on {dev.type} | SKIP |")
            continue
        try:
            check(dev)
        except Exception as e:  # report and go on: one run has to show everything
            report(f"| {name} | {type(e).__name__}: {str(e)[:300]} | FAIL |")
            traceback.print_exc()
        if args.out:
            Path(args.out).write_text("\n".join(LINES) + "\n")
    report("")
    report(f"(total {time.time() - t0:.0f} s)")
    if args.out:
        Path(args.out).write_text("\n".join(LINES) + "\n")
    if any(line.endswith("| FAIL |") for line in LINES):
        sys.exit(1)


if __name__ == "__main__":
    main()
