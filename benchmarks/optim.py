"""One optimizer update: fnloop (``tx.update`` + ``apply_updates``, or ``tx.apply_``) vs torch.

Run: ``python benchmarks/optim.py`` (about 100 float32 tensors, ~10M values) or
``python benchmarks/optim.py --quick``. Contenders are interleaved in one process (in a balanced
order: `_common.balanced_order`) after a warm-up; before each update, outside the
timing, every contender refills its own gradient tensors, as a backward pass does right
before a training step's update, so each one starts with its gradients freshly written (in
cache). The script prints the median time per update,
the ratio to the last contender (``torch.optim``'s ``foreach=True`` step), minor page
faults per update (``ru_minflt``) and how many ``torch._foreach_*`` kernels one update
launches.

``--pin-malloc`` pins glibc's mmap and trim thresholds (``mallopt``) so that freed blocks
stay in the heap; compare with and without it to see the cost of allocation churn.
"""

from __future__ import annotations

import argparse
import ctypes
import platform
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import _common as C
import torch

from fnloop import optim


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def pin_malloc() -> bool:
    """Keeps freed memory in glibc's heap (no mmap for big blocks, no trimming)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok = libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024)
    ok &= libc.mallopt(m_trim_threshold, 1 << 30)
    return bool(ok)


def make_params(n_layers: int, width: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """``n_layers`` (weight, bias) pairs with output sizes cycling through 0.6x..1.4x width."""
    g = torch.Generator().manual_seed(seed)
    params = {}
    for i in range(n_layers):
        d_out = int(width * (0.6 + 0.2 * (i % 5)))
        params[f"layer{i}.weight"] = torch.randn(d_out, width, generator=g) * 0.02
        params[f"layer{i}.bias"] = torch.zeros(d_out)
    return params


def minflt() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class Contender:
    """A named update step with its own copy of params, grads and optimizer state."""

    def __init__(
        self, name: str, step: Callable[[], None], prepare: Callable[[], None] | None = None
    ) -> None:
        self.name = name
        self.step = step
        self.prepare = prepare  # untimed set-up before each step
        self.times: list[float] = []
        self.faults: list[int] = []

    def run(self, record: bool) -> None:
        if self.prepare is not None:
            self.prepare()
        f0, t0 = minflt(), time.perf_counter()
        self.step()
        t1, f1 = time.perf_counter(), minflt()
        if record:
            self.times.append((t1 - t0) * 1e3)
            self.faults.append(f1 - f0)


def refill(buffers: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> Callable[[], None]:
    """The untimed ``prepare`` of every contender: copies ``grads`` into its own ``buffers``.

    Every contender gets it, so that each update starts with its gradients just written,
    as after a backward pass; a contender that alone refilled its gradients would find
    them in cache while the others read theirs from memory.
    """

    def prepare() -> None:
        for n, g in grads.items():
            buffers[n].copy_(g)

    return prepare


def fnloop_contender(
    name: str, tx: optim.GradientTransformation, params: dict, grads: dict
) -> Contender:
    box: dict[str, Any] = {"params": {n: p.clone() for n, p in params.items()}}
    box["state"] = tx.init(box["params"])
    buffers = {n: g.clone() for n, g in grads.items()}

    def step() -> None:
        updates, box["state"] = tx.update(buffers, box["state"], box["params"])
        box["params"] = optim.apply_updates(box["params"], updates)

    c = Contender(name, step, refill(buffers, grads))
    c.box = box  # type: ignore[attr-defined]
    return c


def fnloop_inplace_contender(
    name: str, tx: optim.GradientTransformation, params: dict, grads: dict
) -> Contender:
    """``tx.apply_``: the fused in-place step a ``donate=True`` train step (and ``fit``) runs.

    It consumes the gradients, as a step consumes those autograd just made; refilling
    the gradient buffers happens outside the timed region.
    """
    box: dict[str, Any] = {"params": {n: p.clone() for n, p in params.items()}}
    box["state"] = tx.init(box["params"])
    buffers = {n: g.clone() for n, g in grads.items()}

    def step() -> None:
        assert tx.apply_ is not None
        box["params"], box["state"] = tx.apply_(buffers, box["state"], box["params"])

    return Contender(name, step, refill(buffers, grads))


def torch_optimizer(
    make_opt: Callable[[list[torch.Tensor]], torch.optim.Optimizer], params: dict, grads: dict
) -> tuple[torch.optim.Optimizer, Callable[[], None]]:
    """``make_opt`` over copies of ``params`` whose ``.grad`` are copies of ``grads``, and
    the ``prepare`` that refills those ``.grad``."""
    ps = [torch.nn.Parameter(p.clone()) for p in params.values()]
    buffers = {n: g.clone() for n, g in grads.items()}
    for p, g in zip(ps, buffers.values(), strict=True):
        p.grad = g
    return make_opt(ps), refill(buffers, grads)


def torch_contender(
    name: str,
    make_opt: Callable[[list[torch.Tensor]], torch.optim.Optimizer],
    params: dict,
    grads: dict,
) -> Contender:
    opt, prepare = torch_optimizer(make_opt, params, grads)
    return Contender(name, opt.step, prepare)


def torch_scheduled_contender(
    name: str,
    make_opt: Callable[[list[torch.Tensor]], torch.optim.Optimizer],
    make_scheduler: Callable[[torch.optim.Optimizer], Any],
    params: dict,
    grads: dict,
) -> Contender:
    """``opt.step()`` then ``scheduler.step()``, as a hand loop with a schedule runs them."""
    opt, prepare = torch_optimizer(make_opt, params, grads)
    scheduler = make_scheduler(opt)

    def step() -> None:
        opt.step()
        scheduler.step()

    return Contender(name, step, prepare)


def fused_adamw_reference(
    lr: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 1e-2
) -> optim.GradientTransformation:
    """Not fnloop's API: AdamW as ONE out-of-place transform, for scale only.

    Its "updates" are the new params (use ``new = updates``, not ``apply_updates``). It
    follows torch's sync-free (capturable) order, so it shows how fast a pure update that
    allocates only the new mu, nu, params and one temporary can be: 9 full passes and
    4 new tensors per parameter, against fnloop's 11 passes and 7 new tensors.
    """

    def init_fn(params: Any) -> Any:
        zeros = [torch.zeros_like(p) for p in params.values()]
        return (torch.zeros((), dtype=torch.float64), zeros, [z.clone() for z in zeros])

    def update_fn(grads: Any, state: Any, params: Any = None) -> Any:
        count, mu, nu = state
        g, p = list(grads.values()), list(params.values())
        count = count + 1
        bc1, bc2_sqrt = 1 - b1**count, (1 - b2**count).sqrt()
        mu = torch._foreach_lerp(mu, g, 1 - b1)
        nu = torch._foreach_mul(nu, b2)
        torch._foreach_addcmul_(nu, g, g, 1 - b2)
        denom = torch._foreach_sqrt(nu)
        torch._foreach_div_(denom, bc2_sqrt)
        torch._foreach_add_(denom, eps)
        torch._foreach_div_(denom, -lr / bc1)
        new_p = torch._foreach_mul(p, 1 - lr * weight_decay)
        torch._foreach_addcdiv_(new_p, mu, denom)
        return dict(zip(params, new_p, strict=True)), (count, mu, nu)

    return optim.GradientTransformation(init_fn, update_fn)


def fused_contender(name: str, params: dict, grads: dict) -> Contender:
    tx = fused_adamw_reference(1e-3)
    box: dict[str, Any] = {"params": {n: p.clone() for n, p in params.items()}}
    box["state"] = tx.init(box["params"])
    buffers = {n: g.clone() for n, g in grads.items()}

    def step() -> None:
        box["params"], box["state"] = tx.update(buffers, box["state"], box["params"])

    return Contender(name, step, refill(buffers, grads))


def count_foreach_kernels(step: Callable[[], None]) -> tuple[int, int]:
    """(foreach kernel launches, other aten ops) in one call of ``step``."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    foreach = other = 0
    for ev in prof.key_averages():
        if ev.key.startswith("aten::_foreach_"):
            foreach += ev.count
        elif ev.key.startswith("aten::"):
            other += ev.count
    return foreach, other


