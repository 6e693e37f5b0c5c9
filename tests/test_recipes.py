"""Whole recipes, as an experienced PyTorch user writes them, against hand-written torch loops.

Each option is tested alone elsewhere; here they run together in float64 on the CPU:
a small GPT-style language model (tied embedding and head, dropout in causal attention,
label smoothing, AdamW with decay / no-decay groups, linear warm-up then cosine decay,
clipping, accumulation, activation checkpointing) and a ResNet-style CNN in
``channels_last`` (BatchNorm, SGD with Nesterov momentum and weight decay, a
``MultiStepLR`` schedule, an EMA of the weights evaluated as fnloop documents it).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.checkpoint import checkpoint

import fnloop as fl
from fnloop import optim

V, D, HEADS, T = 23, 8, 2, 6
LR, WD, WARM, UPDATES, ETA_MIN = 3e-3, 0.1, 3, 8, 3e-4


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.mlp = nn.Sequential(
            nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D), nn.Dropout(0.1)
        )

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (
            z.view(b, t, HEADS, D // HEADS).transpose(1, 2)
            for z in self.qkv(self.ln1(x)).split(D, dim=-1)
        )
        p = 0.1 if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, D))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self, activation_checkpointing: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.pos = nn.Embedding(V, D), nn.Embedding(T, D)
        self.drop = nn.Dropout(0.1)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.ln_f = nn.LayerNorm(D)
        self.head = nn.Linear(D, V, bias=False)
        self.head.weight = self.emb.weight
        self.ckpt = activation_checkpointing
        self.double()

    def forward(self, idx):
        x = self.drop(self.emb(idx) + self.pos(torch.arange(idx.shape[1])))
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.ckpt else block(x)
        return self.head(self.ln_f(x))


def lm_loss(logits, y):
    return F.cross_entropy(logits.reshape(-1, V), y.reshape(-1), label_smoothing=0.1)


def lm_step(model, batch):
    x, y = batch
    return {"loss": lm_loss(model(x), y)}


def no_decay(module):
    """Biases, norms and embeddings: the tied weight goes by the embedding's name."""
    kinds = (nn.Embedding, nn.LayerNorm)
    owners = {n for n, m in module.named_modules() if isinstance(m, kinds)}
    return {
        n for n, p in module.named_parameters() if p.ndim <= 1 or n.rpartition(".")[0] in owners
    }


def fl_optimizer(skip):
    schedule = optim.join_schedules(
        [
            optim.linear_schedule(LR, start_factor=0.1, total_iters=WARM),
            optim.cosine_schedule(LR, t_max=UPDATES - WARM, eta_min=ETA_MIN),
        ],
        boundaries=[WARM],
    )
    return optim.chain(
        optim.clip_by_global_norm(1.0),
        optim.partition(
            {
                "decay": optim.adamw(schedule, weight_decay=WD),
                "no_decay": optim.adamw(schedule, weight_decay=0.0),
            },
            lambda n: "no_decay" if n in skip else "decay",
        ),
    )


