"""Classify handwritten digits with a small CNN: fnloop's main example.

    python examples/digits.py              # ~10 s on 2 CPU cores, ~98.6% accuracy
    python examples/digits.py --fresh      # start over instead of resuming runs/digits
    python examples/digits.py --extras     # also: test a step alone, compile it, vmap it
    torchrun --nproc_per_node=2 examples/digits.py --out-dir runs/digits-ddp  # data parallel

The data is scikit-learn's digits set (1,797 8x8 grey images, 10 classes; it ships with
scikit-learn, nothing is downloaded). Everything fnloop needs from you is the
``training_step`` function below; the rest is ordinary PyTorch and argparse.

The run folder (``runs/digits`` by default) gets the log file, the checkpoints that a
re-run resumes from, ``best_model.pt`` (a plain ``state_dict``), ``metrics.csv`` and
``history.png``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import fnloop as fl
from fnloop import optim


# --------------------------------------------------------------------------- the task
def training_step(model, batch):
    """One batch: ``model(x)`` runs the CNN with the weights of the current state."""
    images, labels = batch
    logits = model(images)
    loss = F.cross_entropy(logits, labels)
    acc = (logits.argmax(dim=1) == labels).float().mean()
    return {"loss": loss, "acc": acc}


def make_model(width: int = 32) -> nn.Module:
    """A small CNN for 1x8x8 images."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 8x8 -> 4x4
        nn.Flatten(),
        nn.Dropout(0.25),
        nn.Linear(2 * width * 4 * 4, 10),
    )


def make_loaders(batch_size: int, seed: int, processes: int = 1) -> tuple[DataLoader, DataLoader]:
    """A stratified 80/20 train/validation split of the digits, as (N, 1, 8, 8) floats.

    Under ``torchrun`` each of the ``processes`` gets its share of every batch.
    """
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    train_idx, valid_idx = train_test_split(
        range(len(labels)), test_size=0.2, stratify=digits.target, random_state=seed
    )
    train = TensorDataset(images[train_idx], labels[train_idx])
    valid = TensorDataset(images[valid_idx], labels[valid_idx])
    if processes == 1:
        return (
            DataLoader(train, batch_size=batch_size, shuffle=True),
            DataLoader(valid, batch_size=256),
        )
    # Validation: each process its own share, every example once (a DistributedSampler
    # would repeat examples to even out the shares, and the metrics would count them twice).
    share = Subset(valid, range(torch.distributed.get_rank(), len(valid), processes))
    return (
        DataLoader(
            train, batch_size=batch_size // processes, sampler=DistributedSampler(train, seed=seed)
        ),
        DataLoader(share, batch_size=256),
    )


# --------------------------------------------------------------------------- the run
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=30, help="at most this many epochs")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--patience",
        type=int,
        default=8,
        help="stop after this many epochs without a better valid/acc",
    )
    parser.add_argument(
        "--out-dir",
        help="the run folder (default runs/digits, runs/digits-seedN for --seed N other "
        "than 0, and -fast appended with --fast)",
    )
    parser.add_argument(
        "--fresh", action="store_true", help="delete the previous run instead of resuming it"
    )
    parser.add_argument("--fast", action="store_true", help="tiny settings (for tests)")
    parser.add_argument(
        "--extras", action="store_true", help="also show step testing, compile and vmap"
    )
    args = parser.parse_args(argv)
    # The seed picks the train/validation split: resuming another seed's run would
    # validate (and pick best_model.pt) on images that run trained on.
    name = "digits" if args.seed == 0 else f"digits-seed{args.seed}"
    args.out_dir = args.out_dir or f"runs/{name}{'-fast' if args.fast else ''}"
    if args.fast:
        args.epochs = min(args.epochs, 3)
    return args


