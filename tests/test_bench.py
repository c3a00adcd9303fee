"""`datm-fast bench`: engines (with their options) timed at a paper shape, the exact check first."""

from __future__ import annotations

import json

import pytest

from datm_fast.bench import engine_options
from datm_fast.cli import main


def test_engine_names_carry_engine_options():
    assert engine_options("exact").unroll == "exact" and engine_options("exact").step == "auto"
    options = engine_options("exact:fused=false,step=autograd", micro_batch=5)
    assert (options.fused, options.step, options.micro_batch) == (False, "autograd", 5)
    assert engine_options("tesla:micro_batch=3", micro_batch=5).micro_batch == 3  # the name wins
    with pytest.raises(ValueError, match="unknown engine option.*colour"):
        engine_options("exact:colour=red")
    with pytest.raises(ValueError, match="unroll must be one of"):
        engine_options("fast")


def test_bench_command_writes_a_row_per_engine(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["bench", "--configs", "cifar10-ipc1", "--steps-scale", "0.025", "--iterations", "1", "--warmup", "0"]
    assert (
        main([*args, "--engines", "full;exact:step=autograd", "--no-isolate", "--device", "cpu", "--json", str(out)])
        == 0
    )
    printed = capsys.readouterr().out
    assert "exact vs full at cifar10-ipc1 in float64" in printed and "passes" in printed
    assert "| cifar10-ipc1 | 10 x 2 | exact:step=autograd |" in printed
    rows = json.loads(out.read_text())["results"]
    assert [r["engine"] for r in rows] == ["full", "exact:step=autograd"] and all(r["mean_s"] > 0 for r in rows)
    assert main([*args, "--engines", "exact:colour=red"]) == 2
    assert "unknown engine option(s) colour" in capsys.readouterr().err


def test_upstream_engines_run_beside_ours(tmp_path, capsys):
    """upstream-full and upstream-tesla time upstream's own loops (re-stated) at the same shape, in the same table."""
    assert engine_options("upstream-full").unroll == "full" and engine_options("upstream-tesla").unroll == "tesla"
    with pytest.raises(ValueError, match="takes no options"):
        engine_options("upstream-full:micro_batch=2")
    with pytest.raises(ValueError, match="unroll must be one of"):
        engine_options("upstream-exact")
    out = tmp_path / "bench.json"
    args = ["bench", "--configs", "cifar10-ipc1", "--steps-scale", "0.025", "--iterations", "1", "--warmup", "0"]
    engines = "exact;upstream-full;upstream-tesla"
    assert main([*args, "--engines", engines, "--no-isolate", "--no-check", "--device", "cpu", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    for engine in engines.split(";"):
        assert f"| cifar10-ipc1 | 10 x 2 | {engine} |" in printed
    assert "| upstream-tesla | " in printed and "8.40 s, 0.64 GB (at 80 steps)" in printed  # the quoted figure too
    rows = json.loads(out.read_text())["results"]
    assert [r["engine"] for r in rows] == engines.split(";")
    assert all(r["error"] is None and r["mean_s"] > 0 and r["syn_steps"] == 2 for r in rows)
    assert main([*args, "--engines", "exact;upstream-fast", "--no-isolate", "--no-check"]) == 2
    assert "unroll must be one of" in capsys.readouterr().err


def test_profiled_engines_say_where_the_time_went(tmp_path, capsys):
    """--profile: one more iteration under torch.profiler for the engines named, its top operators printed
    under the table and kept in the row (on a GPU also kernels launched and the device-busy share)."""
    out = tmp_path / "bench.json"
    args = ["bench", "--configs", "cifar10-ipc1", "--steps-scale", "0.025", "--iterations", "1", "--warmup", "0"]
    args += ["--no-isolate", "--no-check", "--device", "cpu"]
    assert main([*args, "--engines", "exact;full", "--profile", "exact", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    line = next(x for x in printed.splitlines() if x.startswith("profile exact @ cifar10-ipc1: wall "))
    assert "convolution" in line  # the student's convolutions are among its top operators
    assert printed.index("| cifar10-ipc1 | 10 x 2 | full |") < printed.index(line)  # under the table
    exact, full = json.loads(out.read_text())["results"]
    assert full["profile"] is None and exact["profile"]["device"] == "cpu" and exact["profile"]["wall_s"] > 0
    assert len(exact["profile"]["top"]) == 12 and all(t["calls"] >= 1 for t in exact["profile"]["top"])
    assert main([*args, "--engines", "exact", "--profile", "tesla"]) == 2
    assert "--profile names engines not in --engines: tesla" in capsys.readouterr().err
