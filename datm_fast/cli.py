"""The ``datm-fast`` command line.

Subcommands (registered in :func:`build_parser`; the larger ones live beside their stage):
    quickstart  the whole pipeline in minutes on a CPU (datm_fast.quickstart)
    buffer  train, convert and inspect expert buffers (datm_fast.experts.cli)
    info    versions and which backends are live, and why one is not
    data    load (decode once, cache) a dataset, optionally long-tailed and preprocessed, print a
            summary and write an image grid
    distill run DATM from a config and an expert buffer; checkpoints, resume, image grids; on several
            devices under torchrun (``torchrun --nproc-per-node N -m datm_fast.cli distill ...``)
    eval    train fresh networks on a distilled set (or a real baseline) and report test accuracy
    report  a Markdown summary of a run directory with curves and the image grid
    bench   seconds per distillation iteration and peak memory of the unroll engines at the shapes
            of the paper's configs, with upstream's figures beside ours
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the commands import their stages when they run: datm-fast --help stays fast
    from .distill import RunDir
    from .distributed import Distributed

__all__ = ["build_parser", "main"]


def _cmd_info(args: argparse.Namespace) -> int:
    import platform

    import torch

    from . import __version__
    from .backends import backend_info
    from .precision import precision_summary

    print(f"datm_fast {__version__}  torch {torch.__version__}  python {platform.python_version()}")
    print(f"cpu threads: {torch.get_num_threads()}  cuda devices: {torch.cuda.device_count()}")
    for status in backend_info().values():
        print(f"  {status}")
    print(precision_summary())
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


def _cmd_bench(args: argparse.Namespace) -> int:
    import json

    import torch

    from .bench import (
        SHAPES,
        UPSTREAM,
        UPSTREAM_ENGINES,
        check_exact,
        engine_options,
        environment,
        profile_line,
        run_bench,
        run_bench_isolated,
    )
    from .utils import atomic_write

    device = torch.device(args.device)
    if args.configs is None:  # CIFAR-10 IPC 1 and 10 at full size on a CPU; every paper shape otherwise
        args.configs = "cifar10-ipc1,cifar10-ipc10" if device.type == "cpu" and args.steps_scale == 1.0 else "all"
    names = list(SHAPES) if args.configs == "all" else [c.strip() for c in args.configs.split(",")]
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        raise ValueError(f"unknown bench config(s) {', '.join(unknown)}; expected some of: {', '.join(SHAPES)}")
    # ';' separates engines whenever one carries options (whose own separator is ','), or when it is used at all.
    engines = [e.strip() for e in args.engines.split(";" if ":" in args.engines or ";" in args.engines else ",")]
    for engine in engines:
        engine_options(engine)  # a misspelt engine or option fails before any work, naming it
    profiled = {e.strip() for e in args.profile.split(";") if e.strip()}
    if profiled - set(engines):
        raise ValueError(f"--profile names engines not in --engines: {'; '.join(sorted(profiled - set(engines)))}")
    env = environment()
    upstream = UPSTREAM["h100" if device.type == "cuda" else "cpu"]
    rows: list[dict[str, Any]] = []
    profiles: list[str] = []  # one line per profiled row, printed after the table
    checks = {}
    print(f"# {' · '.join(f'{k} {v}' for k, v in env.items())}", flush=True)
    if args.check:  # exact must equal full (float64) at CIFAR-10 IPC 1, scaled like the table, before timing
        shape = SHAPES["cifar10-ipc1"].scaled(args.steps_scale)
        checks["cifar10-ipc1"] = check_exact(shape, device=device, micro_batch=args.micro_batch)
        worst = max(checks["cifar10-ipc1"].values())
        status = "passes" if worst < 1e-10 else "FAILS"
        print(f"exact vs full at cifar10-ipc1 in float64: max relative difference {worst:.1e} ({status}, < 1e-10)")
        if worst >= 1e-10:
            return 1
    print("| config | batch_syn x syn_steps | engine | s / iteration | peak GB | upstream s, GB | vs our full |")
    print("|---|---|---|---|---|---|---|", flush=True)
    run = run_bench_isolated if args.isolate else run_bench
    for name in names:
        shape = SHAPES[name].scaled(args.steps_scale)
        results = {}
        for engine in engines:
            r = run(
                shape,
                engine,
                device=str(device),
                iterations=args.iterations,
                warmup=args.warmup,
                micro_batch=args.micro_batch,
                profile=engine in profiled,
            )
            results[engine] = r
            rows.append(r.to_dict())
            # upstream's loop, quoted, for the plain engine names and for our re-statement of that loop
            ref = upstream.get(name, {}).get(UPSTREAM_ENGINES.get(engine, engine), "n/a")
            ref_text = "–" if ref == "n/a" else ("out of memory" if ref is None else f"{ref[0]:.2f} s, {ref[1]:.2f} GB")
            if args.steps_scale != 1.0 and ref_text != "–":
                ref_text += f" (at {SHAPES[name].syn_steps} steps)"  # upstream's figures are at full size
            full = results.get("full")
            usable = full is not None and not full.error and not r.error and engine != "full"
            speed = f"{full.mean / r.mean:.2f}x" if usable else "–"
            ours = r.error or f"{r.mean:.2f} ± {r.std:.2f}"
            peak = "–" if r.error else f"{r.peak_gb:.2f}"
            cells = [name, f"{shape.batch_syn} x {shape.syn_steps}", engine, ours, peak, ref_text, speed]
            print("| " + " | ".join(cells) + " |", flush=True)
            if r.profile is not None:
                profiles.append(profile_line(f"{engine} @ {name}", r.profile))
            if args.json is not None:  # after every row: a run stopped by a time limit keeps what it measured
                with atomic_write(args.json, "w") as f:
                    payload = {"environment": env, "steps_scale": args.steps_scale, "results": rows, "checks": checks}
                    json.dump(payload, f, indent=2)
    for line in profiles:  # under the table, which must stay one block of rows
        print(line)
    if args.json is not None:
        print(f"wrote {args.json}")
    return 0


# ----- distill ----------------------------------------------------------------------------------------------------
def _parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["ipc=10", "lr_img=1e3"]`` -> ``{"ipc": "10", "lr_img": "1e3"}``; values are coerced by load_config."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {pair!r}")
        out[key.strip()] = value.strip()
    return out


def _parse_log_to(text: str) -> list[str]:
    """``--log-to tensorboard,wandb`` -> ``["tensorboard", "wandb"]``; an unknown name is a usage error."""
    from .distill.loggers import parse_logger_names

    try:
        return parse_logger_names(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _distill_data(args: argparse.Namespace, config: Any, buffer: Any) -> Any:
    """The data to distil: what the buffer's experts were trained on (its manifest's data spec), else the
    config's data keys (``dataset``, ``zca``, ``data_path``) and the command's ``--dataset``/``--data-root``."""
    from .data import DataSpec

    recorded = buffer.data_spec
    if recorded is None:
        spec = config.data.spec(root=args.data_root)
        return spec.replace(dataset=args.dataset) if args.dataset else spec
    if args.dataset is not None and DataSpec(args.dataset, root=args.data_root).dataset != recorded.dataset:
        raise ValueError(
            f"--dataset {args.dataset} contradicts the buffer, whose experts were trained on {recorded.dataset!r}"
        )
    if config.data.zca != (recorded.preprocessing == "zca"):
        raise ValueError(
            f"the config says zca: {str(config.data.zca).lower()}, but the buffer's experts were trained on "
            f"{recorded.preprocessing!r} data: set zca to match (--set zca={str(not config.data.zca).lower()})"
        )
    return recorded if args.data_root is None else recorded.replace(root=args.data_root)


def _lost_contact(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed because another rank is gone or hangs: gloo raises a
    plain RuntimeError naming its source (``.../gloo/transport/tcp/pair.cc:537] Read error ...:
    Connection reset by peer`` within 0.02 s of a peer's kill -9, torch 2.13 CPU, 2026-12-04), NCCL a
    DistBackendError."""
    import torch.distributed as dist

    return isinstance(exc, dist.DistError) or "gloo" in str(exc).lower() or "nccl" in str(exc).lower()


