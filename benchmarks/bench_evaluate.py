"""Benchmark of evaluation training (``datm_fast.evaluate``): seconds per epoch of one run at CIFAR-10
IPC 10 and IPC 50 shapes (random images, logit labels, ConvNet, batch 256, DSA), against a re-statement
of upstream's ``evaluate_synset`` loop timed in the same process; on a GPU also 5 runs at IPC 1000
(batch 128) at once, projected to the protocol's 1001 passes.

Run:  pytest benchmarks/bench_evaluate.py --benchmark-only [--benchmark-json out.json]
      python benchmarks/bench_evaluate.py [--retain-memory] [--repeats 5]   # a table for RESULTS.md

Providers:
    upstream             DataLoader(TensorDataset, shuffle=True), nn.Module, torch.optim.SGD, upstream's
                         DiffAugment (per-sample theta lists, ``.item()`` per batch), ``loss.item()`` per batch
    module               datm_fast's module engine (data and DSA on the device, no host syncs)
    functional           datm_fast's functional engine (stacked parameters, functional_call; vmap over runs)
    functional+compile   the same with ``EvalConfig(compile=True)``

Shared 2-core machines are noisy (the same epoch varies 4x with the host's load): every provider is
timed in turn, several times, and the minimum is reported beside the median.
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import statistics
import time
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from datm_fast.evaluate import EvalConfig
from datm_fast.evaluate._engine import TrainSet, _stack, _train_stack, _train_test_module, make_run_rngs
from datm_fast.models import get_network

PROVIDERS = ("upstream", "module", "functional", "functional+compile")


# ----- upstream's loop, re-stated for timing (MTT/DATM utils: DiffAugment, epoch, evaluate_synset) ----------
class _ParamDiffAug:
    prob_flip, ratio_scale, ratio_rotate, ratio_crop_pad, ratio_cutout = 0.5, 1.2, 15.0, 0.125, 0.5
    brightness, saturation, contrast = 1.0, 2.0, 0.5


def _up_scale(x: torch.Tensor, p: _ParamDiffAug) -> torch.Tensor:
    r = p.ratio_scale
    sx = torch.rand(x.shape[0]) * (r - 1.0 / r) + 1.0 / r
    sy = torch.rand(x.shape[0]) * (r - 1.0 / r) + 1.0 / r
    theta = torch.tensor([[[sx[i], 0, 0], [0, sy[i], 0]] for i in range(x.shape[0])], dtype=torch.float)
    grid = F.affine_grid(theta, x.shape, align_corners=True).to(x.device)
    return F.grid_sample(x, grid, align_corners=True)


def _up_rotate(x: torch.Tensor, p: _ParamDiffAug) -> torch.Tensor:
    t = (torch.rand(x.shape[0]) - 0.5) * 2 * p.ratio_rotate / 180 * math.pi
    theta = torch.tensor(
        [[[torch.cos(t[i]), torch.sin(-t[i]), 0], [torch.sin(t[i]), torch.cos(t[i]), 0]] for i in range(x.shape[0])],
        dtype=torch.float,
    )
    grid = F.affine_grid(theta, x.shape, align_corners=True).to(x.device)
    return F.grid_sample(x, grid, align_corners=True)


def _up_color(x: torch.Tensor, p: _ParamDiffAug) -> torch.Tensor:
    rand = lambda: torch.rand(x.size(0), 1, 1, 1, dtype=x.dtype, device=x.device)  # noqa: E731
    x = x + (rand() - 0.5) * p.brightness
    m = x.mean(dim=1, keepdim=True)
    x = (x - m) * (rand() * p.saturation) + m
    m = x.mean(dim=[1, 2, 3], keepdim=True)
    return (x - m) * (rand() + p.contrast) + m


def _up_crop(x: torch.Tensor, p: _ParamDiffAug) -> torch.Tensor:
    sx, sy = int(x.size(2) * p.ratio_crop_pad + 0.5), int(x.size(3) * p.ratio_crop_pad + 0.5)
    tx = torch.randint(-sx, sx + 1, size=[x.size(0), 1, 1], device=x.device)
    ty = torch.randint(-sy, sy + 1, size=[x.size(0), 1, 1], device=x.device)
    gb, gx, gy = torch.meshgrid(
        *(torch.arange(n, dtype=torch.long, device=x.device) for n in (x.size(0), x.size(2), x.size(3))), indexing="ij"
    )
    gx = torch.clamp(gx + tx + 1, 0, x.size(2) + 1)
    gy = torch.clamp(gy + ty + 1, 0, x.size(3) + 1)
    xp = F.pad(x, [1, 1, 1, 1, 0, 0, 0, 0])
    return xp.permute(0, 2, 3, 1).contiguous()[gb, gx, gy].permute(0, 3, 1, 2)


def _up_cutout(x: torch.Tensor, p: _ParamDiffAug) -> torch.Tensor:
    cs = int(x.size(2) * p.ratio_cutout + 0.5), int(x.size(3) * p.ratio_cutout + 0.5)
    ox = torch.randint(0, x.size(2) + (1 - cs[0] % 2), size=[x.size(0), 1, 1], device=x.device)
    oy = torch.randint(0, x.size(3) + (1 - cs[1] % 2), size=[x.size(0), 1, 1], device=x.device)
    gb, gx, gy = torch.meshgrid(
        *(torch.arange(n, dtype=torch.long, device=x.device) for n in (x.size(0), cs[0], cs[1])), indexing="ij"
    )
    gx = torch.clamp(gx + ox - cs[0] // 2, min=0, max=x.size(2) - 1)
    gy = torch.clamp(gy + oy - cs[1] // 2, min=0, max=x.size(3) - 1)
    mask = torch.ones(x.size(0), x.size(2), x.size(3), dtype=x.dtype, device=x.device)
    mask[gb, gx, gy] = 0
    return x * mask.unsqueeze(1)


def _up_flip(x: torch.Tensor, p: _ParamDiffAug) -> torch.Tensor:
    return torch.where(torch.rand(x.size(0), 1, 1, 1, device=x.device) < p.prob_flip, x.flip(3), x)


_UP_FNS = (_up_color, _up_crop, _up_cutout, _up_flip, _up_scale, _up_rotate)


def _upstream_diff_augment(x: torch.Tensor) -> torch.Tensor:
    fn = _UP_FNS[torch.randint(0, len(_UP_FNS), size=(1,)).item()]  # mode 'S': one group per batch
    return fn(x, _ParamDiffAug()).contiguous()


def _upstream_runner(images: torch.Tensor, logits: torch.Tensor, batch: int, passes: int) -> Callable[[], None]:
    """Upstream's evaluate_synset training loop (soft labels), ``passes`` epochs per call."""
    device = images.device
    loader = DataLoader(TensorDataset(images, logits), batch_size=batch, shuffle=True, num_workers=0)

    def criterion(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.sum(-F.log_softmax(out, dim=1) * F.softmax(target, dim=1)) / out.shape[0]

    def run() -> None:
        net = get_network("ConvNet", 3, 10, 32).to(device)
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=0.0005)
        for _ in range(passes):
            net.train()
            loss_avg = 0.0
            for img, lab in loader:
                img = _upstream_diff_augment(img.float().to(device))
                loss = criterion(net(img), lab.float().to(device))
                loss_avg += loss.item() * lab.shape[0]
                opt.zero_grad()
                loss.backward()
                opt.step()

    return run


