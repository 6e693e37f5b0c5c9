"""Data parallelism (I5): two processes launched by torchrun (gloo, CPU) against one process
on the same global batches."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

sys.path.insert(0, str(Path(__file__).parent / "jobs"))
import bad_input_job
import ddp_job
import mid_epoch_outputs_job

import fnloop as fl
from fnloop.distributed import mean_over_processes, true_everywhere, world_size

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)


def torchrun(
    out: Path,
    *args: str,
    job: Path = Path(ddp_job.__file__),
    timeout: float = 600,
    fails: bool = False,
) -> None:
    """Runs ``job`` (the DDP job by default) in 2 processes, writing into ``out``; it must
    succeed, or with ``fails``, fail."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(job),
            str(out),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert (done.returncode != 0) == fails, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("ddp")
    torchrun(out)
    return out, [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def assert_same(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for name in a:
        assert_close(a[name], b[name], rtol=1e-12, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")


def test_steps_average_gradients_over_processes(ranks) -> None:
    """Each process's half of every batch, gradients averaged (with clipping, AdamW and
    accumulation) = one process on the whole batches."""
    _, results = ranks
    single = ddp_job.steps(slice(None)).params
    for r in results:
        assert_same(r["steps"], single)


def test_a_nan_in_one_process_skips_the_update_in_all(ranks) -> None:
    _, results = ranks
    single = ddp_job.steps(slice(None), nan_at=4)
    assert int(single.skipped_steps) == 1
    for r in results:
        assert r["skipped"] == 1
        assert_same(r["steps_nan"], single.state_dict())


def test_fit_matches_one_process_and_only_rank_0_writes(ranks) -> None:
    out, results = ranks
    single = ddp_job.fit(None, 1, 0, ddp_job.mlp())
    for r in results:
        assert_same(r["fit"], single.state_dict())
        # Epoch metrics are means over both processes' examples: the single run's.
        for split, metrics in single.history.items():
            for key, values in metrics.items():
                assert_close(torch.tensor(r["history"][split][key]), torch.tensor(values))
    run = out / "run"
    log = (run / "run_training.log").read_text()
    assert log.count("[  1/3]") == 1, log  # one writer
    assert len(list((run / "checkpoints").glob("*.pt"))) >= 1
    resumed = fl.load_checkpoint(
        sorted((run / "checkpoints").glob("*.pt"))[-1],
        like=fl.TrainState.create(ddp_job.mlp(), tx=ddp_job.tx()),
    )
    assert_same(resumed.state_dict(), single.state_dict())  # loadable without DDP


def test_validation_shares_of_unequal_size_give_one_processs_metrics(ranks) -> None:
    """The guide's fix for a padding DistributedSampler: each process validates its own
    share (17 and 16 of 33 examples, in 5 and 4 batches of up to 4); the epoch means
    are the single process's over all 33."""
    single = ddp_job.unequal_validation(1, 0)
    for r in ranks[1]:
        assert list(r["unequal_validation"]) == list(single)
        for key, values in single.items():
            assert_close(torch.tensor(r["unequal_validation"][key]), torch.tensor(values))


def test_a_skipped_update_keeps_averaged_statistics_with_accumulation(ranks) -> None:
    """The micro-batches before a skipped update changed each process's own statistics:
    the kept ones are their mean, so the processes still agree."""
    _, (r0, r1) = ranks
    assert r0["skip_bn_skipped"] == r1["skip_bn_skipped"] == 1
    assert_same(r0["skip_bn"], r1["skip_bn"])
    # A NaN in one process's part of a window's first micro-batch: every process drops
    # that micro-batch's statistics (one process on the whole batch would), counter too.
    assert_same(r0["skip_bn_opening"], r1["skip_bn_opening"])
    assert r0["skip_bn_opening"]["1.num_batches_tracked"] == 3
    assert r0["buffers_own_memory"] and r1["buffers_own_memory"]
    assert r0["window_buffers_own_memory"] and r1["window_buffers_own_memory"]


def test_a_second_fit_continues_an_open_accumulation_window(ranks) -> None:
    """Each process's partial gradient sums go into the second fit (as their mean), not
    rank 0's alone: the same as one fit of all the epochs."""
    _, results = ranks
    for r in results:
        assert_same(r["refit_two"], r["refit_one"])


def test_batchnorm_statistics_are_averaged_so_processes_agree(ranks) -> None:
    _, (r0, r1) = ranks
    assert_same(r0["fit_bn"], r1["fit_bn"])
    assert any("running_mean" in k for k in r0["fit_bn"])


def test_a_single_process_is_left_alone() -> None:
    assert world_size() == 1
    t = {"a": torch.ones(2)}
    assert mean_over_processes(t)["a"] is t["a"]
    flag = torch.tensor([True, False])
    assert true_everywhere(flag) is flag


def test_averaging_keeps_a_channels_last_tensors_memory_format(monkeypatch) -> None:
    """Contiguous tensors come back as views of the reduced buffer; a channels-last one
    (a conv weight's gradient) as a channels-last tensor of the mean (the all-reduce of
    2 processes simulated as the sum of 2 copies)."""
    import fnloop.distributed

    def all_reduce(flat: torch.Tensor) -> None:
        flat.mul_(2)

    monkeypatch.setattr(fnloop.distributed, "world_size", lambda: 2)
    monkeypatch.setattr(fnloop.distributed, "collective_device", lambda t: t.device)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 2, 4, 5, generator=g).contiguous(memory_format=torch.channels_last)
    bias = torch.randn(3, generator=g)
    got = mean_over_processes({"weight": weight, "bias": bias})
    assert got["weight"].is_contiguous(memory_format=torch.channels_last)
    assert not got["weight"].is_contiguous()
    assert torch.equal(got["weight"], weight) and torch.equal(got["bias"], bias)


@pytest.fixture
def two_alike_processes(monkeypatch) -> None:
    """Two processes holding the same tensors, simulated in this one: the all-reduce sums
    two copies of what it gets."""
    import fnloop.distributed

    def all_reduce(flat: torch.Tensor) -> None:
        flat.mul_(2)

    monkeypatch.setattr(fnloop.distributed, "world_size", lambda: 2)
    monkeypatch.setattr(fnloop.distributed, "collective_device", lambda t: t.device)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)


@pytest.mark.usefixtures("two_alike_processes")
def test_averaging_fp16_values_near_their_largest_gives_their_mean() -> None:
    """Each process's share is divided before the all-reduce sums them: two processes'
    fp16 gradients of 60000 (the largest fp16 is 65504) average to 60000, where a sum
    taken first would be inf."""
    grad = torch.tensor([60000.0, -60000.0, 1.0], dtype=torch.float16)
    assert torch.equal(mean_over_processes({"grad": grad})["grad"], grad)


@pytest.mark.usefixtures("two_alike_processes")
def test_averaging_tensors_on_two_devices_reduces_each_on_its_own() -> None:
    """Tensors of one dtype on two devices (weights on a GPU, a buffer kept on the CPU)
    are reduced device by device, each mean on its input's device (the meta device
    stands for the second one)."""
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0])
    got = mean_over_processes({"a": a, "other": torch.empty(3, device="meta"), "b": b})
    assert got["other"].device == torch.device("meta") and got["other"].shape == (3,)
    assert torch.equal(got["a"], a) and torch.equal(got["b"], b)


