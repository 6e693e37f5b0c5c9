"""Shared helpers for the benchmarks: the benchmark models, timing, interleaving, medians,
page faults, RSS, machine information and table formatting.

Nothing here imports fnloop, so the helpers can be reused by any benchmark script
(``benchmarks/step.py``, ``benchmarks/fit.py``, ``benchmarks/gpu.py``,
``benchmarks/ddp.py``).
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

# --------------------------------------------------------------------------- models
# One definition for every script, so that the GPU and data-parallel figures are the CPU
# benchmark's models on another device or in other processes.


def tiny_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
    )


def cnn(conv_bias: bool = True) -> nn.Module:
    """The CNN+BN on 1x8x8 inputs. ``conv_bias=False`` drops the biases of the two
    convolutions, which BatchNorm right after them cancels: their gradient is ~0, and Adam
    turns its rounding noise into steps of about ``lr`` either way, so checks that compare
    two implementations parameter by parameter (``gpu.py``'s) leave them out this way."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=conv_bias),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, bias=conv_bias),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 8 * 8, 10),
    )


# name -> (label, factory, batch size, input shape without the batch dimension)
MODELS: dict[str, tuple[str, Callable[[], nn.Module], int, tuple[int, ...]]] = {
    "tiny": ("tiny MLP 32-64-10, b=32", tiny_mlp, 32, (32,)),
    "mlp": ("MLP 784-1024-1024-10, b=128", mlp, 128, (784,)),
    "cnn": ("CNN+BN 1x8x8, b=64", cnn, 64, (1, 8, 8)),
}


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------- machine info


def cpu_model() -> str:
    """The CPU model name from ``/proc/cpuinfo`` (or ``platform.processor()``)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """CPU, cores, threads, torch and Python versions, date: printed above every table."""
    import torch

    return {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def print_machine_info(extra: dict[str, Any] | None = None) -> None:
    info = machine_info()
    if extra:
        info.update(extra)
    width = max(len(k) for k in info)
    for key, value in info.items():
        print(f"{key:<{width}} : {value}")
    sys.stdout.flush()


# --------------------------------------------------------------------------- counters


def minor_faults() -> int:
    """Minor page faults of this process so far (``ru_minflt``)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB: ``VmHWM`` from ``/proc/self/status``,
    or ``ru_maxrss`` (KiB on Linux) where there is no ``/proc``.

    On Linux ``ru_maxrss`` is not a fresh interpreter's own: a process that ``subprocess``
    starts (vfork or fork, then exec) reports the larger of its own peak and the peak its
    parent had reached, so a child would show a benchmark parent's peak whenever that was
    the higher. ``VmHWM`` counts the memory of the running program only.
    """
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024.0 if sys.platform != "darwin" else rss / 2**20


def current_rss_mb() -> float:
    """Current resident set size in MiB (from ``/proc/self/statm``)."""
    try:
        with open("/proc/self/statm", encoding="utf-8") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def iqr(xs: Sequence[float]) -> tuple[float, float]:
    """The 25th and 75th percentiles (the spread printed beside medians)."""
    if len(xs) < 2:
        x = xs[0] if xs else float("nan")
        return x, x
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


# --------------------------------------------------------------------------- other load


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from ``/proc/stat``."""
    with open("/proc/stat", encoding="utf-8") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


def _own_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class LoadMeter:
    """CPU cores kept busy by *other* processes while this one runs (from /proc/stat).

    ``read()`` returns the average number of cores others used since the last call.
    Resolution is one jiffy (10 ms), so readings over short windows are rough.
    """

    def __init__(self) -> None:
        self.available = os.path.exists("/proc/stat")
        self._hz = os.sysconf("SC_CLK_TCK") if self.available else 100
        self.reset()

    def reset(self) -> None:
        self._t = time.perf_counter()
        self._own = _own_cpu_s()
        self._busy = _cpu_jiffies()[0] if self.available else 0

    def read(self) -> float:
        if not self.available:
            return float("nan")
        t, own, busy = time.perf_counter(), _own_cpu_s(), _cpu_jiffies()[0]
        wall = max(t - self._t, 1e-9)
        others = max(0.0, (busy - self._busy) / self._hz - (own - self._own)) / wall
        self._t, self._own, self._busy = t, own, busy
        return others


def load_line() -> str:
    """Other processes' CPU use over one second, and the load average."""
    try:
        with open("/proc/loadavg", encoding="utf-8") as f:
            loadavg = " ".join(f.read().split()[:3])
    except OSError:
        loadavg = "n/a"
    return f"other processes: {wait_for_quiet(0):.2f} cores busy (1 s sample); loadavg {loadavg}"


