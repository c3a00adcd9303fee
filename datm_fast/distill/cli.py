"""``datm-fast distill``: run DATM from a config (ours or upstream's YAML) on a dataset and a buffer."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "run_distill", "parse_overrides", "parse_log_to"]


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["ipc=10", "lr_img=1e3"]`` -> ``{"ipc": "10", "lr_img": "1e3"}``; values are coerced by load_config."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {pair!r}")
        out[key.strip()] = value.strip()
    return out


def parse_log_to(text: str) -> list[str]:
    """``--log-to tensorboard,wandb`` -> ``["tensorboard", "wandb"]``; an unknown name is a usage error."""
    from .loggers import parse_logger_names

    try:
        return parse_logger_names(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run_distill(args: argparse.Namespace) -> int:
    import torch

    from ..data import load_dataset, preprocess
    from ..evaluate import EvalConfig, RunInfo, evaluator_on_test_set, write_run_info
    from ..experts import ExpertBuffer
    from .config import load_config
    from .loggers import check_logger_names
    from .loop import distill

    try:  # a missing tensorboard/wandb fails before any work, in one line (main reports RuntimeErrors)
        check_logger_names(getattr(args, "log_to", None) or ())
    except ImportError as exc:
        raise RuntimeError(str(exc)) from exc
    overrides = parse_overrides(args.set or [])
    for key in ("iterations", "seed", "device", "unroll"):
        value = getattr(args, key)
        if value is not None:
            overrides[key] = value
    if getattr(args, "wandb_project", None):
        overrides["project"] = args.wandb_project
    config = load_config(args.config, **overrides)
    out = Path(args.out)
    if config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available()):
        from ..utils import retain_freed_memory

        retain_freed_memory()  # 1.1x per CPU iteration: no page faults on re-allocated activations

    raw = load_dataset(args.dataset or config.dataset, root=args.data_root, cache_dir=args.cache_dir)
    method = "zca" if config.zca else "normalize"
    data, transform = preprocess(raw, method, cache_dir=args.cache_dir)
    buffer = ExpertBuffer.open(args.buffer, dataset=data if not args.no_buffer_check else None)
    print(
        f"distilling {data.name} ({method}) at ipc {config.ipc} from {buffer.num_experts} experts x "
        f"{buffer.num_epochs} epochs, unroll {config.unroll}, {config.iterations} iterations -> {out}"
    )

    evaluator = None
    if not args.no_eval:
        eval_config = EvalConfig(
            model=config.model,
            runs=args.eval_runs or config.num_eval,
            epochs=args.eval_epochs or config.epoch_eval_train,
            batch_size=config.batch_train,
        )
        device = None if config.device == "auto" else config.device
        evaluator = evaluator_on_test_set(data, eval_config, device=device)

    out.mkdir(parents=True, exist_ok=True)
    write_run_info(
        out, RunInfo(dataset=args.dataset or config.dataset, preprocessing=method, model=config.model, ipc=config.ipc)
    )
    result = distill(
        data,
        buffer,
        config,
        transform=transform,
        evaluator=evaluator,
        run_dir=out,
        resume=args.resume,
        progress=not args.quiet,
        loggers=getattr(args, "log_to", None) or (),
    )
    acc = "not evaluated" if result.best_accuracy is None else f"best accuracy {100 * result.best_accuracy:.2f}%"
    print(f"done: {acc} at iteration {result.iteration}, lr {result.lr:.3g}; set and grid in {out}")
    return 0


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "distill",
        help="distil a dataset with DATM",
        description="Distil a dataset with DATM from a config (a shipped name such as cifar10-ipc10, or a YAML file "
        "in our or upstream's format) and an expert buffer (datm-fast buffer, or upstream's replay_buffer_*.pt).",
    )
    from .config import list_configs

    p.add_argument("--config", required=True, help=f"a YAML path, or a shipped config: {', '.join(list_configs())}")
    p.add_argument("--buffer", required=True, help="expert buffer directory")
    p.add_argument("--out", required=True, help="run directory (checkpoints, sets, grids, metrics.jsonl)")
    p.add_argument("--dataset", default=None, help="dataset name or path (default: the config's)")
    p.add_argument("--data-root", default=None, help="folder dataset names resolve against")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--iterations", type=int, default=None, help="override the config's Iteration")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--unroll", choices=("exact", "full", "tesla"), default=None)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any config key (repeatable)")
    p.add_argument("--no-eval", action="store_true", help="never evaluate (the last set is kept)")
    p.add_argument("--eval-runs", type=int, default=None, help="networks per evaluation (default: num_eval)")
    p.add_argument("--eval-epochs", type=int, default=None, help="epochs per evaluation (default: epoch_eval_train)")
    p.add_argument("--no-buffer-check", action="store_true", help="skip the buffer's dataset fingerprint check")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--log-to",
        type=parse_log_to,
        default=[],
        metavar="LOGGERS",
        help="also log metrics and image grids to tensorboard (OUT/tensorboard), wandb, or both: tensorboard,wandb "
        "(pip install tensorboard / wandb)",
    )
    p.add_argument(
        "--wandb-project", default=None, help="wandb project (default: the config's project key); the run is OUT's name"
    )
    p.set_defaults(func=run_distill)
