"""Per-step cost of ``fl.fit`` vs a hand-written epoch loop vs Lightning's ``Trainer.fit``.

Usage::

    python benchmarks/fit.py           # full run (a few minutes on 2 cores)
    python benchmarks/fit.py --quick   # smoke run

All of them train the same model from the same initial weights with AdamW(lr=1e-3) on the
same in-memory ``TensorDataset`` through a ``DataLoader(batch_size, shuffle=True,
num_workers=0)`` of ``--steps-per-epoch`` batches, with a progress bar on, as users run
them (bars and console lines go to ``/dev/null`` while timed; they still render):

* ``fnloop``: ``fl.fit(state, training_step, loader, max_epochs=E, progress=True)``
  (console epoch lines on, no ``out_dir``, so no files).
* ``hand``: ``for x, y in tqdm(loader): opt.zero_grad(); loss = ...; loss.backward();
  opt.step()`` with ``torch.optim.AdamW(foreach=True)``, the loss summed on the device
  and printed once per epoch.
* ``hand fused``: the same with ``torch.optim.AdamW(fused=True)``: ``fit`` donates its
  states, so its update is torch's fused CPU kernel; ``fnloop/hand fused`` compares the
  two loops with the same optimizer kernel.
* ``Lightning``: ``Trainer(max_epochs=E, logger=False, enable_checkpointing=False,
  enable_model_summary=False, accelerator="cpu", devices=1).fit(module, loader)``, the
  default TQDM bar, ``self.log("loss", loss, prog_bar=True)`` in ``training_step``.

The per-step cost is the slope ``(time(2N steps) - time(N steps)) / N`` so start-up
(building the state or the Trainer, the first epoch's set-up) cancels; per-epoch work
(bars, epoch-end reads) stays in, amortised over ``--steps-per-epoch`` steps. Each
repeat runs every contender for N and 2N steps, in a balanced order
(``_common.balanced_order``); the table gives the median slope over the repeats.

The start-up column is what a run costs beyond its steps: the time of a one-epoch run
(each repeat runs one more, ~4% of the time) less ``--steps-per-epoch`` steps at the
median slope; median and IQR over the repeats, in ms. It is a difference of two noisy
figures, so a loop whose start-up is ~0 (the hand loops: building an optimizer) can come
out a few ms negative; the IQR shows the noise. (Until 2026-11-30 it was
``t(N) - N * slope``, the N-step line extrapolated to zero steps: at N = 400 steps a 5%
wobble between the two runs moved it by more than the start-up itself, and it printed
-0.11 s for the hand loop on the CNN.)
"""

from __future__ import annotations

import argparse
import copy
import functools
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C
import torch
import torch.nn.functional as F
from step import training_step
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

FIT_MODELS = ("tiny", "cnn")


def lightning_module() -> Any:
    """The ``lightning`` package (or ``pytorch_lightning``), or ``None``."""
    try:
        import lightning.pytorch as pl

        return pl
    except ImportError:
        try:
            import pytorch_lightning as pl

            return pl
        except ImportError:
            return None


def make_loader(dataset: TensorDataset, batch: int, seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=0, generator=g)


# --------------------------------------------------------------------------- contenders


def run_fnloop(module: nn.Module, loader: DataLoader, epochs: int) -> None:
    import fnloop as fl

    state = fl.TrainState.create(module, tx=fl.optim.adamw(1e-3), device="cpu")
    fl.fit(state, training_step, loader, max_epochs=epochs, progress=True)


def run_hand(module: nn.Module, loader: DataLoader, epochs: int, fused: bool = False) -> None:
    model = module
    kernel = {"fused": True} if fused else {"foreach": True}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, **kernel)
    for epoch in range(epochs):
        model.train()
        total = torch.zeros(())
        seen = 0
        for x, y in tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", leave=False):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            total += loss.detach() * x.shape[0]
            seen += x.shape[0]
        print(f"[{epoch + 1}/{epochs}] loss:{(total / seen).item():.4g}")


def make_lightning_runner(pl: Any) -> Callable[[nn.Module, DataLoader, int], None]:
    class LitModel(pl.LightningModule):
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = F.cross_entropy(self.model(x), y)
            self.log("loss", loss, prog_bar=True)
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-3, foreach=True)

    def run(module: nn.Module, loader: DataLoader, epochs: int) -> None:
        trainer = pl.Trainer(
            max_epochs=epochs,
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=True,
            accelerator="cpu",
            devices=1,
        )
        trainer.fit(LitModel(module), loader)

    return run


