"""Evaluation runs shared out over ranks: the same accuracies as one process, to the bit on CPU.

In this process, ranks are threads that gather through a barrier (uneven shares, a rank with no run,
a pool of models and a random-real baseline from one generator); then ``datm-fast eval`` on 2 gloo ranks
launched by torchrun against one plain process, on scikit-learn's digits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torchrun import LEAVE, torchrun

from datm_fast.data import ImageDataset
from datm_fast.distributed import SINGLE, Distributed
from datm_fast.evaluate import EvalConfig, EvalResult, evaluate_models, random_real_baseline
from datm_fast.evaluate.protocol import merge_runs

SMALL = "ConvNetW32"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny networks: one thread is as fast and the same for every rank-thread (2 shared cores in CI)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----- ranks as threads of this process ---------------------------------------------------------------------
class _World:
    def __init__(self, size: int) -> None:
        self.barrier = threading.Barrier(size, timeout=120)
        self.slots: list[Any] = [None] * size


@dataclass(frozen=True)
class _ThreadRank(Distributed):
    """A rank whose ``all_gather_object`` meets the other threads of its :class:`_World`."""

    world: _World = field(default_factory=lambda: _World(1), compare=False)

    def all_gather_object(self, value: Any) -> list[Any]:
        self.world.slots[self.rank] = value
        self.world.barrier.wait()
        out = list(self.world.slots)
        self.world.barrier.wait()  # nobody overwrites a slot before everyone has read it
        return out


def _on_ranks(world_size: int, work):
    """``work(distributed)`` on ``world_size`` thread ranks; their return values in rank order."""
    world = _World(world_size)
    results: list[Any] = [None] * world_size
    errors: list[BaseException] = []

    def one(rank: int) -> None:
        try:
            results[rank] = work(_ThreadRank(rank, world_size, world=world))
        except BaseException as exc:  # re-raised below, in the test's thread
            errors.append(exc)
            world.barrier.abort()

    threads = [threading.Thread(target=one, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def _toy_dataset() -> ImageDataset:
    g = torch.Generator().manual_seed(1)
    x, tx = torch.randn(40, 3, 16, 16, generator=g), torch.randn(20, 3, 16, 16, generator=g)
    return ImageDataset("toy", x, torch.arange(40) % 4, tx, torch.arange(20) % 4, ("a", "b", "c", "d"))


def _pool_then_baseline(distributed: Distributed) -> tuple[list[EvalResult], torch.Tensor]:
    """Two models (functional and module engine) and a random-real baseline, all from one generator."""
    ds = _toy_dataset()
    g = torch.Generator().manual_seed(3)
    images, labels = torch.randn(8, 3, 16, 16, generator=g), torch.randn(8, 4, generator=g)
    cfg = EvalConfig(model=SMALL, runs=3, epochs=2, batch_size=4, compile=False)
    results = evaluate_models(
        images, labels, 0.02, ds.test_images, ds.test_labels, [SMALL, "ConvNetBN"], cfg,
        generator=g, device="cpu", progress=False, distributed=distributed,
    )  # fmt: skip
    results.append(random_real_baseline(ds, 2, cfg, generator=g, progress=False, distributed=distributed))
    return results, g.get_state()


def _runs(results: list[EvalResult]) -> list[tuple[str, tuple[float, ...], tuple[float, ...]]]:
    return [(r.model, r.accuracies, r.train_losses) for r in results]


@pytest.mark.parametrize("world_size", [2, 4])
def test_runs_shared_over_ranks_equal_one_process_to_the_bit(world_size):
    alone, state = _pool_then_baseline(SINGLE)
    assert [r.runs for r in alone] == [3, 3, 3]
    assert len({r.accuracies for r in alone}) == 3  # the three evaluations differ: a mix-up would show
    # 2 ranks: shares of 2 and 1 runs; 4 ranks: rank 3 trains nothing and only gathers.
    for results, after in _on_ranks(world_size, _pool_then_baseline):
        assert _runs(results) == _runs(alone)  # every rank holds the whole result, in run order
        assert torch.equal(after, state)  # the generator ends where one process leaves it


def test_merge_runs_puts_runs_in_order_and_refuses_a_share_that_is_no_partition():
    merged = merge_runs([([0, 2], [5, 7], [0.5, 0.7], 2.0), ([1], [6], [0.6], 3.0), ([], [], [], 0.0)], 3)
    assert merged.correct == [5, 6, 7] and merged.losses == [0.5, 0.6, 0.7] and merged.seconds == 3.0
    with pytest.raises(RuntimeError, match=r"runs \[1\] of 3 were computed by no rank"):
        merge_runs([([0, 2], [5, 7], [0.5, 0.7], 1.0)], 3)
    with pytest.raises(RuntimeError, match="run 0 of 3 was computed by no rank or by several"):
        merge_runs([([0, 1], [5, 6], [0.5, 0.6], 1.0), ([0, 2], [5, 7], [0.5, 0.7], 1.0)], 3)


# ----- datm-fast eval on 2 gloo ranks ----------------------------------------------------------------------
# Each rank gives its own --out: rank 1's must stay unwritten. The group is joined here, so that the four
# commands share it (run_eval leaves a group it did not join).
SCRIPT = textwrap.dedent(
    """
    import os, sys
    from datm_fast.cli import main
    from datm_fast.distributed import from_environment

    work, label = sys.argv[1], sys.argv[2]
    rank = int(os.environ.get("RANK", "0"))
    common = ["--dataset", "digits", "--runs", "3", "--epochs", "2", "--batch-size", "8", "--device", "cpu",
              "--compile", "off", "--quiet"]
    the_set = ["eval", f"{work}/set", "--preprocess", "none", "--models", "ConvNet,ConvNetBN", *common]
    baseline = ["eval", "--baseline", "random-real", "--ipc", "1", "--model", "ConvNet", *common]
    with from_environment("cpu", timeout_s=120) as d:
        codes = []
        if d.active:
            # Another seed on rank 1; a file in the way of rank 0's output: refused on both ranks, before training.
            codes.append(main([*the_set, "--seed", str(rank), "--out", f"{work}/{label}/seed{rank}.json"]))
            blocked = f"{work}/a-file/x.json" if d.is_main else f"{work}/{label}/blocked.json"
            codes.append(main([*the_set, "--out", blocked]))
        codes.append(main([*the_set, "--out", f"{work}/{label}/set{rank}.json"]))
        codes.append(main([*baseline, "--out", f"{work}/{label}/random{rank}.json"]))
        print(f"CODES {rank} {codes}", flush=True)
    """
)


def _results(path: Path) -> list[tuple[str, list[float], list[float]]]:
    return [(r["model"], r["accuracies"], r["train_losses"]) for r in json.loads(path.read_text())["results"]]


@pytest.mark.slow
def test_eval_on_two_ranks_equals_one_process_and_rank0_alone_writes(tmp_path):
    pytest.importorskip("sklearn", reason="the bundled digits need scikit-learn")
    work = tmp_path
    (work / "set").mkdir()
    g = torch.Generator().manual_seed(0)
    torch.save(torch.rand(10, 1, 8, 8, generator=g), work / "set" / "images_best.pt")
    torch.save(torch.randn(10, 10, generator=g), work / "set" / "labels_best.pt")
    torch.save(torch.tensor(0.01), work / "set" / "lr_best.pt")
    (work / "a-file").write_text("in the way of a directory")
    script = work / "eval_ranks.py"
    script.write_text(SCRIPT + LEAVE)
    env = {"DATM_FAST_CACHE": str(work / "cache"), "OMP_NUM_THREADS": "1"}

    one = subprocess.run(
        [sys.executable, str(script), str(work), "one"],
        capture_output=True, text=True, env={**os.environ, **env}, timeout=300,
    )  # fmt: skip
    assert one.returncode == 0 and "CODES 0 [0, 0]" in one.stdout, one.stderr[-3000:]
    two = torchrun(2, script, work, "two", env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    # Both refusals on both ranks; then both evaluations.
    assert "CODES 0 [2, 2, 0, 0]" in two.stdout and "CODES 1 [2, 2, 0, 0]" in two.stdout, two.stdout + two.stderr
    # Said once per job (by rank 0); rank 1 fails too, silently (its exit status).
    assert two.stderr.count("the ranks disagree on the protocol's seed (rank 0: 0; rank 1: 1)") == 1, two.stderr
    assert two.stderr.count("cannot write here") == 1, two.stderr
    assert not (work / "two" / "seed0.json").exists() and not (work / "two" / "blocked.json").exists()

    for kind in ("set", "random"):
        alone = _results(work / "one" / f"{kind}0.json")
        shared = _results(work / "two" / f"{kind}0.json")
        assert [len(acc) for _, acc, _ in shared] == [3] * len(alone)
        assert shared == alone  # the same floats: each run trained by one process exactly as alone
        assert not (work / "two" / f"{kind}1.json").exists()  # rank 1 wrote nothing
    assert json.loads((work / "two" / "set0.json").read_text())["world_size"] == 2
    assert [m for m, _, _ in _results(work / "two" / "set0.json")] == ["ConvNet", "ConvNetBN"]
    assert two.stdout.count("accuracy (%)") == 2  # the table, printed by rank 0 alone, once per command
