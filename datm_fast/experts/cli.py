"""The ``datm-fast buffer`` command: train expert buffers, convert upstream ones, inspect and verify.

Register with :func:`add_parser` on the ``datm-fast`` subparsers. Usage::

    datm-fast buffer --dataset cifar10 --data-root ../shared/data --model ConvNet --experts 100 \\
        --epochs 50 --optimizer gsam --zca --out buffers/cifar10_zca
    datm-fast buffer convert OLD_DIR --out DIR [--model ConvNet] [--dataset cifar10 --data-root R --zca]
    datm-fast buffer info DIR [--verify]

Training resumes: the same command again skips finished experts and retrains an interrupted group.
On several processes (one per GPU, or CPU ranks): ``torchrun --nproc-per-node N -m datm_fast.cli buffer ...``
trains expert k on rank k mod N and makes the same buffer, file for file (see
:func:`datm_fast.experts.build_buffer`).
``python -m datm_fast.experts buffer ...`` runs the same command without the ``datm-fast`` entry point.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "main"]

_DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"


def _data_spec(args: argparse.Namespace, *, subsets: bool) -> Any:
    """The data the arguments name (``datm_fast.data.DataSpec``): the buffer records it in its manifest."""
    from ..data import DataSpec

    return DataSpec(
        args.dataset,
        root=args.data_root,
        preprocessing="zca" if args.zca else args.preprocess,
        max_train=args.max_train_images if subsets else None,
        max_test=args.max_test_images if subsets else None,
        seed=args.seed if subsets else 0,
    )


def _add_data_args(p: argparse.ArgumentParser, *, required: bool) -> None:
    p.add_argument(
        "--dataset",
        required=False,
        default=None,
        help="dataset name (cifar10, cifar100, tinyimagenet, mnist, ...) or path" + (" (required)" if required else ""),
    )
    p.add_argument("--data-root", type=Path, default=None, help="folder that dataset names resolve against")
    p.add_argument(
        "--cache-dir", type=Path, default=None, help="decoded-data and ZCA cache (default ~/.cache/datm_fast)"
    )
    p.add_argument("--zca", action="store_true", help="ZCA-whiten (DATM's choice for CIFAR and Tiny ImageNet)")
    p.add_argument(
        "--preprocess",
        choices=("normalize", "zca", "none"),
        default="normalize",
        help="preprocessing when --zca is not given (default: per-channel normalisation, as upstream without ZCA)",
    )


def add_parser(subparsers: Any) -> None:
    """Register ``buffer`` (train; with sub-actions ``convert`` and ``info``) on ``datm-fast``'s subparsers.

    Each parser sets ``func`` to its handler, which takes the parsed ``argparse.Namespace`` and
    returns an exit status; bad input raises ``ValueError`` (including ``ExpertBufferError`` and
    ``DatasetError``) with a message naming it.
    """
    from ..distributed import add_timeout_flag
    from ..precision import PRECISIONS

    p = subparsers.add_parser(
        "buffer",
        help="train expert trajectories into a buffer (resumable); also: buffer convert, buffer info",
        description="Train N expert ConvNets on a dataset and store every epoch's parameters "
        "(one safetensors file per expert plus manifest.json). Rerun the same command to resume.",
    )
    _add_data_args(p, required=True)
    p.add_argument("--model", default=None, help="ConvNet name (ConvNet, ConvNetD4, ConvNetBN, ...; default by size)")
    p.add_argument("--experts", type=int, default=100, help="number of experts (default 100)")
    p.add_argument("--epochs", type=int, default=50, help="training epochs per expert (default 50)")
    p.add_argument("--optimizer", choices=("sgd", "gsam"), default="gsam", help="sgd (MTT) or gsam (FTD/DATM; default)")
    p.add_argument("--out", type=Path, default=None, help="buffer directory (required)")
    p.add_argument("--seed", type=int, default=0, help="run seed; expert i derives its own from it (default 0)")
    p.add_argument("--lr", type=float, default=0.01, help="learning rate (default 0.01)")
    p.add_argument("--batch-size", type=int, default=256, help="batch size (default 256)")
    p.add_argument("--momentum", type=float, default=0.0, help="SGD momentum (default 0)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="SGD weight decay (default 0)")
    p.add_argument("--rho", type=float, default=0.01, help="GSAM radius (default 0.01)")
    p.add_argument("--alpha", type=float, default=0.3, help="GSAM alpha (default 0.3)")
    p.add_argument("--no-adaptive", action="store_true", help="GSAM without the adaptive (w^2) perturbation")
    p.add_argument("--dsa-strategy", default=_DEFAULT_STRATEGY, help=f"DSA op groups (default {_DEFAULT_STRATEGY})")
    p.add_argument("--no-dsa", action="store_true", help="no augmentation")
    p.add_argument(
        "--experts-per-batch", type=int, default=None, help="experts trained at once (default: 1 CPU, 8 GPU)"
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="float32",
        help="float32: IEEE (TF32 off; default); tf32: TF32 convolutions/matmuls on GPUs (upstream's); bfloat16: "
        "autocast forward (datm_fast.precision)",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    add_timeout_flag(p)
    p.add_argument("--max-train-images", type=int, default=None, help="train on a random subset (quick runs)")
    p.add_argument("--max-test-images", type=int, default=None, help="test on a random subset (quick runs)")
    p.add_argument(
        "--backend",
        choices=("auto", "torch", "cpp", "cuda"),
        default="auto",
        help="backend of the fused norm/ReLU/pool block: auto (default: C++ on CPU, CUDA on a GPU), cpp, cuda, "
        "or torch (PyTorch's separate ops)",
    )
    p.add_argument(
        "--graphs",
        choices=("off", "on"),
        default="off",
        help="capture each batch shape's training step as a CUDA graph and replay it (GPUs; the same experts)",
    )
    p.add_argument("--no-verify", action="store_true", help="on resume, check finished files by size, not checksum")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_buffer, _buffer_parser=p)

    sub = p.add_subparsers(dest="buffer_action", metavar="{convert,info}")
    c = sub.add_parser(
        "convert",
        help="convert an upstream buffer (replay_buffer_<n>.pt) to the native format",
        description="Read replay_buffer_<n>.pt files (MTT/FTD/DATM) with torch.load(weights_only=True) and "
        "write one safetensors file per expert plus manifest.json. Resumable.",
    )
    c.add_argument("src", type=Path, help="directory of replay_buffer_<n>.pt files (or one such file)")
    c.add_argument("--out", type=Path, required=True, help="native buffer directory to write")
    c.add_argument(
        "--model", default=None, help="ConvNet name the buffer was trained with (default: inferred, instance norm)"
    )
    _add_data_args(c, required=False)
    c.set_defaults(func=_cmd_convert)

    i = sub.add_parser("info", help="summarise a buffer (native or upstream); --verify checks every checksum")
    i.add_argument("path", type=Path, help="buffer directory")
    i.add_argument("--verify", action="store_true", help="verify every file's sha256 now")
    i.set_defaults(func=_cmd_info)


def _cmd_buffer(args: argparse.Namespace) -> int:
    """Train a buffer: in this process, or as one rank of ``torchrun --nproc-per-node N -m datm_fast.cli buffer``
    (each rank trains its share of the experts on its own device; rank 0 alone writes the manifest and
    prints the summary, the others one line each on stderr)."""
    from ..distributed import from_environment
    from .train import resolve_device

    parser: argparse.ArgumentParser = args._buffer_parser
    missing = [flag for flag, v in (("--dataset", args.dataset), ("--out", args.out)) if v is None]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    if args.experts < 1:
        raise ValueError(f"--experts must be >= 1, got {args.experts}")
    if args.experts_per_batch is not None and args.experts_per_batch < 1:
        raise ValueError(f"--experts-per-batch must be >= 1, got {args.experts_per_batch}")
    device = resolve_device(args.device)
    with from_environment("cuda" if device.type == "cuda" else "cpu", timeout_s=args.dist_timeout) as ranks:
        return _train_buffer(args, ranks, ranks.device(device))


def _train_buffer(args: argparse.Namespace, ranks: Any, device: Any) -> int:
    from ..augment import DSAConfig
    from ..models import convnet_spec_from_name, default_convnet_name
    from ..utils import check_writable
    from .config import ExpertConfig

    check_writable(args.out)  # a read-only place: one line now, before the data are loaded
    if device.type == "cpu":
        # Reuse freed activation memory instead of page-faulting 100+ MB back in every step: 1.3x per
        # CPU training step (2.70 -> 2.02 s per 1,000 GSAM images, benchmarks/RESULTS.md). Process-wide,
        # which is fine for a command.
        from ..utils import retain_freed_memory

        retain_freed_memory()
    config = ExpertConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        rho=args.rho,
        alpha=args.alpha,
        adaptive=not args.no_adaptive,
        dsa=None if args.no_dsa else DSAConfig(strategy=args.dsa_strategy),
        seed=args.seed,
        precision=args.precision,
    )
    t0 = time.perf_counter()
    data_spec = _data_spec(args, subsets=True)
    # Every rank loads the data itself (the cache's files are written atomically, so ranks filling it at
    # once is safe); the ranks then agree on its fingerprint before any training.
    ds, _ = data_spec.load(cache_dir=args.cache_dir)
    model = args.model or default_convnet_name(ds.image_size)
    spec = convnet_spec_from_name(model, ds.channels, ds.num_classes, ds.image_size)
    opt = (
        config.optimizer
        if config.optimizer == "sgd"
        else (f"gsam(rho={config.rho}, alpha={config.alpha}{', adaptive' if config.adaptive else ''})")
    )
    if ranks.is_main:
        print(
            f"{ds.name} ({ds.preprocessing}): {len(ds.train_labels)} train / {len(ds.test_labels)} test images, "
            f"prepared in {time.perf_counter() - t0:.1f} s",
            file=sys.stderr,
        )
        on = f", {ranks.world_size} ranks" if ranks.active else ""
        print(
            f"{args.experts} x {model} ({spec.num_params} params), {config.epochs} epochs, batch "
            f"{config.batch_size}, {opt}, lr {config.lr}, DSA {'off' if config.dsa is None else config.dsa.strategy}, "
            f"seed {config.seed}, device {device}{on} -> {args.out}",
            file=sys.stderr,
        )
    try:
        summary = _build(args, ds, spec, config, model, device, data_spec, ranks)
    except FloatingPointError as e:  # a diverged expert: report it like any other bad input
        raise RuntimeError(str(e)) from None
    if ranks.is_main:
        print(summary.line())
    else:
        mine = summary.trained_here or ()
        print(f"{ranks}: trained {len(mine)} expert(s) {list(mine)} on {device}", file=sys.stderr)
    return 0


def _build(
    args: argparse.Namespace,
    ds: Any,
    spec: Any,
    config: Any,
    model: str,
    device: Any,
    data_spec: Any,
    ranks: Any,
) -> Any:
    from .build import build_buffer

    return build_buffer(
        args.out,
        ds,
        spec,
        config,
        args.experts,
        model_name=model,
        data_spec=data_spec,
        device=device,
        experts_per_batch=args.experts_per_batch,
        backend=args.backend,
        graphs=args.graphs == "on",
        progress=not args.no_progress,
        verify_existing=not args.no_verify,
        distributed=ranks,
    )


def _cmd_convert(args: argparse.Namespace) -> int:
    from .buffer import ExpertBuffer, convert_upstream

    dataset = None
    if args.dataset is not None:
        dataset, _ = _data_spec(args, subsets=False).load(cache_dir=args.cache_dir)
    src = ExpertBuffer.open(args.src, model=args.model)
    if dataset is not None:
        want = (dataset.channels, dataset.num_classes, dataset.image_size)
        got = (src.spec.channels, src.spec.num_classes, src.spec.image_size)
        if want != got:
            raise ValueError(
                f"{args.src}: buffer is for (channels, classes, image size) {got}, but dataset "
                f"{dataset.name!r} has {want}"
            )
    from tqdm.auto import tqdm

    bar = tqdm(total=src.num_experts, unit="expert", desc="converting")
    try:
        buf = convert_upstream(
            args.src, args.out, spec=src.spec, dataset=dataset, model_name=args.model, on_expert=lambda i: bar.update()
        )
    finally:
        bar.close()
    print(f"converted {args.src} -> {buf.root}: {buf.num_experts} experts x {buf.num_epochs} epochs, {buf.spec}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from .buffer import ExpertBuffer

    buf = ExpertBuffer.open(args.path)
    print(repr(buf))
    if buf.manifest is not None:
        m = buf.manifest
        ds = m.get("dataset") or {}
        print(f"  dataset: {ds.get('name')} ({ds.get('preprocessing')}), fingerprint {ds.get('fingerprint')}")
        print(f"  config:  {m.get('config')}")
        accs = [buf.stats(i).get("test_acc") for i in range(buf.num_experts)]
        finals = [a[-1] for a in accs if a]
        if finals:
            print(
                f"  final test acc: mean {100 * sum(finals) / len(finals):.2f}%, "
                f"min {100 * min(finals):.2f}%, max {100 * max(finals):.2f}% over {len(finals)} experts"
            )
    if args.verify:
        t0 = time.perf_counter()
        buf.verify()
        print(f"  verified {buf.num_experts} files in {time.perf_counter() - t0:.1f} s: all checksums match")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m datm_fast.experts buffer ...``: the command without the ``datm-fast`` entry point."""
    parser = argparse.ArgumentParser(prog="python -m datm_fast.experts")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_parser(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError, RuntimeError) as exc:  # one line, as datm-fast's main says it
        print(f"datm-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2