# ----- ours ----------------------------------------------------------------------------------------------
def _set(ipc: int, device: torch.device, runs: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n = 10 * ipc
    return torch.randn(n, 3, 32, 32, generator=g).to(device), torch.randn(n, 10, generator=g).to(device)


def make_runner(provider: str, ipc: int, device: torch.device, passes: int, runs: int = 1, batch: int = 256):
    """A callable that trains ``runs`` runs for ``passes`` epochs from scratch (no test pass)."""
    images, logits = _set(ipc, device)
    if provider == "upstream":
        if runs != 1:
            raise ValueError("the upstream loop trains one run at a time")
        return _upstream_runner(images, logits, batch, passes)
    data = TrainSet(images, F.softmax(logits, 1))
    cfg = EvalConfig(runs=runs, epochs=passes - 1, batch_size=batch, compile=provider.endswith("+compile"))
    g = torch.Generator().manual_seed(1)
    tx, ty = images[:2], torch.zeros(2, dtype=torch.long, device=device)

    def run() -> None:
        rngs = make_run_rngs(g, runs, device)
        if provider.startswith("functional"):
            _train_stack(
                _stack("ConvNet", 10, (3, 32, 32), rngs, device), data, 0.01, cfg, rngs, device, lambda k: None
            )
        else:
            for r in rngs:
                _train_test_module("ConvNet", 10, data, 0.01, cfg, r, tx, ty, device, lambda k: None)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return run


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


# ----- pytest-benchmark ---------------------------------------------------------------------------------
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("ipc", [10, 50])
def test_eval_epoch_cpu(benchmark, provider, ipc):
    passes = 3 if ipc == 10 else 2
    run = make_runner(provider, ipc, torch.device("cpu"), passes)
    run()  # warm-up (compiles for +compile)
    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=0)
    per_epoch = benchmark.stats.stats.min / passes
    benchmark.extra_info.update(
        {
            "device": device_name(torch.device("cpu")),
            "torch": torch.__version__,
            "seconds_per_epoch_min": round(per_epoch, 4),
            "epochs_per_second": round(1 / per_epoch, 2),
        }
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("provider", ["functional", "functional+compile"])
def test_eval_ipc1000_five_runs_gpu(benchmark, provider):
    device = torch.device("cuda")
    passes = 3
    run = make_runner(provider, 1000, device, passes, runs=5, batch=128)
    run()
    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=0)
    per_epoch = benchmark.stats.stats.min / passes
    benchmark.extra_info.update(
        {
            "device": device_name(device),
            "torch": torch.__version__,
            "seconds_per_epoch_5_runs": round(per_epoch, 4),
            "projected_seconds_1001_passes": round(1001 * per_epoch, 1),
        }
    )


