"""Expert training throughput: datm_fast's trainer against an upstream-style loop, in expert-epochs per second.

Run as a script (prints a table; ``--markdown`` prints rows for benchmarks/RESULTS.md)::

    python benchmarks/bench_experts.py [--device cpu|cuda] [--images 1280] [--repeats 3] [--optimizer gsam]

or under pytest-benchmark: ``pytest benchmarks/bench_experts.py --benchmark-only``.

What is timed: training the CIFAR-10 ConvNet (3x32x32, width 128, depth 3, instance norm; 320,010
parameters) with batch 256, DSA on every batch and the optimiser, on random CIFAR-shaped images
(speed does not depend on the pixels), plus the per-epoch test evaluation at CIFAR-10's test/train
ratio (1 test image per 5 train images). Reported: seconds per 1,000 train images per expert, and
expert-epochs per second for a 50,000-image CIFAR-10 epoch (= 1 / (50 * s_per_1000)). Each figure
is the best (and the median) of ``--repeats`` timed runs after one untimed warm-up run (which also
compiles); providers are timed round-robin, so that load from other processes on a shared machine
hits them alike. ``cpu/thread`` is the process CPU time divided by the thread count: on a machine
shared with other jobs it estimates the wall time on dedicated cores.

Providers:

* ``upstream-style``: what upstream's ``buffer_FTD.py`` does per step, minus its data loader and its
  per-sample Python DSA loops: an ``nn.Module`` ConvNet (NCHW), our DSA, and GSAM written as
  upstream's ``gsam.py`` (per-tensor loops, perturb / unperturb). A same-machine, same-load baseline.
* ``datm_fast torch``: :class:`~datm_fast.experts.ExpertTrainer` with PyTorch's separate ops for the
  norm/ReLU/pool blocks (``backend="torch"``; called ``aten`` in results before 2026-12-04).
* ``datm_fast cpp``: the trainer with the fused C++ block kernels (the CPU default).
* ``datm_fast cuda``: the trainer with the fused CUDA block kernels (the GPU default).
* ``... NCHW``: without channels_last; ``... K=2``: two experts per group (grouped convolutions).

Upstream's own figures (DATM.md; measured by the project on the same kinds of machine): GSAM, batch
256, DSA: 6.9 s per 1,000 CIFAR-10 images on the 2-core CPU, 3.5 s per CIFAR-10 epoch on one H100.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

from datm_fast.augment import DSAConfig, dsa
from datm_fast.bench import profile_line, profile_summary
from datm_fast.data import ImageDataset
from datm_fast.experts import ExpertConfig, ExpertTrainer
from datm_fast.models import ConvNet, ConvNetSpec
from datm_fast.precision import PRECISIONS

SPEC = ConvNetSpec(channels=3, num_classes=10, image_size=32)
CIFAR_TRAIN = 50_000
UPSTREAM_CPU_S_PER_1000 = 6.9  # GSAM, batch 256, DSA, 2-core CPU (DATM.md)
UPSTREAM_H100_S_PER_EPOCH = 3.5  # GSAM, CIFAR-10 epoch, one H100 (DATM.md)


def synthetic_cifar(n_train: int, seed: int = 0) -> ImageDataset:
    g = torch.Generator().manual_seed(seed)
    n_test = max(1, n_train // 5)
    return ImageDataset(
        "synthetic-cifar",
        torch.randn(n_train, 3, 32, 32, generator=g),
        torch.randint(0, 10, (n_train,), generator=g),
        torch.randn(n_test, 3, 32, 32, generator=g),
        torch.randint(0, 10, (n_test,), generator=g),
        classes=tuple(str(i) for i in range(10)),
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def upstream_style_epoch(
    ds: ImageDataset, optimizer: str, device: torch.device, *, lr=0.01, rho=0.01, alpha=0.3, batch=256
) -> None:
    """One epoch the way upstream's buffer_FTD.py trains an expert (module, per-tensor GSAM), then the test pass."""
    gen = torch.Generator().manual_seed(0)
    net = ConvNet(SPEC, generator=gen).to(device)
    params = list(net.parameters())
    cfg = DSAConfig()
    x_all, y_all = ds.train_images.to(device), ds.train_labels.to(device)
    order = torch.randperm(len(y_all), generator=gen).to(device)

    def grads(x, y):
        for p in params:
            p.grad = None
        out = net(x)
        F.cross_entropy(out, y).backward()
        return out

    for lo in range(0, len(y_all), batch):
        idx = order[lo : lo + batch]
        x = dsa(x_all[idx], cfg, generator=gen if device.type == "cpu" else None, host_generator=gen)
        y = y_all[idx]
        grads(x, y)
        if optimizer == "gsam":
            with torch.no_grad():
                old = [p.grad.clone() for p in params]
                norm = torch.norm(torch.stack([(p.abs() * g).norm() for p, g in zip(params, old)]))
                scale = rho / (norm + 1e-12)
                e_ws = []
                for p, g in zip(params, old):
                    e = g * scale * p.pow(2)
                    p.add_(e)
                    e_ws.append(e)
            grads(x, y)
            with torch.no_grad():
                new = [p.grad for p in params]
                inner = sum(torch.sum(o * n) for o, n in zip(old, new))
                nn_ = torch.norm(torch.stack([n.norm() for n in new]))
                on = torch.norm(torch.stack([o.norm() for o in old]))
                cos = inner / (nn_ * on + 1e-12)
                for p, o, n, e in zip(params, old, new, e_ws):
                    n.add_(o - cos * on * n / (nn_ + 1e-12), alpha=-alpha)
                    p.sub_(e)
        with torch.no_grad():
            for p in params:
                p.add_(p.grad, alpha=-lr)
    with torch.no_grad():
        for lo in range(0, len(ds.test_labels), 500):
            net(ds.test_images[lo : lo + 500].to(device)).argmax(1)
    _sync(device)


