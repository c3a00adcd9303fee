"""``datm-fast eval``: evaluate a run directory, upstream-format files, or a baseline; print a table and
write the results as JSON.

Examples::

    datm-fast eval runs/c10-ipc10                               # run.json says which data (DataSpec)
    datm-fast eval logged/Normal --dataset cifar10 --data-root ../shared/data --zca --models M
    datm-fast eval images_5000.pt labels_5000.pt lr_5000.pt --dataset cifar10 --data-root DIR --zca
    datm-fast eval --baseline random-real --ipc 10 --dataset cifar10 --data-root DIR --zca --runs 5
    torchrun --nproc-per-node 4 -m datm_fast.cli eval runs/c10-ipc10 --runs 5   # the runs shared by 4 GPUs

Under torchrun the runs of every model are shared out over the ranks (one device each, ``cuda:LOCAL_RANK``)
with the seeds one process gives them, so the accuracies are one process's; the ranks first agree on
the set, the data and the protocol, and rank 0 alone prints and writes the results.

Registered by :func:`add_parser` into the ``datm-fast`` parser.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the command imports torch when it runs, not when the parser is built
    import torch

    from ..distributed import Distributed

__all__ = ["add_parser", "run_eval"]

_BASELINES = ("random-real", "whole")


def add_parser(subparsers: Any) -> None:
    """Register the ``eval`` subcommand on ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    from ..distributed import add_timeout_flag
    from ..precision import PRECISIONS

    p = subparsers.add_parser(
        "eval",
        help="evaluate distilled sets or baselines (DATM's protocol)",
        description="Train fresh networks on a distilled set (or a baseline) and report test accuracy, mean ± std.",
    )
    p.add_argument(
        "inputs",
        nargs="*",
        metavar="RUN_DIR_OR_FILES",
        help="a run directory (images_<tag>.pt, labels_<tag>.pt, lr_<tag>.pt, optional run.json), or the files "
        "images_*.pt labels_*.pt [lr_*.pt]; none with --baseline",
    )
    data = p.add_argument_group("data")
    data.add_argument("--dataset", default=None, help="dataset name or path (default: from run.json)")
    data.add_argument(
        "--data-root", default=None, help="folder dataset names resolve against (default: the one run.json records)"
    )
    data.add_argument("--cache-dir", default=None, help="decoded-pixel and transform cache")
    data.add_argument("--zca", action="store_true", help="the set is ZCA-whitened (same as --preprocess zca)")
    data.add_argument(
        "--preprocess", choices=("zca", "normalize", "none"), default=None, help="the set's space (default: run.json)"
    )
    data.add_argument("--tag", default="best", help="which files of a run directory: images_<tag>.pt etc.")
    proto = p.add_argument_group("protocol")
    proto.add_argument("--runs", type=int, default=5, help="networks trained per model (mean ± std over them)")
    proto.add_argument("--epochs", type=int, default=1000, help="upstream's epoch_eval_train")
    proto.add_argument("--batch-size", type=int, default=256, help="upstream's batch_train (DATM configs: 128)")
    proto.add_argument("--model", default=None, help="network (default: run.json's, else ConvNet)")
    proto.add_argument("--models", default=None, help="several: 'ConvNet,AlexNet' or a pool name such as M")
    proto.add_argument(
        "--lr", type=float, default=None, help="training lr (default: the learned lr; 0.01 for baselines)"
    )
    proto.add_argument("--no-dsa", action="store_true", help="train without DSA augmentation")
    proto.add_argument("--baseline", choices=_BASELINES, default=None, help="evaluate a baseline instead of a set")
    proto.add_argument("--ipc", type=int, default=None, help="images per class of the random-real baseline")
    run = p.add_argument_group("running")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    add_timeout_flag(run)
    run.add_argument("--engine", choices=("auto", "functional", "module"), default="auto")
    run.add_argument("--parallel-runs", type=int, default=None, help="runs trained at once (default: auto)")
    run.add_argument(
        "--compile",
        choices=("auto", "on", "off"),
        default="auto",
        help="torch.compile the training step (auto: on CPU for long runs, 1.6x there)",
    )
    run.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="float32",
        help="float32: IEEE (TF32 off); tf32: TF32 convolutions/matmuls on GPUs (upstream's); bfloat16: autocast",
    )
    run.add_argument(
        "--graphs",
        choices=("off", "on"),
        default="off",
        help="capture each batch shape's training step as a CUDA graph and replay it (functional engine; GPUs)",
    )
    # The option's earlier spelling, kept so that scripts written for it run as they did.
    run.add_argument("--bf16", dest="precision", action="store_const", const="bfloat16", help=argparse.SUPPRESS)
    run.add_argument("--out", type=Path, default=None, help="results JSON (default: beside the set, or ./eval_*.json)")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_eval)


