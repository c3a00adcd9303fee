"""Benchmark harness of the unroll engines at the shapes of the paper's configs.

Each measurement times whole distillation iterations (the unroll plus ``loss.backward()``) of one
engine on random expert parameters and random synthetic data, so it needs no buffer. Used by
``datm-fast bench`` and ``benchmarks/bench_unroll.py``.

Beside our engines, ``upstream-full`` and ``upstream-tesla`` time upstream DATM's own inner loops
(``distill/DATM.py`` and ``distill/DATM_tesla.py``, re-stated in
:mod:`datm_fast.reference.upstream_unroll`, per-sample DiffAugment included) at the same shapes in the
same run, so a table's upstream figures come from the machine it was measured on.

Peak memory is ``torch.cuda.max_memory_allocated`` on a GPU. On CPU it is the peak resident set size
of the process, so each (shape, engine) pair runs in a fresh subprocess when ``isolate=True`` (the
default of the command): one process's peak would otherwise hide the next one's.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from .augment import DSAConfig
from .distill.unroll import EngineOptions, trajectory_matching_loss
from .models import ConvNetSpec, init_flat_params
from .reference.upstream_unroll import upstream_full_iteration, upstream_minibatches, upstream_tesla_iteration
from .step_graphs import StepGraphs
from .utils import peak_rss_bytes

__all__ = [
    "BenchShape",
    "SHAPES",
    "UPSTREAM",
    "UPSTREAM_ENGINES",
    "BenchResult",
    "engine_options",
    "run_bench",
    "run_bench_isolated",
    "check_exact",
    "profile_summary",
    "profile_line",
]


@dataclass(frozen=True)
class BenchShape:
    """One paper config's shape: the synthetic set, the inner loop and the network."""

    name: str
    channels: int
    image_size: int
    num_classes: int
    ipc: int
    batch_syn: int
    syn_steps: int
    depth: int = 3

    @property
    def num_images(self) -> int:
        return self.ipc * self.num_classes

    def scaled(self, steps_scale: float) -> BenchShape:
        """The same shape with ``syn_steps`` scaled (at least 1): reduced runs for slow machines."""
        return replace(self, syn_steps=max(1, round(self.syn_steps * steps_scale)))


SHAPES: dict[str, BenchShape] = {
    s.name: s
    for s in (
        BenchShape("cifar10-ipc1", 3, 32, 10, 1, 10, 80),
        BenchShape("cifar10-ipc10", 3, 32, 10, 10, 100, 80),
        BenchShape("cifar10-ipc50", 3, 32, 10, 50, 500, 80),
        BenchShape("cifar10-ipc500", 3, 32, 10, 500, 1000, 40),
        BenchShape("cifar10-ipc1000", 3, 32, 10, 1000, 1000, 100),
        BenchShape("cifar100-ipc50", 3, 32, 100, 50, 1000, 80),
        BenchShape("tiny-ipc10", 3, 64, 200, 10, 500, 40, depth=4),
        BenchShape("tiny-ipc50", 3, 64, 200, 50, 1000, 20, depth=4),
    )
}

# Upstream DATM's own loop, seconds per iteration and peak memory (GB); None = out of memory.
# H100: ../shared/docs/DATM.md (PyTorch 2.11). CPU: the 2-core development machine, peak RSS (issue 4).
UPSTREAM: dict[str, dict[str, dict[str, tuple[float, float] | None]]] = {
    "h100": {
        "cifar10-ipc1": {"full": (1.09, 2.6), "tesla": (1.50, 0.25)},
        "cifar10-ipc10": {"full": (1.19, 22.9), "tesla": (1.64, 1.0)},
        "cifar10-ipc50": {"full": None, "tesla": (3.09, 5.7)},
        "cifar10-ipc500": {"full": None, "tesla": (2.79, 10.1)},
        "cifar10-ipc1000": {"full": None, "tesla": (6.95, 10.3)},
        "cifar100-ipc50": {"full": None, "tesla": (5.66, 9.7)},
        "tiny-ipc10": {"full": None, "tesla": (5.18, 20.2)},
        "tiny-ipc50": {"full": None, "tesla": (5.02, 38.3)},
    },
    "cpu": {
        "cifar10-ipc1": {"full": (6.5, 3.2), "tesla": (8.4, 0.64)},
        "cifar10-ipc10": {"full": None, "tesla": (116.0, 1.5)},
    },
}


