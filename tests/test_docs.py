"""The documentation's code runs: every ```python block of the docs, and their commands.

Each block of ``README.md``, ``docs/guide.md`` and ``examples/README.md`` is one test,
named by file, block number and first line. A file's blocks run in order in one namespace
(they read as one session: a later block uses the ``state`` an earlier one made), which
starts from that file's prelude below: tiny models and in-memory loaders standing in for
the names the docs take as given (``module``, ``train_loader``, ``batch``, ...), never
for names a block imports or defines itself. Each file runs in a temporary working
directory, so the ``runs/...`` folders and ``*.pt`` files the docs write land there.

Rules that change what runs (all visible here):

- ``torch.compile`` compiles with ``backend="eager"``: dynamo still traces the whole step
  (a step it cannot trace fails as it would for a user), but inductor's code generation,
  15-20 s per step on two CPU cores, is skipped (``tests/test_fit.py`` and
  ``tests/test_step.py`` compile with it).
- Placeholders (see :class:`_Placeholders`): ``name = ...`` takes ``name`` from the
  prelude; ``[...]`` is an empty list; a ``...`` argument of ``fit`` stands for the
  arguments the call leaves out (the prelude's ``DOC_FIT_ARGS`` and ``DOC_FIT_OPTIONS``).
  A block with any other ``...`` fails, unless ``SCHEMATIC`` lists it as schematic on
  purpose (it is then skipped with the reason): a stray ``...`` cannot silently take a
  block, and the checks on it, out of the run.
- ``SIDE_BY_SIDE`` blocks show two programs in two columns: each column runs on its own.
- ``ENVIRONMENT`` gives a block environment variables (the torchrun example runs as a
  world of one process).
- ``REQUIRES`` names the optional package a block needs: without it the block is skipped.
- ``CHECKS`` verify what a block claims in its comments (``fit leaves it unchanged``,
  ``a list of 32 floats``); a block that defines ``test_*`` functions has them called.
- ``ANCHORS`` keep the rules' block numbers honest: a block added before one shifts them.

Besides the blocks: the shown epoch line and run folder are what ``fit`` writes, the shell
commands name scripts and flags the examples accept and extras ``pyproject.toml`` has
(and the README's test command is CI's), and the ``fl.``/``optim.`` names and keywords in
the prose's inline code exist.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import importlib.util
import inspect
import io
import logging
import math
import os
import re
import shlex
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FunctionType, ModuleType
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fnloop
import fnloop as fl
from fnloop import optim

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
DOCS = ("README.md", "docs/guide.md", "examples/README.md")

Namespace = dict[str, Any]


# --------------------------------------------------------------------------- extraction
@dataclasses.dataclass(frozen=True)
class Block:
    """One fenced code block of a doc."""

    doc: str  # path relative to the repository root
    index: int  # 0-based among the doc's blocks of this language
    line: int  # 1-based line of the block's first code line in the doc
    source: str

    @property
    def id(self) -> str:
        first = " ".join(self.source.strip().splitlines()[0].split())[:40]
        return f"{self.doc}-{self.index}: {first}"


def extract_blocks(doc: str, language: str = "python") -> list[Block]:
    """The ```<language> blocks of ``doc``, in order (``""``: the unlabelled ones)."""
    blocks: list[Block] = []
    fence: tuple[str, int] | None = None  # the open block's language and first line
    lines: list[str] = []
    for number, line in enumerate((ROOT / doc).read_text(encoding="utf-8").splitlines(), 1):
        if fence is None:
            if line.startswith("```"):
                fence, lines = (line[3:].strip(), number + 1), []
        elif line.rstrip() == "```":
            if fence[0] == language:
                blocks.append(Block(doc, len(blocks), fence[1], "\n".join(lines) + "\n"))
            fence = None
        else:
            lines.append(line)
    assert fence is None, f"{doc}: a block opened on line {fence[1] - 1} is not closed"
    return blocks


BLOCKS = [block for doc in DOCS for block in extract_blocks(doc)]


# --------------------------------------------------------------------------- preludes
def _digit_like(n: int, seed: int) -> TensorDataset:
    """``n`` random 1x8x8 images with labels 0-9 (the digits' shapes)."""
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(
        torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)
    )


def _make_net() -> nn.Module:
    """A small MLP with dropout for 1x8x8 images and 10 classes."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 10)
    )


def _classify(model: Any, batch: Any) -> dict[str, torch.Tensor]:
    x, y = batch
    logits = model(x)
    return {"loss": F.cross_entropy(logits, y), "acc": (logits.argmax(-1) == y).float().mean()}


class _EndlessDigits(torch.utils.data.IterableDataset):
    """An endless stream of random 1x8x8 images with labels 0-9."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(2)
        while True:
            yield torch.rand(1, 8, 8, generator=g), torch.randint(0, 10, (), generator=g)


def _loaders() -> tuple[DataLoader, DataLoader]:
    # drop_last=True: the docs' advice for compiled steps with dropout.
    train = DataLoader(_digit_like(32, 0), batch_size=16, shuffle=True, drop_last=True)
    return train, DataLoader(_digit_like(16, 1), batch_size=16)