# ----- a table for RESULTS.md ---------------------------------------------------------------------------
def _time(runs: dict[str, Callable[[], None]], passes: dict[str, int], repeats: int) -> dict[str, list[float]]:
    for fn in runs.values():
        fn()  # warm-up
    out: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for k, fn in runs.items():  # interleaved: every provider sees the same spread of host load
            t = time.perf_counter()
            fn()
            out[k].append((time.perf_counter() - t) / passes[k])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--ipc", default="10,50")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--retain-memory", action="store_true", help="datm_fast.utils.retain_freed_memory() first")
    args = parser.parse_args()
    if args.retain_memory:
        from datm_fast.utils import retain_freed_memory

        print("retain_freed_memory:", retain_freed_memory())
    cpu = torch.device("cpu")
    now = datetime.datetime.now().isoformat(timespec="minutes")
    print(f"# {now}  {device_name(cpu)}  torch {torch.__version__}  python {platform.python_version()}")
    print("| IPC | provider | s/epoch (min) | s/epoch (median) | vs upstream (min) |")
    print("|---|---|---|---|---|")
    for ipc in (int(v) for v in args.ipc.split(",")):
        providers = args.providers.split(",")
        passes = {p: 3 if ipc <= 10 else 2 for p in providers}
        times = _time({p: make_runner(p, ipc, cpu, passes[p]) for p in providers}, passes, args.repeats)
        base = min(times["upstream"]) if "upstream" in times else math.nan
        for p, ts in times.items():
            print(f"| {ipc} | {p} | {min(ts):.3f} | {statistics.median(ts):.3f} | {base / min(ts):.2f}x |", flush=True)
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        print(f"# GPU {device_name(dev)}: 5 runs at IPC 1000, batch 128, projected to 1001 passes")
        for p in ("functional", "functional+compile"):
            times = _time({p: make_runner(p, 1000, dev, 3, runs=5, batch=128)}, {p: 3}, 2)
            print(f"| 1000 x5 | {p} | {min(times[p]):.3f} s/epoch | {1001 * min(times[p]):.0f} s projected |")


if __name__ == "__main__":
    main()