def wait_for_quiet(max_wait_s: float, threshold: float = 0.3, window_s: float = 1.0) -> float:
    """Waits (up to ``max_wait_s``) until other processes use < ``threshold`` cores.

    Returns the other load seen in the last window. The benchmarks call it before every
    table: on a shared 2-core machine a concurrent test run makes torch's two OpenMP
    threads wait on each other, and step times grow tenfold or more.
    """
    meter = LoadMeter()
    if not meter.available:
        return float("nan")
    deadline = time.monotonic() + max_wait_s
    quiet = 0
    load = float("nan")
    while True:
        time.sleep(window_s)
        load = meter.read()
        quiet = quiet + 1 if load < threshold else 0
        if quiet >= 2 or time.monotonic() >= deadline:
            return load


# --------------------------------------------------------------------------- interleaving


@dataclass
class Contender:
    """One side of a comparison.

    ``run(n)`` performs ``n`` steps (it keeps its own state between calls).
    """

    name: str
    run: Callable[[int], Any]
    times_us: list[float] = field(default_factory=list)  # per-step time of each block
    faults: list[float] = field(default_factory=list)  # page faults per step of each block

    def median_us(self, rounds: Sequence[int] | None = None) -> float:
        xs = self.times_us if rounds is None else [self.times_us[i] for i in rounds]
        return median(xs)

    def median_faults(self, rounds: Sequence[int] | None = None) -> float:
        xs = self.faults if rounds is None else [self.faults[i] for i in rounds]
        return median(xs)