def hand_loop(module, batches, rates=None):
    """AdamW (fused) with two groups, ``(loss / 2).backward()`` per micro-batch, clipping;
    the rates of ``SequentialLR(LinearLR, CosineAnnealingLR)``, or ``rates`` if given."""
    model = copy.deepcopy(module).train()
    skip = no_decay(module)
    named = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in named if n not in skip], "weight_decay": WD},
        {"params": [p for n, p in named if n in skip], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=LR, fused=True)
    sched = torch.optim.lr_scheduler.SequentialLR(
        opt,
        [
            torch.optim.lr_scheduler.LinearLR(opt, 0.1, 1.0, WARM),
            torch.optim.lr_scheduler.CosineAnnealingLR(opt, UPDATES - WARM, ETA_MIN),
        ],
        milestones=[WARM],
    )
    torch.manual_seed(7)
    losses, used = [], []
    for u in range(UPDATES):
        if rates is not None:
            for group, rate in zip(opt.param_groups, rates[u]):
                group["lr"] = rate
        used.append([g["lr"] for g in opt.param_groups])
        for x, y in batches[2 * u : 2 * u + 2]:
            loss = lm_loss(model(x), y)
            (loss / 2).backward()
            losses.append(loss.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if rates is None:
            sched.step()
        opt.zero_grad()
    return model, losses, used


@pytest.mark.parametrize("activation_checkpointing", [False, True])
def test_gpt_recipe_matches_a_hand_loop(activation_checkpointing):
    module = TinyGPT(activation_checkpointing)
    assert module.head.weight is module.emb.weight
    state = fl.TrainState.create(module, tx=fl_optimizer(no_decay(module))).clone()
    # The tied weight is one tensor of the state, under the first name.
    assert "head.weight" not in state.params and "emb.weight" in state.params
    assert len(state.params) == len(list(module.parameters()))
    step = fl.make_train_step(lm_step, accumulation_steps=2, donate=True)
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(0, V, (2 * UPDATES, 3, T + 1), generator=g)
    batches = [(s[:, :-1], s[:, 1:]) for s in seq]

    torch.manual_seed(7)
    losses, rates = [], []
    for u in range(UPDATES):
        rates.append([float(r) for r in optim.learning_rates(state.opt_state)])
        for batch in batches[2 * u : 2 * u + 2]:
            state, metrics = step(state, batch)
            losses.append(metrics["loss"])
    assert int(state.step) == UPDATES

    # Given fnloop's rates, torch's loop ends with the same weights, bit for bit (the
    # tied weight updated once, with the gradient of both uses).
    model, ref_losses, _ = hand_loop(module, batches, rates)
    assert torch.equal(torch.stack(losses), torch.stack(ref_losses))
    for n, p in model.named_parameters():
        assert torch.equal(state.params[n], p.detach()), n
    # torch's own scheduler gives the same rates to rounding (CosineAnnealingLR is
    # recursive), and so the same weights to rounding.
    model, _, torch_rates = hand_loop(module, batches)
    for ours, theirs in zip(rates, torch_rates):
        assert ours == pytest.approx(theirs, rel=1e-14, abs=0.0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(state.params[n], p.detach(), rtol=1e-10, atol=1e-13)


class Res(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.b2(self.c2(F.relu(self.b1(self.c1(x))))))


def resnet():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        Res(4),
        nn.MaxPool2d(2),
        Res(4),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 5),
    )
    return net.double().to(memory_format=torch.channels_last)


def classify(model, batch):
    x, y = batch
    logits = model(x)
    return {"loss": F.cross_entropy(logits, y), "logits": logits}


@pytest.mark.parametrize("fused", [True, False])
def test_channels_last_resnet_sgd_nesterov_multistep_ema_matches_torch(fused):
    steps, decay = 8, 0.8
    module = resnet()
    ref = copy.deepcopy(module)
    kind = {"fused": True} if fused else {"foreach": True}
    opt = torch.optim.SGD(
        ref.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, **kind
    )
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [3, 6], 0.1)
    ema = AveragedModel(ref, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=False)
    tx = optim.sgd(
        optim.multistep_schedule(0.1, [3, 6], 0.1), momentum=0.9, nesterov=True, weight_decay=5e-4
    )
    state = fl.TrainState.create(module, tx=tx, ema_decay=decay).clone()
    step = fl.make_train_step(classify, donate=True)
    g = torch.Generator().manual_seed(1)
    x = [
        torch.randn(6, 3, 6, 6, generator=g, dtype=torch.float64).contiguous(
            memory_format=torch.channels_last
        )
        for _ in range(steps + 1)
    ]
    y = torch.randint(0, 5, (steps + 1, 6), generator=g)
    for t in range(steps):
        assert optim.learning_rates(state.opt_state) == [opt.param_groups[0]["lr"]]
        F.cross_entropy(ref(x[t]), y[t]).backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        ema.update_parameters(ref)
        state, _ = step(state, (x[t], y[t]))
    assert state.params["0.weight"].is_contiguous(memory_format=torch.channels_last)
    for n, p in ref.named_parameters():
        assert torch.equal(state.params[n], p.detach()), n
        assert torch.equal(state.ema[n], dict(ema.module.named_parameters())[n].detach()), n
    for n, b in ref.named_buffers():
        assert torch.equal(state.buffers[n], b), n
    # Evaluation uses the EMA weights with the training run's BatchNorm statistics
    # (AveragedModel(use_buffers=False) keeps the buffers it copied at the start).
    evaluated = copy.deepcopy(ema.module)
    evaluated.load_state_dict(dict(ref.named_buffers()), strict=False)
    with torch.no_grad():
        expected = evaluated.eval()(x[steps])
    got = fl.make_eval_step(classify)(state, (x[steps], y[steps]))["logits"]
    assert torch.equal(got, expected)


