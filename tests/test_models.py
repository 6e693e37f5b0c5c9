"""Model families users train (RNNs, attention, parametrizations, norms) against a
hand-written PyTorch loop: eager, donating and vmapped steps, eval steps, checkpoints."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fnloop as fl
from fnloop import optim

# torch's notes on its own coverage (vmap's fallback for ops without a batching rule,
# prototype nested tensors in TransformerEncoder's fast path), not about fnloop.
pytestmark = [
    pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning"),
    pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning"),
]

torch.set_default_dtype(torch.float32)

VOCAB = 11
STEPS = 3


# ---------------------------------------------------------------------------- models


class LSTMClassifier(nn.Module):
    """Embedding with a padding row, a two-layer LSTM with dropout between layers."""

    def __init__(self, dropout: float = 0.3) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 6, padding_idx=0)
        self.rnn = nn.LSTM(6, 8, num_layers=2, dropout=dropout, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        _, (h, _) = self.rnn(self.emb(tokens))
        return self.head(h[-1])


class PackedGRU(nn.Module):
    """A bidirectional GRU over a packed batch of sequences of different lengths."""

    def __init__(self, dropout: float = 0.3) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 6, padding_idx=0)
        self.rnn = nn.GRU(6, 5, num_layers=2, dropout=dropout, batch_first=True, bidirectional=True)
        self.head = nn.Linear(10, 3)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = pack_padded_sequence(
            self.emb(tokens), lengths.cpu(), batch_first=True, enforce_sorted=False
        )
        _, h = self.rnn(packed)
        return self.head(torch.cat([h[-2], h[-1]], dim=-1))


class TinyTransformer(nn.Module):
    """A two-layer TransformerEncoder with a key padding mask (nested tensors in eval)."""

    def __init__(self, dropout: float = 0.3) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8, padding_idx=0)
        layer = nn.TransformerEncoderLayer(
            8, nhead=2, dim_feedforward=16, dropout=dropout, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=2)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pad = tokens == 0
        h = self.encoder(self.emb(tokens), src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).to(h.dtype)
        return self.head((h * keep).sum(1) / keep.sum(1)), h


class AttentionPool(nn.Module):
    """A learned query attending over the tokens (separate q/k/v projections)."""

    def __init__(self, dropout: float = 0.3) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 6, padding_idx=0)
        self.query = nn.Parameter(torch.randn(1, 1, 8))
        self.attn = nn.MultiheadAttention(
            8, num_heads=2, dropout=dropout, batch_first=True, kdim=6, vdim=6
        )
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys = self.emb(tokens)
        query = self.query.expand(tokens.shape[0], -1, -1)
        out, weights = self.attn(query, keys, keys, key_padding_mask=tokens == 0)
        return self.head(self.norm(out[:, 0])), weights


class SpectralNormNet(nn.Module):
    """``parametrizations.spectral_norm``: a parameter ``original`` and buffers ``_u``, ``_v``
    that each training forward pass updates in place."""

    def __init__(self, dropout: float = 0.3) -> None:
        super().__init__()
        self.l1 = parametrizations.spectral_norm(nn.Linear(5, 12))
        self.drop = nn.Dropout(dropout)
        self.l2 = parametrizations.spectral_norm(nn.Linear(12, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(self.drop(F.leaky_relu(self.l1(x), 0.2)))


class LegacySpectralNormNet(nn.Module):
    """The hook-based ``torch.nn.utils.spectral_norm`` (``weight_orig``, ``weight_u``,
    ``weight_v``; the weight is a plain attribute its pre-hook sets)."""

    def __init__(self, dropout: float = 0.3) -> None:
        super().__init__()
        self.l1 = nn.utils.spectral_norm(nn.Linear(5, 12))
        self.drop = nn.Dropout(dropout)
        self.l2 = nn.utils.spectral_norm(nn.Linear(12, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(self.drop(F.leaky_relu(self.l1(x), 0.2)))


class OrthogonalNet(nn.Module):
    """``parametrizations.orthogonal`` (with its ``base`` buffer) and ``weight_norm``."""

    def __init__(self, dropout: float = 0.3) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 6)
        self.rot = parametrizations.orthogonal(nn.Linear(6, 6))
        self.drop = nn.Dropout(dropout)
        self.out = parametrizations.weight_norm(nn.Linear(6, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(torch.tanh(self.rot(self.inp(x)))))


class NormCNN(nn.Module):
    """Convolutions with GroupNorm, then LayerNorm (with and without bias)."""

    def __init__(self, dropout: float = 0.3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 8, 3, padding=1)
        self.gn = nn.GroupNorm(4, 8)
        self.conv2 = nn.Conv2d(8, 4, 3, stride=2)
        self.ln = nn.LayerNorm(16)
        self.drop = nn.Dropout(dropout)
        self.ln2 = nn.LayerNorm(16, bias=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.gn(self.conv1(x)))
        h = self.ln(self.conv2(h).flatten(1))
        return self.head(self.ln2(self.drop(F.gelu(h))))


# ----------------------------------------------------------------------------- data


def _tokens(g: torch.Generator, size: int = 4, length: int = 6) -> dict[str, torch.Tensor]:
    """Right-padded token ids (0 is padding; every sequence has at least one token)."""
    lengths = torch.randint(1, length + 1, (size,), generator=g)
    lengths[0] = length
    tokens = torch.randint(1, VOCAB, (size, length), generator=g)
    tokens[torch.arange(length) >= lengths[:, None]] = 0
    return {"tokens": tokens, "lengths": lengths, "y": torch.randint(0, 3, (size,), generator=g)}


def _features(shape: tuple[int, ...]) -> Callable[[torch.Generator], dict[str, torch.Tensor]]:
    def make(g: torch.Generator) -> dict[str, torch.Tensor]:
        x = torch.randn(4, *shape, generator=g, dtype=torch.float64)
        return {"x": x, "y": torch.randint(0, 3, (4,), generator=g)}

    return make


def _logits(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    cls: type[nn.Module]
    data: Callable[[torch.Generator], dict[str, torch.Tensor]]
    inputs: Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, ...]]

    def make(self, seed: int = 0, dropout: float = 0.3) -> nn.Module:
        torch.manual_seed(seed)
        return self.cls(dropout=dropout).double()

    def batches(self, n: int = STEPS, seed: int = 1) -> list[dict[str, torch.Tensor]]:
        g = torch.Generator().manual_seed(seed)
        return [self.data(g) for _ in range(n)]

    def forward(self, model: Any, batch: dict[str, torch.Tensor]) -> Any:
        return model(*self.inputs(batch))

    def step_fn(self, model: Any, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        logits = _logits(self.forward(model, batch))
        return {
            "loss": F.cross_entropy(logits, batch["y"]),
            "acc": (logits.argmax(-1) == batch["y"]).double().mean(),
            "logits": logits,
        }


def _tok(b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return (b["tokens"],)


def _x(b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return (b["x"],)


CASES = [
    Case("lstm", LSTMClassifier, _tokens, _tok),
    Case("packed_gru", PackedGRU, _tokens, lambda b: (b["tokens"], b["lengths"])),
    Case("transformer", TinyTransformer, _tokens, _tok),
    Case("mha", AttentionPool, _tokens, _tok),
    Case("spectral_norm", SpectralNormNet, _features((5,)), _x),
    Case("spectral_norm_legacy", LegacySpectralNormNet, _features((5,)), _x),
    Case("orthogonal", OrthogonalNet, _features((5,)), _x),
    Case("group_layer_norm", NormCNN, _features((2, 5, 5)), _x),
]
IDS = [case.name for case in CASES]


# ------------------------------------------------------------------------- helpers


def _seed(i: int) -> None:
    torch.manual_seed(1000 + i)


def hand_loop(case: Case, module: nn.Module, data: list, opt_fn: Callable) -> tuple:
    module = copy.deepcopy(module).train()
    opt = opt_fn(module.parameters())
    losses = []
    for i, b in enumerate(data):
        _seed(i)
        opt.zero_grad()
        loss = F.cross_entropy(_logits(case.forward(module, b)), b["y"])
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return module, opt, losses


def run_steps(step: Callable, state: fl.TrainState, data: list) -> tuple:
    metrics = []
    for i, b in enumerate(data):
        _seed(i)
        state, m = step(state, b)
        metrics.append(m)
    return state, metrics


def snapshot(state: fl.TrainState) -> list[torch.Tensor]:
    return [leaf.clone() for leaf in fl._tree.tree_leaves(state)]


def assert_unchanged(state: fl.TrainState, snap: list[torch.Tensor]) -> None:
    leaves = fl._tree.tree_leaves(state)
    assert len(leaves) == len(snap)
    for old, now in zip(snap, leaves):
        assert torch.equal(old, now)


def assert_states_equal(a: fl.TrainState, b: fl.TrainState, rtol: float = 0, atol: float = 0):
    assert a.step == b.step
    for x, y in zip(fl._tree.tree_leaves(a), fl._tree.tree_leaves(b), strict=True):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


# float64. Not bit-exact only where the optimizer rounds in another order (AdamW's foreach
# kernel against fnloop's fused one), which Adam amplifies for a gradient that is rounding
# noise: attention's key bias, whose true gradient is 0 (softmax ignores a shift), moves
# by lr * noise / eps ~ 1e-11.
TOL = {"rtol": 1e-10, "atol": 1e-12}
ADAM_TOL = {"rtol": 1e-10, "atol": 1e-10}

OPTIMIZERS = {
    "adamw": (
        lambda: optim.adamw(1e-2, weight_decay=0.05),
        lambda p: torch.optim.AdamW(p, 1e-2, weight_decay=0.05, foreach=True),
    ),
    "sgd": (
        lambda: optim.sgd(0.1, momentum=0.9),
        lambda p: torch.optim.SGD(p, 0.1, momentum=0.9),
    ),
}


def assert_matches_hand_loop(state: fl.TrainState, ref: nn.Module, opt: torch.optim.Optimizer):
    tol = ADAM_TOL if isinstance(opt, torch.optim.AdamW) else TOL
    names = [n for n, _ in ref.named_parameters()]
    assert sorted(state.params) == sorted(names)
    assert sorted(state.buffers) == sorted(n for n, _ in ref.named_buffers())
    for name, p in ref.named_parameters():
        torch.testing.assert_close(state.params[name], p.detach(), **tol)
    for name, b in ref.named_buffers():
        torch.testing.assert_close(state.buffers[name], b, **tol)
    torch_state = [opt.state[p] for p in ref.parameters()]
    if isinstance(opt, torch.optim.AdamW):
        adam = state.opt_state[0]
        assert int(adam.count) == int(torch_state[0]["step"])
        for name, s in zip(names, torch_state):
            torch.testing.assert_close(adam.mu[name], s["exp_avg"], **TOL)
            torch.testing.assert_close(adam.nu[name], s["exp_avg_sq"], **TOL)
    else:
        trace = state.opt_state[1]
        for name, s in zip(names, torch_state):
            torch.testing.assert_close(trace.momentum_buffer[name], s["momentum_buffer"], **TOL)


def hand_eval(case: Case, module: nn.Module, batch: dict) -> Any:
    module = copy.deepcopy(module).eval()
    with torch.no_grad():
        return case.forward(module, batch)


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_eager_step_matches_hand_loop_and_is_pure(case, opt_name):
    tx_fn, opt_fn = OPTIMIZERS[opt_name]
    module, data = case.make(), case.batches()
    ref, opt, losses = hand_loop(case, module, data, opt_fn)
    state = fl.TrainState.create(module, tx=tx_fn(), device="cpu")
    before = snapshot(state)
    trained, metrics = run_steps(fl.make_train_step(case.step_fn), state, data)
    assert_unchanged(state, before)
    for m, loss in zip(metrics, losses):
        torch.testing.assert_close(m["loss"], loss, rtol=1e-12, atol=1e-14)
    assert trained.step == STEPS
    assert_matches_hand_loop(trained, ref, opt)
    # Every parameter moved (none silently left out of training), but the embedding's
    # padding row, which gets no gradient: without weight decay it stays 0.
    for name, p in module.named_parameters():
        assert not torch.equal(trained.params[name], p), name
    if "emb.weight" in trained.params and opt_name == "sgd":
        assert (trained.params["emb.weight"][0] == 0).all()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_eval_step_is_the_eval_mode_no_grad_forward(case):
    module, batch = case.make(), case.batches(1, seed=5)[0]
    state = fl.TrainState.create(module, tx=optim.sgd(0.1), device="cpu")
    trained, _ = run_steps(fl.make_train_step(case.step_fn), state, case.batches())
    eval_step = fl.make_eval_step(case.step_fn)
    for s in (state, trained):
        before = snapshot(s)
        fresh = case.make(seed=7)
        fresh.load_state_dict(s.state_dict())
        want = _logits(hand_eval(case, fresh, batch))
        got = eval_step(s, batch)
        assert_unchanged(s, before)
        # Equal up to rounding: torch picks another matmul kernel for weights that do not
        # require grad (a trained state's) than for a module's parameters (mha: 4e-16).
        torch.testing.assert_close(got["logits"], want, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(
            got["loss"], F.cross_entropy(want, batch["y"]), rtol=1e-12, atol=1e-14
        )


def test_transformer_eval_step_takes_the_fast_path_with_nested_tensors():
    # In eval mode under no_grad, TransformerEncoder runs torch's fused kernel on nested
    # tensors, which leaves the padded positions 0 (the training path does not).
    case = CASES[IDS.index("transformer")]
    module, batch = case.make(), case.batches(1, seed=5)[0]
    state = fl.TrainState.create(module, tx=optim.sgd(0.1), device="cpu")
    pad = batch["tokens"] == 0
    assert pad.any()

    def hidden(model, batch):
        logits, h = model(batch["tokens"])
        return {"loss": F.cross_entropy(logits, batch["y"]), "h": h}

    got = fl.make_eval_step(hidden)(state, batch)["h"]
    want = hand_eval(case, module, batch)[1]
    assert torch.equal(got, want)
    assert (got[pad] == 0).all()
    _seed(0)
    _, metrics = fl.make_train_step(hidden)(state, batch)
    assert (metrics["h"][pad] != 0).any()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_donating_steps_match_pure_steps(case):
    module, data = case.make(), case.batches()
    state = fl.TrainState.create(module, tx=optim.adamw(1e-2), device="cpu")
    pure, _ = run_steps(fl.make_train_step(case.step_fn), state, data)
    donated = state.clone()
    ptrs = {n: p.data_ptr() for n, p in donated.params.items()}
    donated, _ = run_steps(fl.make_train_step(case.step_fn, donate=True), donated, data)
    assert {n: p.data_ptr() for n, p in donated.params.items()} == ptrs
    # Equal up to rounding: a donated state's tensors lie back to back in one buffer
    # (state.clone()), where the GRU's kernels round otherwise (packed_gru: 1e-18).
    assert_states_equal(donated, pure, **TOL)


class PackedInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(3, 4, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, packed: PackedSequence) -> torch.Tensor:
        return self.head(self.rnn(packed)[1][-1])


def test_a_packed_sequence_in_the_batch():
    torch.manual_seed(0)
    module = PackedInput().double()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, 3, generator=g, dtype=torch.float64)
    packed = pack_padded_sequence(
        x, torch.tensor([5, 2, 3]), batch_first=True, enforce_sorted=False
    )
    batch = (packed, torch.tensor([0, 2, 1]))

    def fn(model, batch):
        return {"loss": F.cross_entropy(model(batch[0]), batch[1])}

    ref = copy.deepcopy(module)
    opt = torch.optim.SGD(ref.parameters(), 0.1, momentum=0.9)
    losses = []
    for _ in range(2):
        opt.zero_grad()
        loss = fn(ref, batch)["loss"]
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    state = fl.TrainState.create(module, tx=optim.sgd(0.1, momentum=0.9), device="cpu")
    trained, means = fl.train_epoch(state, fl.make_train_step(fn), [batch, batch])
    assert_matches_hand_loop(trained, ref, opt)
    assert means["loss"] == pytest.approx(sum(losses) / 2, rel=1e-12)
    with torch.no_grad():
        want = fn(ref.eval(), batch)["loss"]
    torch.testing.assert_close(fl.make_eval_step(fn)(trained, batch)["loss"], want, **TOL)


# torch.func.vmap has no batching rule for what these models' forward passes run: packed
# sequences (pack_padded_sequence's batch sizes become batched, and the RNN reads them on
# the host) and spectral_norm's power iteration (normalize(..., out=u)).
VMAP_UNSUPPORTED = {
    "packed_gru": r"(?s)calling \.item\(\).*reads a tensor's value on the host",
    "spectral_norm": r"(?s)aten::div\.out.*no batching rule",
}
VMAP_CASES = [c for c in CASES if c.name not in VMAP_UNSUPPORTED and "legacy" not in c.name]


def _vmap_states(case: Case) -> list[fl.TrainState]:
    # Without dropout: vmap's randomness="different" draws other masks than separate runs.
    # SGD: Adam would amplify the rounding noise of attention's key bias (see ADAM_TOL).
    return [
        fl.TrainState.create(
            case.make(seed, dropout=0.0), tx=optim.sgd(lr, momentum=0.9), device="cpu"
        )
        for seed, lr in ((0, 0.1), (1, 0.03), (2, 0.01))
    ]


@pytest.mark.parametrize("case", VMAP_CASES, ids=[c.name for c in VMAP_CASES])
def test_vmap_over_stacked_states_matches_training_each_alone(case):
    data, states = case.batches(), _vmap_states(case)
    step, eval_step = fl.make_train_step(case.step_fn), fl.make_eval_step(case.step_fn)
    alone = [run_steps(step, s, data)[0] for s in states]
    many = torch.func.vmap(step, in_dims=(0, None), randomness="different")
    stacked = fl.stack_states(states)
    before = snapshot(stacked)
    stacked, metrics = run_steps(many, stacked, data)
    assert metrics[-1]["loss"].shape == (3,)
    for got, want in zip(fl.unstack_states(stacked), alone, strict=True):
        assert_states_equal(got, want, **TOL)
    # The vmapped eval step (LSTM: torch has no batching rule for its fused kernel under
    # no_grad; TransformerEncoder: nor for its eval fast path) gives each model's metrics.
    evals = torch.func.vmap(eval_step, in_dims=(0, None))(stacked, data[0])
    for i, want in enumerate(alone):
        m = eval_step(want, data[0])
        torch.testing.assert_close(evals["logits"][i], m["logits"], **TOL)
        torch.testing.assert_close(evals["loss"][i], m["loss"], **TOL)
    assert_unchanged(fl.stack_states(states), before)


@pytest.mark.parametrize("name", list(VMAP_UNSUPPORTED))
def test_vmap_of_a_model_torch_cannot_batch_is_a_clear_error(name):
    case = CASES[IDS.index(name)]
    states, batch = _vmap_states(case), case.batches(1)[0]
    stacked = fl.stack_states(states)
    step, eval_step = fl.make_train_step(case.step_fn), fl.make_eval_step(case.step_fn)
    many = torch.func.vmap(step, in_dims=(0, None))
    evals = torch.func.vmap(eval_step, in_dims=(0, None))
    runs = [many, evals] if name == "packed_gru" else [many]
    for run in runs:
        with pytest.raises(RuntimeError, match=VMAP_UNSUPPORTED[name]) as info:
            run(stacked, batch)
        assert "fl.unstack_states" in str(info.value)
    if name == "spectral_norm":  # evaluating does not run the power iteration
        logits = evals(stacked, batch)["logits"]
        for i, state in enumerate(states):
            torch.testing.assert_close(logits[i], eval_step(state, batch)["logits"], **TOL)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_checkpoint_and_exported_model_round_trip(case, tmp_path):
    module, data = case.make(), case.batches()
    step = fl.make_train_step(case.step_fn)
    state = fl.TrainState.create(module, tx=optim.adamw(1e-2), device="cpu")
    trained, _ = run_steps(step, state, data[:2])
    path = fl.save_checkpoint(tmp_path / "ckpt.pt", trained)
    restored = fl.load_checkpoint(path, like=state)
    assert_states_equal(restored, trained)
    _seed(9)
    a, _ = step(trained, data[2])
    _seed(9)
    b, _ = step(restored, data[2])
    assert_states_equal(a, b)

    fl.save_model(tmp_path / "model.pt", a)
    fresh = case.make(seed=5)
    fresh.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    want = a.state_dict()
    assert sorted(fresh.state_dict()) == sorted(want)
    for name, t in fresh.state_dict().items():
        assert torch.equal(t, want[name]), name
    batch = case.batches(1, seed=5)[0]
    got = fl.make_eval_step(case.step_fn)(a, batch)["logits"]
    torch.testing.assert_close(_logits(hand_eval(case, fresh, batch)), got, **TOL)


def test_identically_built_legacy_spectral_norm_models_stack():
    """Each ``torch.nn.utils.spectral_norm`` module has a hook object of its own:
    ``stack_states`` compares such hooks by class and settings, not identity (it refused
    two identically built models). Evaluating the stack runs; training it meets the
    power iteration, which torch cannot batch (a clear error)."""
    case = CASES[IDS.index("spectral_norm_legacy")]
    states, batch = _vmap_states(case), case.batches(1)[0]
    stacked = fl.stack_states(states)
    eval_step = fl.make_eval_step(case.step_fn)
    logits = torch.func.vmap(eval_step, in_dims=(0, None))(stacked, batch)["logits"]
    for i, state in enumerate(states):
        torch.testing.assert_close(logits[i], eval_step(state, batch)["logits"], **TOL)
    many = torch.func.vmap(fl.make_train_step(case.step_fn), in_dims=(0, None))
    with pytest.raises(RuntimeError, match=r"fl\.unstack_states"):
        many(stacked, batch)
    other = LegacySpectralNormNet()
    other.l1 = nn.utils.spectral_norm(nn.Linear(5, 12), n_power_iterations=3)
    with pytest.raises(ValueError, match=r"l1\._forward_pre_hooks hold"):
        fl.stack_states([states[0], fl.TrainState.create(other, tx=optim.sgd(0.1), device="cpu")])


COMPILED = ["lstm", "transformer"]


@pytest.mark.slow
@pytest.mark.parametrize("name", COMPILED)
def test_compiled_train_and_eval_steps_match_eager(name):
    # fallback_random: inductor draws the dropout masks with eager's generator (config's
    # own patch: monkeypatch's undo deleted the option on torch 2.11). The transformer
    # without dropout: under torch.func.grad, which compiled steps use, a
    # TransformerEncoderLayer with dropout draws other masks than under eager autograd
    # (in plain torch too: torch.func.grad_and_value(loss) against loss.backward()).
    if name == "transformer" and torch.__version__ < torch.torch_version.TorchVersion("2.13"):
        pytest.skip(
            "torch 2.11's compiled CPU flash-attention backward mixes float32 into this "
            "float64 model ('expected scalar type Double but found Float'); 2.13 compiles it"
        )
    with torch._inductor.config.patch(fallback_random=True):
        _compiled_steps_match_eager(name)


def _compiled_steps_match_eager(name: str) -> None:
    torch._dynamo.reset()
    case = CASES[IDS.index(name)]
    module, data = case.make(dropout=0.3 if name == "lstm" else 0.0), case.batches()
    state = fl.TrainState.create(module, tx=optim.adamw(1e-2), device="cpu")
    step, eval_step = fl.make_train_step(case.step_fn), fl.make_eval_step(case.step_fn)
    explanation = torch._dynamo.explain(step)(state, data[0])
    assert explanation.graph_break_count == 0, explanation.break_reasons
    eager, eager_metrics = run_steps(step, state, data)
    compiled, compiled_metrics = run_steps(torch.compile(step), state, data)
    for a, b in zip(eager_metrics, compiled_metrics):
        torch.testing.assert_close(a["loss"], b["loss"], rtol=1e-12, atol=1e-14)
    assert_states_equal(compiled, eager, **ADAM_TOL)
    batch = case.batches(1, seed=5)[0]
    got = torch.compile(eval_step)(compiled, batch)["logits"]
    torch.testing.assert_close(got, eval_step(compiled, batch)["logits"], **TOL)
