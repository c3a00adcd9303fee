"""Benchmark of evaluation training (``datm_fast.evaluate``): seconds per epoch of one run at CIFAR-10
IPC 10 and IPC 50 shapes (random images, logit labels, ConvNet, batch 256, DSA), against a re-statement
of upstream's ``evaluate_synset`` loop timed in the same process; on a GPU also 5 runs at IPC 1000
(batch 128) at once, projected to the protocol's 1001 passes.

Run:  pytest benchmarks/bench_evaluate.py --benchmark-only [--benchmark-json out.json]
      python benchmarks/bench_evaluate.py [--device cuda] [--retain-memory] [--repeats 5] [--json F]
                                                                          # a table for RESULTS.md

Providers:
    upstream             DataLoader(TensorDataset, shuffle=True), nn.Module, torch.optim.SGD, upstream's
                         DiffAugment (per-sample theta lists, ``.item()`` per batch), ``loss.item()`` per batch
    module               datm_fast's module engine (data and DSA on the device, no host syncs)
    functional           datm_fast's functional engine (stacked parameters, functional_call; vmap over runs)
    functional+compile   the same with ``EvalConfig(compile=True)``
    ...+tf32, ...+bfloat16   any of ours in that precision (``EvalConfig.precision``; default float32: IEEE)
    functional+graphs    each batch shape's training step as a CUDA graph (``EvalConfig(graphs="on")``;
                         the capture is timed in each call)

Shared 2-core machines are noisy (the same epoch varies 4x with the host's load): every provider is
timed in turn, several times, and the minimum is reported beside the median.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from datm_fast.bench import profile_line, profile_summary
from datm_fast.evaluate import EvalConfig
from datm_fast.evaluate._engine import TrainSet, _stack, _train_stack, _train_test_module, make_run_rngs
from datm_fast.models import get_network
from datm_fast.precision import PRECISIONS
from datm_fast.reference.upstream_unroll import DSA_STRATEGY, ParamDiffAug, diff_augment

PROVIDERS = ("upstream", "module", "functional", "functional+compile")


# ----- upstream's loop, re-stated for timing (MTT/DATM utils: DiffAugment, epoch, evaluate_synset) ----------
def _upstream_diff_augment(x: torch.Tensor) -> torch.Tensor:
    # evaluate_synset's call: DiffAugment(img, args.dsa_strategy, param=args.dsa_param), per-sample (seed -1).
    return diff_augment(x, DSA_STRATEGY, param=ParamDiffAug())


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
    options = provider.split("+")[1:]  # "functional+compile+tf32": torch.compile, TF32 (datm_fast.precision)
    precision = next((o for o in options if o in PRECISIONS), "float32")
    cfg = EvalConfig(
        runs=runs,
        epochs=passes - 1,
        batch_size=batch,
        compile="compile" in options,
        precision=precision,
        graphs="on" if "graphs" in options else "off",
    )
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
    if benchmark.stats is None:  # --benchmark-disable: the run above was a smoke test, there are no figures
        return
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
    if benchmark.stats is None:  # --benchmark-disable: the run above was a smoke test, there are no figures
        return
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
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where every row is timed (default: cuda when available); on cuda also 5 runs at IPC 1000",
    )
    parser.add_argument("--no-ipc1000", action="store_true", help="skip the 5 x IPC 1000 rows on cuda")
    parser.add_argument(
        "--ipc1000-providers",
        default="functional,functional+compile",
        help="the providers of the 5 x IPC 1000 rows (ours only: upstream trains one run at a time)",
    )
    parser.add_argument(
        "--profile",
        default="",
        metavar="PROVIDERS",
        help="comma list of ours to run one more pass of under torch.profiler, at 5 runs of IPC 1000 on cuda (else "
        "at the first --ipc): a '# profile ...' line each (kernels, device-busy share, top kernels)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here (after every row)")
    parser.add_argument("--retain-memory", action="store_true", help="datm_fast.utils.retain_freed_memory() first")
    args = parser.parse_args()
    if args.retain_memory:
        from datm_fast.utils import retain_freed_memory

        print("retain_freed_memory:", retain_freed_memory())
    device = torch.device(args.device)
    now = datetime.datetime.now().isoformat(timespec="minutes")
    header = {"date": now, "device": device_name(device), "torch": torch.__version__}
    rows: list[dict[str, object]] = []

    def keep(row: dict[str, object]) -> None:
        rows.append(row)
        if args.json is not None:  # after every row: a run stopped by a time limit keeps what it measured
            args.json.write_text(json.dumps({**header, "rows": rows}, indent=2) + "\n")

    print(f"# {now}  {device_name(device)}  torch {torch.__version__}  python {platform.python_version()}")
    print("| IPC | provider | s/epoch (min) | s/epoch (median) | vs upstream (min) |")
    print("|---|---|---|---|---|")
    for ipc in (int(v) for v in args.ipc.split(",")):
        providers = args.providers.split(",")
        passes = {p: 3 if ipc <= 10 else 2 for p in providers}
        times = _time({p: make_runner(p, ipc, device, passes[p]) for p in providers}, passes, args.repeats)
        base = min(times["upstream"]) if "upstream" in times else math.nan
        for p, ts in times.items():
            print(f"| {ipc} | {p} | {min(ts):.3f} | {statistics.median(ts):.3f} | {base / min(ts):.2f}x |", flush=True)
            keep({"ipc": ipc, "provider": p, "seconds_per_epoch": ts, "vs_upstream": base / min(ts)})
    if device.type == "cuda" and not args.no_ipc1000:
        print(f"# GPU {device_name(device)}: 5 runs at IPC 1000, batch 128, projected to 1001 passes")
        for p in args.ipc1000_providers.split(","):
            times = _time({p: make_runner(p, 1000, device, 3, runs=5, batch=128)}, {p: 3}, 2)
            print(f"| 1000 x5 | {p} | {min(times[p]):.3f} s/epoch | {1001 * min(times[p]):.0f} s projected |")
            keep({"ipc": 1000, "runs": 5, "provider": p, "seconds_per_epoch": times[p]})
    for p in filter(None, args.profile.split(",")):
        on_target = device.type == "cuda" and not args.no_ipc1000
        ipc, runs, batch = (1000, 5, 128) if on_target else (int(args.ipc.split(",")[0]), 1, 256)
        run = make_runner(p, ipc, device, 1, runs=runs, batch=batch)
        run()  # warm-up (and compile, and capture) outside the profile
        print("# " + profile_line(f"{p} (IPC {ipc} x {runs} runs, one pass)", profile_summary(run, device)), flush=True)


if __name__ == "__main__":
    main()