@pytest.mark.parametrize(
    ("theirs", "says"),
    [
        ([("params.w", "float32 (2,)")], "rank 0 has 'params.b' (float32 (3,)), it has not"),
        (
            [("params.w", "float32 (2,)"), ("params.b", "float64 (3,)")],
            "'params.b' is float32 (3,) on rank 0 and float64 (3,) there",
        ),
        (
            [("params.w", "float32 (2,)"), ("params.b", "float32 (3,)"), ("ema.w", "float32 (2,)")],
            "it has 'ema.w', rank 0 has not",
        ),
        (
            [("params.b", "float32 (3,)"), ("params.w", "float32 (2,)")],
            "it holds the same entries in another order",
        ),
    ],
)
def test_broadcast_state_names_how_a_processs_state_differs(theirs, says) -> None:
    """What broadcast_state's error says (in every process) of a process's state that
    is not shaped as rank 0's: the first entry that differs, in words."""
    from fnloop.distributed import _layout_difference

    rank0 = [("params.w", "float32 (2,)"), ("params.b", "float32 (3,)")]
    assert _layout_difference(rank0, theirs) == says


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_vmap_in_a_distributed_run_is_a_clear_error(monkeypatch, compiled) -> None:
    """Also compiled, where the averaging would otherwise run on the batched gradients
    and leave every process with other weights."""
    import fnloop.step

    monkeypatch.setattr(fnloop.step, "world_size", lambda: 2)
    states = [fl.TrainState.create(ddp_job.mlp(), tx=ddp_job.tx()) for _ in range(2)]
    step = torch.func.vmap(
        fl.make_train_step(ddp_job.classify), in_dims=(0, None), randomness="different"
    )
    if compiled:
        torch._dynamo.reset()
        step = torch.compile(step)
    x, y = ddp_job.data(8)
    with pytest.raises(ValueError, match=r"cannot do under torch\.func\.vmap"):
        step(fl.stack_states(states), (x, y))


