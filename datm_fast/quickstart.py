"""``datm-fast quickstart``: the whole pipeline in a few minutes on a CPU, with no network and no files.

data -> experts -> distill (IPC 1 and 10) -> evaluate against random real images -> report.

The default dataset is scikit-learn's bundled 8x8 digits (:mod:`datm_fast.data.bundled`), so the
command runs on a fresh machine; ``--dataset`` / ``--data-root`` point it at CIFAR-10, MNIST and the
rest (then expect hours on a CPU at the defaults of the paper, minutes at these small settings).
The defaults are sized for 2 CPU cores: a narrow ConvNet (width 32), 4 experts of 20 epochs, 100
distillation iterations of 20 unrolled steps per IPC, 3 evaluation runs of 300 epochs.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["QuickstartConfig", "QuickstartRow", "run_quickstart", "add_parser"]


@dataclass(frozen=True)
class QuickstartConfig:
    dataset: str = "digits"  # a dataset name or path (datm_fast.data.load_dataset)
    data_root: str | None = None  # folder dataset names resolve against
    out: str = "runs/quickstart"  # everything goes here: buffer/, ipc1/, ipc10/
    model: str = "ConvNetW32"  # ConvNet width 32: 16x fewer conv FLOPs than width 128
    ipcs: tuple[int, ...] = (1, 10)
    experts: int = 4
    expert_epochs_trained: int = 20  # epochs each expert is trained
    expert_lr: float = 0.05  # SGD lr of the experts, and the student's initial lr (lr_teacher)
    expert_batch: int = 64
    iterations: int = 100  # distillation iterations per IPC
    syn_steps: int = 20  # unrolled student steps per iteration
    lr_img: float = 100.0  # SGD lr of the synthetic images (normalised pixel space)
    eval_runs: int = 3
    eval_epochs: int = 300
    seed: int = 0
    device: str = "auto"
    preprocess: str = "auto"  # zca for RGB (as DATM), normalize for grey; or zca / normalize / none


@dataclass(frozen=True)
class QuickstartRow:
    ipc: int
    distilled_mean: float
    distilled_std: float
    random_mean: float
    random_std: float
    run_dir: Path
    grid: Path
    report: Path
    seconds: float


def run_quickstart(config: QuickstartConfig, *, progress: bool = True) -> list[QuickstartRow]:
    """Run the pipeline; returns one row per IPC (accuracies are fractions)."""
    from .data import load_dataset, preprocess
    from .distill import distill, load_config
    from .evaluate import EvalConfig, RunInfo, evaluate_against_random_real, write_run_info
    from .experts import ExpertBuffer, ExpertConfig, build_buffer
    from .models import convnet_spec_from_name
    from .report import write_report
    from .utils import resolve_device

    out = Path(config.out)
    device = resolve_device(config.device)
    raw = load_dataset(config.dataset, root=config.data_root)
    method = config.preprocess if config.preprocess != "auto" else ("zca" if raw.channels == 3 else "normalize")
    data, transform = preprocess(raw, method)  # type: ignore[arg-type]
    spec = convnet_spec_from_name(config.model, data.channels, data.num_classes, data.image_size)

    expert_config = ExpertConfig(
        epochs=config.expert_epochs_trained,
        optimizer="sgd",
        lr=config.expert_lr,
        batch_size=config.expert_batch,
        seed=config.seed,
    )
    summary = build_buffer(
        out / "buffer",
        data,
        spec,
        expert_config,
        config.experts,
        model_name=config.model,
        device=device,
        progress=progress,
    )
    buffer = ExpertBuffer.open(out / "buffer", spec=spec, dataset=data)
    expert_acc = sum(summary.final_test_acc) / max(len(summary.final_test_acc), 1)
    print(
        f"experts: {buffer.num_experts} x {buffer.num_epochs} epochs, mean final test accuracy {100 * expert_acc:.1f}%"
    )

    eval_config = EvalConfig(model=config.model, runs=config.eval_runs, epochs=config.eval_epochs)
    rows = []
    trained = config.expert_epochs_trained
    for ipc in config.ipcs:
        started = time.perf_counter()
        run_dir = out / f"ipc{ipc}"
        # Difficulty alignment (DATM): one image per class matches the early, easy part of the
        # trajectories; ten per class match a later, harder window. Digits, seed 0, 100 iterations
        # (2026-12-03): IPC 10 with start epochs in [0, 10) and 2-epoch targets gave 89.6 +- 0.5 %
        # (random real 89.0 +- 2.3 %); [4, 14) with 3 epochs 90.5 %; [6, 16) with 4 epochs 92.2 +- 2.0 %,
        # and 90.4 +- 1.8 % after a rounding-level change (the conv op, 2026-12-03): near the experts'
        # 91.6 % ceiling these windows are within evaluation noise of each other.
        if ipc <= 1:
            expert_epochs, min_start, max_start = 2, 0, 4
        else:
            expert_epochs = max(2, trained // 5)
            min_start, max_start = (3 * trained) // 10, trained - expert_epochs
        distill_config = load_config(
            dict(
                dataset=config.dataset,
                model=config.model,
                ipc=ipc,
                syn_steps=config.syn_steps,
                expert_epochs=expert_epochs,
                min_start_epoch=min_start,
                max_start_epoch=max_start,
                sequential_generation=False,
                batch_syn=data.num_classes * ipc,
                iterations=config.iterations,
                lr_img=config.lr_img,
                lr_teacher=config.expert_lr,
                lr_lr=1e-5,
                lr_y=2.0,
                pix_init="samples_predicted_correctly",
                zca=method == "zca",
                threshold=10.0,
                checkpoint_every=max(1, config.iterations // 2),
                device=str(device),
                seed=config.seed,
                num_eval=config.eval_runs,
                epoch_eval_train=config.eval_epochs,
            )
        )
        run_dir.mkdir(parents=True, exist_ok=True)
        write_run_info(run_dir, RunInfo(dataset=config.dataset, preprocessing=method, model=config.model, ipc=ipc))
        result = distill(data, buffer, distill_config, transform=transform, run_dir=run_dir, progress=progress)
        distilled, baseline = evaluate_against_random_real(
            result.images,
            result.labels,
            result.lr,
            data,
            ipc,
            eval_config,
            seed=config.seed,
            results_path=run_dir / "eval_best.json",
            name=f"distilled ipc {ipc}",
            meta={"dataset": config.dataset},
            baseline_lr=config.expert_lr,
            device=device,
            progress=progress,
        )
        report = write_report(run_dir)
        rows.append(
            QuickstartRow(
                ipc=ipc,
                distilled_mean=distilled.mean,
                distilled_std=distilled.std,
                random_mean=baseline.mean,
                random_std=baseline.std,
                run_dir=run_dir,
                grid=run_dir / "images_best.png",
                report=report,
                seconds=time.perf_counter() - started,
            )
        )
    print(format_table(config.dataset, rows))
    return rows


def format_table(dataset: str, rows: list[QuickstartRow]) -> str:
    lines = [
        f"| {dataset} | distilled (DATM) | random real | time | image grid | report |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| IPC {r.ipc} | {100 * r.distilled_mean:.1f} ± {100 * r.distilled_std:.1f} % | "
            f"{100 * r.random_mean:.1f} ± {100 * r.random_std:.1f} % | {r.seconds:.0f} s | {r.grid} | {r.report} |"
        )
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    config = QuickstartConfig(
        dataset=args.dataset,
        data_root=args.data_root,
        out=args.out,
        model=args.model,
        ipcs=tuple(int(v) for v in args.ipcs.split(",")),
        experts=args.experts,
        expert_epochs_trained=args.expert_epochs,
        iterations=args.iterations,
        syn_steps=args.syn_steps,
        eval_runs=args.eval_runs,
        eval_epochs=args.eval_epochs,
        seed=args.seed,
        device=args.device,
    )
    run_quickstart(config, progress=not args.quiet)
    return 0


def add_parser(subparsers: Any) -> None:
    d = QuickstartConfig()
    p = subparsers.add_parser(
        "quickstart",
        help="the whole pipeline in minutes on a CPU: experts, distillation at IPC 1 and 10, evaluation, report",
    )
    p.add_argument("--dataset", default=d.dataset, help="default: scikit-learn's bundled 8x8 digits")
    p.add_argument("--data-root", default=None)
    p.add_argument("--out", default=d.out)
    p.add_argument("--model", default=d.model)
    p.add_argument("--ipcs", default=",".join(map(str, d.ipcs)), help="comma-separated images per class")
    p.add_argument("--experts", type=int, default=d.experts)
    p.add_argument("--expert-epochs", type=int, default=d.expert_epochs_trained)
    p.add_argument("--iterations", type=int, default=d.iterations)
    p.add_argument("--syn-steps", type=int, default=d.syn_steps)
    p.add_argument("--eval-runs", type=int, default=d.eval_runs)
    p.add_argument("--eval-epochs", type=int, default=d.eval_epochs)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_run)