def main(argv: list[str] | None = None) -> fl.TrainState:
    args = parse_args(argv)
    out_dir = Path(args.out_dir)
    if args.fresh and (out_dir / "checkpoints").is_dir():
        # Only a folder that fit wrote (it has checkpoints/). Without this, fit's
        # resume=False would keep the old files in checkpoints/previous-<time>/.
        shutil.rmtree(out_dir)
    torch.manual_seed(args.seed)
    # A model this small runs fastest on one CPU thread: more threads only add
    # synchronisation, and slow to a crawl when other programs use the cores too.
    torch.set_num_threads(1)
    processes = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun
    device = None  # TrainState.create's default: CUDA when available, else the CPU
    if processes > 1:
        # One GPU per process (NCCL) when this machine has a GPU for each of its
        # processes; otherwise every process runs on the CPU (gloo).
        if torch.cuda.device_count() >= int(os.environ["LOCAL_WORLD_SIZE"]):
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")

    train_loader, valid_loader = make_loaders(args.batch_size, args.seed, processes)
    model = make_model(width=8 if args.fast else 32)

    # Warm up linearly for one epoch, then follow a cosine down to zero at the last epoch.
    # (--epochs sets the curve: a run resumed with another --epochs goes on along the new one.)
    warmup_steps = len(train_loader)
    total_steps = args.epochs * len(train_loader)
    schedule = optim.join_schedules(
        [
            optim.linear_schedule(args.lr, start_factor=0.1, total_iters=warmup_steps),
            optim.cosine_schedule(args.lr, t_max=max(1, total_steps - warmup_steps)),
        ],
        boundaries=[warmup_steps],
    )
    tx = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(schedule, weight_decay=1e-2))
    # Validation (and best_model.pt) use an exponential moving average of the weights,
    # over about 1 / (1 - 0.95) = 20 updates: about one epoch.
    state = fl.TrainState.create(model, tx=tx, ema_decay=0.95, device=device)

    start = time.perf_counter()
    state = fl.fit(
        state,
        training_step,
        {"train": train_loader, "valid": valid_loader},
        max_epochs=args.epochs,
        early_stopping=fl.EarlyStopping("valid/acc", mode="max", patience=args.patience),
        out_dir=out_dir,  # log, metrics.csv, history.png, checkpoints/, best_model.pt
        run_name="digits",  # the log file's name: digits_training.log
        resume=not args.fresh,  # a re-run goes on from the newest checkpoint in out_dir
    )
    seconds = time.perf_counter() - start
    if processes > 1:
        torch.distributed.destroy_process_group()
        if int(os.environ["RANK"]) != 0:
            return state  # the other processes trained the same state; rank 0 reports

    print(f"\nRun folder {out_dir}/ ({seconds:.1f}s):")
    for path in sorted(out_dir.rglob("*")):
        if path.is_file():
            print(f"  {path.relative_to(out_dir)}  ({path.stat().st_size:,} bytes)")

    accs = state.history["valid"]["acc"]
    best = max(range(len(accs)), key=accs.__getitem__)
    print(
        f"Validation accuracy: best {accs[best]:.4f} (epoch {best + 1}), "
        f"final {accs[-1]:.4f} after {state.epoch} epochs, {state.step} steps"
    )

    # best_model.pt is a plain state_dict: a fresh copy of the module loads it.
    model = make_model(width=8 if args.fast else 32).eval()
    model.load_state_dict(torch.load(out_dir / "best_model.pt", weights_only=True))
    valid_set = valid_loader.dataset
    if isinstance(valid_set, Subset):  # under torchrun, this process's share: check all
        valid_set = valid_set.dataset
    images, labels = valid_set.tensors
    with torch.no_grad():
        acc = (model(images).argmax(dim=1) == labels).float().mean()
    print(f"best_model.pt in a plain nn.Module: validation accuracy {acc:.4f}")

    if args.extras:
        show_extras(state, train_loader, valid_loader)
    return state


# --------------------------------------------------------------------------- extras
def show_extras(state: fl.TrainState, train_loader: DataLoader, valid_loader: DataLoader) -> None:
    """Three things beyond ``fit``: a step on its own, a compiled step, N models at once."""
    batch = next(iter(train_loader))

    # 1. A step is a plain function: test it with no fit, no files, no logging.
    train_step = fl.make_train_step(training_step)
    new_state, metrics = train_step(state, batch)
    assert new_state.step == state.step + 1 and torch.isfinite(metrics["loss"])
    print(
        f"\n[step alone] step {state.step} -> {new_state.step}, loss {float(metrics['loss']):.4f}"
    )

    # 2. The whole step (forward, backward, clipping, AdamW, EMA) as one compiled graph.
    #    donate=True: each step writes into the previous state's memory (fit steps from a
    #    copy of `state`, which stays intact). drop_last=True keeps the batch shape fixed:
    #    no dynamic shapes, which dropout fails under (compiled once from torch 2.14;
    #    before, twice: for the first update and for every later one).
    compiled = torch.compile(fl.make_train_step(training_step, donate=True))
    fixed_shape_loader = DataLoader(
        train_loader.dataset, batch_size=train_loader.batch_size, shuffle=True, drop_last=True
    )
    t0 = time.perf_counter()
    compiled_state = fl.fit(
        state,
        compiled,
        {"train": fixed_shape_loader, "valid": valid_loader},
        max_epochs=state.epoch + 1,
        progress=False,
        log_to_console=False,
    )
    acc = compiled_state.history["valid"]["acc"][-1]
    print(f"[compiled] one more epoch in {time.perf_counter() - t0:.1f}s, valid acc {acc:.4f}")

    # 3. Train 4 fresh models, one per learning rate, at once: vmap over a stacked state.
    learning_rates = (1e-3, 3e-3, 1e-2, 3e-2)
    stacked = fl.stack_states(
        [fl.TrainState.create(make_model(), tx=optim.adamw(lr)) for lr in learning_rates]
    )
    many_steps = torch.func.vmap(train_step, in_dims=(0, None), randomness="different")
    many_evals = torch.func.vmap(fl.make_eval_step(training_step), in_dims=(0, None))
    t0 = time.perf_counter()
    for _ in range(3):  # metrics hold one value per model: a list of 4 floats
        stacked, train_metrics = fl.train_epoch(stacked, many_steps, train_loader)
        stacked, valid_metrics = fl.validate_epoch(stacked, many_evals, valid_loader)
    print(f"[vmap] 4 models, 3 epochs in {time.perf_counter() - t0:.1f}s; by lr:")
    for lr, loss, acc in zip(learning_rates, train_metrics["loss"], valid_metrics["acc"]):
        print(f"  lr {lr:g}: train loss {loss:.4f}, valid acc {acc:.4f}")
    best = max(range(len(learning_rates)), key=valid_metrics["acc"].__getitem__)
    print(f"  best: lr {learning_rates[best]:g}; its state is fl.unstack_states(stacked)[{best}]")


if __name__ == "__main__":
    main()