# --------------------------------------------------------------------------- measurement


def time_run(
    fn: Callable[[nn.Module, DataLoader, int], None],
    module: nn.Module,
    dataset: TensorDataset,
    batch: int,
    epochs: int,
    seed: int,
    quiet: bool,
) -> tuple[float, int]:
    """Seconds and minor page faults of one whole run (start-up included)."""
    model = copy.deepcopy(module)
    loader = make_loader(dataset, batch, seed)
    torch.manual_seed(seed)
    with C.quiet_fds(quiet):
        f0 = C.minor_faults()
        t0 = time.perf_counter()
        fn(model, loader, epochs)
        dt = time.perf_counter() - t0
        faults = C.minor_faults() - f0
    return dt, faults


def bench_model(
    name: str,
    contenders: dict[str, Callable[[nn.Module, DataLoader, int], None]],
    *,
    steps_per_epoch: int,
    epochs: int,
    repeats: int,
    quiet: bool,
    max_wait_s: float,
) -> dict[str, Any]:
    label, factory, batch, shape = C.MODELS[name]
    torch.manual_seed(0)
    module = factory()
    n = batch * steps_per_epoch
    g = torch.Generator().manual_seed(1)
    dataset = TensorDataset(
        torch.randn(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g)
    )
    names = list(contenders)
    for cname in names:  # warm-up: imports, first-call costs
        time_run(contenders[cname], module, dataset, batch, 1, 0, quiet)
    C.wait_for_quiet(max_wait_s)
    n_steps = epochs * steps_per_epoch
    slopes: dict[str, list[float]] = {c: [] for c in names}
    faults: dict[str, list[float]] = {c: [] for c in names}
    short: dict[str, list[float]] = {c: [] for c in names}
    loads: list[float] = []
    meter = C.LoadMeter()
    t_start = time.perf_counter()
    for r in range(repeats):
        meter.reset()
        order = C.balanced_order(r, names)
        for cname in order:
            lengths = (1, epochs, 2 * epochs)
            res = {
                e: time_run(contenders[cname], module, dataset, batch, e, r, quiet)
                for e in (lengths if r % 2 == 0 else lengths[::-1])
            }
            (t1, f1), (t2, f2) = res[epochs], res[2 * epochs]
            slopes[cname].append((t2 - t1) / n_steps * 1e6)
            faults[cname].append((f2 - f1) / n_steps)
            short[cname].append(res[1][0])
        loads.append(meter.read())
    wall = time.perf_counter() - t_start
    quiet_rounds = [i for i, x in enumerate(loads) if not x > 0.5]
    filtered = len(quiet_rounds) >= max(3, repeats // 3)
    use = quiet_rounds if filtered else list(range(repeats))
    used = (
        f"{len(use)}/{repeats} repeats with other load <= 0.5 used"
        if filtered
        else f"all {repeats} repeats used: too few had other load <= 0.5"
    )

    def med(xs: list[float]) -> float:
        return C.median([xs[i] for i in use])

    def startup_ms(c: str) -> list[float]:
        """Each repeat's one-epoch run less its steps at the median slope (ms)."""
        return [(short[c][i] - med(slopes[c]) * steps_per_epoch / 1e6) * 1e3 for i in use]

    return {
        "model": name,
        "label": label,
        "params": C.n_params(module),
        "steps": n_steps,
        "us": {c: med(slopes[c]) for c in names},
        "iqr": {c: C.iqr([slopes[c][i] for i in use]) for c in names},
        "faults": {c: med(faults[c]) for c in names},
        "startup_ms": {c: C.median(startup_ms(c)) for c in names},
        "startup_iqr": {c: C.iqr(startup_ms(c)) for c in names},
        "note": f"{used} (median other load {C.median(loads):.2f} cores)",
        "wall_s": wall,
        "all": slopes,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short runs, few repeats")
    ap.add_argument("--models", default=",".join(FIT_MODELS))
    ap.add_argument("--steps-per-epoch", type=int, default=50)
    ap.add_argument("--epochs", type=int, default=None, help="N = epochs * steps-per-epoch")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--show", action="store_true", help="do not send bars to /dev/null")
    ap.add_argument("--no-lightning", action="store_true")
    ap.add_argument("--max-wait", type=float, default=None)
    args = ap.parse_args()

    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "pytorch_lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    epochs = args.epochs or (2 if args.quick else 8)
    repeats = args.repeats or (3 if args.quick else 7)
    max_wait = args.max_wait if args.max_wait is not None else (5 if args.quick else 60)

    import fnloop

    contenders: dict[str, Callable[[nn.Module, DataLoader, int], None]] = {
        "hand": run_hand,
        "hand fused": functools.partial(run_hand, fused=True),
        "fnloop": run_fnloop,
    }
    pl = None if args.no_lightning else lightning_module()
    if pl is not None:
        contenders["Lightning"] = make_lightning_runner(pl)
        lightning_version = getattr(pl, "__version__", "?")
    else:
        lightning_version = "not installed" if not args.no_lightning else "skipped"

    print("# benchmarks/fit.py: fl.fit vs hand-written loop vs Lightning Trainer.fit (CPU)")
    C.print_machine_info(
        {
            "fnloop": getattr(fnloop, "__version__", "?"),
            "lightning": lightning_version,
            "method": f"slope (t(2N) - t(N)) / N, N = {epochs} epochs x "
            f"{args.steps_per_epoch} steps, {repeats} repeats, interleaved",
            "load": C.load_line(),
        }
    )
    if pl is None:
        print(f"Lightning: {lightning_version}")
    print(flush=True)

    rows = []
    results = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        r = bench_model(
            name,
            contenders,
            steps_per_epoch=args.steps_per_epoch,
            epochs=epochs,
            repeats=repeats,
            quiet=not args.show,
            max_wait_s=max_wait,
        )
        results.append(r)
        print(
            f"  {r['label']}: "
            + ", ".join(f"{k} {v:.1f} us/step" for k, v in r["us"].items())
            + f"; {r['note']} ({r['wall_s']:.0f} s)",
            flush=True,
        )
        u, q = r["us"], r["iqr"]
        lt = u.get("Lightning", float("nan"))
        lq = q.get("Lightning", (float("nan"), float("nan")))
        rows.append(
            [
                r["label"],
                f"{u['hand']:.0f} ({q['hand'][0]:.0f}-{q['hand'][1]:.0f})",
                f"{u['hand fused']:.0f} ({q['hand fused'][0]:.0f}-{q['hand fused'][1]:.0f})",
                f"{u['fnloop']:.0f} ({q['fnloop'][0]:.0f}-{q['fnloop'][1]:.0f})",
                f"{lt:.0f} ({lq[0]:.0f}-{lq[1]:.0f})" if pl is not None else "not installed",
                f"{C.ratio(u['fnloop'], u['hand']):.2f}",
                f"{C.ratio(u['fnloop'], u['hand fused']):.2f}",
                f"{C.ratio(lt, u['hand']):.2f}" if pl is not None else "n/a",
                " / ".join(f"{r['faults'][c]:.1f}" for c in contenders),
                " / ".join(f"{r['startup_ms'][c]:.0f}" for c in contenders),
            ]
        )
    print()
    print("## fit: per-step slope, median us/step (IQR)")
    print()
    print(
        C.table(
            [
                "model",
                "hand us",
                "hand fused us",
                "fnloop us",
                "Lightning us",
                "fnloop/hand",
                "fnloop/hand fused",
                "Lightning/hand",
                "faults/step " + "/".join(contenders),
                "start-up ms " + "/".join(contenders),
            ],
            rows,
        )
    )
    for r in results:
        print(f"- {r['label']}: {r['note']}")
    print(
        f"- start-up: a {args.steps_per_epoch}-step (one-epoch) run's time less its steps at "
        "the median slope, median (IQR) over the repeats; a difference of two noisy figures, "
        "so ~0 (the hand loops) can come out negative"
    )
    for r in results:
        print(
            f"  - {r['label']}: "
            + ", ".join(
                f"{c} {r['startup_ms'][c]:.0f} ms ({lo:.0f} to {hi:.0f})"
                for c, (lo, hi) in r["startup_iqr"].items()
            )
        )
    if pl is None:
        print("Lightning: " + lightning_version)


if __name__ == "__main__":
    main()