class Crash(Exception):
    pass


class CrashAt(fl.callbacks.Callback):
    def __init__(self, epoch, batch):
        self.epoch, self.batch = epoch, batch

    def on_train_batch_end(self, state, outputs, batch, batch_idx):
        if state.epoch + 1 == self.epoch and batch_idx == self.batch:
            raise Crash


def fit_resnet(out_dir, callbacks=()):
    """3 epochs of 4 batches with accumulation over 3: windows cross the epoch ends."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 3, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (40,), generator=g)

    def collate(examples):
        xb, yb = torch.utils.data.default_collate(examples)
        return xb.contiguous(memory_format=torch.channels_last), yb

    train = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x[:32], y[:32]),
        batch_size=8,
        shuffle=True,
        generator=torch.Generator().manual_seed(3),
        collate_fn=collate,
    )
    valid = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x[32:], y[32:]), batch_size=8, collate_fn=collate
    )
    tx = optim.sgd(optim.onecycle_schedule(0.1, 4), momentum=0.9, nesterov=True, weight_decay=5e-4)
    state = fl.TrainState.create(resnet(), tx=tx, ema_decay=0.8)
    return fl.fit(
        state,
        fl.make_train_step(classify, accumulation_steps=3),
        {"train": train, "valid": valid},
        max_epochs=3,
        out_dir=out_dir,
        checkpoint_every_n_steps=1,
        callbacks=list(callbacks),
        log_to_console=False,
        progress=False,
    )


@pytest.fixture(scope="module")
def uninterrupted_resnet_fit(tmp_path_factory):
    return fit_resnet(tmp_path_factory.mktemp("uninterrupted"))


@pytest.mark.parametrize(("epoch", "batch"), [(2, 0), (2, 2)], ids=["open-window", "mid-epoch"])
def test_channels_last_resnet_fit_with_open_windows_resumes_bit_exactly(
    tmp_path, uninterrupted_resnet_fit, epoch, batch
):
    """A crash where an accumulation window is open across an epoch end (or, mid-epoch,
    after the last update) resumes to the uninterrupted run's weights, EMA, BatchNorm
    statistics and history, in ``channels_last``."""
    ref = uninterrupted_resnet_fit
    with pytest.raises(Crash):
        fit_resnet(tmp_path / "cut", [CrashAt(epoch, batch)])
    torch.manual_seed(123)  # a new process starts with other global RNG states
    got = fit_resnet(tmp_path / "cut")
    assert (
        (got.step, got.epoch, got.micro_step) == (ref.step, ref.epoch, ref.micro_step) == (4, 3, 0)
    )
    for group in ("params", "ema", "buffers"):
        for name, t in getattr(ref, group).items():
            assert torch.equal(getattr(got, group)[name], t), (group, name)
    assert got.params["0.weight"].is_contiguous(memory_format=torch.channels_last)
    assert got.history == ref.history