@pytest.mark.parametrize("crash", ["2-0", "2-2"], ids=["window-open", "mid-epoch"])
def test_resume_after_a_crash_repeats_the_uninterrupted_run(ranks, crash) -> None:
    """Each process resumes with its own generators (dropout) and partial epoch means:
    bit-exact against the uninterrupted distributed run. An accumulation window open at
    the checkpoint (2-0 resumes from the epoch-1 checkpoint) continues from the processes'
    mean of their partial sums: the same math, rounded in another order (float64 here)."""
    _, results = ranks
    for r in results:
        resumed, straight = r[f"resumed-{crash}"], r["straight"]
        if crash == "2-2":
            assert list(resumed) == list(straight)
            for name in straight:
                assert torch.equal(resumed[name], straight[name]), name
            assert r[f"resumed-{crash}_history"] == r["straight_history"]
        else:
            assert_same(resumed, straight)
            for split, metrics in r["straight_history"].items():
                for key, values in metrics.items():
                    got = r[f"resumed-{crash}_history"][split][key]
                    assert_close(torch.tensor(got), torch.tensor(values), rtol=1e-12, atol=0)
    assert not torch.equal(results[0]["straight"]["0.weight"].cpu(), ddp_job.mlp()[0].weight)


def test_one_process_goes_on_from_a_checkpoint_two_processes_wrote(ranks, tmp_path) -> None:
    """Resuming on fewer processes (one machine after two): the log says the run will not
    repeat an uninterrupted one (rank 0's generators for all), the two processes' epochs
    are the history, and training goes on from their checkpoint."""
    out, results = ranks
    folder = tmp_path / "run"
    shutil.copytree(out / "crash-2-2", folder)
    state = ddp_job.resumable(folder, 1, 0, max_epochs=4)
    log = (folder / "run_training.log").read_text()
    assert re.search(
        r"WARNING - \S+ckpt-\d+-e\.pt was written by 2 processes and this run has 1: every "
        r"process continues with rank 0's random generators",
        log,
    )
    assert state.epoch == 4
    two = results[0]["resumed-2-2_history"]
    assert {s: {k: v[:3] for k, v in m.items()} for s, m in state.history.items()} == two


