"""Data-parallel step time: fnloop's gradient-averaging train step vs DistributedDataParallel.

Usage::

    python benchmarks/ddp.py           # starts 2 CPU processes (gloo) with torchrun itself
    python benchmarks/ddp.py --quick   # smoke run

Each of the 2 processes trains on its half of every global batch, one thread each.
Contenders, same model, same initial weights, same batches, interleaved in one pair of
processes:

* ``DDP``: ``DistributedDataParallel(module)`` with ``torch.optim.AdamW(lr=1e-3,
  foreach=True)``: ``opt.zero_grad(); F.cross_entropy(ddp(x), y).backward(); opt.step()``
  (gradients all-reduced in buckets while the backward pass runs).
* ``fnloop``: ``fl.make_train_step(training_step, donate=True)`` on ``state.clone()`` (what
  ``fit`` runs): one all-reduce per dtype after the backward pass.
* ``fnloop pure``: ``fl.make_train_step(training_step)``.

Rank 0 prints the median per-step time over the blocks and the ratios to DDP, after
checking that both give the same parameters after 3 steps.
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import fnloop as fl

MODELS = {  # _common's models, step.py's, with data-parallel global batches
    "tiny MLP 32-64-10, global b=64": (C.tiny_mlp, (32,), 64),
    "MLP 784-1024-1024-10, global b=128": (C.mlp, (784,), 128),
    "CNN+BN 1x8x8, global b=128": (C.cnn, (1, 8, 8), 128),
}
N_BATCHES = 8


def training_step(model: Any, batch: Any) -> dict[str, torch.Tensor]:
    x, y = batch
    return {"loss": F.cross_entropy(model(x), y)}


def shards(shape: tuple[int, ...], global_batch: int, rank: int, world: int) -> list:
    """This process's rows of ``N_BATCHES`` global batches (the same on every process)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(N_BATCHES):
        x = torch.randn(global_batch, *shape, generator=g)
        y = torch.randint(0, 10, (global_batch,), generator=g)
        out.append((x[rank::world].contiguous(), y[rank::world].contiguous()))
    return out


def contenders(factory: Any, batches: list) -> tuple[list[C.Contender], Any]:
    torch.manual_seed(0)
    module = factory()
    ddp = DistributedDataParallel(copy.deepcopy(module))
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3, foreach=True)
    box: dict[str, Any] = {"i": 0}

    def run_ddp(n: int) -> None:
        for _ in range(n):
            x, y = batches[box["i"] % N_BATCHES]
            opt.zero_grad()
            F.cross_entropy(ddp(x), y).backward()
            opt.step()
            box["i"] += 1

    def fnloop_runner(donate: bool) -> Any:
        state = fl.TrainState.create(module, tx=fl.optim.adamw(1e-3), device="cpu")
        step = fl.make_train_step(training_step, donate=donate)
        holder = {"state": state.clone() if donate else state, "i": 0}

        def run(n: int) -> None:
            for _ in range(n):
                holder["state"], _ = step(holder["state"], batches[holder["i"] % N_BATCHES])
                holder["i"] += 1

        return run, holder

    run_donate, donate_box = fnloop_runner(True)
    run_pure, _ = fnloop_runner(False)
    return [
        C.Contender("DDP", run_ddp),
        C.Contender("fnloop", run_donate),
        C.Contender("fnloop pure", run_pure),
    ], (ddp, donate_box)


def same_numbers(factory: Any, batches: list) -> float:
    """Max abs difference of the parameters after 3 steps, DDP vs fnloop. Biases right
    before a BatchNorm are left out: their gradient is ~0, and Adam turns rounding noise
    into +-lr steps in either implementation."""
    (ddp_c, fn_c, _), (ddp, box) = contenders(factory, batches)
    ddp_c.run(3)
    fn_c.run(3)
    layers = list(ddp.module)
    before_bn = {
        f"{i}.bias" for i in range(len(layers) - 1) if isinstance(layers[i + 1], nn.BatchNorm2d)
    }
    theirs = {n: p for n, p in ddp.module.named_parameters() if n not in before_bn}
    return max((box["state"].params[n] - p).abs().max().item() for n, p in theirs.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if "LOCAL_RANK" not in os.environ:  # start the 2 processes
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        sys.exit(subprocess.run([*cmd, __file__, *sys.argv[1:]]).returncode)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0:
        C.print_machine_info({"processes": world, "backend": "gloo", "threads/process": 1})
    rows = []
    for name, (factory, shape, global_batch) in MODELS.items():
        batches = shards(shape, global_batch, rank, world)
        diff = same_numbers(factory, batches)
        cs, _ = contenders(factory, batches)
        # Fixed block sizes: every process must take the same number of steps. The other
        # process is expected load (1 core), hence max_other_load. The barrier lines the
        # processes up after each block's gc.collect(), outside the timing.
        res = C.interleave(
            cs,
            block_steps=10 if args.quick else 20,
            blocks=5 if args.quick else 15,
            warmup_steps=20,
            max_other_load=1.5,
            sync=dist.barrier,
        )
        base = res.us("DDP")
        rows.append(
            [
                name,
                f"{base:.0f}",
                f"{res.us('fnloop'):.0f}",
                f"{C.ratio(res.us('fnloop'), base):.2f}",
                f"{res.us('fnloop pure'):.0f}",
                f"{C.ratio(res.us('fnloop pure'), base):.2f}",
                f"{diff:.1e}",
            ]
        )
        if rank == 0:
            print(f"- {name}: {res.note()}", flush=True)
    if rank == 0:
        headers = ["model", "DDP us", "fnloop us", "fnloop/DDP", "pure us", "pure/DDP", "max diff"]
        print(C.table(headers, rows))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