def make_runner(provider: str, ds: ImageDataset, optimizer: str, device: torch.device):
    """A zero-argument callable that trains one epoch (per expert) of ``provider``; returns experts per call."""
    # A word naming a precision (datm_fast.precision) sets the experts' arithmetic: "datm_fast cuda tf32".
    precision = next((w for w in provider.split() if w in PRECISIONS), "float32")
    cfg = ExpertConfig(epochs=1, optimizer=optimizer, precision=precision)  # type: ignore[arg-type]
    if provider == "upstream-style":
        return (lambda: upstream_style_epoch(ds, optimizer, device)), 1
    backend = provider.split()[1]
    channels_last = "NCHW" not in provider
    k = int(provider.split("K=")[1].split()[0]) if "K=" in provider else 1
    graphs = "graphs" in provider.split()  # each train() call captures its steps once, then replays them
    trainer = ExpertTrainer(ds, SPEC, cfg, device=device, backend=backend, channels_last=channels_last, graphs=graphs)

    def run() -> None:
        trainer.train(list(range(k)))
        _sync(device)

    return run, k


PROVIDERS = ("upstream-style", "datm_fast torch", "datm_fast cpp", "datm_fast cpp K=2")
#: Also understood by --providers: "datm_fast torch NCHW", "datm_fast cpp NCHW", "datm_fast cuda K=8", and a
#: precision word: "datm_fast cuda K=8 tf32", "datm_fast cuda bfloat16" (default float32: IEEE, TF32 off), and
#: "graphs": each step as a CUDA graph, "datm_fast cuda K=8 graphs" (the capture is timed in each epoch's call).