def readme_prelude() -> Namespace:
    """What the README's blocks take as given. Its first block imports the rest."""
    from torch.nn.utils import clip_grad_norm_
    from torch.optim.lr_scheduler import ReduceLROnPlateau, StepLR

    # The train loader the README names is the user's own (examples/digits.py's): its
    # last batch is smaller, so a compiled block must make its own drop_last loader.
    _, valid_loader = _loaders()
    train_loader = DataLoader(_digit_like(40, 0), batch_size=16, shuffle=True)
    x, y = next(iter(train_loader))
    # The side-by-side block: the torch.optim column trains `model` on `loss`, the
    # fnloop.optim column `params` (a copy) on `grads`, the gradients of that loss.
    model = _make_net()
    loss = F.cross_entropy(model(x), y)
    named = dict(model.named_parameters())
    gradients = torch.autograd.grad(loss, list(named.values()), retain_graph=True)
    params = {n: p.detach().clone() for n, p in named.items()}
    return {
        "net": _make_net(),
        "make_net": _make_net,
        "train_loader": train_loader,
        "valid_loader": valid_loader,
        "x": x,
        "y": y,
        "model": model,
        "loss": loss,
        "params": params,
        "grads": dict(zip(named, gradients)),  # `grads = ...`
        "StepLR": StepLR,
        "ReduceLROnPlateau": ReduceLROnPlateau,
        "clip_grad_norm_": clip_grad_norm_,
    }


def guide_prelude() -> Namespace:
    """The guide's blocks are fragments: imports, a model, loaders and step functions."""
    import logging

    from torch.utils.data.distributed import DistributedSampler

    train_loader, valid_loader = _loaders()
    loaders = {"train": train_loader, "valid": valid_loader}

    def fit_args() -> tuple[Any, ...]:
        return fl.TrainState.create(_make_net(), tx=optim.adamw(1e-3)), _classify, loaders

    return {
        "os": os,
        "math": math,
        "logging": logging,
        "torch": torch,
        "F": F,
        "nn": nn,
        "DataLoader": DataLoader,
        "DistributedSampler": DistributedSampler,
        "Subset": torch.utils.data.Subset,
        "fl": fl,
        "optim": optim,
        "make_model": _make_net,
        "module": _make_net(),
        "model": _make_net(),
        "training_step": _classify,
        "validation_step": _classify,
        "step": _classify,
        "batch": next(iter(train_loader)),
        "loader": train_loader,
        "train_loader": train_loader,
        "valid_loader": valid_loader,
        "tl": train_loader,
        "vl": valid_loader,
        "loaders": loaders,
        "train_set": train_loader.dataset,
        "valid_set": valid_loader.dataset,
        "global_batch": 16,
        "epochs": 2,
        "plain_data": {"note": "any plain data", "numbers": [1, 2.5]},
        "stream": DataLoader(_EndlessDigits(), batch_size=16),
        "DOC_FIT_ARGS": fit_args,
        "DOC_FIT_OPTIONS": {"max_epochs": 2},
    }