@pytest.mark.slow  # torchrun starts two processes
def test_one_process_resuming_two_processes_mid_epoch_keeps_the_outputs_out(tmp_path) -> None:
    """The partial means of the processes that wrote a mid-epoch checkpoint are summed
    for one process that resumes it: predictions, an output in every batch before the
    checkpoint, stay out of the metrics though the resumed epoch's only batch left has
    one example (they became train/pred)."""
    job = Path(mid_epoch_outputs_job.__file__)
    torchrun(tmp_path, job=job)
    newest = max(p.name for p in (tmp_path / "checkpoints").glob("ckpt-*.pt"))
    assert newest == "ckpt-0000000002-b.pt"
    # 9 examples in batches of 4, 4, 1: the resumed epoch skips 2 and trains on 1.
    state = mid_epoch_outputs_job.run(tmp_path, 1, 0, 9)
    assert state.step == 3
    assert set(state.history["train"]) == {"loss", "lr"}
    log = (tmp_path / "run_training.log").read_text()
    assert "batch 2 of epoch 1" in log and "pred:" not in log


def test_fit_starts_every_process_from_rank_0s_state(ranks) -> None:
    """Processes that built different weights (seeded by rank) train rank 0's, as
    DistributedDataParallel does."""
    _, results = ranks
    single = ddp_job.fit(None, 1, 0, ddp_job.mlp(seed=0)).state_dict()
    for r in results:
        assert_same(r["fit_seeded"], single)
        # fit(..., donate=True) trains rank 0's state in the memory of each process's own.
        assert_same(r["fit_donated"], single)
        assert r["fit_donated_in_place"]


@pytest.mark.slow
def test_compiled_steps_average_gradients_in_one_graph_ci_subset(tmp_path: Path) -> None:
    torchrun(tmp_path, "--compile")
    for r in range(2):
        result = torch.load(tmp_path / f"rank{r}-compile.pt", weights_only=True)
        assert result["graph_breaks"] == 0
        assert_same(result["compiled"], result["eager"])
        assert_same(result["compiled_skip"], result["eager_skip"])
    r0 = torch.load(tmp_path / "rank0-compile.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1-compile.pt", weights_only=True)
    assert_same(r0["compiled"], r1["compiled"])


def test_raise_on_a_nan_in_one_process_raises_in_all_where_one_process_does(ranks) -> None:
    """At the micro-batch itself, also one that opens an accumulation window (a NaN
    loss there can have finite gradients, which the window's update would not show)."""
    _, results = ranks
    single = ddp_job.raise_on_nan(0, world=1)
    assert single == {
        "nan_opening": (4, "non-finite loss"),
        "nan_closing": (3, "non-finite loss"),
        "empty_mask": (2, "non-finite loss"),
    }
    for r in results:
        assert r["raised_at"] == single


def test_broadcast_state_sends_rank_0s_counters_and_history_and_checks_shapes(ranks) -> None:
    _, results = ranks
    for r in results:
        b = r["broadcast"]
        assert (b["step"], b["epoch"], b["history"]) == (3, 1, {"train": {"loss": (0.5,)}})
        assert b["ema_decay"] == 0.8
        assert "process 1's state is not shaped as rank 0's: it has 'ema." in b["refused"]
        wider = "'params.0.bias' is float64 (16,) on rank 0 and float64 (17,) there"
        assert wider in b["refused_shape"]
    assert_same(results[0]["broadcast"]["ema"], results[1]["broadcast"]["ema"])
    assert_same(results[0]["broadcast"]["params"], results[1]["broadcast"]["params"])
    # What a step makes as it runs reaches a process whose state lacks it.
    assert_same(results[0]["broadcast"]["window"], results[1]["broadcast"]["window"])
    assert results[1]["broadcast"]["window"]["micro_step"] == 1


def test_broadcast_state_sends_rank_0s_leaves_that_are_not_tensors(tmp_path: Path) -> None:
    """A subclass's float field (a leaf, which clone and checkpoints keep) comes from rank
    0 as its tensors do, instead of failing in every process."""
    torchrun(tmp_path, job=Path(__file__).parent / "jobs" / "leaf_broadcast_job.py")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert r0["best"] == r1["best"] == 1.0
    assert_same(r0["params"], r1["params"])


