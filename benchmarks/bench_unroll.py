"""Seconds per distillation iteration and peak memory of the unroll engines at the paper's shapes.

    python benchmarks/bench_unroll.py                    # CPU: CIFAR-10 IPC 1 and 10 at full size
    python benchmarks/bench_unroll.py --reduced          # CPU: every config, syn_steps scaled to 1/10
    python benchmarks/bench_unroll.py --device cuda      # GPU: every config at full size

Each (config, engine) pair runs in its own process, so peak memory (peak RSS on CPU,
``torch.cuda.max_memory_allocated`` on GPU) is that pair's own. Writes a JSON file and prints a
Markdown table with upstream's figures beside ours and the speed-ups over our ``full`` engine,
measured side by side in the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from datm_fast.bench import SHAPES, UPSTREAM, check_exact, environment, run_bench_isolated
from datm_fast.utils import atomic_write


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--configs", default=None, help="comma-separated; default depends on the device")
    parser.add_argument(
        "--engines", default="full,exact,tesla", help="comma-separated; NAME-aten = NAME without the fused kernels"
    )
    parser.add_argument("--reduced", action="store_true", help="scale syn_steps to 1/10 (CPU overview)")
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first (0: time the first)")
    parser.add_argument("--micro-batch", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/unroll.json"))
    args = parser.parse_args(argv)

    if args.configs:
        names = args.configs.split(",")
    elif args.device == "cpu" and not args.reduced:
        names = ["cifar10-ipc1", "cifar10-ipc10"]
    else:
        names = list(SHAPES)
    scale = 0.1 if args.reduced else 1.0
    upstream = UPSTREAM["h100" if args.device.startswith("cuda") else "cpu"]
    env = environment()
    rows, checks = [], {}
    check_shape = SHAPES["cifar10-ipc1"].scaled(scale)
    checks["cifar10-ipc1"] = check_exact(check_shape, device=args.device, micro_batch=args.micro_batch)
    print(f"# {' · '.join(f'{k} {v}' for k, v in env.items())}", flush=True)
    print(f"exact vs full at cifar10-ipc1 (relative difference): {checks['cifar10-ipc1']}", flush=True)
    print("| config | batch_syn x syn_steps | engine | s / iteration | peak GB | upstream s, GB | vs our full |")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        shape = SHAPES[name].scaled(scale)
        results = {}
        for engine in args.engines.split(","):
            # "exact-aten": the engine with PyTorch's ops for the norm/ReLU/pool blocks (no fused kernels).
            base, fused = (engine[: -len("-aten")], False) if engine.endswith("-aten") else (engine, True)
            r = run_bench_isolated(
                shape,
                base,
                device=args.device,
                iterations=args.iterations,
                warmup=args.warmup,
                micro_batch=args.micro_batch,
                fused=fused,
            )
            r.engine = engine
            results[engine] = r
            rows.append(r.to_dict())
            ref = upstream.get(name, {}).get(base, "n/a")
            ref_text = "–" if ref == "n/a" else ("out of memory" if ref is None else f"{ref[0]:.2f} s, {ref[1]:.2f} GB")
            if scale != 1.0 and ref_text != "–":
                ref_text += f" (at {SHAPES[name].syn_steps} steps)"  # upstream's figures are at full size
            full = results.get("full")
            speed = (
                f"{full.mean / r.mean:.2f}x"
                if full is not None and not full.error and not r.error and engine != "full"
                else "–"
            )
            ours = r.error or f"{r.mean:.2f} ± {r.std:.2f}"
            peak = "–" if r.error else f"{r.peak_gb:.2f}"
            cells = [name, f"{shape.batch_syn} x {shape.syn_steps}", engine, ours, peak, ref_text, speed]
            print("| " + " | ".join(cells) + " |", flush=True)
            # After every row, so a run stopped by a time limit (a lent GPU's lease) keeps what it measured.
            with atomic_write(args.out, "w") as f:
                json.dump({"environment": env, "reduced": args.reduced, "results": rows, "checks": checks}, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
