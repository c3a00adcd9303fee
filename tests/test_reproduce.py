"""`datm-fast reproduce`: presets, the table against the paper, and the `tiny` preset end to end on real CIFAR-10."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from datm_fast.cli import main
from datm_fast.data import ImageDataset
from datm_fast.distill import load_config
from datm_fast.reproduce import (
    JPEG_NOTE,
    PAPER_DATM,
    PAPER_RANDOM,
    PRESETS,
    ReproduceResult,
    ReproduceRow,
    WholeDatasetRow,
    distill_config_for,
    expert_epochs_needed,
    format_table,
    get_preset,
    run_reproduce,
)

REPO = Path(__file__).resolve().parents[1]


# ----- presets (no data) ------------------------------------------------------------------------------------------
def test_presets_are_the_issues_budgets():
    assert set(PRESETS) == {"tiny", "short", "paper", "gpu-check"}
    short = PRESETS["short"]
    assert (short.experts, short.expert_epochs, short.iterations) == (20, 30, 2000)
    assert short.eval_runs == 5 and short.eval_epochs == 1000 and short.ipcs == (10,)
    assert short.model == "ConvNet" and short.expert_optimizer == "gsam" and not short.distill_overrides
    paper = PRESETS["paper"]
    assert (paper.experts, paper.expert_epochs, paper.eval_runs, paper.eval_epochs) == (100, 50, 5, 1000)
    assert paper.ipcs == (1, 10, 50, 500, 1000) and paper.iterations is None and paper.whole_dataset
    assert PRESETS["tiny"].max_train is not None and PRESETS["tiny"].eval_runs == 1


def test_short_distills_with_the_shipped_ipc10_config_but_2000_iterations():
    cfg = distill_config_for(PRESETS["short"], 10, device="cpu", seed=3)
    shipped = load_config("cifar10-ipc10")
    assert cfg.iterations == 2000 and cfg.seed == 3 and cfg.device == "cpu"
    for key in ("syn_steps", "batch_syn", "lr_img", "lr_lr", "lr_y", "max_start_epoch", "pix_init", "threshold"):
        assert getattr(cfg, key) == getattr(shipped, key), key
    assert distill_config_for(PRESETS["paper"], 1000).iterations == load_config("cifar10-ipc1000").iterations


# Per-step costs issue 13 records (ours on an H200, upstream's on an H100) and our expert-epoch target: the
# gpu-check preset must stay inside the 300 s the GPU session script gives it when someone changes it.
_H200_S_PER_ITERATION = {1: 0.56, 10: 0.45}  # exact engine, whole-batch micro-batch
_H200_S_PER_EVAL_BATCH = 0.89 / 79  # 5 runs at IPC 1000, batch 128: 79 batches per epoch
_GPU_S_PER_EXPERT_EPOCH = 0.24  # GSAM, CIFAR-10 (a target: not yet measured on a GPU)
_DATA_AND_START_S = 20.0


def _gpu_check_estimate(p) -> float:
    experts = p.experts * expert_epochs_needed(p) * _GPU_S_PER_EXPERT_EPOCH
    distill = sum((p.iterations + 1) * _H200_S_PER_ITERATION[ipc] for ipc in p.ipcs)  # upstream runs Iteration + 1
    batches = {ipc: -(-10 * ipc // distill_config_for(p, ipc).batch_train) for ipc in p.ipcs}  # per epoch
    evaluation = sum(2 * p.eval_runs / 5 * p.eval_epochs * batches[ipc] * _H200_S_PER_EVAL_BATCH for ipc in p.ipcs)
    return _DATA_AND_START_S + experts + distill + evaluation


def test_gpu_check_is_a_short_accuracy_check_that_fits_the_gpu_session():
    p = get_preset("gpu-check")
    assert p is PRESETS["gpu-check"] and p.ipcs == (1, 10) and p.iterations == 150
    assert p.model == "ConvNet" and p.expert_optimizer == "gsam" and not p.distill_overrides  # the shipped configs
    assert p.eval_runs == 5 and not p.whole_dataset and p.max_train is None and p.max_test is None  # real protocol
    assert not p.select_best  # eval_it 500 > 150 iterations: in-loop selection would never run
    assert distill_config_for(p, 1).eval_it > p.iterations and distill_config_for(p, 10).eval_it > p.iterations
    # The experts are as long as the IPC 10 window needs (19 + 2), so the runner trains what the preset says.
    assert expert_epochs_needed(p) == p.expert_epochs == 21
    for ipc in p.ipcs:  # everything but the iteration count as shipped
        cfg, shipped = distill_config_for(p, ipc, device="cuda"), load_config(f"cifar10-ipc{ipc}")
        assert cfg.iterations == 150
        for key in ("syn_steps", "batch_syn", "lr_img", "lr_lr", "lr_y", "max_start_epoch", "pix_init", "batch_train"):
            assert getattr(cfg, key) == getattr(shipped, key), (ipc, key)
    estimate = _gpu_check_estimate(p)
    assert 200 < estimate <= 300, estimate  # ~226 s: 5 minutes at most, and not a trivially small check
    assert _gpu_check_estimate(p.replace(iterations=300)) > 300  # the iterations are what the budget binds


def test_gpu_check_is_a_preset_choice(capsys):
    with pytest.raises(SystemExit):
        main(["reproduce", "--help"])
    assert "gpu-check" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["reproduce", "--preset", "gpu-chek"])
    assert exc.value.code == 2 and "gpu-check" in capsys.readouterr().err  # argparse lists the choices


def test_expert_epochs_cover_every_window():
    # IPC 500 / 1000 draw start epochs up to 59 and match 2 epochs later: 61-epoch experts.
    assert expert_epochs_needed(PRESETS["paper"]) == 61
    assert expert_epochs_needed(PRESETS["short"]) == 30
    assert expert_epochs_needed(PRESETS["short"], [50]) == 41  # IPC 50's window reaches epoch 41
    assert expert_epochs_needed(PRESETS["tiny"]) == 2


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"ipcs": (7,)}, "no shipped CIFAR-10 config"),
        ({"ipcs": ()}, "empty"),
        ({"ipcs": (10, 10)}, "duplicates"),
        ({"experts": 0}, "experts"),
        ({"expert_epochs": 1.5}, "expert_epochs"),
        ({"expert_optimizer": "adam"}, "expert_optimizer"),
        ({"expert_lr": -1.0}, "expert_lr"),
        ({"expert_backend": "fast"}, "expert_backend"),
        ({"model": "ResNet18"}, "ConvNet name"),
        ({"iterations": 0}, "iterations"),
        ({"eval_runs": 0}, "eval_runs"),
        ({"select_best": "yes"}, "select_best"),
        ({"max_train": 0}, "max_train"),
        ({"distill_overrides": {"ipc": 3}}, "set by the runner"),
        ({"distill_overrides": {"seed": 3}}, "set by the runner"),
        ({"distill_overrides": {"lr_imgs": 3}}, "unknown DistillConfig key"),
        ({"distill_overrides": {"iterations": 3}}, "preset's own field"),
    ],
)
def test_preset_validation(changes, match):
    with pytest.raises(ValueError, match=match):
        PRESETS["short"].replace(**changes)


def test_preset_overrides_are_frozen_pairs_and_checked_by_load_config():
    p = PRESETS["short"].replace(name="mine", distill_overrides={"syn_steps": 40, "lr_img": 50})
    assert p.distill_overrides == (("lr_img", 50), ("syn_steps", 40)) and p.overrides == {"lr_img": 50, "syn_steps": 40}
    assert hash(p) == hash(p.replace())  # frozen and hashable
    assert distill_config_for(p, 10).syn_steps == 40
    bad = p.replace(distill_overrides={"syn_steps": -1})  # a value only the config can judge
    with pytest.raises(ValueError, match="syn_steps"):
        distill_config_for(bad, 10)
    assert get_preset("tiny") is PRESETS["tiny"] and get_preset(p) is p
    with pytest.raises(ValueError, match="tiny, short, paper"):
        get_preset("huge")


# ----- the table (no data) ----------------------------------------------------------------------------------------
def _row(ipc: int, mean: float, std: float, rmean: float, seconds: float) -> ReproduceRow:
    return ReproduceRow(
        ipc=ipc,
        distilled_mean=mean,
        distilled_std=std,
        distilled_accuracies=(mean - std, mean + std),
        random_mean=rmean,
        random_std=0.004,
        random_accuracies=(rmean,),
        paper_datm=PAPER_DATM[ipc] / 100,
        paper_random=PAPER_RANDOM[ipc] / 100,
        seconds=seconds,
        distill_seconds=seconds / 2,
        iterations=2000,
        best_iteration=1500,
        learned_lr=0.012,
        run_dir=f"out/ipc{ipc}",
    )


def _result(rows, whole=None) -> ReproduceResult:
    return ReproduceResult(
        preset=PRESETS["short"],
        rows=tuple(rows),
        whole=whole,
        buffer={
            "experts": 20,
            "epochs": 30,
            "optimizer": "gsam",
            "trained": list(range(20)),
            "reused": [],
            "seconds": 600,
        },
        data={"train_images": 50000, "test_images": 10000, "preprocessing": "zca"},
        environment={"device": "cuda: NVIDIA H200", "threads": 16, "datm_fast": "0.1.0", "torch": "2.x", "date": "D"},
        seed=0,
        seconds=5000.0,
        out="out",
        notes=("a note",),
    )


def test_format_table_against_the_paper():
    rows = [_row(10, 0.6512, 0.0034, 0.3021, 2520.0), _row(1, 0.4700, 0.001, 0.15, 45.0)]
    whole = WholeDatasetRow(mean=0.8350, std=0.002, accuracies=(0.833, 0.837), epochs=200, paper=0.848, seconds=9000.0)
    table = format_table(_result(rows, whole))
    lines = table.splitlines()
    row10 = next(line for line in lines if line.startswith("| 10 |"))
    assert row10 == "| 10 | 65.1 ± 0.3 % | 30.2 ± 0.4 % | 66.8 % | 31.0 % | -1.7 | 42.0 min |"
    row1 = next(line for line in lines if line.startswith("| 1 |"))
    assert "46.9 %" in row1 and "15.4 %" in row1 and "+0.1" in row1 and "45 s" in row1
    whole_line = next(line for line in lines if line.startswith("| whole dataset |"))
    assert "83.5 ± 0.2 %" in whole_line and "84.8 %" in whole_line and "-1.3" in whole_line and "2.5 h" in whole_line
    assert "preset `short`" in table and "20 x 30 epochs (gsam)" in table and "cuda: NVIDIA H200" in table
    assert "Note: a note" in table and JPEG_NOTE in table and "1-3 points" in table
    assert "2 networks trained for 1000 epochs on the best set" in table and "whole dataset: 200 epochs" in table
    assert abs(rows[0].gap - (0.6512 - 0.668)) < 1e-12
    assert ReproduceRow.from_dict(json.loads(json.dumps(rows[0].to_dict()))) == rows[0]
    no_whole = format_table(_result(rows[:1]))
    assert "whole dataset" not in no_whole and no_whole.count("\n| ") == 2  # the header separator and one row


# ----- command line (no data) -------------------------------------------------------------------------------------
def test_command_line_is_wired(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["reproduce", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in ("--preset", "--data-root", "--out", "--device", "--seed", "--ipcs", "--quiet", "tiny,short,paper"):
        assert option in out


def test_missing_cifar10_names_the_folder(tmp_path, capsys):
    where = tmp_path / "no-data-here"
    code = main(["reproduce", "--preset", "tiny", "--data-root", str(where), "--out", str(tmp_path / "o"), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert "CIFAR-10 not found" in err and str(where) in err and "cifar10-jpeg.npz" in err
    assert not (tmp_path / "o").exists()  # nothing was started
    assert main(["reproduce", "--preset", "tiny", "--ipcs", "1,7", "--data-root", str(where)]) == 2
    assert "7" in capsys.readouterr().err


def test_benchmark_script_runs_the_same_function(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = REPO / "benchmarks" / "reproduce.py"
    done = subprocess.run(
        [sys.executable, str(script), "--preset", "tiny", "--data-root", str(tmp_path), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "benchmarks/reproduce.py: error: CIFAR-10 not found" in done.stderr and str(tmp_path) in done.stderr


# ----- the tiny preset on real CIFAR-10 ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cifar10_root(shared_data):
    if not (shared_data / "cifar10-jpeg.npz").is_file():
        pytest.skip(f"CIFAR-10 (cifar10-jpeg.npz) not found in {shared_data}")
    return shared_data


@pytest.mark.slow
def test_tiny_preset_end_to_end_and_resume(cifar10_root, session_cache_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "tiny"
    result = run_reproduce("tiny", cifar10_root, out, device="cpu", seed=0, progress=False, cache_dir=session_cache_dir)

    assert [r.ipc for r in result.rows] == [1, 10]
    for r in result.rows:
        for acc in (r.distilled_mean, r.random_mean, *r.distilled_accuracies, *r.random_accuracies):
            assert 0.0 <= acc <= 1.0  # fractions, never percentages
        assert r.paper_datm == PAPER_DATM[r.ipc] / 100 and r.paper_random == PAPER_RANDOM[r.ipc] / 100
        assert len(r.distilled_accuracies) == 1 and r.iterations == 5 and r.seconds > 0
        run_dir = out / f"ipc{r.ipc}"
        files = ("images_best.pt", "labels_best.pt", "lr_best.pt", "metrics.jsonl", "report.md", "run.json")
        for name in (*files, "eval_best_vs_random_real.json"):
            assert (run_dir / name).is_file(), name
    assert result.whole is not None and 0.0 <= result.whole.mean <= 1.0 and result.whole.paper == 0.848
    assert result.buffer["experts"] == 2 and result.buffer["epochs"] == 2 and result.buffer["trained"] == [0, 1]
    assert result.data["train_images"] == 500 and result.data["test_images"] == 1000

    md = (out / "results.md").read_text()
    for text in ("| 1 |", "| 10 |", "| whole dataset |", "46.9 %", "66.8 %", "15.4 %", "31.0 %", "84.8 %", "JPEG"):
        assert text in md, text
    assert md.strip() == format_table(result)
    saved = json.loads((out / "results.json").read_text())
    assert [r["ipc"] for r in saved["rows"]] == [1, 10] and saved["preset"]["name"] == "tiny"
    assert saved["rows"][1]["paper_datm"] == pytest.approx(0.668) and saved["whole_dataset"]["paper"] == 0.848
    for key in ("device", "date", "torch", "datm_fast"):
        assert saved["environment"][key]
    assert saved["environment"]["device"].startswith("cpu")

    # The run records its data (a 500-image subset, ZCA fitted on it): `datm-fast eval RUN_DIR` rebuilds that
    # very space and, with the same protocol and seed, gets the accuracy the run recorded, to the bit.
    record = json.loads((out / "ipc1" / "run.json").read_text())
    assert record["data"]["max_train"] == 500 and record["data"]["preprocessing"] == "zca"
    batch = str(distill_config_for(PRESETS["tiny"], 1).batch_train)
    eval_args = ["eval", str(out / "ipc1"), "--runs", "1", "--epochs", "20", "--batch-size", batch, "--seed", "0"]
    assert main([*eval_args, "--device", "cpu", "--cache-dir", str(session_cache_dir), "--quiet"]) == 0
    again_eval = json.loads((out / "ipc1" / "eval_best.json").read_text())
    assert again_eval["results"][0]["accuracies"] == list(result.rows[0].distilled_accuracies)

    # Results written before fingerprints had content roots (2026-12-05) keyed the data by its legacy
    # fingerprint: they are reused all the same (the name stands in for the source-metadata one).
    monkeypatch.setattr(ImageDataset, "legacy_fingerprint", property(lambda d: "legacy" if d.fingerprint else None))
    for done in (out / "ipc1" / "reproduce_row.json", out / "ipc10" / "reproduce_row.json", out / "whole_dataset.json"):
        cached = json.loads(done.read_text())
        cached["key"]["data"] = "legacy"
        done.write_text(json.dumps(cached))

    # Again, through the command line: the buffer and the finished IPCs are reused, the table is printed.
    monkeypatch.setattr("datm_fast.utils.retain_freed_memory", lambda: False)  # keep this process's malloc
    capsys.readouterr()
    args = ["reproduce", "--preset", "tiny", "--data-root", str(cifar10_root), "--out", str(out), "--device", "cpu"]
    assert main([*args, "--cache-dir", str(session_cache_dir), "--quiet"]) == 0
    printed = capsys.readouterr().out
    again = json.loads((out / "results.json").read_text())
    assert again["buffer"]["trained"] == [] and again["buffer"]["reused"] == [0, 1]
    assert [r["distilled_accuracies"] for r in again["rows"]] == [r["distilled_accuracies"] for r in saved["rows"]]
    assert "| 10 |" in printed and "66.8 %" in printed and "results.md" in printed
    for done in (out / "ipc1" / "reproduce_row.json", out / "ipc10" / "reproduce_row.json", out / "whole_dataset.json"):
        assert json.loads(done.read_text())["key"]["data"] == "legacy", done  # reused, not made again
