"""``datm-fast report``: the Markdown summary of a run directory, its curves and its image grid."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datm_fast.data import DataSpec
from datm_fast.distill import RunDir, RunRecord
from datm_fast.distill.config import load_config
from datm_fast.evaluate.config import EvalResult
from datm_fast.evaluate.results import write_results
from datm_fast.report import add_parser, read_metrics, run_report, write_report

ITERATIONS = 60  # rows 0..60
EVAL_EVERY = 20
NONFINITE_AT = 25
OVER_THRESHOLD_AT = (3, 40)


def _rows() -> list[dict]:
    rows = []
    for it in range(ITERATIONS + 1):
        row: dict = {"iteration": it}
        if it % EVAL_EVERY == 0:
            row.update(eval_mean=0.30 + 0.003 * it, eval_std=0.01 + 0.0001 * it)
        loss = 0.9 - 0.008 * it + 0.02 * math.sin(it)
        nonfinite = it == NONFINITE_AT
        if nonfinite:
            loss = float("nan")
        elif it in OVER_THRESHOLD_AT:
            loss = 1.2
        row.update(
            loss=loss,
            start_epoch=it % 7,
            expert=it % 3,
            lr=0.01 + 1e-5 * it,
            skipped=nonfinite or loss > 1.0,
            nonfinite=nonfinite,
            seconds=0.5,
            peak_memory_gb=1.25,
        )
        rows.append(row)
    return rows


def _make_run(run: Path, *, half_line: bool = True, images: bool = True) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    config = load_config(
        {"dataset": "cifar10", "ipc": 2, "iterations": ITERATIONS, "eval_it": EVAL_EVERY, "expansion_end_epoch": 100}
    )
    config.to_yaml(run / "config.yaml")
    RunDir(run).write_record(RunRecord(DataSpec("cifar10", preprocessing="zca"), ipc=2))
    with open(run / "metrics.jsonl", "w") as f:
        for row in _rows():
            f.write(json.dumps(row) + "\n")  # NaN is written as NaN, as the loop does
        if half_line:
            f.write('{"iteration": 61, "loss": 0.4, "start_ep')  # a killed run's last line
    if images:
        torch.save(torch.randn(20, 3, 32, 32), run / "images_best.pt")  # ZCA space: not in [0, 1]
        torch.save(torch.randn(20, 10), run / "labels_best.pt")
        torch.save(torch.tensor(0.0106), run / "lr_best.pt")
    result = EvalResult(
        model="ConvNet",
        accuracies=(0.4712, 0.4731, 0.4698),
        train_losses=(0.2, 0.21, 0.19),
        seconds=12.5,
        epochs=300,
        lr=0.0106,
        num_images=20,
        name=str(run),
    )
    write_results(run / "eval_best.json", [result], meta={"seed": 0, "source": str(run)})
    baseline = EvalResult(
        model="ConvNet",
        accuracies=(0.2601, 0.2655),
        train_losses=(0.5, 0.5),
        seconds=3.0,
        epochs=300,
        lr=0.01,
        num_images=20,
        name="random-real cifar10 ipc 2",
    )
    write_results(
        run / "eval_random-real_cifar10_ipc2.json",
        [baseline],
        meta={"baseline": "random-real", "ipc": 2, "dataset": "cifar10"},
    )
    return run


def _check_png(path: Path, min_size: tuple[int, int]) -> np.ndarray:
    assert path.is_file(), path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size[0] >= min_size[0] and im.size[1] >= min_size[1], im.size
        assert im.size[0] <= 4000 and im.size[1] <= 4000, im.size
        pixels = np.asarray(im.convert("RGB"), dtype=np.float32)
    assert pixels.std() > 0, f"{path} is blank"
    return pixels


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, str]:
    run = _make_run(tmp_path_factory.mktemp("report") / "c10-ipc2")
    path = write_report(run)
    return path, path.read_text()


def test_report_written_beside_the_run(report):
    path, text = report
    assert path == path.parent / "report.md" and path.parent.name == "c10-ipc2"
    assert not list(path.parent.glob(".*.tmp")), "atomic_write left a temporary file"
    assert text.startswith("# Distillation run `c10-ipc2`")


def test_report_summary_counts(report):
    _, text = report
    assert "| dataset | cifar10 (zca) |" in text
    assert "| images per class | 2 |" in text
    assert "| model | ConvNet |" in text
    # 61 complete rows (0..60); the half-written 62nd line is not counted
    assert f"| iterations run | {ITERATIONS + 1} of {ITERATIONS + 1} planned" in text
    skipped = len(OVER_THRESHOLD_AT) + 1
    assert f"| updates skipped | {skipped} ({len(OVER_THRESHOLD_AT)} with loss > threshold 1, 1 non-finite) |" in text
    assert "| non-finite losses or gradients | 1 |" in text
    assert f"{0.5 * (ITERATIONS + 1):.1f} s total, 0.5 s per iteration" in text
    assert "1.25 GB" in text


def test_report_accuracy_table(report):
    _, text = report
    accuracy = text.split("## Accuracy")[1].split("## Curves")[0]
    # best of metrics.jsonl: iteration 60, 48.00 ± 1.60 %
    assert "48.00 ± 1.60" in accuracy and "at iteration 60" in accuracy
    assert "best of 4 evaluations" in accuracy
    # eval_best.json, in write_results' layout
    ours = EvalResult("ConvNet", (0.4712, 0.4731, 0.4698), (0.2, 0.21, 0.19), 12.5, 300, 0.0106, 20)
    assert f"{100 * ours.mean:.2f} ± {100 * ours.std:.2f}" in accuracy
    assert "`eval_best.json` | set `best` | ConvNet | 3 |" in accuracy
    # the baseline, in its own table
    baselines = accuracy.split("### Baselines")[1]
    assert "random-real cifar10 ipc 2 | ConvNet | 2 | 26.28 ± 0.27" in baselines
    # every evaluation of metrics.jsonl
    for it in range(0, ITERATIONS + 1, EVAL_EVERY):
        assert f"| {it} | {100 * (0.30 + 0.003 * it):.2f} ±" in accuracy


def test_report_links_and_pictures(report):
    path, text = report
    run = path.parent
    assert "](curves.png)" in text
    assert "](grid.png)" in text  # no images_best.png in this run: drawn from images_best.pt
    assert "min-max" in text and "ZCA" in text  # says the whitening was not undone
    assert "](config.yaml)" in text
    _check_png(run / "curves.png", (800, 500))
    grid = _check_png(run / "grid.png", (2 * 64, 10 * 64))  # 10 classes x 2 images, 32 px at scale 2
    assert grid.shape[:2] == (10 * 66 + 2, 2 * 66 + 2)


def test_report_config_and_notes(report):
    _, text = report
    config = text.split("## Config")[1]
    # one line per section, every key: derived from the config's sections, no list kept by hand
    assert "- **data**: `dataset` cifar10" in config and "- **learning**: `ipc` 2" in config
    assert "`expansion_end_epoch` 100" in config.split("- **matching**:")[1].split("\n")[0]
    assert "- **engine**: `unroll` exact" in config
    assert "half-written" in text.split("## Notes")[1]


def test_a_set_evaluated_beside_its_baseline_is_shown_as_an_evaluation(tmp_path):
    """The comparison file as the pipelines write it (the set and random real subsets in one file, tagged
    as a baseline comparison): the set's result belongs in the accuracy table, the baseline in its own."""
    run = _make_run(tmp_path / "run", half_line=False)
    (run / "metrics.jsonl").write_text('{"iteration": 0, "loss": 0.5}\n')  # no in-loop evaluation
    (run / "eval_random-real_cifar10_ipc2.json").unlink()
    ours = EvalResult("ConvNet", (0.61, 0.63), (0.2, 0.2), 1.0, 300, 0.01, 20, name="distilled ipc 2")
    theirs = EvalResult("ConvNet", (0.31, 0.33), (0.5, 0.5), 1.0, 300, 0.01, 20, name="random-real cifar10 ipc 2")
    (run / "eval_best.json").unlink()
    write_results(
        run / "eval_best_vs_random_real.json", [ours, theirs], meta={"ipc": 2, "baseline": "random-real", "tag": "best"}
    )
    accuracy = write_report(run).read_text().split("## Accuracy")[1].split("## Curves")[0]
    assert "No evaluation" not in accuracy
    table, baselines = accuracy.split("### Baselines")
    assert "set `best` | ConvNet | 2 | 62.00 ± 1.00" in table
    assert "random-real cifar10 ipc 2 | ConvNet | 2 | 32.00 ± 1.00" in baselines