def _split_files(paths: list[Path]) -> tuple[Path, Path, Path | None]:
    """Images, labels and lr files, by name prefix (images_/labels_/lr_), else by order."""
    found: dict[str, Path] = {}
    for path in paths:
        m = re.match(r"(images|labels|lr)(_|\.|$)", path.name)
        if m is None or m.group(1) in found:
            found = {}
            break
        found[m.group(1)] = path
    if not found:
        if len(paths) not in (2, 3):
            raise ValueError(
                f"expected a run directory or the files images_*.pt labels_*.pt [lr_*.pt], got {len(paths)} paths"
            )
        found = dict(zip(("images", "labels", "lr"), paths))
    if "images" not in found or "labels" not in found:
        raise ValueError(f"need an images_*.pt and a labels_*.pt file, got {', '.join(str(p) for p in paths)}")
    return found["images"], found["labels"], found.get("lr")


def _agree_on(distributed: Distributed, what: str, values: dict[str, Any]) -> None:
    """The ranks agree on each of ``values`` (``what``'s fields), naming the first that differs."""
    distributed.agree_each({f"{what}'s {k}": v for k, v in values.items()})


def _check_writable_on_rank0(distributed: Distributed, directory: Path) -> None:
    """``check_writable`` where the results are written (rank 0), raised on every rank: the others
    would otherwise stop with a lost connection at their next collective, not with the reason."""
    from ..distributed import on_main
    from ..utils import check_writable

    on_main(distributed, f"check that it can write in {directory}", lambda: check_writable(directory), share=False)


def run_eval(args: argparse.Namespace) -> int:
    """Carry out ``datm-fast eval`` (see the module docstring); returns the exit status.

    Under torchrun each rank trains its share of every model's runs (one device per rank:
    ``cuda:LOCAL_RANK``); rank 0 prints the table and writes the results, the same as one process's.
    """
    from ..distributed import from_environment
    from ..utils import resolve_device

    device = resolve_device(args.device)
    with from_environment(device.type, timeout_s=args.dist_timeout) as distributed:
        return _run_eval(args, distributed.device(device), distributed)


