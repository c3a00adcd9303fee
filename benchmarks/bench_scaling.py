"""Scaling over torch.distributed ranks: seconds per distillation iteration (the exact engine sharing each
step's micro-batches) and per expert-epoch (experts dealt round robin), on 1..N ranks launched by torchrun,
with the share of the time the ranks spend in collectives.

Run::

    python benchmarks/bench_scaling.py [--layouts 1x1,2x1,1x2] [--device cpu|cuda] [--json F] [--markdown]
    python benchmarks/bench_scaling.py --layouts 1x1,2x1,4x1,8x1 --device cuda      # 1 to 8 GPUs

A layout ``RxT`` is R ranks of T threads each (``OMP_NUM_THREADS``; on CUDA one GPU per rank). On a
CPU, ``2x1`` against ``1x1`` is the scaling of the distributed path at one thread per rank, and ``1x2``
is what the same two cores give one process: the fair comparison on one machine.

What is timed (random data: the speed does not depend on the pixels; every rank draws the same):

* ``distill``: one iteration = ``trajectory_matching_loss(unroll="exact")`` + ``backward()`` at CIFAR-10
  shape (ConvNet width 128, depth 3, instance norm), IPC 10 (batch_syn 100), ``--syn-steps`` steps
  (DATM uses 80; 10 by default here to keep a CPU run short: the time is linear in the steps), DSA on;
  one warm-up iteration, then the median of ``--iterations``.
* ``experts``: :func:`~datm_fast.experts.build_buffer` of ``--experts`` experts x ``--epochs`` epochs
  (GSAM, batch 256, DSA) on ``--images`` CIFAR-shaped images (test set: a fifth of that); s/expert-epoch
  is its wall time over experts x epochs (at 50,000 images an expert-epoch is 50,000 / images times as
  long).
* ``collectives``: the seconds inside all-reduce, gather and broadcast calls (synchronised on CUDA) over
  the timed wall time, on rank 0. It includes waiting for a slower rank: load imbalance counts as
  communication here, which is what a user loses to it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from datm_fast.augment import DSAConfig
from datm_fast.data import ImageDataset
from datm_fast.distill import make_unroll_plan, trajectory_matching_loss
from datm_fast.distributed import Distributed, from_environment
from datm_fast.experts import ExpertConfig, build_buffer
from datm_fast.models import ConvNetSpec, init_flat_params

CIFAR_CONVNET = ConvNetSpec(3, 10, 32)  # width 128, depth 3, instance norm: 320,010 parameters
TINY_CONVNET = ConvNetSpec(3, 10, 8, width=8, depth=2)  # --tiny: the test's shape


@dataclass(frozen=True)
class TimedRanks(Distributed):
    """A :class:`Distributed` that adds the seconds of its collectives into ``spent[0]``."""

    device: torch.device = field(default=torch.device("cpu"), compare=False)
    spent: list[float] = field(default_factory=lambda: [0.0], compare=False, repr=False)

    def _timed(self, work: Callable[[], Any]) -> Any:
        if not self.active:
            return work()
        _sync(self.device)
        started = time.perf_counter()
        out = work()
        _sync(self.device)
        self.spent[0] += time.perf_counter() - started
        return out

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._timed(lambda: super(TimedRanks, self).all_reduce_sum(tensor))

    def all_gather_object(self, value: Any) -> list[Any]:
        return self._timed(lambda: super(TimedRanks, self).all_gather_object(value))

    def broadcast_object(self, value: Any, src: int = 0) -> Any:
        return self._timed(lambda: super(TimedRanks, self).broadcast_object(value, src))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----- one rank's work (under torchrun) -----------------------------------------------------------------------
def measure_distill(ranks: TimedRanks, spec: ConvNetSpec, ipc: int, syn_steps: int, iterations: int) -> dict:
    device = ranks.device
    g = torch.Generator().manual_seed(0)
    n = ipc * spec.num_classes
    start = init_flat_params(spec, g).to(device)
    target = start + 0.01 * torch.randn(spec.num_params, generator=g).to(device)
    images = torch.randn(n, *spec.input_shape, generator=g).to(device).requires_grad_()
    labels = torch.randn(n, spec.num_classes, generator=g).to(device).requires_grad_()
    lr = torch.tensor(0.01, device=device).requires_grad_()
    seconds, spent = [], []
    for it in range(1 + iterations):
        plan = make_unroll_plan(
            n,
            syn_steps,
            n,
            image_size=spec.image_size,
            augment=DSAConfig(),
            generator=torch.Generator(device).manual_seed(it),
            device=device,
        )
        ranks.barrier()
        _sync(device)
        before, started = ranks.spent[0], time.perf_counter()
        loss = trajectory_matching_loss(spec, start, target, images, labels, lr, plan=plan, distributed=ranks)
        loss.backward()
        _sync(device)
        if it > 0:  # the first one warms up (allocations, lazy initialisation)
            seconds.append(time.perf_counter() - started)
            spent.append(ranks.spent[0] - before)
        images.grad = labels.grad = lr.grad = None
    return {
        "s_per_iteration": statistics.median(seconds),
        "collective_share": sum(spent) / sum(seconds),
        "shape": f"ipc {ipc} (batch {n}) x {syn_steps} steps",
    }


def synthetic_cifar(n_train: int, spec: ConvNetSpec, seed: int = 0) -> ImageDataset:
    g = torch.Generator().manual_seed(seed)
    n_test = max(1, n_train // 5)
    shape = spec.input_shape
    return ImageDataset(
        "synthetic-cifar",
        torch.randn(n_train, *shape, generator=g),
        torch.randint(0, spec.num_classes, (n_train,), generator=g),
        torch.randn(n_test, *shape, generator=g),
        torch.randint(0, spec.num_classes, (n_test,), generator=g),
        classes=tuple(str(i) for i in range(spec.num_classes)),
    )


def measure_experts(ranks: TimedRanks, spec: ConvNetSpec, work: Path, experts: int, epochs: int, images: int) -> dict:
    data = synthetic_cifar(images, spec)
    config = ExpertConfig(epochs=epochs)
    out = work / f"buffer-{ranks.world_size}-ranks-{os.environ.get('OMP_NUM_THREADS', 'all')}-threads"
    ranks.barrier()
    before, started = ranks.spent[0], time.perf_counter()
    build_buffer(out, data, spec, config, experts, device=ranks.device, distributed=ranks)
    _sync(ranks.device)
    wall = time.perf_counter() - started
    return {
        "s_per_expert_epoch": wall / (experts * epochs),
        "collective_share": (ranks.spent[0] - before) / wall,
        "shape": f"{experts} experts x {epochs} epochs, {images} images",
    }


def worker(args: argparse.Namespace) -> None:
    device_type = "cuda" if args.device == "cuda" else "cpu"
    with from_environment(device_type, timeout_s=600) as joined:
        device = torch.device("cuda", joined.local_rank) if device_type == "cuda" else torch.device("cpu")
        ranks = TimedRanks(joined.rank, joined.world_size, joined.local_rank, joined.timeout_s, device=device)
        spec = TINY_CONVNET if args.tiny else CIFAR_CONVNET
        row = {
            "ranks": ranks.world_size,
            "threads": torch.get_num_threads(),
            "distill": measure_distill(ranks, spec, args.ipc, args.syn_steps, args.iterations),
            "experts": measure_experts(ranks, spec, Path(args.work), args.experts, args.epochs, args.images),
        }
        if ranks.is_main:
            Path(args.row).write_text(json.dumps(row))


# ----- the table -------------------------------------------------------------------------------------------------
def parse_layouts(text: str) -> list[tuple[int, int]]:
    """``"1x1,2x1,1x2"`` -> [(1, 1), (2, 1), (1, 2)] (ranks x threads per rank)."""
    layouts = []
    for part in text.split(","):
        try:
            ranks, threads = (int(v) for v in part.strip().lower().split("x"))
        except ValueError:
            raise ValueError(f"--layouts: {part!r} is not RANKSxTHREADS (e.g. 2x1)") from None
        if ranks < 1 or threads < 1:
            raise ValueError(f"--layouts: {part!r}: ranks and threads must be >= 1")
        layouts.append((ranks, threads))
    return layouts


def run_layout(args: argparse.Namespace, ranks: int, threads: int, work: Path) -> dict:
    row = work / f"row-{ranks}x{threads}.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    command += [__file__, "--worker", "--row", str(row), "--work", str(work), "--device", args.device]
    command += ["--ipc", str(args.ipc), "--syn-steps", str(args.syn_steps), "--iterations", str(args.iterations)]
    command += ["--experts", str(args.experts), "--epochs", str(args.epochs), "--images", str(args.images)]
    command += ["--tiny"] if args.tiny else []
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{ranks}x{threads} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(row.read_text())


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def render(rows: list[dict], markdown: bool) -> str:
    head = ["ranks x threads", "s/iteration", "speed-up", "collectives", "s/expert-epoch", "speed-up", "collectives"]
    base_iteration, base_epoch = rows[0]["distill"]["s_per_iteration"], rows[0]["experts"]["s_per_expert_epoch"]
    lines = []
    for r in rows:
        d, e = r["distill"], r["experts"]
        lines.append(
            [
                f"{r['ranks']} x {r['threads']}",
                f"{d['s_per_iteration']:.3f}",
                f"{base_iteration / d['s_per_iteration']:.2f}x",
                f"{100 * d['collective_share']:.1f}%",
                f"{e['s_per_expert_epoch']:.3f}",
                f"{base_epoch / e['s_per_expert_epoch']:.2f}x",
                f"{100 * e['collective_share']:.1f}%",
            ]
        )
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(out + ["| " + " | ".join(line) + " |" for line in lines])
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in [head, *lines])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layouts", default="1x1,2x1,1x2", help="RANKSxTHREADS, comma-separated (default: 1x1,2x1,1x2)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--syn-steps", type=int, default=10)
    p.add_argument("--iterations", type=int, default=3, help="timed distillation iterations (after one warm-up)")
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--images", type=int, default=512, help="train images of the experts' data")
    p.add_argument("--tiny", action="store_true", help="an 8x8 ConvNet of width 8: seconds, for the test")
    p.add_argument("--json", type=Path, default=None, help="also write the rows and the machine here")
    p.add_argument("--markdown", action="store_true", help="the table as Markdown rows")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--row", default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    layouts = parse_layouts(args.layouts)
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as tmp:
        rows = []
        for ranks, threads in layouts:
            rows.append(run_layout(args, ranks, threads, Path(tmp)))
            print(f"{ranks} x {threads}: done", file=sys.stderr, flush=True)
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"{device_name(args.device)}, torch {torch.__version__}, {when}"
    print(f"{machine}; distill {rows[0]['distill']['shape']}; experts {rows[0]['experts']['shape']}")
    print(render(rows, args.markdown))
    if args.json is not None:
        args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