def examples_prelude() -> Namespace:
    """examples/README.md is about ``examples/digits.py``: its model and step, a small
    slice of the digits, and the run folder ``fit(..., out_dir="runs/digits",
    run_name="digits")`` writes (the one the README describes and loads from)."""
    pytest.importorskip("sklearn", reason="the examples need scikit-learn")
    from sklearn.datasets import load_digits

    sys.path.insert(0, str(EXAMPLES))  # as the README says: PYTHONPATH=examples
    import digits  # type: ignore[import-not-found]

    data = load_digits()
    images = torch.tensor(data.images[:192], dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(data.target[:192], dtype=torch.long)
    train_set = TensorDataset(images[:128], labels[:128])
    valid_set = TensorDataset(images[128:], labels[128:])
    train_loader = DataLoader(train_set, batch_size=64, shuffle=True)
    valid_loader = DataLoader(valid_set, batch_size=64)
    state = fl.TrainState.create(digits.make_model(), tx=optim.adamw(3e-3), device="cpu")
    loaders = {"train": train_loader, "valid": valid_loader}
    with contextlib.redirect_stdout(io.StringIO()):
        fl.fit(
            state,
            digits.training_step,
            loaders,
            max_epochs=1,
            out_dir="runs/digits",
            run_name="digits",
        )
    return {
        "torch": torch,
        "DataLoader": DataLoader,
        "fl": fl,
        "optim": optim,
        "make_model": digits.make_model,
        "training_step": digits.training_step,
        "state": state,
        "train_set": train_set,
        "train_loader": train_loader,
        "valid_loader": valid_loader,
    }


PRELUDES: dict[str, Callable[[], Namespace]] = {
    "README.md": readme_prelude,
    "docs/guide.md": guide_prelude,
    "examples/README.md": examples_prelude,
}


# --------------------------------------------------------------------------- rules
class _Placeholders(ast.NodeTransformer):
    """Makes the docs' ``...`` placeholders runnable; :attr:`unresolved` lists the rest.

    - ``name = ...`` (a value of the reader's choosing) is dropped: the prelude defines
      ``name``.
    - ``[...]`` (a list of the reader's choosing) is ``[]``.
    - A ``...`` argument of a ``fit`` call stands for the arguments the call leaves out:
      at position ``i`` it becomes ``*DOC_FIT_ARGS()[i:]`` and the keywords of
      ``DOC_FIT_OPTIONS`` the call does not give.
    """

    def __init__(self, prelude: Namespace) -> None:
        self.prelude = prelude
        self.unresolved: list[int] = []

    def visit_Assign(self, node: ast.Assign) -> ast.AST | None:
        if _is_ellipsis(node.value) and all(isinstance(t, ast.Name) for t in node.targets):
            names = [t.id for t in node.targets if isinstance(t, ast.Name)]
            missing = [n for n in names if n not in self.prelude]
            assert not missing, f"line {node.lineno}: the prelude does not define {missing}"
            return None
        return self.generic_visit(node)

    def visit_List(self, node: ast.List) -> ast.AST:
        if len(node.elts) == 1 and _is_ellipsis(node.elts[0]):
            return ast.copy_location(ast.List(elts=[], ctx=node.ctx), node)
        return self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> ast.AST:
        name = node.func.attr if isinstance(node.func, ast.Attribute) else None
        name = node.func.id if isinstance(node.func, ast.Name) else name
        dots = [i for i, arg in enumerate(node.args) if _is_ellipsis(arg)]
        fills = "DOC_FIT_ARGS" in self.prelude and "DOC_FIT_OPTIONS" in self.prelude
        if name == "fit" and fills and len(dots) == 1 and dots[0] == len(node.args) - 1:
            i = dots[0]
            rest = ast.parse(f"DOC_FIT_ARGS()[{i}:]", mode="eval").body
            node.args[i] = ast.Starred(value=rest, ctx=ast.Load())
            given = {k.arg for k in node.keywords}
            options = self.prelude["DOC_FIT_OPTIONS"]
            node.keywords += [
                ast.keyword(arg=k, value=ast.parse(f"DOC_FIT_OPTIONS[{k!r}]", mode="eval").body)
                for k in options
                if k not in given
            ]
        return self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> ast.AST:
        if node.value is Ellipsis:
            self.unresolved.append(node.lineno)
        return node


def _is_ellipsis(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and node.value is Ellipsis


#: Blocks that are schematic on purpose, with why: a ``...`` no placeholder rule resolves
#: skips them. Any other block with such a ``...`` fails (a skip would hide it for good).
SCHEMATIC: dict[tuple[str, int], str] = {}

#: Blocks that show two programs side by side: each column runs on its own, left first.
#: The right column starts where the first line's second ``#`` comment does.
SIDE_BY_SIDE: dict[tuple[str, int], str] = {
    ("README.md", 3): "torch.optim (left) next to fnloop.optim (right)",
}


def _columns(source: str) -> list[str]:
    """The left and right programs of a side-by-side block: a line's right part starts at
    the first line's second ``#`` after a space (a longer left line has none)."""
    lines = source.splitlines()
    split = lines[0].index("#", 1)
    left, right = [], []
    for line in lines:
        cut = split if line[split - 1 : split] == " " else len(line)
        left.append(line[:cut].rstrip())
        right.append(line[cut:])
    return ["\n".join(left) + "\n", "\n".join(right) + "\n"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _single_process_torchrun() -> dict[str, str]:
    """The variables ``torchrun --nproc_per_node=1`` sets."""
    return {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
    }


#: Environment variables a block runs with (and the process group it leaves is destroyed).
ENVIRONMENT: dict[tuple[str, int], Callable[[], dict[str, str]]] = {
    ("docs/guide.md", 15): _single_process_torchrun,  # section 7, torchrun
}

#: Optional packages a block needs: it is skipped without them.
REQUIRES: dict[tuple[str, int], str] = {
    ("docs/guide.md", 9): "tensorboard",  # the TensorBoard callback
}


# --------------------------------------------------------------------------- claims
def _check_readme_fit(ns: Namespace, before: Namespace) -> None:
    # "any nn.Module; fit leaves it unchanged"
    for name, t in ns["net"].state_dict().items():
        torch.testing.assert_close(t, before["net"][name], rtol=0, atol=0)
    state = ns["state"]
    assert state.ema is not None and 1 <= state.epoch <= 20
    # The epoch line shown after this block: "[ 3/20] loss:0.2121 acc:0.9395 | (val) ..."
    shown = extract_blocks("README.md", "")[0].source.strip()
    pattern = re.escape(shown)
    number = r"(?:\d[\d.e+-]*|nan)"  # as f"{value:.4g}" prints it: 0.9611, 0, 2.5e-05
    pattern = re.sub(r"\d+(\\\.\d+)?", lambda m: number if m.group(1) else r"\s*\d+", pattern)
    log = (Path("runs/demo") / "run_training.log").read_text(encoding="utf-8")
    assert re.search(pattern, log), f"no line like {shown!r} in the log:\n{log}"


def _snapshot_state(ns: Namespace) -> Namespace:
    return {"params": {n: t.clone() for n, t in ns["state"].params.items()}}


def _check_readme_step(ns: Namespace, before: Namespace) -> None:
    # "`state` is unchanged afterwards"
    for name, t in ns["state"].params.items():
        torch.testing.assert_close(t, before["params"][name], rtol=0, atol=0)
    assert set(ns["metrics"]) == {"loss", "acc"}


def _check_readme_sweep(ns: Namespace, before: Namespace) -> None:
    # "metrics: a list of 32 floats per name"
    for metrics in (ns["train_metrics"], ns["valid_metrics"]):
        for values in metrics.values():
            assert len(values) == 32 and all(isinstance(v, float) for v in values)
    # "Each model keeps its own constant learning rate"
    lrs = torch.logspace(-4, -2, 32).tolist()
    for state, lr in zip(ns["states"], lrs):
        assert float(optim.learning_rates(state.opt_state)[0]) == pytest.approx(lr)
    # "a plain state_dict, as best_model.pt"
    ns["make_net"]().load_state_dict(torch.load("best_of_sweep.pt", weights_only=True))
    assert ns["new"].epoch == 20


def _check_readme_side_by_side(ns: Namespace, before: Namespace) -> None:
    # The two columns are the same program: one AdamW update from the same weights and
    # gradients gives the same weights ("torch.optim's exact update rules").
    for name, p in ns["model"].named_parameters():
        torch.testing.assert_close(ns["params"][name], p.detach(), rtol=1e-6, atol=1e-7)
        assert not torch.equal(ns["params"][name], before["params"][name]), name


def _check_guide_callbacks(ns: Namespace, before: Namespace) -> None:
    # The callbacks defined in the block do what they say in a fit: the confusion matrix
    # is logged to "fnloop.run.<run_name>" (the console and the run's log file).
    state = fl.TrainState.create(_make_net(), tx=optim.adamw(1e-3))
    fl.fit(
        state,
        ns["training_step"],
        ns["loaders"],
        max_epochs=1,
        validation_step=ns["validation_step"],
        callbacks=[ns["ConfusionMatrix"]()],
        out_dir="runs/confusion",
    )
    log = Path("runs/confusion/run_training.log").read_text(encoding="utf-8")
    assert "Confusion matrix:\ntensor([[" in log, log
    # "mean: train/grad_norm"; the warning on a large norm (a micro-batch has none); the
    # own periodic checkpoint "after an update, once" (not at the micro-batches after it).
    trained = fl.fit(
        fl.TrainState.create(_make_net(), tx=optim.adamw(1e-3)),
        ns["train_step"],
        ns["loaders"],
        max_epochs=1,
        callbacks=[ns["WarnLargeNorm"]()],
        log_to_console=False,
    )
    assert len(trained.history["train"]["grad_norm"]) == 1
    warned = []
    handler = logging.Handler()
    handler.emit = lambda record: warned.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("fnloop.run.run")
    logger.addHandler(handler)
    try:
        for outputs in ({"grad_norm": torch.tensor(12.0)}, {"grad_norm": torch.tensor(3.0)}, {}):
            ns["WarnLargeNorm"]().on_train_batch_end(trained, outputs, None, 0)
    finally:
        logger.removeHandler(handler)
    assert warned == ["Large gradient norm: 12.00"], warned
    saved = Path("runs/x/step-1000.pt")
    saved.unlink(missing_ok=True)
    for micro_step in (0, 1):
        at_1000 = trained.replace(step=1000, micro_step=micro_step)
        ns["EveryK"]().on_train_batch_end(at_1000, {}, None, 0)
        assert saved.is_file() == (micro_step == 0), micro_step
        saved.unlink(missing_ok=True)


def _check_guide_checkpoints(ns: Namespace, before: Namespace) -> None:
    # "plain state dict (.safetensors too)"; "and what save_checkpoint got"
    module = ns["module"]
    assert torch.load("model.pt", weights_only=True).keys() == module.state_dict().keys()
    assert ns["loaded"].extra["anything"] == ns["plain_data"]
    if importlib.util.find_spec("safetensors") is not None:
        fl.save_model("model.safetensors", ns["state"], use_ema=True)
        fl.load_model("model.safetensors", module)


def _check_guide_stream(ns: Namespace, before: Namespace) -> None:
    # "each time it is iterated, yields the next n batches of the one stream": the block's
    # fit trained five epochs of 100 steps on the endless stream
    epochs = ns["Epochs"](iter(range(10)), n=3)
    assert len(epochs) == 3
    assert [list(epochs) for _ in range(4)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    trained = ns["state"]
    assert trained.epoch == before["epoch"] + 5 and trained.step == before["step"] + 500


def _check_guide_lower_rate(ns: Namespace, before: Namespace) -> None:
    # "after fit has loaded the checkpoint": a resumed run trains on at the new rate, and
    # its checkpoint holds that rate
    state, training_step, loaders = ns["DOC_FIT_ARGS"]()
    fl.fit(state, training_step, loaders, max_epochs=1, out_dir="runs/lower", progress=False)
    state = fl.fit(
        state,
        training_step,
        loaders,
        max_epochs=2,
        out_dir="runs/lower",
        callbacks=[ns["LowerRate"]()],
        progress=False,
    )
    assert state.epoch == 2 and optim.learning_rates(state.opt_state)[0].item() == 1e-4
    assert (
        "Learning rate updated: 0.001000 → 0.000100"
        in Path("runs/lower/run_training.log").read_text()
    )


def _check_guide_custom_resume(ns: Namespace, before: Namespace) -> None:
    # "stopped after an epoch and run again, it ends the same" (bit for bit)
    train = ns["train"]
    assert ns["state"].epoch == ns["epochs"] == 2
    runs = []
    for stops in ([2], [1, 2]):
        os.remove("last.pt")
        torch.manual_seed(0)
        for epochs in stops:
            state = train(epochs)
        runs.append(state)
    assert runs[0].step == runs[1].step == 4
    for a, b in zip(fl._tree.tree_leaves(runs[0]), fl._tree.tree_leaves(runs[1]), strict=True):
        assert torch.equal(a, b)


def _check_guide_sweep(ns: Namespace, before: Namespace) -> None:
    # "[0.91, 0.95, ...], one per model"
    accs = ns["valid_metrics"]["acc"]
    assert len(accs) == 32 and all(isinstance(a, float) for a in accs)
    ns["make_model"]().load_state_dict(torch.load("best_of_sweep.pt", weights_only=True))
    # "`train_epoch` advances `state.step` but leaves `state.epoch` and `state.history`"
    stacked = ns["stacked"]
    assert stacked.step == ns["epochs"] * len(ns["train_loader"])
    assert (stacked.epoch, stacked.history) == (0, {})


def _check_guide_schedule(ns: Namespace, before: Namespace) -> None:
    # "A linear warm-up from 0, then a cosine decay to 0 at `total` (0 from there on),
    # compiled into one graph": the rates of the same schedule in plain Python, and one
    # graph for every update count
    from torch._dynamo.testing import CompileCounter

    schedule = ns["warmup_cosine"]

    def plain(t: int) -> float:
        x = min(max((t - 100) / 900, 0.0), 1.0)
        return 3e-3 * (t / 100 if t < 100 else 0.5 * (1 + math.cos(math.pi * x)))

    assert plain(0) == plain(1000) == plain(1200) == plain(1900) == 0.0
    for t in (0, 1, 50, 99, 100, 101, 550, 999, 1000, 1200, 1900):
        rate = float(schedule(torch.tensor(t, dtype=torch.float64)))
        assert math.isclose(rate, plain(t), rel_tol=1e-12, abs_tol=1e-18), t
    # (dynamo reads the source file of the code it traces: not the Markdown file)
    code = schedule.__code__.replace(co_filename="<docs/guide.md>")
    schedule = FunctionType(code, schedule.__globals__, "", schedule.__defaults__)
    counter = CompileCounter()
    compiled = torch.compile(schedule, backend=counter)
    for t in range(0, 1200, 37):
        compiled(torch.tensor(t, dtype=torch.float64))
    assert counter.frame_count == 1


def _check_guide_gan(ns: Namespace, before: Namespace) -> None:
    # "the gradients reach the generator only": one more G step leaves D's weights as
    # they were, and each state took one update per batch
    g_state, d_state, z = ns["g_state"], ns["d_state"], ns["z"]
    assert g_state.step == d_state.step == len(ns["real_batches"])
    d_before = {k: v.clone() for k, v in d_state.params.items()}
    g_after, metrics = ns["train_g"](g_state, (z, d_state.params, d_state.buffers))
    assert torch.isfinite(metrics["loss"]) and g_after.step == g_state.step + 1
    assert all(torch.equal(v, d_before[k]) for k, v in d_state.params.items())
    assert not torch.equal(g_after.params["0.weight"], g_state.params["0.weight"])


def _check_guide_steps(ns: Namespace, before: Namespace) -> None:
    # "their options read as attributes (`train_step.donate`), and
    # `inspect.unwrap(train_step)` is the `fl.TrainStep` that holds them"
    train_step = ns["train_step"]
    assert (train_step.accumulation_steps, train_step.donate) == (1, False)
    assert isinstance(inspect.unwrap(train_step), fl.TrainStep)
    assert ns["new_state"].step == ns["state"].step + 1 and "loss" in ns["metrics"]


def _check_guide_fit(ns: Namespace, before: Namespace) -> None:
    # "max_epochs=50, ... out_dir="runs/x", run_name="x"": trained, and the run folder
    assert ns["state"].epoch == 50
    assert Path("runs/x/x_training.log").is_file() and Path("runs/x/best_model.pt").is_file()


def _check_guide_torchrun(ns: Namespace, before: Namespace) -> None:
    # A world of one process trained; the process group is the one the block made.
    assert ns["world"] == 1 and ns["state"].epoch == ns["DOC_FIT_OPTIONS"]["max_epochs"]
    assert torch.distributed.get_backend() == ("nccl" if ns["on_gpu"] else "gloo")


def _check_examples_sweep(ns: Namespace, before: Namespace) -> None:
    # "one float per model"
    accs = ns["valid_metrics"]["acc"]
    assert len(accs) == 4 and all(isinstance(a, float) for a in accs)


#: Per block: what to record before it runs, and what its comments claim after.
CHECKS: dict[tuple[str, int], tuple[Callable[[Namespace], Namespace], Callable[..., None]]] = {
    ("README.md", 0): (lambda ns: {"net": ns["net"].state_dict()}, _check_readme_fit),
    ("README.md", 1): (_snapshot_state, _check_readme_step),
    ("README.md", 2): (lambda ns: {}, _check_readme_sweep),
    ("README.md", 3): (
        lambda ns: {"params": dict(ns["params"])},
        _check_readme_side_by_side,
    ),
    ("docs/guide.md", 1): (lambda ns: {}, _check_guide_steps),
    ("docs/guide.md", 5): (lambda ns: {}, _check_guide_schedule),
    ("docs/guide.md", 6): (lambda ns: {}, _check_guide_gan),
    ("docs/guide.md", 8): (lambda ns: {}, _check_guide_fit),
    ("docs/guide.md", 9): (lambda ns: {}, _check_guide_callbacks),
    ("docs/guide.md", 10): (
        lambda ns: {"epoch": ns["state"].epoch, "step": ns["state"].step},
        _check_guide_stream,
    ),
    ("docs/guide.md", 11): (lambda ns: {}, _check_guide_checkpoints),
    ("docs/guide.md", 12): (lambda ns: {}, _check_guide_lower_rate),
    ("docs/guide.md", 13): (lambda ns: {}, _check_guide_custom_resume),
    ("docs/guide.md", 14): (lambda ns: {}, _check_guide_sweep),
    ("examples/README.md", 3): (lambda ns: {}, _check_examples_sweep),
    ("docs/guide.md", 15): (lambda ns: {}, _check_guide_torchrun),
}


# --------------------------------------------------------------------------- running
@contextlib.contextmanager
def _environment(variables: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _eager_compile(*args: Any, **kwargs: Any) -> Any:
    kwargs.setdefault("backend", "eager")
    return _torch_compile(*args, **kwargs)


_torch_compile = torch.compile


class DocSession:
    """One doc's namespace and working directory; runs its blocks in order."""

    def __init__(self, doc: str, cwd: Path) -> None:
        self.doc = doc
        self.cwd = cwd
        self.blocks = [b for b in BLOCKS if b.doc == doc]
        self.outcomes: dict[int, BaseException | None] = {}
        with self.inside():
            torch.manual_seed(0)
            self.prelude = PRELUDES[doc]()
        self.namespace: Namespace = dict(self.prelude)

    @contextlib.contextmanager
    def inside(self) -> Iterator[None]:
        old, threads = Path.cwd(), torch.get_num_threads()
        os.chdir(self.cwd)
        torch.compile = _eager_compile  # type: ignore[assignment]
        torch.set_num_threads(1)  # tiny models: more threads only add synchronisation
        try:
            yield
        finally:
            torch.set_num_threads(threads)
            torch.compile = _torch_compile
            os.chdir(old)

    def run(self, index: int) -> None:
        """Runs block ``index`` (after any earlier block not run yet)."""
        for block in self.blocks[:index]:
            if block.index not in self.outcomes:
                try:
                    self._run(block)
                except (Exception, pytest.skip.Exception) as e:
                    self.outcomes[block.index] = e
        failed = [i for i, e in self.outcomes.items() if isinstance(e, Exception)]
        try:
            self._run(self.blocks[index])
        except Exception as e:
            self.outcomes[index] = e
            if failed:
                e.add_note(f"(earlier blocks of {self.doc} failed: {failed}; this may follow)")
            raise

    def _run(self, block: Block) -> None:
        key = (block.doc, block.index)
        self.outcomes[block.index] = None
        if key in REQUIRES:
            pytest.importorskip(REQUIRES[key])
        if key in ENVIRONMENT and not torch.distributed.is_available():
            pytest.skip("this torch build has no torch.distributed")
        parts = _columns(block.source) if key in SIDE_BY_SIDE else [block.source]
        trees = []
        for part in parts:
            tree = ast.parse(part, filename=block.doc)
            placeholders = _Placeholders(self.prelude)
            tree = ast.fix_missing_locations(placeholders.visit(tree))
            if placeholders.unresolved:
                where = f"{block.doc}:{block.line + placeholders.unresolved[0] - 1}"
                if key not in SCHEMATIC:
                    pytest.fail(
                        f"{where}: a `...` that no placeholder rule resolves. Make the "
                        f"block runnable, or list it in SCHEMATIC with the reason.",
                        pytrace=False,
                    )
                pytest.skip(f"schematic ({SCHEMATIC[key]}): `...` on {where}")
            ast.increment_lineno(tree, block.line - 1)
            trees.append(tree)
        prepare, check = CHECKS.get(key, (lambda ns: {}, lambda ns, before: None))
        environment = ENVIRONMENT.get(key, dict)()
        out = io.StringIO()
        with self.inside(), _environment(environment):
            try:
                with contextlib.redirect_stdout(out):
                    before = prepare(self.namespace)
                    defined = set(self.namespace)
                    for tree in trees:
                        exec(compile(tree, str(ROOT / block.doc), "exec"), self.namespace)
                    for name in sorted(set(self.namespace) - defined):
                        if name.startswith("test_") and callable(self.namespace[name]):
                            self.namespace[name]()  # a pytest in the docs
                    check(self.namespace, before)
            finally:
                sys.stdout.write(out.getvalue())


@pytest.fixture(scope="module")
def sessions() -> Iterator[dict[str, DocSession]]:
    """The docs' sessions, by doc, opened by the first test that needs one."""
    yield {}
    if str(EXAMPLES) in sys.path:  # put there by examples_prelude
        sys.path.remove(str(EXAMPLES))


def _session(
    sessions: dict[str, DocSession], doc: str, factory: pytest.TempPathFactory
) -> DocSession:
    if doc not in sessions:
        sessions[doc] = DocSession(doc, factory.mktemp(Path(doc).stem))
    return sessions[doc]


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_doc_block(
    block: Block, sessions: dict[str, DocSession], tmp_path_factory: pytest.TempPathFactory
) -> None:
    _session(sessions, block.doc, tmp_path_factory).run(block.index)


def test_a_stray_ellipsis_fails_a_block_not_declared_schematic(tmp_path: Path) -> None:
    """A ``...`` that no placeholder rule resolves (here an argument of ``min``) fails the
    block; it was skipped, which hid a broken block and every check on it."""
    session = DocSession("docs/guide.md", tmp_path)
    block = Block("docs/guide.md", len(session.blocks), 7, "x = min(..., 1)\n")
    assert (block.doc, block.index) not in SCHEMATIC
    with pytest.raises(BaseException) as info:  # pytest's skip is not an Exception
        session._run(block)
    assert info.type is pytest.fail.Exception, info.value
    assert "docs/guide.md:7: a `...` that no placeholder rule resolves" in str(info.value)


#: What each block the rules above name by number contains: a block added or removed
#: before it shifts the numbers, and this says so.
ANCHORS: dict[tuple[str, int], str] = {
    ("README.md", 0): "def training_step(model, batch):",
    ("README.md", 1): "fl.make_train_step(training_step)",
    ("README.md", 2): "torch.compile(",
    ("README.md", 3): "# torch.optim ",
    ("docs/guide.md", 1): "train_step = fl.make_train_step(training_step, accumulation_steps=1",
    ("docs/guide.md", 5): "def warmup_cosine(t, lr=3e-3",
    ("docs/guide.md", 6): "fl.BoundModel(d_state.module, d_params, d_buffers)",
    ("docs/guide.md", 8): 'out_dir="runs/x", run_name="x"',
    ("docs/guide.md", 9): "class ConfusionMatrix",
    ("docs/guide.md", 10): "class Epochs:",
    ("docs/guide.md", 11): 'fl.save_model("model.pt", state, use_ema=True)',
    ("docs/guide.md", 12): "class LowerRate(",
    ("docs/guide.md", 13): "def train(epochs: int",
    ("docs/guide.md", 14): "fl.stack_states(states)",
    ("docs/guide.md", 15): "LOCAL_RANK",
    ("examples/README.md", 3): "learning_rates = ",
}


def test_rules_name_the_right_blocks() -> None:
    blocks = {(b.doc, b.index): b.source for b in BLOCKS}
    assert all(doc in {b.doc for b in BLOCKS} for doc in DOCS)
    for key in [*SCHEMATIC, *SIDE_BY_SIDE, *ENVIRONMENT, *REQUIRES, *CHECKS]:
        assert key in ANCHORS, f"{key}: give it an anchor"
    for key, anchor in ANCHORS.items():
        assert anchor in blocks.get(key, ""), f"{key} no longer holds {anchor!r}"


def test_examples_run_folder_listing(
    sessions: dict[str, DocSession], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """examples/README.md's "The run folder": what ``fit(..., out_dir="runs/digits",
    run_name="digits")`` writes (the prelude's run), and metrics.csv's columns."""
    folder = _session(sessions, "examples/README.md", tmp_path_factory).cwd / "runs/digits"
    listing = next(
        b.source for b in extract_blocks("examples/README.md", "") if "runs/" in b.source
    )
    lines = listing.strip().splitlines()
    assert lines[0] == "runs/digits/", lines[0]
    for line in lines[1:]:
        name, _, what = line.strip().partition(" ")
        if name == "history.png" and importlib.util.find_spec("matplotlib") is None:
            continue
        assert list(folder.glob(name)), f"{name} not written: {sorted(folder.rglob('*'))}"
        if name == "metrics.csv":
            columns = what.split(": ")[1].split(", ")
            header = (folder / name).read_text(encoding="utf-8").splitlines()[0]
            assert header.split(",") == columns, header


# --------------------------------------------------------------------------- commands
def _load_example(name: str) -> ModuleType:
    """Imports ``examples/<name>`` (the examples are not a package)."""
    spec = importlib.util.spec_from_file_location(f"docs_example_{name[:-3]}", EXAMPLES / name)
    assert spec is not None and spec.loader is not None, name
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _commands(doc: str) -> list[str]:
    """The shell commands of ``doc``: its ```bash lines and inline `python ...` /
    `torchrun ...` / `pip ...` spans, without comments."""
    lines = [line for block in extract_blocks(doc, "bash") for line in block.source.splitlines()]
    text = (ROOT / doc).read_text(encoding="utf-8")
    lines += re.findall(r"`((?:python|torchrun|pip) [^`]+)`", text)
    lines += [f"python examples/{span}" for span in re.findall(r"`(\w+\.py --[^`]+)`", text)]
    commands = []
    for line in lines:
        for command in line.split("#")[0].split("&&"):
            if command.strip():
                commands.append(command.strip())
    return commands


def _extras() -> set[str]:
    """The optional-dependency groups of ``pyproject.toml``."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    section = text.split("[project.optional-dependencies]")[1].split("\n[")[0]
    return set(re.findall(r"^([\w-]+) = \[", section, re.MULTILINE))


@pytest.mark.parametrize("doc", DOCS)
def test_doc_commands(doc: str) -> None:
    """Every command's script exists and accepts its flags; every pip extra exists."""
    commands = _commands(doc)
    assert commands, f"{doc} shows no command"
    for command in commands:
        words = shlex.split(command)
        for extras in re.findall(r"\.\[([\w,-]+)\]", command):
            assert set(extras.split(",")) <= _extras(), command
        scripts = [i for i, w in enumerate(words) if w.startswith("examples/")]
        if not scripts:
            continue
        script = words[scripts[0]]
        assert (ROOT / script).is_file(), command
        pytest.importorskip("sklearn", reason="the examples need scikit-learn")
        _load_example(Path(script).name).parse_args(words[scripts[0] + 1 :])


def test_readme_test_command_is_the_one_ci_runs() -> None:
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    (line,) = [
        b for b in extract_blocks("README.md", "bash")[0].source.splitlines() if "pytest" in b
    ]
    assert line.split("#")[0].strip() in ci


def test_readme_optional_extras_exist() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    (listed,) = re.findall(r"^Optional extras: (.*)$", text, re.MULTILINE)
    assert set(re.findall(r"`([\w-]+)`", listed)) <= _extras(), listed


def test_examples_flags_table() -> None:
    """examples/README.md: both scripts take the flags of its table ("Both scripts take
    these flags"), and the scripts' defaults are the ones it names."""
    pytest.importorskip("sklearn", reason="the examples need scikit-learn")
    text = (ROOT / "examples/README.md").read_text(encoding="utf-8")
    table = text.split("Both scripts take these flags")[1].split("\n\n")[1]
    flags = re.findall(r"`(--[\w-]+)( [A-Z]+)?`", table)
    assert len(flags) >= 8, table
    values = {" N": "3", " X": "0.1", " DIR": "somewhere"}
    scripts = re.findall(r"^\| `(\w+\.py)` \|", text, re.MULTILINE)
    assert scripts == ["digits.py", "anomaly.py"], scripts
    for script in scripts:
        parse_args = _load_example(script).parse_args
        for flag, metavar in flags:
            parse_args([flag, values[metavar]] if metavar else [flag])
        patience = re.search(rf"`{script}` (\d+)", table)
        assert patience, f"{script}'s default patience is not in the table"
        assert parse_args([]).patience == int(patience.group(1)), script
        # "the run folder (default `runs/<name>`)"; "`--fast` therefore writes to
        # `runs/<name>-fast` unless you pass `--out-dir`"
        assert "(default `runs/<name>`)" in table and "`runs/<name>-fast`" in text
        name = script.removesuffix(".py")
        assert parse_args([]).out_dir == f"runs/{name}"
        assert parse_args(["--fast"]).out_dir == f"runs/{name}-fast"


# --------------------------------------------------------------------------- inline code
def _inline_code(doc: str) -> list[tuple[int, ast.Module]]:
    """The `spans` of ``doc``'s prose (outside fenced blocks) that parse as Python,
    with their line numbers."""
    spans = []
    fenced = False
    for number, line in enumerate((ROOT / doc).read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            for span in re.findall(r"`([^`]+)`", line):
                with contextlib.suppress(SyntaxError):
                    spans.append((number, ast.parse(span)))
    return spans


_ROOTS: Namespace = {"fl": fl, "fnloop": fnloop, "optim": optim}


def _resolve(node: ast.expr) -> Any:
    """The object an attribute chain rooted at ``fl``, ``fnloop`` or ``optim`` names;
    ``None`` for any other expression."""
    if isinstance(node, ast.Name):
        return _ROOTS.get(node.id)
    if isinstance(node, ast.Attribute):
        owner = _resolve(node.value)
        if owner is not None:
            assert hasattr(owner, node.attr), f"{ast.unparse(node)} does not exist"
            return getattr(owner, node.attr)
    return None


@pytest.mark.parametrize("doc", DOCS)
def test_inline_code_names_exist(doc: str) -> None:
    """`fl.x.y` names in the prose exist, and a call there uses keywords its callable
    takes (a renamed function or argument breaks prose too, not only blocks)."""
    checked = 0
    for number, expr in _inline_code(doc):
        for node in ast.walk(expr):
            where = f"{doc}:{number}: `{ast.unparse(expr)}`"
            try:
                target = _resolve(node) if isinstance(node, (ast.Name, ast.Attribute)) else None
                if isinstance(node, ast.Call) and (func := _resolve(node.func)) is not None:
                    params = inspect.signature(func).parameters
                    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
                        unknown = {k.arg for k in node.keywords if k.arg} - set(params)
                        assert not unknown, f"{ast.unparse(node.func)} takes no {unknown}"
            except AssertionError as e:
                raise AssertionError(f"{where}: {e}") from None
            checked += target is not None
    assert checked, f"no fl/optim names in {doc}'s prose"