class _Stopped(RuntimeError):
    """This rank was told to stop (SIGTERM: torchrun stops every rank once one has failed)."""


@contextlib.contextmanager
def _one_rank_of(distributed: Distributed) -> Iterator[None]:
    """Make what ends a rank of a run say so in one line (main prints RuntimeErrors): a collective
    that failed because another rank died or hung, and torchrun's SIGTERM, which it sends to every
    rank once one has failed (otherwise Python dies of it silently: exit code -15)."""
    if not distributed.active:
        yield
        return

    def stop(signum: int, frame: object) -> None:
        signal.signal(signum, signal.SIG_DFL)  # a second one ends the process at once
        raise _Stopped(
            f"{distributed}: stopped by {signal.Signals(signum).name} (torchrun stops every rank once one has failed: "
            "see the first failing rank's message)"
        )

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    except RuntimeError as exc:
        if isinstance(exc, _Stopped) or not _lost_contact(exc):
            raise
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise RuntimeError(
            f"{distributed}: lost the other ranks ({first}): a rank died, or hung beyond --dist-timeout "
            f"{distributed.timeout_s:g} s; see its own message. --resume continues from the last checkpoint"
        ) from exc
    finally:
        signal.signal(signal.SIGTERM, previous)


def _cmd_distill(args: argparse.Namespace) -> int:
    from .distill import load_config
    from .distill.config import flag_overrides
    from .distill.loggers import check_logger_names
    from .distributed import from_environment
    from .utils import resolve_device

    try:  # a missing tensorboard/wandb fails before any work, in one line (main reports RuntimeErrors)
        check_logger_names(args.log_to or ())
    except ImportError as exc:
        raise RuntimeError(str(exc)) from exc
    overrides = {**_parse_overrides(args.set or []), **flag_overrides(args)}
    if args.wandb_project:
        overrides["project"] = args.wandb_project
    config = load_config(args.config, **overrides)
    # Under torchrun: join the ranks (NCCL on CUDA, each rank on cuda:LOCAL_RANK; gloo otherwise); every
    # rank leaves the group at the end, however the command ends.
    device_type = resolve_device(config.run.device).type
    with from_environment(device_type, timeout_s=args.dist_timeout) as distributed, _one_rank_of(distributed):
        return _distill_ranks(args, config, distributed)


