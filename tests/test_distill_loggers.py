"""Optional TensorBoard / wandb logging of the distillation loop (datm_fast.distill.loggers)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
from test_distill_loop import BASE, _fake_evaluator, _random_trajectories, _toy_data

from datm_fast.distill import RunDir
from datm_fast.distill.config import load_config
from datm_fast.distill.loggers import make_loggers, parse_logger_names
from datm_fast.distill.loop import distill

# Iterations 0..4; evaluations before iterations 0 and 3; checkpoints after iterations 1 and 3.
CONFIG = dict(BASE, iterations=4, eval_it=3, checkpoint_every=2)
ROW_KEYS = {"loss", "start_epoch", "expert", "lr", "skipped", "nonfinite", "seconds", "peak_memory_gb"}


def _crash_at(iteration):
    def callback(row):
        if row["iteration"] == iteration:
            raise KeyboardInterrupt

    return callback


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


class FakeWandb:
    """A stand-in ``wandb`` module that records what the logger does with it."""

    def __init__(self):
        self.inits: list[dict] = []
        self.runs: list[FakeWandb.Run] = []
        self.module = types.ModuleType("wandb")
        self.module.init = self.init
        self.module.Image = FakeWandb.Image

    class Image:
        def __init__(self, data):
            self.data = data

    class Run:
        def __init__(self):
            self.logs: list[tuple[dict, int]] = []
            self.finished = 0

        def log(self, data, step=None):
            self.logs.append((dict(data), step))

        def finish(self):
            self.finished += 1

    def init(self, **kwargs):
        self.inits.append(kwargs)
        self.runs.append(FakeWandb.Run())
        return self.runs[-1]


def test_wandb_gets_every_row_and_a_resume_continues_the_same_run(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake.module)
    data = _toy_data()
    experts = _random_trajectories(data, "ConvNetW32")
    config = load_config(CONFIG)
    run_dir = tmp_path / "run"
    kwargs = dict(evaluator=_fake_evaluator, run_dir=run_dir, progress=False, loggers=["wandb"])

    # Killed during iteration 2 (after its row is logged); the checkpoint after iteration 1 is the restart point.
    with pytest.raises(KeyboardInterrupt):
        distill(data, experts, config, callback=_crash_at(2), **kwargs)
    first = fake.runs[0]
    assert first.finished == 1  # closed on the way out of the exception
    run_id = (run_dir / RunDir.WANDB_ID).read_text().strip()
    assert fake.inits[0] == dict(
        project=config.project, name="run", config=config.to_dict(), dir=str(run_dir), id=run_id, resume="allow"
    )
    distill(data, experts, config, resume=True, **kwargs)
    second = fake.runs[1]
    assert second.finished == 1
    assert fake.inits[1]["id"] == run_id and fake.inits[1]["resume"] == "allow"

    def rows(run):
        return [(logged, step) for logged, step in run.logs if "loss" in logged]

    def images(run):
        return [(tag, step, logged[tag]) for logged, step in run.logs for tag in logged if tag.startswith("images_")]

    assert [step for _, step in rows(first)] == [0, 1, 2]
    assert [step for _, step in rows(second)] == [2, 3, 4]  # wandb itself drops the repeated step 2
    # Each row is metrics.jsonl's row at step = iteration (without the iteration itself); evaluations included.
    expected = {r["iteration"]: {k: v for k, v in r.items() if k != "iteration"} for r in _metrics(run_dir)}
    for logged, step in rows(first)[:2] + rows(second):
        assert ROW_KEYS <= logged.keys() and "iteration" not in logged
        assert logged == expected[step]
        assert ("eval_mean" in logged and "eval_std" in logged) == (step in (0, 3)), step
    # Grids: the best set at the evaluations that improved it, the latest set at each checkpoint.
    logged = images(first) + images(second)
    assert ("images_best", 0) in [(tag, step) for tag, step, _ in logged]
    assert [step for tag, step, _ in logged if tag == "images_latest"] == [1, 3]
    for _, _, image in logged:
        assert isinstance(image, FakeWandb.Image)
        assert image.data.dtype == np.uint8 and image.data.ndim == 3 and image.data.shape[2] == 3

    # A fresh run in another directory is another wandb run.
    distill(data, experts, config.replace(iterations=0), run_dir=tmp_path / "other", progress=False, loggers="wandb")
    assert fake.inits[2]["id"] not in (None, run_id) and fake.inits[2]["name"] == "other"
    assert [step for _, step in fake.runs[2].logs] == [0, 0]  # the row, then the final set's grid
    assert "images_best" in fake.runs[2].logs[1][0]


def test_tensorboard_writes_the_scalars_and_grids(tmp_path):
    if importlib.util.find_spec("tensorboard") is None:
        pytest.skip("tensorboard is not installed (pip install tensorboard)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = _toy_data()
    experts = _random_trajectories(data, "ConvNetW32")
    config = load_config(CONFIG)
    run_dir = tmp_path / "run"
    kwargs = dict(evaluator=_fake_evaluator, run_dir=run_dir, progress=False, loggers=["tensorboard"])
    with pytest.raises(KeyboardInterrupt):
        distill(data, experts, config, callback=_crash_at(2), **kwargs)
    distill(data, experts, config, resume=True, **kwargs)

    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = events.Tags()
    assert ROW_KEYS | {"eval_mean", "eval_std"} <= set(tags["scalars"])
    assert {"images_best", "images_latest"} <= set(tags["images"])
    rows = _metrics(run_dir)
    # The resumed run purges what the killed one logged from iteration 2 on: each iteration once.
    losses = events.Scalars("loss")
    assert [e.step for e in losses] == [r["iteration"] for r in rows] == list(range(5))
    assert np.allclose([e.value for e in losses], [r["loss"] for r in rows], rtol=1e-6)
    assert [e.value for e in events.Scalars("skipped")] == [float(r["skipped"]) for r in rows]
    assert [e.step for e in events.Scalars("eval_mean")] == [0, 3]


def test_ready_logger_objects_get_rows_and_are_closed():
    class Recorder:
        def __init__(self):
            self.rows, self.closed = [], 0

        def log(self, row, step):
            self.rows.append((step, row["loss"]))

        def close(self):
            self.closed += 1

    data = _toy_data()
    recorder = Recorder()
    result = distill(
        data, _random_trajectories(data, "ConvNetW32"), load_config(CONFIG), progress=False, loggers=[recorder]
    )
    assert recorder.rows == [(r["iteration"], r["loss"]) for r in result.history]
    assert [step for step, _ in recorder.rows] == list(range(5)) and recorder.closed == 1


def test_logger_names_and_missing_packages(tmp_path, monkeypatch):
    assert parse_logger_names("tensorboard, wandb,") == ["tensorboard", "wandb"]
    assert parse_logger_names(["WandB", "wandb"]) == ["wandb"]
    with pytest.raises(ValueError, match="unknown logger 'tensorbored': choose from tensorboard, wandb"):
        make_loggers(["tensorbored"], tmp_path)
    data = _toy_data()
    experts = _random_trajectories(data, "ConvNetW32")
    with pytest.raises(ValueError, match="unknown logger 'mlflow'"):
        distill(data, experts, load_config(CONFIG), run_dir=tmp_path / "never", progress=False, loggers=["mlflow"])
    assert not (tmp_path / "never").exists()  # refused before any work

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(ImportError, match="pip install wandb"):
        make_loggers("wandb", tmp_path)
    with pytest.raises(ImportError, match="pip install tensorboard"):
        make_loggers(["tensorboard"], tmp_path)
    with pytest.raises(ImportError, match="pip install wandb"):
        distill(data, experts, load_config(CONFIG), run_dir=tmp_path / "never", progress=False, loggers="wandb")
    assert not (tmp_path / "never").exists()

    monkeypatch.setitem(sys.modules, "tensorboard", types.ModuleType("tensorboard"))
    with pytest.raises(ValueError, match="needs a run directory"):
        make_loggers(["tensorboard"], None)


def test_cli_log_to(tmp_path, monkeypatch, capsys):
    from datm_fast.cli import build_parser, main

    argv = ["distill", "--config", "cifar10-ipc10", "--buffer", "b", "--out", str(tmp_path / "out")]
    args = build_parser().parse_args([*argv, "--log-to", "tensorboard,wandb", "--wandb-project", "p"])
    assert args.log_to == ["tensorboard", "wandb"] and args.wandb_project == "p"
    assert build_parser().parse_args(argv).log_to == []
    with pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--log-to", "tensorboard,mlflow"])
    assert "unknown logger 'mlflow'" in capsys.readouterr().err

    monkeypatch.setitem(sys.modules, "wandb", None)
    assert main([*argv, "--log-to", "wandb"]) == 2  # one line naming the package, before any work
    assert "pip install wandb" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_importing_datm_fast_imports_no_tracker():
    code = (
        "import sys, datm_fast, datm_fast.distill, datm_fast.distill.loggers, datm_fast.cli\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorboard', 'wandb') "
        "or m.startswith('torch.utils.tensorboard')]\n"
        "assert not bad, bad\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