def test_metrics_are_matched_by_name_across_processes(ranks) -> None:
    _, results = ranks
    for r in results:
        assert r["metric_names"]["only0"] == [1.0]
        assert r["metric_names"]["only1"] == [2.0]
        assert r["metric_names"]["own"] == [0.0]  # a callback's metric: rank 0's
        assert r["metric_names"]["part/own"] == [0.0]
        assert r["metric_names"]["splits"] == ["train", "train/part"]
        assert len(r["metric_names"]["loss"]) == 1
        assert "pred" not in r["metric_names"]  # an output in rank 0


def test_a_batch_skipped_for_one_process_nan_drops_out_of_every_process_means(ranks) -> None:
    """A NaN in one process's half: the other's finite loss for that batch is left out
    too, so the epoch's means are one process's over the whole batches (where the loss
    of that batch is NaN), with and without accumulation."""
    for k, means in zip((1, 2), ([ddp_job.skip_epoch_means(1, 0, k) for k in (1, 2)])):
        assert means["loss"] == means["loss"]  # not NaN: the finite batches count
        for r in ranks[1]:
            got = r["skip_epoch_means"][k - 1]
            assert got == pytest.approx(means, rel=1e-12), k


def test_finite_only_means_over_processes_equal_one_process_over_all(ranks) -> None:
    """The values each process left out are left out of the counts of all."""
    _, results = ranks
    single = ddp_job.finite_only_means(None)
    assert single == pytest.approx({"loss": (3 * 1.0 + 4.0) / 4, "acc": (1.5 + 2.0) / 6})
    for r in results:
        assert r["finite_only_means"] == pytest.approx(single)


def test_frozen_parameters_are_not_averaged(monkeypatch) -> None:
    """They are the same in every process; averaging them would cost bandwidth and, with
    3 processes, change them by rounding."""
    import fnloop.distributed
    import fnloop.step

    reduced: list[str] = []

    def spy(tensors):
        reduced.extend(tensors)
        return dict(tensors)

    monkeypatch.setattr(fnloop.step, "world_size", lambda: 2)
    monkeypatch.setattr(fnloop.distributed, "mean_over_processes", spy)
    module = ddp_job.with_bn()
    module[0].requires_grad_(False)
    state = fl.TrainState.create(module, tx=ddp_job.tx())
    x, y = ddp_job.data(8)
    fl.make_train_step(ddp_job.classify)(state, (x, y))
    assert "buffer/0.weight" not in reduced and "grad/0.weight" not in reduced
    assert {"grad/3.weight", "buffer/1.running_mean", "extra/loss"} <= set(reduced)


def test_fit_averages_an_open_window_without_the_frozen_parameters(monkeypatch) -> None:
    """fit's mean of an open accumulation window (a second fit, or a checkpoint) leaves
    the frozen parameters out as the step does."""
    import fnloop.distributed
    from fnloop.fit import _window_mean

    reduced: list[str] = []

    def spy(tensors):
        reduced.extend(tensors)
        return dict(tensors)

    # (fnloop.fit is the function: the module is found by its name.)
    monkeypatch.setattr(sys.modules["fnloop.fit"], "world_size", lambda: 2)
    monkeypatch.setattr(fnloop.distributed, "mean_over_processes", spy)
    module = ddp_job.with_bn()
    module[0].requires_grad_(False)
    state = fl.TrainState.create(module, tx=ddp_job.tx())
    state, _ = fl.make_train_step(ddp_job.classify, accumulation_steps=2)(state, ddp_job.data(8))
    assert state.grad_accum is not None
    _window_mean(state)
    assert "buffer/0.weight" not in reduced and "grad/0.weight" not in reduced
    assert {"grad/3.weight", "buffer/1.running_mean"} <= set(reduced)