def _distill_ranks(args: argparse.Namespace, config: Any, distributed: Distributed) -> int:
    from .distill import RunDir
    from .distributed import on_main

    out = Path(args.out)
    if distributed.active:  # before rank 0 takes the directory for a run the others would not compute
        distributed.agree("the config", config.to_dict())

    # The run directory is taken (writable, not another run's, not written by another process) before
    # the buffer and the data are read: a refusal comes in seconds, not after minutes of loading. Rank 0
    # alone takes and writes it; its refusal is raised on every rank.
    def take() -> RunDir:
        return RunDir(out).start(config, resume=args.resume, overwrite=args.overwrite)

    run = on_main(distributed, "take the run directory", take, share=False)
    try:
        return _distill_into(run, out, args, config, distributed)
    finally:
        if run is not None:
            run.finish()


def _distill_into(
    run: RunDir | None, out: Path, args: argparse.Namespace, config: Any, distributed: Distributed
) -> int:
    import torch

    from .distill import distill
    from .distill.config import eval_models
    from .evaluate import EvalConfig, evaluator_on_test_set
    from .experts import ExpertBuffer
    from .utils import retain_freed_memory

    if config.run.device == "cpu" or (config.run.device == "auto" and not torch.cuda.is_available()):
        retain_freed_memory()  # 1.1x per CPU iteration: no page faults on re-allocated activations

    buffer_dir = Path(args.buffer) if args.buffer is not None else config.expert_dir()
    if args.buffer is None and not buffer_dir.exists():
        raise ValueError(
            f"no --buffer given and the config's expert directory {buffer_dir} (buffer_path/dataset/model) does "
            "not exist; pass --buffer DIR"
        )
    buffer = ExpertBuffer.open(buffer_dir)
    data_spec = _distill_data(args, config, buffer)
    data, transform = data_spec.load(cache_dir=args.cache_dir)
    if not args.no_buffer_check:
        buffer.check(dataset=data)
    ranks = f" on {distributed.world_size} ranks" if distributed.active else ""
    precision = "" if config.engine.precision == "float32" else f" in {config.engine.precision}"
    if distributed.is_main:
        print(
            f"distilling {data.name} ({data_spec.preprocessing}) at ipc {config.ipc} from {buffer.num_experts} experts "
            f"x {buffer.num_epochs} epochs ({buffer_dir}), unroll {config.engine.unroll}{precision}, "
            f"{config.iterations} iterations{ranks} -> {out}",
            flush=True,
        )
    evaluator = None
    if not args.no_eval and distributed.is_main:  # rank 0 evaluates and hands the outcome to the others
        evaluation = config.evaluation
        eval_config = EvalConfig(
            model=config.model,
            runs=args.eval_runs or evaluation.num_eval,
            epochs=args.eval_epochs or evaluation.epoch_eval_train,
            batch_size=evaluation.batch_train,
        )
        device = None if config.run.device == "auto" else config.run.device
        evaluator = evaluator_on_test_set(data, eval_config, models=eval_models(config), device=device)
    result = distill(
        data,
        buffer,
        config,
        data_spec=data_spec,
        transform=transform,
        evaluator=evaluator,
        run_dir=run if run is not None else out,
        resume=args.resume,
        progress=not args.quiet,
        loggers=args.log_to or (),
        distributed=distributed,
    )
    acc = "not evaluated" if result.best_accuracy is None else f"best accuracy {100 * result.best_accuracy:.2f}%"
    if distributed.is_main:
        print(
            f"done: {acc} at iteration {result.iteration}, lr {result.lr:.3g}, {result.updates}; set and grid in {out}"
        )
    return 0