# Engines that run upstream's own loop (re-stated), and which of our engines computes the same function.
UPSTREAM_ENGINES: dict[str, str] = {"upstream-full": "full", "upstream-tesla": "tesla"}


@dataclass
class BenchResult:
    shape: str
    engine: str
    device: str
    syn_steps: int
    batch_syn: int
    num_images: int
    micro_batch: int | None
    seconds: list[float] = field(default_factory=list)  # per timed iteration
    peak_gb: float = 0.0  # GPU: max_memory_allocated; CPU: peak RSS of the process
    baseline_gb: float = 0.0  # the same measure before the first iteration (data, params, libraries)
    error: str | None = None
    profile: dict[str, Any] | None = None  # one more iteration under torch.profiler (run_bench(profile=True))

    @property
    def mean(self) -> float:
        return statistics.fmean(self.seconds) if self.seconds else float("nan")

    @property
    def std(self) -> float:
        return statistics.stdev(self.seconds) if len(self.seconds) > 1 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(mean_s=self.mean, std_s=self.std)
        return d


def _peak_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return peak_rss_bytes() / 1e9


def _problem(shape: BenchShape, device: torch.device, dtype: torch.dtype, seed: int):
    spec = ConvNetSpec(shape.channels, shape.num_classes, shape.image_size, depth=shape.depth)
    g = torch.Generator().manual_seed(seed)
    start = init_flat_params(spec, g, dtype=dtype).to(device)
    target = (start.cpu() + 0.01 * torch.randn(spec.num_params, generator=g, dtype=dtype)).to(device)
    images = torch.randn(shape.num_images, shape.channels, shape.image_size, shape.image_size, generator=g, dtype=dtype)
    labels = torch.randn(shape.num_images, shape.num_classes, generator=g, dtype=dtype)
    lr = torch.tensor(0.01, dtype=dtype)
    return spec, start, target, images.to(device), labels.to(device), lr.to(device)


def engine_options(engine: str, *, micro_batch: int | None = None, backend: str = "auto") -> EngineOptions:
    """The engine options a benchmark ``engine`` names: ``full``, ``exact`` or ``tesla``, optionally with
    option changes after a colon, ``exact:fused=false,step=autograd`` (any :class:`EngineOptions` field;
    values are read as the config reads them). ``micro_batch`` and ``backend`` apply unless the name sets them.

    ``upstream-full`` and ``upstream-tesla`` (:data:`UPSTREAM_ENGINES`) run upstream's loop as it is
    written, which takes no options; for them this returns the options of our engine that computes the
    same function with PyTorch's ops (``full`` or ``tesla``, unfused, through autograd).
    """
    unroll, _, rest = engine.partition(":")
    if unroll in UPSTREAM_ENGINES:
        if rest:
            raise ValueError(f"engine {engine!r}: {unroll} is upstream's loop as written and takes no options")
        return EngineOptions(unroll=UPSTREAM_ENGINES[unroll], fused=False, step="autograd", backend="torch")  # type: ignore[arg-type]
    changes: dict[str, str] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"engine {engine!r}: expected NAME or NAME:option=value,..., got {item!r}")
        changes[key.strip()] = value.strip()
    unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(EngineOptions)})
    if unknown:
        raise ValueError(f"engine {engine!r}: unknown engine option(s) {', '.join(unknown)}")
    base = {"micro_batch": micro_batch, "backend": backend}
    return EngineOptions(**{**base, "unroll": unroll, **changes})  # type: ignore[arg-type]


def _iteration(spec, problem, shape, options: EngineOptions, seed, device, leaves=None, step_graphs=None):
    """One iteration; ``leaves`` (the set as leaf tensors, reused as the outer loop reuses its set) and
    ``step_graphs`` (the run's static steps) let ``graphs=on`` capture once and replay after."""
    start, target, images, labels, lr = problem
    if leaves is None:
        leaves = tuple(t.detach().clone().requires_grad_() for t in (images, labels, lr))
    x, y, a = leaves
    for t in leaves:
        t.grad = None
    gen = torch.Generator(device=device).manual_seed(seed)
    host = torch.Generator().manual_seed(seed)
    loss = trajectory_matching_loss(
        spec,
        start,
        target,
        x,
        y,
        a,
        syn_steps=shape.syn_steps,
        batch_syn=shape.batch_syn,
        augment=DSAConfig(),
        generator=gen,
        host_generator=host,
        options=options,
        step_graphs=step_graphs,
    )
    loss.backward()
    return loss.detach(), x.grad, y.grad, a.grad


