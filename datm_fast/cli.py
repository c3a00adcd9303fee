"""The ``datm-fast`` command line.

Subcommands (each a function ``_cmd_<name>`` registered in :func:`build_parser`):
    info    versions and which backends are live, and why one is not
    data    load (decode once, cache) a dataset, optionally long-tailed and preprocessed, print a
            summary and write an image grid
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["build_parser", "main"]


def _cmd_info(args: argparse.Namespace) -> int:
    import platform

    import torch

    from . import __version__
    from .backends import backend_info

    print(f"datm_fast {__version__}  torch {torch.__version__}  python {platform.python_version()}")
    print(f"cpu threads: {torch.get_num_threads()}  cuda devices: {torch.cuda.device_count()}")
    for status in backend_info().values():
        print(f"  {status}")
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    import torch

    from .data import load_dataset as load
    from .data import long_tailed, preprocess
    from .viz import save_image_grid

    started = time.perf_counter()
    dataset = load(args.dataset, root=args.root, cache_dir=args.cache_dir)
    loaded = time.perf_counter()
    if args.long_tail is not None:
        dataset = long_tailed(dataset, args.long_tail, seed=args.seed)
    processed, transform = preprocess(dataset, args.preprocess, cache_dir=args.cache_dir)
    done = time.perf_counter()

    c, (h, w) = dataset.channels, dataset.image_size
    counts = dataset.class_counts("train")
    print(f"{dataset.name}: {dataset.num_classes} classes, images {c}x{h}x{w}")
    print(f"  train {len(dataset.train_labels):>7}  (per class {int(counts.min())} to {int(counts.max())})")
    print(f"  test  {len(dataset.test_labels):>7}")
    if dataset.val_labels is not None:
        print(f"  val   {len(dataset.val_labels):>7}")
    mean = dataset.train_images.mean(dim=(0, 2, 3))
    std = dataset.train_images.std(dim=(0, 2, 3))
    print(f"  train pixel mean {[round(v, 4) for v in mean.tolist()]}  std {[round(v, 4) for v in std.tolist()]}")
    timing = f"loaded in {loaded - started:.1f} s, preprocessed in {done - loaded:.1f} s"
    print(f"  preprocessing: {args.preprocess}  ({timing})")
    if args.grid is not None:
        # One row per class (at most 10 classes shown), images mapped back to pixel space for viewing.
        per_class = args.grid_per_class
        rows = []
        for k in range(min(dataset.num_classes, 10)):
            idx = torch.nonzero(processed.train_labels == k).flatten()[:per_class]
            rows.append(transform.inverse(processed.train_images[idx]))
        path = save_image_grid(torch.cat(rows), args.grid, nrow=per_class, scale=2)
        shown = "pixel space" if args.preprocess == "none" else f"{args.preprocess} undone for viewing"
        print(f"  image grid (first {per_class} train images of each class, {shown}): {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="datm-fast", description="Dataset distillation by difficulty-aligned trajectory matching."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="versions and live backends")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("data", help="load, cache and summarise a dataset; write an image grid")
    p.add_argument("dataset", help="a name (cifar10, mnist, fashion_mnist, breastmnist, ...) or a path")
    p.add_argument("--root", default=None, help="folder that dataset names resolve against")
    p.add_argument("--cache-dir", default=None, help="decoded-pixel cache (default: ~/.cache/datm_fast)")
    p.add_argument("--preprocess", choices=("zca", "normalize", "none"), default="none")
    p.add_argument("--long-tail", type=float, default=None, metavar="FACTOR", help="imbalance factor, e.g. 100")
    p.add_argument("--seed", type=int, default=0, help="seed of the long-tail subsampling")
    p.add_argument("--grid", type=Path, default=None, help="write a PNG grid of train images here")
    p.add_argument("--grid-per-class", type=int, default=10)
    p.set_defaults(func=_cmd_data)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        # Bad input is reported in one line that names it; a traceback helps nobody here.
        print(f"datm-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
