"""One process of a run set up wrongly, launched by ``torchrun`` from test_distributed.py.

Usage: torchrun --standalone --nproc_per_node=2 bad_input_job.py OUT_DIR CASE

Runs ``CASE`` (a function below) and saves what it returned to ``OUT_DIR/rank{r}.pt``.
The group times out after a minute, so a case that makes the processes wait for each
other fails instead of hanging the tests.
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fnloop as fl
from fnloop import optim


def classify(model: Any, batch: Any) -> dict[str, torch.Tensor]:
    x, y = batch
    return {"loss": F.cross_entropy(model(x), y)}


def unequal_train(rank: int) -> dict[str, Any]:
    """Train loaders of 5 and 4 batches: refused in both processes (not a hang)."""
    torch.manual_seed(0)
    n = 40 if rank == 0 else 32
    loader = DataLoader(TensorDataset(torch.randn(n, 4), torch.randint(0, 2, (n,))), 8)
    state = fl.TrainState.create(nn.Linear(4, 2), tx=optim.sgd(0.1))
    try:
        fl.fit(state, classify, loader, max_epochs=1, log_to_console=False, progress=False)
    except ValueError as e:
        return {"error": str(e)}
    return {"error": None}


def main() -> None:
    out, case = Path(sys.argv[1]), sys.argv[2]
    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = torch.distributed.get_rank()
    torch.save(globals()[case](rank), out / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