def test_a_set_named_like_a_baseline_is_shown_as_an_evaluation(tmp_path, monkeypatch):
    """Reported: "No evaluation ..." above a table holding eval_best.json's result. `datm-fast eval RUN_DIR`
    names the result after the path it was given; a run called like a baseline kind (random real images as
    the set's initialisation, DATM's pix_init: real) had its evaluation filed as a baseline."""
    monkeypatch.chdir(tmp_path)
    run = _make_run(Path("random-real-init"), half_line=False)
    (run / "metrics.jsonl").write_text('{"iteration": 0, "loss": 0.5}\n')  # no in-loop evaluation
    (run / "eval_random-real_cifar10_ipc2.json").unlink()
    ours = EvalResult("ConvNet", (0.47, 0.48), (0.2, 0.2), 1.0, 300, 0.01, 20, name=str(run))
    write_results(run / "eval_best.json", [ours], meta={"seed": 0, "source": str(run)})  # as `datm-fast eval` does
    accuracy = write_report(run).read_text().split("## Accuracy")[1].split("## Curves")[0]
    assert "No evaluation" not in accuracy and "### Baselines" not in accuracy
    assert "`eval_best.json` | set `best` | ConvNet | 2 | 47.50 ± 0.50" in accuracy

    # Only a real baseline: then, and only then, the set has no evaluation yet.
    (run / "eval_best.json").unlink()
    theirs = EvalResult("ConvNet", (0.31, 0.33), (0.5, 0.5), 1.0, 300, 0.01, 20, name="random-real cifar10 ipc 2")
    write_results(run / "eval_random-real_cifar10_ipc2.json", [theirs], meta={"baseline": "random-real", "ipc": 2})
    accuracy = write_report(run).read_text().split("## Accuracy")[1].split("## Curves")[0]
    assert "No evaluation of the distilled set yet" in accuracy
    assert "random-real cifar10 ipc 2 | ConvNet | 2 | 32.00 ± 1.00" in accuracy.split("### Baselines")[1]
    (run / "eval_random-real_cifar10_ipc2.json").unlink()
    accuracy = write_report(run).read_text().split("## Accuracy")[1].split("## Curves")[0]
    assert "No evaluation yet: no eval rows" in accuracy and "|" not in accuracy