def bench(
    title: str,
    contenders: list[Contender],
    reps: int,
    warmup: int,
) -> None:
    for _ in range(warmup):
        for c in contenders:
            c.run(record=False)
    for rep in range(reps):
        # Not reversed every other time: reversing ran the first and the last contender
        # twice in a row at each turn, with their own tensors still in cache.
        order = C.balanced_order(rep, contenders)
        for c in order:
            c.run(record=True)
    base = statistics.median(contenders[-1].times)
    print(f"\n{title}")
    print(
        f"  {'contender':38s} {'median ms':>10s} {'min ms':>8s} {'ratio':>6s} "
        f"{'faults/step med/mean':>21s} {'foreach':>8s} {'other ops':>9s}"
    )
    for c in contenders:
        med = statistics.median(c.times)
        foreach, other = count_foreach_kernels(c.step)
        print(
            f"  {c.name:38s} {med:10.2f} {min(c.times):8.2f} {med / base:6.2f} "
            f"{statistics.median(c.faults):10.0f} /{statistics.mean(c.faults):9.0f} "
            f"{foreach:8d} {other:9d}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="~1M values, fewer repetitions")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--pin-malloc", action="store_true", help="pin glibc malloc thresholds")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    pinned = pin_malloc() if args.pin_malloc else False
    n_layers, width = (20, 224) if args.quick else (50, 448)
    reps = args.reps or (10 if args.quick else 30)
    warmup = 3 if args.quick else 5

    params = make_params(n_layers, width)
    g = torch.Generator().manual_seed(1)
    grads = {n: torch.randn(p.shape, generator=g) * 1e-2 for n, p in params.items()}
    total = sum(p.numel() for p in params.values())

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU: {cpu_name()}")
    print(f"python {platform.python_version()}, malloc pinned: {pinned}")
    print(
        f"{len(params)} float32 tensors, {total / 1e6:.2f}M values; {reps} repetitions "
        f"after {warmup} warm-up, interleaved"
    )

    bench(
        "AdamW(lr=1e-3, weight_decay=1e-2), one update",
        [
            fnloop_contender("fnloop adamw", optim.adamw(1e-3, weight_decay=1e-2), params, grads),
            fnloop_inplace_contender(
                "fnloop adamw, in place (donate)",
                optim.adamw(1e-3, weight_decay=1e-2),
                params,
                grads,
            ),
            fused_contender("(reference: one fused pure transform)", params, grads),
            torch_contender(
                "(reference: torch AdamW(fused=True))",
                lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=1e-2, fused=True),
                params,
                grads,
            ),
            torch_contender(
                "torch.optim.AdamW(foreach=True)",
                lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=1e-2, foreach=True),
                params,
                grads,
            ),
        ],
        reps,
        warmup,
    )
    bench(
        "SGD(lr=1e-2, momentum=0.9), one update",
        [
            fnloop_contender("fnloop sgd momentum", optim.sgd(1e-2, momentum=0.9), params, grads),
            fnloop_inplace_contender(
                "fnloop sgd momentum, in place (donate)",
                optim.sgd(1e-2, momentum=0.9),
                params,
                grads,
            ),
            torch_contender(
                "torch.optim.SGD(foreach=True)",
                lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, foreach=True),
                params,
                grads,
            ),
        ],
        reps,
        warmup,
    )
    # 10**6 steps: the rate moves every step but stays near 1e-2 (the values stay finite).
    bench(
        "SGD(momentum=0.9) with a cosine schedule, one update",
        [
            fnloop_inplace_contender(
                "fnloop sgd momentum + cosine, in place (donate)",
                optim.sgd(optim.cosine_schedule(1e-2, 10**6), momentum=0.9),
                params,
                grads,
            ),
            torch_scheduled_contender(
                "torch.optim.SGD(foreach=True) + CosineAnnealingLR",
                lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, foreach=True),
                lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, 10**6),
                params,
                grads,
            ),
        ],
        reps,
        warmup,
    )


if __name__ == "__main__":
    main()
