"""Anomaly detection by reconstruction: an autoencoder that has only seen "normal" digits.

    python examples/anomaly.py             # 10-20 s on 2 CPU cores, AUC ~0.9
    python examples/anomaly.py --fresh     # start over instead of resuming runs/anomaly

The ``AnomalyTrainer`` example of the object-oriented ``BaseTrainer``, as fnloop code.
The autoencoder is trained to reconstruct the digits 0-8 of scikit-learn's digits set
(nothing is downloaded); it has never seen a 9. Afterwards each image of a held-out set
(unseen normal digits and all the 9s) gets an anomaly score, its reconstruction error,
and the ROC AUC says how well the score tells the two apart (0.5 is chance, 1.0
perfect).

Batches are dicts, ``{"image": ...}``, as in that example: fnloop accepts any batch structure.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader

import fnloop as fl
from fnloop import optim


# --------------------------------------------------------------------------- the task
def training_step(model, batch):
    """Reconstruct the images; the loss is the mean squared error."""
    images = batch["image"]
    reconstructed = model(images)
    return {"loss": F.mse_loss(reconstructed, images)}


def make_autoencoder(bottleneck: int = 16) -> nn.Module:
    """64 pixels -> ``bottleneck`` numbers -> 64 pixels."""
    return nn.Sequential(
        nn.Linear(64, 128),
        nn.ReLU(),
        nn.Linear(128, bottleneck),
        nn.ReLU(),
        nn.Linear(bottleneck, 128),
        nn.ReLU(),
        nn.Linear(128, 64),
        nn.Sigmoid(),
    )


def split_digits(anomaly: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Normal train / normal valid / test images, and the test labels (1 = anomaly)."""
    digits = load_digits()
    images = torch.tensor(digits.data, dtype=torch.float32) / 16.0  # (N, 64) in [0, 1]
    is_anomaly = torch.tensor(digits.target == anomaly)
    normal, anomalies = images[~is_anomaly], images[is_anomaly]
    train, rest = train_test_split(normal, test_size=0.3, random_state=seed)
    valid, test_normal = train_test_split(rest, test_size=0.5, random_state=seed)
    test = torch.cat([test_normal, anomalies])
    test_labels = torch.cat([torch.zeros(len(test_normal)), torch.ones(len(anomalies))])
    return train, valid, test, test_labels


def dict_loader(images: torch.Tensor, batch_size: int, shuffle: bool) -> DataLoader:
    # A list of dicts is a dataset; the default collate turns it into {"image": (B, 64)}.
    return DataLoader([{"image": x} for x in images], batch_size=batch_size, shuffle=shuffle)


# --------------------------------------------------------------------------- the run
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=150, help="at most this many epochs")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3, help="initial learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--anomaly", type=int, default=9, choices=range(10), help="the digit never trained on"
    )
    parser.add_argument(
        "--patience",
        type=int,
        default=15,
        help="stop after this many epochs without a lower valid/loss",
    )
    parser.add_argument(
        "--out-dir",
        help="the run folder (default runs/anomaly, runs/anomaly-D for --anomaly D other "
        "than 9, -seedN appended for --seed N other than 0, and -fast with --fast)",
    )
    parser.add_argument(
        "--fresh", action="store_true", help="delete the previous run instead of resuming it"
    )
    parser.add_argument("--fast", action="store_true", help="tiny settings (for tests)")
    args = parser.parse_args(argv)
    # Each unseen digit gets a folder of its own: resuming the run of another digit would
    # score a model that was trained on the digit it calls unseen. So does each seed: it
    # picks the split, and another seed's model has trained on most of this seed's test.
    name = "anomaly" if args.anomaly == 9 else f"anomaly-{args.anomaly}"
    name += "" if args.seed == 0 else f"-seed{args.seed}"
    args.out_dir = args.out_dir or f"runs/{name}{'-fast' if args.fast else ''}"
    if args.fast:
        args.epochs = min(args.epochs, 15)
    return args


def main(argv: list[str] | None = None) -> float:
    args = parse_args(argv)
    out_dir = Path(args.out_dir)
    if args.fresh and (out_dir / "checkpoints").is_dir():
        shutil.rmtree(out_dir)  # only a folder that fit wrote (it has checkpoints/)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # a model this small is fastest on one CPU thread

    train, valid, test, test_labels = split_digits(args.anomaly, args.seed)
    loaders = {
        "train": dict_loader(train, args.batch_size, shuffle=True),
        "valid": dict_loader(valid, 256, shuffle=False),
    }
    # The learning rate halves when valid/loss (fit's monitor) stalls for 5 epochs.
    learning_rate = optim.reduce_on_plateau(args.lr, factor=0.5, patience=5)
    state = fl.TrainState.create(make_autoencoder(), tx=optim.adam(learning_rate))

    start = time.perf_counter()
    state = fl.fit(
        state,
        training_step,
        loaders,
        max_epochs=args.epochs,
        # A reconstruction loss of ~0.02: the default min_delta (1e-3) would be 5 % of it.
        early_stopping=fl.EarlyStopping("valid/loss", patience=args.patience, min_delta=1e-4),
        out_dir=out_dir,
        run_name="anomaly",
        resume=not args.fresh,
    )
    seconds = time.perf_counter() - start

    print(f"\nRun folder {out_dir}/ ({seconds:.1f}s):")
    for path in sorted(out_dir.rglob("*")):
        if path.is_file():
            print(f"  {path.relative_to(out_dir)}  ({path.stat().st_size:,} bytes)")

    # Score the held-out images with the best weights, loaded into a plain nn.Module.
    model = fl.load_model(out_dir / "best_model.pt", make_autoencoder()).eval()
    with torch.no_grad():
        scores = ((model(test) - test) ** 2).mean(dim=1)
    auc = roc_auc_score(test_labels.numpy(), scores.numpy())
    n_anomalies = int(test_labels.sum())
    print(
        f"Anomaly detection (digit {args.anomaly} unseen): ROC AUC {auc:.4f} on "
        f"{len(test) - n_anomalies} normal and {n_anomalies} anomalous images "
        f"(best valid/loss {min(state.history['valid']['loss']):.4g})"
    )
    return auc


if __name__ == "__main__":
    main()