def test_read_metrics_tolerates_bad_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        '{"iteration": 0, "loss": 0.5}\nnot json\n{"iteration": 1, "loss": NaN}\n'
        '{"iteration": 1, "loss": 0.4}\n[1, 2]\n{"iteration": 2, "loss": Infin'
    )
    metrics = read_metrics(path)
    assert [r["iteration"] for r in metrics.rows] == [0, 1]
    assert metrics.rows[1]["loss"] == 0.4  # an iteration logged twice: the last row wins
    assert metrics.bad_lines == [2, 5, 6]
    assert metrics.partial_last
    path.write_text('{"iteration": 0, "loss": NaN}\n')
    metrics = read_metrics(path)
    assert math.isnan(metrics.rows[0]["loss"]) and not metrics.bad_lines and not metrics.partial_last


def test_existing_grid_is_reused_and_out_elsewhere(tmp_path):
    run = _make_run(tmp_path / "run", half_line=False)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (70, 140, 3), dtype=np.uint8)).save(
        run / "images_best.png"
    )
    path = write_report(run)
    text = path.read_text()
    assert "](images_best.png)" in text and not (run / "grid.png").exists()
    assert "## Notes" not in text  # nothing missing, no half-written line

    out = write_report(run, out=tmp_path / "reports" / "c10.md")
    assert out == tmp_path / "reports" / "c10.md"
    text = out.read_text()
    assert "](c10_curves.png)" in text and "](c10_images_best.png)" in text
    assert "](../run/config.yaml)" in text
    assert (tmp_path / "reports" / "c10_images_best.png").read_bytes() == (run / "images_best.png").read_bytes()
    _check_png(tmp_path / "reports" / "c10_curves.png", (800, 500))

    assert write_report(run, out=tmp_path / "reports") == tmp_path / "reports" / "report.md"
    assert write_report(run, out=tmp_path / "new") == tmp_path / "new" / "report.md"
    assert (tmp_path / "new" / "curves.png").is_file() and (tmp_path / "new" / "images_best.png").is_file()
    with pytest.raises(ValueError, match=r"\*\.md"):
        write_report(run, out=tmp_path / "reports" / "c10.txt")


def test_run_without_images_config_or_rows(tmp_path):
    run = tmp_path / "fresh"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")
    text = write_report(run).read_text()
    assert "| iterations run | 0 (metrics.jsonl has no rows yet) |" in text
    assert "No iterations logged yet." in text and not (run / "curves.png").exists()
    notes = text.split("## Notes")[1]
    assert "no `config.yaml`" in notes and "no `images_best.png` or `images_best.pt`" in notes


def test_errors_name_what_is_missing(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match=r"nope does not exist.*metrics\.jsonl"):
        write_report(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"empty: no metrics\.jsonl \(one JSON row per distillation iteration\)"):
        write_report(empty)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        write_report(tmp_path / "file")


def test_cli_handler(tmp_path, capsys):
    run = _make_run(tmp_path / "run", images=False)
    parser = argparse.ArgumentParser(prog="datm-fast")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["report", str(run)])
    assert args.func is run_report
    assert args.func(args) == 0
    assert f"report: {run / 'report.md'}" in capsys.readouterr().out
    text = (run / "report.md").read_text()
    assert "](curves.png)" in text and "No image grid." in text

    args = parser.parse_args(["report", str(run), "--out", str(tmp_path / "r.md")])
    assert args.func(args) == 0 and (tmp_path / "r_curves.png").is_file()
    args = parser.parse_args(["report", str(tmp_path / "missing")])
    with pytest.raises(ValueError, match="missing does not exist"):
        args.func(args)


def test_import_does_not_load_matplotlib():
    code = "import sys, datm_fast.report; assert 'matplotlib' not in sys.modules, 'matplotlib imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