def _upstream_iteration(spec, problem, shape, engine: str, seed, device):
    """One iteration of upstream's loop (``engine`` in :data:`UPSTREAM_ENGINES`) with its per-sample
    DiffAugment, drawing its minibatches and augmentations from the global RNG, as upstream does."""
    start, target, images, labels, lr = problem
    x, y, a = (t.detach().clone().requires_grad_() for t in (images, labels, lr))
    torch.manual_seed(seed)  # the caller forks the global RNG: seeding here leaves the process's state alone
    indices = upstream_minibatches(shape.num_images, shape.syn_steps, shape.batch_syn)
    iteration = upstream_full_iteration if engine == "upstream-full" else upstream_tesla_iteration
    loss = iteration(spec, start, target, x, y, a, indices, augment=True)
    return loss, x.grad, y.grad, a.grad


def run_bench(
    shape: BenchShape,
    engine: str,
    *,
    device: str | torch.device = "cpu",
    iterations: int = 2,
    warmup: int = 1,
    micro_batch: int | None = None,
    backend: str = "auto",
    seed: int = 0,
    profile: bool = False,
) -> BenchResult:
    """Time ``iterations`` distillation iterations of ``engine`` (see :func:`engine_options`: ``exact``,
    ``exact:fused=false``, ..., or upstream's loop, ``upstream-full`` and ``upstream-tesla``) at ``shape``
    in this process; with ``profile``, run one more under ``torch.profiler`` (:func:`profile_summary`)."""
    options = engine_options(engine, micro_batch=micro_batch, backend=backend)
    device = torch.device(device)
    upstream = engine.partition(":")[0] in UPSTREAM_ENGINES
    result = BenchResult(
        shape.name,
        engine,
        str(device),
        shape.syn_steps,
        shape.batch_syn,
        shape.num_images,
        None if upstream else micro_batch,  # upstream's loop takes whole minibatches
    )
    spec, *problem = _problem(shape, device, torch.float32, seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result.baseline_gb = _peak_gb(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    # One set of leaves and one StepGraphs for the whole run, as distill keeps them: graphs=on captures
    # in the warm-up iteration and replays in the timed ones.
    _, _, images, labels, lr = problem
    leaves = tuple(t.detach().clone().requires_grad_() for t in (images, labels, lr))
    step_graphs = StepGraphs()
    # Upstream's loop draws from the global RNG: forked, so that the run leaves the process's state as it was.
    rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], enabled=upstream)

    def one(i: int) -> None:
        if upstream:
            _upstream_iteration(spec, problem, shape, engine, seed + i, device)
        else:
            _iteration(spec, problem, shape, options, seed + i, device, leaves, step_graphs)
        sync()

    try:
        with rng:
            for i in range(warmup + iterations):
                sync()
                t0 = time.perf_counter()
                one(i)
                if i >= warmup:
                    result.seconds.append(time.perf_counter() - t0)
            if profile:
                sync()
                result.profile = profile_summary(lambda: one(warmup + iterations), device)
    except torch.cuda.OutOfMemoryError as exc:  # the point of the exercise for `full` at large IPC
        result.error = f"out of memory: {str(exc).splitlines()[0]}"
    result.peak_gb = _peak_gb(device)
    return result


