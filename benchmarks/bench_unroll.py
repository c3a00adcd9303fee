"""Seconds per distillation iteration and peak memory of the unroll engines at the paper's shapes.

    python benchmarks/bench_unroll.py                    # CPU: CIFAR-10 IPC 1 and 10 at full size
    python benchmarks/bench_unroll.py --reduced          # CPU: every config, syn_steps scaled to 1/10
    python benchmarks/bench_unroll.py --device cuda      # GPU: every config at full size

``datm-fast bench`` with this script's defaults (results in ``benchmarks/results/unroll.json``;
``--reduced`` = ``--steps-scale 0.1``): each (config, engine) pair runs in its own process, so peak
memory (peak RSS on CPU, ``torch.cuda.max_memory_allocated`` on GPU) is that pair's own; the Markdown
table puts upstream's figures beside ours and the speed-ups over our ``full`` engine, measured side by
side in the same run. Engines may carry options: ``--engines "exact;exact:fused=false"``.
"""

from __future__ import annotations

import sys

from datm_fast.cli import main as cli_main


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--reduced" in args:
        args.remove("--reduced")
        args += ["--steps-scale", "0.1"]
    if "--out" in args:
        args[args.index("--out")] = "--json"
    if "--json" not in args:
        args += ["--json", "benchmarks/results/unroll.json"]
    return cli_main(["bench", *args])


if __name__ == "__main__":
    sys.exit(main())