@dataclass
class Interleaved:
    """What :func:`interleave` measured: per-round other load and which rounds count."""

    contenders: Sequence[Contender]
    block_steps: int
    round_load: list[float]
    quiet_rounds: list[int]
    max_other_load: float

    @property
    def rounds(self) -> list[int] | None:
        """The rounds the medians use: the quiet ones, or all when too few were quiet."""
        n = len(self.round_load)
        return self.quiet_rounds if len(self.quiet_rounds) >= max(5, n // 3) else None

    def us(self, name: str) -> float:
        return self._get(name).median_us(self.rounds)

    def faults(self, name: str) -> float:
        return self._get(name).median_faults(self.rounds)

    def iqr(self, name: str) -> tuple[float, float]:
        c = self._get(name)
        rounds = self.rounds
        return iqr(c.times_us if rounds is None else [c.times_us[i] for i in rounds])

    def paired(self, name: str, ref: str) -> tuple[float, float, float]:
        """Median and IQR of ``name``'s time over ``ref``'s, block by block in each round.

        Both blocks of a round ran within a second or two of each other, so a slow period
        of the machine scales both and cancels in their ratio; the ratio of the two
        medians can pair a block of a slow period with one of a fast period.
        """
        a, b = self._get(name).times_us, self._get(ref).times_us
        rounds = self.rounds if self.rounds is not None else range(len(a))
        ratios = [a[i] / b[i] for i in rounds]
        return (median(ratios), *iqr(ratios))

    def note(self) -> str:
        n = len(self.round_load)
        load = f"median other load {median(self.round_load):.2f} cores"
        if self.rounds is None:
            return f"all {n} rounds used: too few had other load <= {self.max_other_load} ({load})"
        return (
            f"{len(self.rounds)}/{n} rounds with other load <= {self.max_other_load} used ({load})"
        )

    def _get(self, name: str) -> Contender:
        return next(c for c in self.contenders if c.name == name)


def balanced_order(round_index: int, items: Sequence[Any]) -> list[Any]:
    """``items`` in the order of round ``round_index``, by a Williams design: over ``k``
    rounds (``2k`` when ``k`` is odd) each item runs once in every position and right after
    every other item equally often, so neither a slow drift of the machine nor what the
    contender before left behind (caches, the allocator's state) favours one. A plain
    rotation (A B C, B C A, ...) has A run right before B in every round but one.

    >>> ["".join(balanced_order(i, "ABCD")) for i in range(4)]
    ['ABDC', 'BCAD', 'CDBA', 'DACB']
    """
    k = len(items)
    base, low, high = [0], 1, k - 1
    while len(base) < k:
        if len(base) % 2:
            base.append(low)
            low += 1
        else:
            base.append(high)
            high -= 1
    row = [(b + round_index) % k for b in base]
    if k % 2 and (round_index // k) % 2:
        row.reverse()
    return [items[j] for j in row]


def interleave(
    contenders: Sequence[Contender],
    *,
    block_steps: int,
    blocks: int,
    warmup_steps: int,
    min_block_s: float = 0.0,
    max_other_load: float = 0.5,
    clock: Callable[[], int] = time.perf_counter_ns,
    sync: Callable[[], Any] | None = None,
) -> Interleaved:
    """Times ``contenders`` in alternating blocks of ``block_steps`` steps.

    Every contender first runs ``warmup_steps`` untimed steps. When ``min_block_s`` is
    set, every contender then runs one more untimed block of ``block_steps`` steps, and
    ``block_steps`` is raised so that the fastest of those blocks would have lasted at
    least that long (tiny models: 50 steps take a few milliseconds). Then, ``blocks`` times,
    each contender runs one timed block, in :func:`balanced_order` (so slow drifts of the
    machine and the contender run just before hit every contender alike). ``gc.collect()`` runs
    between blocks, outside the timing. The CPU load of other processes is recorded per
    round; rounds where it exceeded ``max_other_load`` cores are left out of the medians
    (unless fewer than a third of the rounds, or 5, remain).

    ``clock`` (nanoseconds) is wall time by default; ``time.process_time_ns`` gives CPU
    time, which a loaded machine disturbs much less when torch runs one thread.

    ``sync``, when given, runs after ``gc.collect()`` and before each block's clock starts:
    processes that time collective steps pass ``torch.distributed.barrier``, so that no
    block starts with one process still collecting garbage (a full collection with torch
    imported takes 0.1-0.3 s, a different time in each process) and the others' first
    collective waiting for it inside their timed block.
    """
    for c in contenders:
        c.run(warmup_steps)
    if min_block_s > 0:
        per_step = []
        for c in contenders:
            t0 = time.perf_counter()
            c.run(block_steps)
            per_step.append((time.perf_counter() - t0) / block_steps)
        block_steps = max(block_steps, int(min_block_s / max(min(per_step), 1e-9)) + 1)
    meter = LoadMeter()
    round_load: list[float] = []
    for i in range(blocks):
        order = balanced_order(i, contenders)
        meter.reset()
        for c in order:
            gc.collect()
            if sync is not None:
                sync()
            f0 = minor_faults()
            t0 = clock()
            c.run(block_steps)
            t1 = clock()
            f1 = minor_faults()
            c.times_us.append((t1 - t0) / 1e3 / block_steps)
            c.faults.append((f1 - f0) / block_steps)
        round_load.append(meter.read())
    quiet = [i for i, load in enumerate(round_load) if not load > max_other_load]
    return Interleaved(contenders, block_steps, round_load, quiet, max_other_load)


# --------------------------------------------------------------------------- output


@contextlib.contextmanager
def quiet_fds(enabled: bool = True) -> Iterator[None]:
    """Sends file descriptors 1 and 2 to ``/dev/null`` (progress bars keep running)."""
    if not enabled:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table (so the output can be pasted into docs)."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            if v != v:
                return "n/a"
            return f"{v:.3g}" if abs(v) < 10 else f"{v:,.0f}"
        return str(v)

    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    for r in cells:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
    return "\n".join(lines)


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def verdict(value: float, target: float) -> str:
    """``"met"`` when ``value <= target``: the unrounded value (print it with
    :func:`judged_ratio`, so that the figure beside the verdict agrees with it)."""
    if value != value:
        return "n/a"
    return "met" if value <= target else "MISSED"


def judged_ratio(value: float, target: float, decimals: int = 2) -> str:
    """``value``, a ratio that :func:`verdict` judges against ``<= target``, as the tables
    print it: with ``decimals`` decimals, or with as many more as it takes for the printed
    figure to fall on the same side of the target as the value itself.

    Every verdict column uses it: a ratio of 0.7049 printed as "0.70" beside "MISSED"
    (target <= 0.7) would read as a contradiction, and judging the rounded figure instead
    would call 0.7049 met. Here it prints "0.705"; 0.6951 prints "0.70" (met).
    """
    if value != value:
        return "n/a"
    met = value <= target
    for d in range(decimals, 18):
        text = f"{value:.{d}f}"
        if (float(text) <= target) == met:
            return text
    return repr(value)  # round-trips: the same side as the value


# --------------------------------------------------------------------------- subprocesses


def run_child_json(args: Sequence[str], timeout: float = 600.0) -> dict[str, Any]:
    """Runs ``python <args>`` in a fresh interpreter; returns the JSON on its last line."""
    proc = subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"child {args} failed (rc={proc.returncode}):\n{proc.stdout[-2000:]}\n"
            f"{proc.stderr[-4000:]}"
        )
    return json.loads(lines[-1])


# --------------------------------------------------------------------------- allocator


def pin_malloc(trim_threshold: int = 2**31 - 1) -> bool:
    """Keeps freed memory in the process (glibc ``mallopt``), as DESIGN.md section 3 did.

    By default glibc serves big blocks with ``mmap`` (unmapped again on free) and gives
    freed heap tops back to the OS, so code that allocates and frees big tensors every
    step page-faults them in again. This turns ``mmap`` for allocations off
    (``M_MMAP_MAX=0``) and raises the trim threshold. Returns ``False`` where glibc is
    not available. Applies to every contender in the process alike.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    ok = libc.mallopt(m_mmap_max, ctypes.c_int(0))
    ok &= libc.mallopt(m_trim_threshold, ctypes.c_int(trim_threshold))
    return bool(ok)
