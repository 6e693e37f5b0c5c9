"""A small training job for the resume tests: shuffling loader, dropout, mid-epoch checkpoints,
a best model from before the interruptions.

Usage: python resume_job.py OUT_DIR MAX_EPOCHS [SLEEP_PER_BATCH]
Writes OUT_DIR/final.pt (params and history) when it finishes; prints READY once training
is about to start.
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fnloop as fl
from fnloop import optim


class Slow(fl.callbacks.Callback):
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_fit_start(self, state):
        print("READY", flush=True)

    def on_train_batch_end(self, state, outputs, batch, batch_idx):
        time.sleep(self.seconds)


class Score(fl.callbacks.Callback):
    """An epoch metric whose best epoch (the second) lies before a later interruption."""

    def on_validation_epoch_end(self, state, metrics):
        score = {"score": [0.3, 0.9, 0.5, 0.4][state.epoch - 1]}
        return state.replace(history=fl.state.append_history(state.history, "valid", score))


def training_step(model, batch):
    x, y = batch
    logits = model(x)
    return {"loss": F.cross_entropy(logits, y), "acc": (logits.argmax(-1) == y).float().mean()}


def main(out_dir: str, max_epochs: int, sleep: float) -> None:
    torch.manual_seed(0)
    x = torch.randn(192, 6)
    y = (x[:, 0] - x[:, 2] > 0).long()
    loaders = {
        "train": DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True),
        "valid": DataLoader(TensorDataset(x[:64], y[:64]), batch_size=32),
    }
    module = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 2))
    tx = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(optim.cosine_schedule(1e-2, 60)))
    state = fl.TrainState.create(module, tx=tx, ema_decay=0.9, device="cpu")
    state = fl.fit(
        state,
        training_step,
        loaders,
        max_epochs=max_epochs,
        out_dir=out_dir,
        checkpoint_every_n_steps=3,
        early_stopping=fl.EarlyStopping("valid/loss", patience=50),
        monitor="valid/score",  # best_model.pt: epoch 2's weights
        mode="max",
        callbacks=[Score(), Slow(sleep)],
        log_to_console=False,
        progress=False,
    )
    history = {s: {k: list(v) for k, v in m.items()} for s, m in state.history.items()}
    best = torch.load(f"{out_dir}/best_model.pt", weights_only=True)
    opt_state = [t for t in fl._tree.tree_leaves(state.opt_state) if isinstance(t, torch.Tensor)]
    torch.save(
        {
            "params": state.params,
            "ema": state.ema,
            "history": history,
            "step": state.step,
            "best": best,
            "opt_state": opt_state,
        },
        f"{out_dir}/final.pt",
    )
    print("DONE", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]) if len(sys.argv) > 3 else 0.0)
