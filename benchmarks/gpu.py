"""GPU checks in one run (<= 5 minutes on one GPU): correctness, AMP, no host syncs, speed.

Usage: python benchmarks/gpu.py [--out FILE.md] [--quick]

1. CUDA correctness: fnloop's optimizers and train step against torch.optim and a
   hand-written loop on the GPU (float32, tight tolerances).
2. bf16 and fp16 steps: autocast runs, the fp16 loss scale behaves like GradScaler.
3. No host syncs: ``torch.cuda.set_sync_debug_mode("error")`` around steady-state steps
   with clipping, EMA, fp16 loss scaling and ``on_nonfinite="skip"``.
4. The step benchmark on the GPU: fnloop vs the hand loop, eager and compiled, plus 32
   models at once with vmap vs 32 sequential hand loops.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fnloop as fl
from fnloop import optim

DEV = torch.device("cuda")
LINES: list[str] = []


def report(line: str = "") -> None:
    print(line, flush=True)
    LINES.append(line)


def classify(model, batch):
    x, y = batch
    logits = model(x)
    return {"loss": F.cross_entropy(logits, y), "acc": (logits.argmax(-1) == y).float().mean()}


def tiny_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
    )


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 64, 10),
    )


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], int]] = {
    "tiny MLP 32-64-10 (b=32)": (tiny_mlp, (32,), 32),
    "MLP 784-1024-1024-10 (b=128)": (mlp, (784,), 128),
    "CNN+BN 1x8x8 (b=64)": (cnn, (1, 8, 8), 64),
}


def make_batch(shape: tuple[int, ...], b: int, seed: int = 0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return (
        torch.randn(b, *shape, device=DEV, generator=g),
        torch.randint(0, 10, (b,), device=DEV, generator=g),
    )


# ----------------------------------------------------------------------------- 1. correctness


def check_optimizers() -> None:
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
        p0 = {"w": torch.randn(64, 32, device=DEV), "b": torch.randn(32, device=DEV)}
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


def check_train_step() -> None:
    torch.manual_seed(0)
    module = cnn().to(DEV)
    data = [make_batch((1, 8, 8), 64, seed=i) for i in range(20)]
    ref = copy.deepcopy(module)
    opt = torch.optim.AdamW(ref.parameters(), 1e-3, foreach=True)
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        opt.step()
    state = fl.TrainState.create(
        module, tx=optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-3)), device=DEV
    )
    step = fl.make_train_step(classify)
    for b in data:
        state, _ = step(state, b)
    worst = max(
        (state.params[n] - p.detach()).abs().max().item() for n, p in ref.named_parameters()
    )
    worst_b = max(
        (state.buffers[n].float() - b.float()).abs().max().item() for n, b in ref.named_buffers()
    )
    ok = worst < 1e-4 and worst_b < 1e-4
    report(
        f"| train step (CNN+BN, clip, AdamW) vs hand loop, 20 steps | max abs diff params {worst:.2e}, buffers {worst_b:.2e} | {'ok' if ok else 'FAIL'} |"
    )


# ----------------------------------------------------------------------------- 2. AMP


def check_amp() -> None:
    for precision in ("bf16", "fp16"):
        torch.manual_seed(0)
        module = mlp().to(DEV)
        state = fl.TrainState.create(module, tx=optim.adamw(1e-3), device=DEV)
        step = fl.make_train_step(classify, precision=precision)
        ref = copy.deepcopy(module)
        opt = torch.optim.AdamW(ref.parameters(), 1e-3, foreach=True)
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
        losses, ref_losses = [], []
        for i in range(30):
            b = make_batch((784,), 128, seed=i)
            state, m = step(state, b)
            losses.append(m["loss"])
            opt.zero_grad()
            with torch.autocast("cuda", dtype=dtype):
                loss = F.cross_entropy(ref(b[0]), b[1])
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            ref_losses.append(loss.detach().float())
        a, r = torch.stack(losses), torch.stack(ref_losses)
        diff = (a - r).abs().max().item()
        extra = ""
        if precision == "fp16":
            extra = f", scale {float(state.loss_scale.scale):.0f} vs GradScaler {scaler.get_scale():.0f}"
        ok = bool(torch.isfinite(a).all()) and diff < 5e-2
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


def check_no_sync() -> None:
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
    batches = [make_batch((1, 8, 8), 64, seed=i) for i in range(8)]
    for name, create_kw, step_kw in configs:
        torch.manual_seed(0)
        state = fl.TrainState.create(cnn().to(DEV), device=DEV, **create_kw)
        state = state.clone()
        step = fl.make_train_step(classify, **step_kw)
        eval_step = fl.make_eval_step(classify)
        means = fl.MetricMeans()
        for b in batches[:3]:
            state, m = step(state, b)
        torch.cuda.synchronize()
        ok, msg = True, "no sync"
        for phase in ("train step", "eval step"):
            try:
                torch.cuda.set_sync_debug_mode("error")
                for b in batches[3:]:
                    if phase == "train step":
                        state, m = step(state, b)
                        means.add(m, 64)
                    else:
                        means.add(eval_step(state, b), 64)
            except RuntimeError as e:
                ok, msg = False, f"{phase}: {_sync_site(e)}"
                break
            finally:
                torch.cuda.set_sync_debug_mode(0)
        report(f"| no host sync: {name} (train + eval steps) | {msg} | {'ok' if ok else 'FAIL'} |")


# ----------------------------------------------------------------------------- 4. speed


def time_blocks(fns: dict[str, Callable[[], None]], blocks: int, steps: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    torch.cuda.synchronize()
    for _ in range(blocks):
        for name, fn in fns.items():
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(steps):
                fn()
            torch.cuda.synchronize()
            times[name].append((time.perf_counter() - t) / steps * 1e6)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_steps(blocks: int, compile_too: bool) -> None:
    report("")
    report(
        "| model | hand loop µs/step | fnloop eager µs/step | ratio | fnloop eager donate=True µs/step | ratio | fnloop compiled µs/step | ratio | fnloop compiled donate=True µs/step | ratio |"
    )
    report("|---|---|---|---|---|---|---|---|---|---|")
    for name, (mk, shape, b) in MODELS.items():
        torch.manual_seed(0)
        module = mk().to(DEV)
        batch = make_batch(shape, b)
        hand = copy.deepcopy(module)
        opt = torch.optim.AdamW(hand.parameters(), 1e-3, foreach=True)

        def hand_step() -> None:
            opt.zero_grad()
            F.cross_entropy(hand(batch[0]), batch[1]).backward()
            opt.step()

        step = fl.make_train_step(classify)
        dstep = fl.make_train_step(classify, donate=True)
        holder = {
            "s": fl.TrainState.create(module, tx=optim.adamw(1e-3), device=DEV),
            "d": fl.TrainState.create(module, tx=optim.adamw(1e-3), device=DEV).clone(),
        }

        def fn_step() -> None:
            holder["s"], _ = step(holder["s"], batch)

        def d_step() -> None:
            holder["d"], _ = dstep(holder["d"], batch)

        fns = {"hand": hand_step, "fnloop": fn_step, "donate": d_step}
        compiled_cells = "- | - | - | -"
        if compile_too:
            cstep = torch.compile(step)
            cdstep = torch.compile(dstep)
            holder["c"] = fl.TrainState.create(module, tx=optim.adamw(1e-3), device=DEV)
            holder["cd"] = fl.TrainState.create(module, tx=optim.adamw(1e-3), device=DEV).clone()

            def c_step() -> None:
                holder["c"], _ = cstep(holder["c"], batch)

            def cd_step() -> None:
                holder["cd"], _ = cdstep(holder["cd"], batch)

            for _ in range(3):
                c_step()
                cd_step()
            fns["compiled"] = c_step
            fns["compiled donate"] = cd_step
        med = time_blocks(fns, blocks, 50)
        if compile_too:
            compiled_cells = " | ".join(
                f"{med[k]:.0f} | {med[k] / med['hand']:.2f}"
                for k in ("compiled", "compiled donate")
            )
        report(
            f"| {name} | {med['hand']:.0f} | {med['fnloop']:.0f} | {med['fnloop'] / med['hand']:.2f} | {med['donate']:.0f} | {med['donate'] / med['hand']:.2f} | {compiled_cells} |"
        )


def bench_vmap(blocks: int) -> None:
    n = 32
    torch.manual_seed(0)
    modules = [tiny_mlp().to(DEV) for _ in range(n)]
    batch = make_batch((32,), 32)
    opts = [torch.optim.AdamW(m.parameters(), 1e-3, foreach=True) for m in modules]

    def hand() -> None:
        for m, o in zip(modules, opts):
            o.zero_grad()
            F.cross_entropy(m(batch[0]), batch[1]).backward()
            o.step()

    step = torch.func.vmap(fl.make_train_step(classify), in_dims=(0, None), randomness="different")
    holder = {
        "s": fl.stack_states(
            [fl.TrainState.create(m, tx=optim.adamw(1e-3), device=DEV) for m in modules]
        )
    }

    def vm() -> None:
        holder["s"], _ = step(holder["s"], batch)

    med = time_blocks({"hand": hand, "vmap": vm}, blocks, 10)
    report("")
    report(
        f"| {n} tiny MLPs | 32 sequential hand loops {med['hand']:.0f} µs | vmapped fnloop step {med['vmap']:.0f} µs | speed-up {med['hand'] / med['vmap']:.1f}x |"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py needs a CUDA GPU")
    report(
        f"## GPU: {torch.cuda.get_device_name()} — torch {torch.__version__}, CUDA {torch.version.cuda}, Python {platform.python_version()}"
    )
    report("")
    report("| check | result | status |")
    report("|---|---|---|")
    t0 = time.time()
    check_optimizers()
    check_train_step()
    check_amp()
    check_no_sync()
    bench_steps(5 if args.quick else 15, compile_too=not args.no_compile)
    bench_vmap(5 if args.quick else 15)
    report("")
    report(f"(total {time.time() - t0:.0f} s)")
    if args.out:
        Path(args.out).write_text("\n".join(LINES) + "\n")


if __name__ == "__main__":
    main()