@pytest.mark.parametrize("world", [2, 10, 12])
def test_skipping_keeps_finite_metrics_with_any_number_of_processes(monkeypatch, world) -> None:
    """Whether a metric is finite everywhere rides on the gradients' all-reduce: a mean
    of ones over 10 or 12 processes rounds to 1 +- 1 ulp, which once made every finite
    metric NaN (each process's all-reduce is simulated by summing ``world`` copies)."""
    import fnloop.distributed
    import fnloop.step

    def all_reduce(flat: torch.Tensor) -> None:
        total = torch.zeros_like(flat)
        for _ in range(world):
            total += flat
        flat.copy_(total)

    monkeypatch.setattr(fnloop.step, "world_size", lambda: world)
    monkeypatch.setattr(fnloop.distributed, "world_size", lambda: world)
    monkeypatch.setattr(fnloop.distributed, "collective_device", lambda t: t.device)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    state = fl.TrainState.create(ddp_job.mlp().float(), tx=ddp_job.tx())
    x, y = ddp_job.data(8)
    step = fl.make_train_step(ddp_job.classify, on_nonfinite="skip")
    _, metrics = step(state, (x.float(), y))
    assert torch.isfinite(metrics["loss"]) and torch.isfinite(metrics["acc"])
    own = fl.make_eval_step(ddp_job.classify)(state, (x.float(), y))
    assert_close(metrics["loss"], own["loss"])


BAD_INPUT_JOB = Path(bad_input_job.__file__)


def refused_in_every_process(tmp_path: Path, case: str) -> list[str]:
    """Runs ``case`` of the bad-input job in two processes; the error each one saved."""
    torchrun(tmp_path, case, job=BAD_INPUT_JOB, timeout=240)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True)["error"] for r in range(2)]


@pytest.mark.slow
def test_train_loaders_of_different_lengths_are_refused_in_every_process(tmp_path) -> None:
    """The process with more batches would wait in its extra step's all-reduce forever."""
    for error in refused_in_every_process(tmp_path, "unequal_train"):
        assert "different lengths ([5, 4] batches, by rank)" in error
        assert "DistributedSampler" in error


@pytest.mark.slow
def test_skipping_steps_whose_metric_names_differ_by_process(tmp_path) -> None:
    """The flags of which metrics are finite have one size in every process (the
    collectives need it; gloo aborted, or hung with accumulation): a metric is NaN in
    every process that reports it at a call where one process's value was not finite."""
    torchrun(tmp_path, "other_metric_names", job=BAD_INPUT_JOB, timeout=240)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    for k in (1, 2):
        finite0, finite1 = r0[f"k{k}"]["finite"], r1[f"k{k}"]["finite"]
        ok = {"loss": True, "rare": True, "rare2": True}
        for i in range(3 * k):
            want = {**ok, "rare": i != k, "loss": i != 2 * k}
            assert finite0[i] == want, (k, i)
            assert finite1[i] == {"loss": want["loss"]}, (k, i)
        assert r0[f"k{k}"]["skipped"] == r1[f"k{k}"]["skipped"] == 1
        assert_same(r0[f"k{k}"]["params"], r1[f"k{k}"]["params"])


@pytest.mark.slow
def test_a_process_with_an_empty_validation_share_takes_part(tmp_path) -> None:
    """A validation set smaller than the number of processes leaves a share empty: the
    means are the other processes' (one process's over the whole set), not an error."""
    single = bad_input_job.empty_valid_share(0, world=1)
    torchrun(tmp_path, "empty_valid_share", job=BAD_INPUT_JOB, timeout=240)
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        assert list(got) == list(single)
        for key, values in single.items():
            assert_close(torch.tensor(got[key]), torch.tensor(values), rtol=1e-12, atol=0)


@pytest.mark.slow
def test_a_train_loader_without_a_distributed_sampler_is_warned_about(tmp_path) -> None:
    """Every process would train on the whole data set; a DistributedSampler or a Subset
    (this process's share) is not warned about. Only rank 0 logs."""
    torchrun(tmp_path, "train_samplers", job=BAD_INPUT_JOB, timeout=240)
    logs = torch.load(tmp_path / "rank0.pt", weights_only=True)
    warned = [m for m in logs["plain"] if "no DistributedSampler" in m]
    assert len(warned) == 1 and "each of the 2 processes" in warned[0], logs["plain"]
    assert logs["sampler"] and logs["subset"]  # (the handler got fit's lines)
    assert not [m for m in logs["sampler"] + logs["subset"] if "DistributedSampler" in m]
    # Rank 1 logs nothing, not even to a handler the script attached to the run's logger.
    assert torch.load(tmp_path / "rank1.pt", weights_only=True) == {
        "plain": [],
        "sampler": [],
        "subset": [],
    }