def _add_distill_parser(sub: Any) -> None:
    from .distill.config import add_config_flags, list_configs
    from .distributed import add_timeout_flag

    p = sub.add_parser(
        "distill",
        help="distil a dataset with DATM",
        description="Distil a dataset with DATM from a config (a shipped name such as cifar10-ipc10, or a YAML file "
        "in our or upstream's format) and an expert buffer (datm-fast buffer, or upstream's replay_buffer_*.pt). "
        "The data are those the buffer's experts were trained on (recorded in its manifest), else the config's.",
    )
    p.add_argument("--config", required=True, help=f"a YAML path, or a shipped config: {', '.join(list_configs())}")
    p.add_argument(
        "--buffer", default=None, help="expert buffer directory (default: the config's buffer_path/dataset/model)"
    )
    p.add_argument("--out", required=True, help="run directory (checkpoints, sets, grids, metrics.jsonl)")
    p.add_argument("--dataset", default=None, help="dataset name or path (default: the buffer's, else the config's)")
    p.add_argument("--data-root", default=None, help="folder dataset names resolve against (the data moved)")
    p.add_argument("--cache-dir", default=None)
    resume = p.add_mutually_exclusive_group()
    resume.add_argument(
        "--resume", action="store_true", help="continue from OUT/checkpoint.pt (under the config the run started with)"
    )
    resume.add_argument("--overwrite", action="store_true", help="delete what OUT holds and start again")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any config key (repeatable)")
    config_flags = p.add_argument_group("config keys (the same as --set KEY=VALUE)")
    add_config_flags(config_flags)
    p.add_argument("--no-eval", action="store_true", help="never evaluate (the last set is kept)")
    p.add_argument("--eval-runs", type=int, default=None, help="networks per evaluation (default: num_eval)")
    p.add_argument("--eval-epochs", type=int, default=None, help="epochs per evaluation (default: epoch_eval_train)")
    p.add_argument("--no-buffer-check", action="store_true", help="skip the buffer's dataset fingerprint check")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--log-to",
        type=_parse_log_to,
        default=[],
        metavar="LOGGERS",
        help="also log metrics and image grids to tensorboard (OUT/tensorboard), wandb, or both: tensorboard,wandb "
        "(pip install tensorboard / wandb)",
    )
    p.add_argument(
        "--wandb-project", default=None, help="wandb project (default: the config's project key); the run is OUT's name"
    )
    add_timeout_flag(p)
    p.set_defaults(func=_cmd_distill)


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

    p = sub.add_parser(
        "bench",
        help="time the unroll engines at the paper's config shapes",
        description="Seconds per distillation iteration and peak memory of the unroll engines at the shapes of the "
        "paper's configs (random expert parameters and data: no buffer needed), each (config, engine) in its own "
        "process; a Markdown table with upstream's figures beside ours and the speed-ups over our full engine "
        "measured side by side in the same run.",
    )
    p.add_argument("--configs", default=None, help="comma-separated names, or 'all' (default: IPC 1, 10 on CPU; all)")
    p.add_argument(
        "--engines",
        default="full,exact,tesla",
        help="comma-separated engines, or ';'-separated when they carry options: "
        "'exact;exact:fused=false,step=autograd'; upstream-full and upstream-tesla time upstream's own loops "
        "(re-stated) in the same run",
    )
    p.add_argument("--device", default="cuda" if _cuda_visible() else "cpu")
    p.add_argument("--iterations", type=int, default=2, help="timed iterations per engine")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations first (0: time the first)")
    p.add_argument("--steps-scale", type=float, default=1.0, help="scale syn_steps (reduced runs), e.g. 0.1")
    p.add_argument(
        "--micro-batch",
        type=int,
        default=None,
        help="micro-batch of exact/tesla (default: auto: on CPU a step graph of at most 256 MiB, on GPU the whole "
        "batch where a quarter of the free memory holds it)",
    )
    p.add_argument("--no-isolate", dest="isolate", action="store_false", help="run all in this process")
    p.add_argument(
        "--profile",
        default="",
        metavar="ENGINES",
        help="';'-separated engines (of --engines) that also run one iteration under torch.profiler: kernels, "
        "device-busy share and top operators, printed under their row and kept in the JSON",
    )
    p.add_argument("--no-check", dest="check", action="store_false", help="skip the exact-vs-full check")
    p.add_argument("--json", type=Path, default=None, help="write the results here (after every row)")
    p.set_defaults(func=_cmd_bench)

    from .evaluate.cli import add_parser as add_eval_parser
    from .experts.cli import add_parser as add_buffer_parser
    from .quickstart import add_parser as add_quickstart_parser
    from .report import add_parser as add_report_parser
    from .reproduce import add_parser as add_reproduce_parser

    add_quickstart_parser(sub)
    add_buffer_parser(sub)
    _add_distill_parser(sub)
    add_eval_parser(sub)
    add_report_parser(sub)
    add_reproduce_parser(sub)
    return parser


