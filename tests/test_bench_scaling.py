"""benchmarks/bench_scaling.py at a tiny shape on 1 and 2 CPU ranks: it runs, and says what it measured."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_scaling.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_scaling", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_scaling"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_layouts_are_parsed_and_bad_ones_named():
    bench = _bench()
    assert bench.parse_layouts("1x1, 2x1,1X2") == [(1, 1), (2, 1), (1, 2)]
    with pytest.raises(ValueError, match="'2' is not RANKSxTHREADS"):
        bench.parse_layouts("1x1,2")
    with pytest.raises(ValueError, match="'0x1': ranks and threads must be >= 1"):
        bench.parse_layouts("0x1")


def test_one_and_two_ranks_are_timed_with_their_collectives(tmp_path, capsys):
    bench = _bench()
    out = tmp_path / "scaling.json"
    args = ["--tiny", "--layouts", "1x1,2x1", "--ipc", "2", "--syn-steps", "3", "--iterations", "1"]
    args += ["--experts", "2", "--epochs", "1", "--images", "40", "--json", str(out)]
    assert bench.main(args) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["ranks"], r["threads"]) for r in rows] == [(1, 1), (2, 1)]
    for r in rows:
        assert r["distill"]["s_per_iteration"] > 0 and r["experts"]["s_per_expert_epoch"] > 0
    # One rank calls no collective; two do, and spend part (not all) of their time in them.
    assert rows[0]["distill"]["collective_share"] == 0 and rows[0]["experts"]["collective_share"] == 0
    assert 0 < rows[1]["distill"]["collective_share"] < 1 and 0 < rows[1]["experts"]["collective_share"] < 1
    table = capsys.readouterr().out
    assert "ipc 2 (batch 20) x 3 steps" in table and "2 experts x 1 epochs, 40 images" in table
    assert "2 x 1" in table and "1.00x" in table