def measure(providers: list[str], optimizer: str, device: torch.device, images: int, repeats: int) -> list[dict]:
    """Time every provider, round-robin (so that a change in machine load hits them all alike)."""
    ds = synthetic_cifar(images)
    runners = {p: make_runner(p, ds, optimizer, device) for p in providers}
    for run, _ in runners.values():
        run()  # warm-up (and compile)
    times: dict[str, list[float]] = {p: [] for p in providers}
    cpu: dict[str, list[float]] = {p: [] for p in providers}
    for _ in range(repeats):
        for p, (run, _) in runners.items():
            t0, c0 = time.perf_counter(), time.process_time()
            run()
            times[p].append(time.perf_counter() - t0)
            cpu[p].append(time.process_time() - c0)
    rows = []
    threads = torch.get_num_threads() if device.type == "cpu" else 1
    for p in providers:
        k = runners[p][1]
        per = 1000 / k / images  # seconds per run -> seconds per 1000 images per expert
        s_per_1000 = min(times[p]) * per
        rows.append(
            {
                "provider": p,
                "optimizer": optimizer,
                "device": device_name(device),
                "s_per_1000": s_per_1000,
                "s_per_1000_median": statistics.median(times[p]) * per,
                "cpu_s_per_1000_per_thread": min(cpu[p]) * per / threads,
                "expert_epochs_per_s": 1.0 / (s_per_1000 * CIFAR_TRAIN / 1000),
            }
        )
    return rows


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


# ----- pytest-benchmark --------------------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer", ["gsam", "sgd"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_expert_training(benchmark, provider, optimizer):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    images = 512
    run, k = make_runner(provider, synthetic_cifar(images), optimizer, device)
    run()
    benchmark.extra_info.update(images=images, experts=k, device=device_name(device))
    benchmark.pedantic(run, rounds=2, iterations=1)
    s_per_1000 = benchmark.stats.stats.min / k / images * 1000
    benchmark.extra_info["expert_epochs_per_s"] = 1.0 / (s_per_1000 * CIFAR_TRAIN / 1000)


# ----- script ------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--images", type=int, default=1280, help="train images per timed epoch (default 1280)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--optimizer", choices=("gsam", "sgd", "both"), default="both")
    ap.add_argument("--providers", nargs="*", default=list(PROVIDERS))
    ap.add_argument("--markdown", action="store_true", help="print markdown table rows")
    ap.add_argument(
        "--profile",
        nargs="*",
        default=[],
        metavar="PROVIDER",
        help="providers to run one more epoch of under torch.profiler: a '# profile ...' line each (kernels "
        "launched, the device-busy share of the wall time, the top kernels): what explains a miss",
    )
    ap.add_argument(
        "--retain-memory",
        action="store_true",
        help="glibc keeps freed memory (what `datm-fast buffer` runs with on CPU; see retain_freed_memory)",
    )
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.retain_memory:
        from datm_fast.utils import retain_freed_memory

        print(f"retain_freed_memory: {retain_freed_memory()}")
    opts = ("gsam", "sgd") if args.optimizer == "both" else (args.optimizer,)
    print(
        f"# {datetime.datetime.now().isoformat(timespec='minutes')}  torch {torch.__version__}  "
        f"{device_name(device)}  images/epoch {args.images}, best of {args.repeats}"
    )
    for opt in opts:
        for r in measure(args.providers, opt, device, args.images, args.repeats):
            if args.markdown:
                print(
                    f"| {opt} | {r['provider']} | {r['s_per_1000']:.2f} ({r['s_per_1000_median']:.2f}) | "
                    f"{r['cpu_s_per_1000_per_thread']:.2f} | {r['expert_epochs_per_s']:.4f} |"
                )
            else:
                print(
                    f"{opt:5s} {r['provider']:24s} {r['s_per_1000']:7.2f} s/1000 img "
                    f"(median {r['s_per_1000_median']:.2f}, cpu/thread {r['cpu_s_per_1000_per_thread']:.2f})  "
                    f"{r['expert_epochs_per_s']:.4f} expert-epochs/s"
                )
    for opt in opts:
        for provider in args.profile:
            run, _ = make_runner(provider, synthetic_cifar(args.images), opt, device)
            run()  # warm-up (and compile, and capture) outside the profile
            print("# " + profile_line(f"{provider} ({opt}, {args.images} images)", profile_summary(run, device)))
    if device.type == "cpu":
        print(f"upstream (DATM.md): gsam {UPSTREAM_CPU_S_PER_1000} s/1000 img on the 2-core CPU")
    else:
        print(f"upstream (DATM.md): gsam {UPSTREAM_H100_S_PER_EPOCH} s per CIFAR-10 epoch on one H100")


if __name__ == "__main__":
    main()