def _cuda_visible() -> bool:
    # Counting devices does not initialise CUDA.
    import torch

    return torch.cuda.is_available()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError, RuntimeError) as exc:
        # Bad input, a failed run, a read-only place or a full disk: one line that names it; a
        # traceback helps nobody here. Under torchrun, one line per job: what failed on another rank,
        # and a disagreement (which every rank sees alike), is said by the rank where it happened / rank 0.
        if not _said_elsewhere(exc):
            print(f"datm-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _said_elsewhere(exc: BaseException) -> bool:
    """Whether another rank of this torchrun job reports ``exc`` (see :func:`main`)."""
    from .distributed import OtherRankFailed, RanksDisagree

    return isinstance(exc, OtherRankFailed) or (isinstance(exc, RanksDisagree) and os.environ.get("RANK", "0") != "0")


def console() -> None:
    """The ``datm-fast`` command (and ``python -m datm_fast.cli``): :func:`main`, then exit with its status.

    A rank of a torchrun job of several ranks ends with ``os._exit`` once its output is flushed, skipping
    the interpreter's finalisation: there, gloo's worker threads may still be freeing the last
    collective's work, whose tensors need the GIL, and the interpreter aborts the process ("terminate
    called without an active exception", SIGABRT in ProcessGroupGloo::runLoop under
    ``~AsyncBarrierWork``, seen with gdb; 3 of 30 finished 2-rank distill runs on the 2-core CPU,
    torch 2.13, 2026-12-05, after the process group had been destroyed). Every file is written and
    closed by then; torchrun would report such a rank as failed.
    """
    code = main()
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a rank of several
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    console()