@pytest.mark.slow
def test_a_failure_in_another_process_says_why_in_rank_0s_log(tmp_path) -> None:
    """Rank 0 only sees its all-reduce cut off ("Connection closed by peer"); the process
    that failed writes its own error into the log file, before rank 0's line."""
    torchrun(tmp_path, "fails_in_rank_1", job=BAD_INPUT_JOB, timeout=240, fails=True)
    log = (tmp_path / "run" / "run_training.log").read_text(encoding="utf-8")
    errors = [
        line.partition(" - ERROR - ")[2] for line in log.splitlines() if " - ERROR - " in line
    ]
    assert len(errors) == 2, log
    assert errors[0] == "Process 1 of 2: Stopped by ValueError in epoch 1: a bug in rank 1 alone."
    assert errors[1].startswith("Stopped by "), log  # rank 0's own (torch's words)


@pytest.mark.slow
def test_a_failure_in_rank_0_alone_gets_no_line_from_the_process_it_cut_off(tmp_path) -> None:
    torchrun(tmp_path, "fails_in_rank_0", job=BAD_INPUT_JOB, timeout=240, fails=True)
    log = (tmp_path / "run" / "run_training.log").read_text(encoding="utf-8")
    errors = [
        line.partition(" - ERROR - ")[2] for line in log.splitlines() if " - ERROR - " in line
    ]
    assert len(errors) == 1, log
    assert errors[0].startswith("Stopped by ValueError in epoch 1: a bug in rank 0 alone."), log


@pytest.mark.slow
def test_fit_given_a_window_open_in_rank_0_alone_goes_on_from_it(tmp_path) -> None:
    """The processes cannot average a window that only one of them has (it waited in
    the all-reduce forever): rank 0's goes on, as when every process has that one."""
    torchrun(tmp_path, "window_in_rank_0", job=BAD_INPUT_JOB, timeout=240)
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        assert got["rank0"]["counters"] == got["everywhere"]["counters"] == (2, 1)
        assert_same(got["rank0"]["params"], got["everywhere"]["params"])


@pytest.mark.slow
def test_fit_settings_that_differ_from_rank_0s_are_refused_in_every_process(tmp_path) -> None:
    """A valid loader in rank 0 alone put the processes' collective calls out of step
    (a hang, or another call's data in the wrong gather)."""
    for error in refused_in_every_process(tmp_path, "valid_in_rank_0_alone"):
        assert "other settings in process 1 than in rank 0: valid loader given is" in error
        assert "False there and True in rank 0" in error


@pytest.mark.slow
def test_the_run_folder_is_complete_in_every_process_when_fit_returns(tmp_path) -> None:
    """Rank 0 writes best_model.pt and the plot after the last epoch: the other processes
    wait for it before fit returns."""
    torchrun(tmp_path, "best_model_after_fit", job=BAD_INPUT_JOB, timeout=240)
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        assert got == {"best_model": True, "plot": True}, r


def test_complex_buffers_are_averaged_like_real_ones(monkeypatch) -> None:
    import fnloop.distributed

    reduced: list[str] = []

    def spy(tensors):
        reduced.extend(tensors)
        return dict(tensors)

    monkeypatch.setattr(fnloop.distributed, "mean_over_processes", spy)
    fnloop.distributed.mean_grads_and_buffers(
        {"w": torch.ones(2)},
        {"real": torch.ones(2), "cplx": torch.ones(2, dtype=torch.complex64)},
        frozen=(),
    )
    assert {"buffer/real", "buffer/cplx"} <= set(reduced)