def profile_summary(work: Any, device: torch.device, top: int = 12) -> dict[str, Any]:
    """``work()`` once under ``torch.profiler``, summarised for a benchmark row (and so for a note that
    explains a miss): the wall time (profiler overhead included), on a GPU the number of kernels
    launched and the time they kept the device busy (a launch-bound step shows busy well below wall),
    and the ``top`` operators (kernels on a GPU) by self time, in ms."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with torch_profile(activities=activities):  # the profiler's own start-up (0.5 s the first time) outside
        pass
    t0 = time.perf_counter()
    with torch_profile(activities=activities) as prof:
        work()
    wall = time.perf_counter() - t0
    summary: dict[str, Any] = {"wall_s": round(wall, 4), "device": device.type}
    if on_gpu:
        kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        summary["kernels"] = len(kernels)
        busy = sum(e.time_range.elapsed_us() for e in kernels) / 1e6
        summary["device_busy_s"] = round(busy, 4)
        summary["device_busy_share"] = round(busy / wall, 3) if wall > 0 else None

    def self_us(e: Any) -> float:
        return float(e.self_device_time_total if on_gpu else e.self_cpu_time_total)

    ranked = sorted(prof.key_averages(), key=self_us, reverse=True)[:top]
    summary["top"] = [{"name": e.key, "calls": int(e.count), "self_ms": round(self_us(e) / 1e3, 3)} for e in ranked]
    return summary


def profile_line(what: str, profile: dict[str, Any]) -> str:
    """A :func:`profile_summary` in words: ``profile exact @ cifar10-ipc10: wall 0.480 s; 9,120 kernels,
    device busy 0.210 s (44%); top: name 12.3 ms x 640, ...`` (kernels and busy time on a GPU only)."""
    parts = [f"profile {what}: wall {profile['wall_s']:.3f} s"]
    if "kernels" in profile:
        share = profile.get("device_busy_share")
        parts.append(
            f"{profile['kernels']:,} kernels, device busy {profile['device_busy_s']:.3f} s"
            + (f" ({100 * share:.0f}%)" if share is not None else "")
        )
    top = ", ".join(f"{t['name']} {t['self_ms']:.1f} ms x {t['calls']}" for t in profile["top"][:6])
    return "; ".join(parts) + f"; top: {top}"


def run_bench_isolated(shape: BenchShape, engine: str, **kwargs: Any) -> BenchResult:
    """:func:`run_bench` in a fresh Python process, so its peak memory is its own."""
    payload = json.dumps({"shape": asdict(shape), "engine": engine, "kwargs": kwargs})
    code = (
        "import json, sys; from datm_fast.bench import BenchShape, run_bench; "
        "p = json.loads(sys.argv[1]); r = run_bench(BenchShape(**p['shape']), p['engine'], **p['kwargs']); "
        "print('RESULT ' + json.dumps(r.to_dict()))"
    )
    env = os.environ.copy()
    if str(kwargs.get("device", "cpu")).startswith("cpu"):
        # As the CPU commands run (datm_fast.utils.retain_freed_memory): glibc keeps freed blocks
        # instead of unmapping them, so each step does not page-fault its activations in again
        # (CIFAR-10 IPC 1 exact: 7.24 +- 0.72 s -> 6.45 +- 0.04 s measured 2026-11-24).
        env.setdefault("MALLOC_MMAP_MAX_", "0")
        env.setdefault("MALLOC_TRIM_THRESHOLD_", str(2**31 - 1))
    proc = subprocess.run([sys.executable, "-c", code, payload], capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            d = json.loads(line[len("RESULT ") :])
            d.pop("mean_s"), d.pop("std_s")
            return BenchResult(**d)
    # Killed by the OOM killer, or crashed: report it as a result rather than losing the whole table.
    device = str(kwargs.get("device", "cpu"))
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
    return BenchResult(
        shape.name,
        engine,
        device,
        shape.syn_steps,
        shape.batch_syn,
        shape.num_images,
        kwargs.get("micro_batch"),
        error=f"process failed ({proc.returncode}): {tail[0]}",
    )


def check_exact(
    shape: BenchShape,
    *,
    device: str | torch.device = "cpu",
    micro_batch: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> dict[str, float]:
    """Relative differences of the ``exact`` gradients from the ``full`` ones at ``shape``.

    In float64 by default: there both engines agree to round-off (5e-16 measured at CIFAR-10 IPC 1,
    80 steps). In float32 the two summation orders differ by ~1e-7 per step, and over 80 steps of a
    ReLU network (whose gradient jumps where an activation changes sign) that grew to 6e-3 for the
    images gradient at the same shape: a property of float32, not of the engine.
    """
    device = torch.device(device)
    spec, *problem = _problem(shape, device, dtype, seed)
    full = _iteration(spec, problem, shape, engine_options("full"), seed, device)
    exact = _iteration(spec, problem, shape, engine_options("exact", micro_batch=micro_batch), seed, device)
    names = ("loss", "images", "labels", "lr")
    return {n: float((e - f).norm() / f.norm()) for n, e, f in zip(names, exact, full)}


def environment() -> dict[str, str]:
    """Device, date and versions, for every table of figures."""
    info = {
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "threads": str(torch.get_num_threads()),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = str(torch.version.cuda)
    return info