def _run_eval(args: argparse.Namespace, device: torch.device, distributed: Distributed) -> int:
    import torch

    from ..augment import DSAConfig
    from ..data import DataSpec
    from ..distill.rundir import RunDir, load_synset
    from ..utils import retain_freed_memory, tensor_digest
    from .baselines import BASELINE_LR, random_real_baseline
    from .baselines import whole_dataset_baseline as whole_baseline
    from .config import EvalConfig, resolve_models
    from .protocol import check_models, evaluate_models
    from .results import format_table, write_results

    if args.zca and args.preprocess not in (None, "zca"):
        raise ValueError(f"--zca contradicts --preprocess {args.preprocess}")
    preprocessing = "zca" if args.zca else args.preprocess
    if device.type == "cpu":
        retain_freed_memory()  # this process only trains: reuse freed activations (1.2-1.6x on CPU)
    generator = torch.Generator().manual_seed(args.seed)
    config = EvalConfig(
        model=args.model or "ConvNet",
        runs=args.runs,
        epochs=args.epochs,
        batch_size=args.batch_size,
        dsa=None if args.no_dsa else DSAConfig(),
        engine=args.engine,
        parallel_runs=args.parallel_runs,
        compile={"auto": "auto", "on": True, "off": False}[args.compile],
        precision=args.precision,
        graphs=args.graphs,
    )
    meta: dict[str, Any] = {"seed": args.seed}

    def agree_on_inputs(data: DataSpec, models: tuple[str, ...], lr: float, set_digest: str | None) -> None:
        # Before the data are loaded: a rank given other arguments or another set fails at once, on every rank.
        if set_digest is not None:
            distributed.agree("the set (sha256)", set_digest)
        # Not the data root: a copy of the data may lie elsewhere on another machine.
        _agree_on(distributed, "the data", {k: v for k, v in data.to_json().items() if k != "root"})
        protocol = {**config.to_dict(), "models": models, "lr": lr, "seed": args.seed}
        _agree_on(distributed, "the protocol", {**protocol, "baseline": args.baseline, "ipc": args.ipc})

    if args.baseline is not None:
        if args.inputs:
            raise ValueError("--baseline evaluates real data: give no RUN_DIR_OR_FILES")
        if args.dataset is None:
            raise ValueError("--baseline needs --dataset")
        if args.baseline == "random-real" and args.ipc is None:
            raise ValueError("--baseline random-real needs --ipc")
        data = DataSpec(args.dataset, root=args.data_root, preprocessing=preprocessing or "none")
        models = check_models(resolve_models(args.models) if args.models else (config.model,))
        suffix = f"_ipc{args.ipc}" if args.baseline == "random-real" else ""
        out = args.out or Path(f"eval_{args.baseline}_{Path(args.dataset).stem}{suffix}.json")
        _check_writable_on_rank0(distributed, out.parent)  # a read-only place fails now, not after training
        lr = args.lr if args.lr is not None else BASELINE_LR
        agree_on_inputs(data, models, lr, None)
        dataset, _ = data.load(cache_dir=args.cache_dir)
        distributed.agree("the dataset", (dataset.name, dataset.identity()))
        results = []
        for m in models:
            cfg = config.replace(model=m)
            options: dict[str, Any] = dict(
                generator=generator, lr=lr, device=device, progress=not args.quiet, distributed=distributed
            )
            if args.baseline == "random-real":
                res = random_real_baseline(dataset, args.ipc, cfg, **options)
            else:
                res = whole_baseline(dataset, cfg, **options)
            results.append(res)
        meta.update(baseline=args.baseline, ipc=args.ipc, data=data.to_json())
    else:
        if not args.inputs:
            raise ValueError("give a run directory or images_*.pt labels_*.pt [lr_*.pt] files (or --baseline)")
        paths = [Path(p) for p in args.inputs]
        record = None
        if len(paths) == 1 and paths[0].is_dir():
            run = RunDir(paths[0])
            images, labels, lr_file = run.find_set(args.tag)
            record = run.read_record()
            out = args.out or run.eval_results(args.tag)
            source = str(paths[0])
        else:
            images, labels, lr_file = _split_files(paths)
            out = args.out or images.parent / f"eval_{images.stem}.json"
            source = str(images)
        synset = load_synset(images, labels, lr_file)
        data = record.data if record is not None else None
        if data is not None:
            if args.dataset is not None and args.dataset != data.dataset:
                raise ValueError(f"--dataset {args.dataset} contradicts {source}/run.json (dataset {data.dataset!r})")
            if preprocessing is not None and preprocessing != data.preprocessing:
                raise ValueError(f"--preprocess {preprocessing} contradicts {source}/run.json ({data.preprocessing!r})")
        else:
            if args.dataset is None:
                raise ValueError(f"{source}: no run.json names the dataset; pass --dataset (and --data-root)")
            if preprocessing is None:
                raise ValueError(
                    f"{source}: no run.json says how the images were preprocessed; pass --zca, or --preprocess "
                    "normalize / none (test images must be in the set's space)"
                )
            data = DataSpec(args.dataset, root=args.data_root, preprocessing=preprocessing)
        default_model = args.model or (record.model if record is not None else "ConvNet")
        models = check_models(resolve_models(args.models) if args.models else (default_model,))
        lr = args.lr if args.lr is not None else synset.lr
        if lr is None:
            raise ValueError(f"{source}: no lr file; pass --lr")
        _check_writable_on_rank0(distributed, Path(out).parent)  # a read-only place fails now, not after training
        agree_on_inputs(data, models, lr, tensor_digest(synset.images, synset.labels))
        dataset, _ = data.load(root=args.data_root, cache_dir=args.cache_dir)
        distributed.agree("the dataset", (dataset.name, dataset.identity()))
        results = evaluate_models(
            synset.images,
            synset.labels,
            lr,
            dataset.test_images,
            dataset.test_labels,
            models,
            config,
            distributed=distributed,
            generator=generator,
            device=device,
            num_classes=dataset.num_classes,
            name=source,
            progress=not args.quiet,
        )
        meta.update(source=source, data=data.to_json())

    if not distributed.is_main:  # every rank holds the results; one prints and writes them
        return 0
    print(format_table(results))
    for r in results:
        if r.diverged:
            print(f"warning: {r.model}: training diverged in some run (non-finite loss); check the lr and the set")
    if distributed.active:
        meta.update(world_size=distributed.world_size)
    path = write_results(out, results, config=config, device=device, meta=meta)
    print(f"results: {path}")
    return 0
