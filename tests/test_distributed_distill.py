"""Distillation on several ranks (gloo, 2 CPU ranks under torchrun): the exact and tesla engines share each
step's micro-batches and equal one process in float64; ``datm-fast distill`` on 2 ranks equals 1 rank to
float32 rounding, rank 0 alone writes the run, a killed rank fails the job in seconds and ``--resume`` on 2
ranks equals an uninterrupted 2-rank run bit for bit; ranks given different inputs are refused on every rank.
"""

from __future__ import annotations

import importlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_run import BUFFER_ARGS, TINY_YAML
from torchrun import LEAVE, rank_rows, torchrun, torchrun_command

from datm_fast.augment import DSAConfig
from datm_fast.cli import main
from datm_fast.distill import make_unroll_plan, trajectory_matching_loss
from datm_fast.distill.rundir import RunDir
from datm_fast.distributed import SINGLE, Distributed
from datm_fast.models import ConvNetSpec, init_flat_params

pytestmark = pytest.mark.slow

unroll_module = importlib.import_module("datm_fast.distill.unroll")  # the package attribute is the function
FAULT_SEED = int(os.environ.get("DATM_FAST_FAULT_SEED", "0"))


# ----- the engines ---------------------------------------------------------------------------------------------
# (name, spec arguments, images, batch_syn, syn_steps, micro_batch): batches that neither the set nor the
# micro-batch divides. On 2 ranks a batch of 4 under a limit of 3 runs as 2 + 2 (one micro-batch each), a
# batch of 7 under a limit of 2 as 2 + 2 + 2 + 1 (rank 0: 4 images, rank 1: 3); the short chunks of the plan
# (10 = 4 + 4 + 2, 13 = 7 + 6) run as 1 + 1 (whole on one rank) and 2 + 2 + 1 + 1 (one rank: 2 + 2 + 2).
SHAPES = [
    ("d2-b4-mb3", dict(channels=3, num_classes=4, image_size=8, width=6, depth=2), 10, 4, 7, 3),
    ("d3-b7-mb2", dict(channels=3, num_classes=5, image_size=8, width=5, depth=3), 13, 7, 5, 2),
]
# (unroll, graphs): the static steps (graphs=on) run each micro-batch from fixed buffers; the all-reduce stays
# outside them.
ENGINES = [("exact", "off"), ("tesla", "off"), ("exact", "on")]


def _problem(spec: ConvNetSpec, num_images: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    start = init_flat_params(spec, g, dtype=torch.float64)
    target = start + 0.02 * torch.randn(spec.num_params, generator=g, dtype=torch.float64)
    images = torch.randn(num_images, *spec.input_shape, generator=g, dtype=torch.float64)
    labels = 2 * torch.randn(num_images, spec.num_classes, generator=g, dtype=torch.float64)
    return start, target, images, labels, torch.tensor(0.05, dtype=torch.float64)


def _gradients(shape, unroll: str, graphs: str, distributed: Distributed | None):
    """The loss and the image, label and lr gradients of one unroll with DSA, in float64."""
    _, spec_args, n, batch, steps, micro = shape
    args = dict(spec_args)
    spec = ConvNetSpec(args.pop("channels"), args.pop("num_classes"), args.pop("image_size"), **args)
    start, target, images, labels, lr = _problem(spec, n)
    plan = make_unroll_plan(
        n, steps, batch, image_size=spec.image_size, augment=DSAConfig(), generator=torch.Generator().manual_seed(3)
    )
    x, y, a = (t.clone().requires_grad_() for t in (images, labels, lr))
    loss = trajectory_matching_loss(
        spec,
        start,
        target,
        x,
        y,
        a,
        plan=plan,
        unroll=unroll,
        micro_batch=micro,
        graphs=graphs,
        distributed=distributed,
    )
    loss.backward()
    return [loss.detach(), x.grad, y.grad, a.grad]


GRADIENTS_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_distributed_distill import ENGINES, SHAPES, _gradients
from datm_fast.distributed import Distributed, from_environment

class Counting(Distributed):
    calls = []  # the sizes of this process's all-reduces

    def all_reduce_sum(self, tensor):
        Counting.calls.append(tensor.numel())
        return super().all_reduce_sum(tensor)

with from_environment("cpu", timeout_s=120) as joined:
    ranks = Counting(joined.rank, joined.world_size, joined.local_rank, joined.timeout_s)
    out = {{}}
    for shape in SHAPES:
        for unroll, graphs in ENGINES:
            Counting.calls.clear()
            grads = _gradients(shape, unroll, graphs, ranks)
            out[shape[0], unroll, graphs] = (grads, list(Counting.calls))
    torch.save(out, {out!r} + f"/rank{{ranks.rank}}.pt")
"""


def test_micro_batches_are_shared_so_that_every_rank_has_work():
    spec = ConvNetSpec(3, 4, 8, width=6, depth=2)

    def sizes(batch: int, limit: int, ranks: int) -> list[int]:
        return [s.stop - s.start for s in unroll_module._micro_batches(spec, batch, limit, torch.float64, ranks)]

    assert sizes(4, 4, 1) == [4] and sizes(100, 32, 1) == [25, 25, 25, 25] and sizes(10, 3, 1) == [3, 3, 3, 1]
    assert sizes(4, 4, 2) == [2, 2]  # the limit alone would leave rank 1 idle
    assert sizes(7, 2, 2) == [2, 2, 2, 1]  # ranks get 4 and 3 images
    assert sizes(10, 3, 2) == [3, 3, 2, 2]  # a multiple of the ranks: 5 images each
    assert sizes(100, 100, 4) == [25, 25, 25, 25] and sizes(3, 10, 4) == [1, 1, 1]  # no empty micro-batch
    shares = [Distributed(r, 2).mine(unroll_module._micro_batches(spec, 7, 2, torch.float64, 2)) for r in (0, 1)]
    assert shares == [[slice(0, 2), slice(4, 6)], [slice(2, 4), slice(6, 7)]]
    batch_norm = ConvNetSpec(3, 4, 8, width=6, depth=2, norm="batch")  # its statistics span the batch
    assert unroll_module._micro_batches(batch_norm, 7, 2, torch.float64, 2) == [slice(0, 7)]


def test_one_rank_calls_no_collective_and_full_is_refused_on_several(monkeypatch):
    def no_collective(*args, **kwargs):
        raise AssertionError("a collective was called on one rank")

    monkeypatch.setattr(torch.distributed, "all_reduce", no_collective)
    monkeypatch.setattr(torch.distributed, "all_gather_object", no_collective)
    shape = SHAPES[0]
    for unroll in ("exact", "tesla"):
        alone = _gradients(shape, unroll, "off", None)
        for got, ref in zip(_gradients(shape, unroll, "off", SINGLE), alone):
            assert torch.equal(got, ref)
    with pytest.raises(ValueError, match="the full engine cannot share its work over 2 ranks"):
        _gradients(shape, "full", "off", Distributed(rank=0, world_size=2))  # refused before any collective


@pytest.fixture(scope="module")
def distributed_gradients(tmp_path_factory) -> dict[int, dict]:
    out = tmp_path_factory.mktemp("gradients")
    script = out / "gradients.py"
    script.write_text(GRADIENTS_SCRIPT.format(tests=str(Path(__file__).parent), out=str(out)) + LEAVE)
    done = torchrun(2, script, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return {rank: torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)}


@pytest.mark.parametrize("unroll, graphs", ENGINES, ids=[f"{u}-graphs-{g}" for u, g in ENGINES])
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_two_ranks_compute_the_gradient_of_one_process(distributed_gradients, shape, unroll, graphs):
    """float64: relative difference < 1e-12 (measured 2026-12-05: at most 3.7e-15), the same on both ranks bit for
    bit, with one all-reduce per step in the roll-out, one per step in exact's reverse pass and one at its end."""
    alone = _gradients(shape, unroll, graphs, None)
    (ours, calls), (theirs, _) = (distributed_gradients[r][shape[0], unroll, graphs] for r in (0, 1))
    for name, got, other, ref in zip(("loss", "images", "labels", "lr"), ours, theirs, alone):
        assert torch.equal(got, other), f"the ranks hold different {name}"
        assert ref.abs().max() > 0
        assert ((got - ref).norm() / ref.norm()).item() < 1e-12, name
    _, spec_args, n, batch, steps, _ = shape
    images, labels = n * (3 * 8 * 8), n * spec_args["num_classes"]
    num_params = ConvNetSpec(3, spec_args["num_classes"], 8, width=spec_args["width"], depth=spec_args["depth"])
    hvps = [num_params.num_params] * steps if unroll == "exact" else []
    assert calls == [num_params.num_params] * steps + hvps + [images + labels + 1]


# ----- the command ---------------------------------------------------------------------------------------------


def _distill_args(digits: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["distill", "--config", str(digits["config"]), "--buffer", str(digits["buffer"]), "--out", str(out), *extra]


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> dict[str, Path]:
    """A digits buffer, the tiny config and a finished 2-rank run of it (each made once, by the commands)."""
    pytest.importorskip("sklearn", reason="the bundled digits need scikit-learn")
    root = tmp_path_factory.mktemp("digits")
    paths = {"root": root, "cache": root / "cache", "config": root / "tiny.yaml", "buffer": root / "buffer"}
    paths["config"].write_text(TINY_YAML)
    env = {**os.environ, "DATM_FAST_CACHE": str(paths["cache"]), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "datm_fast.cli", "buffer", *BUFFER_ARGS, "--out", str(paths["buffer"])]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    paths["run"] = root / "run2"
    started = time.monotonic()
    done = torchrun(2, "-m", "datm_fast.cli", *_distill_args(paths, paths["run"]), "--quiet", env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    paths["stdout"] = root / "stdout.txt"
    paths["stdout"].write_text(done.stdout)
    print(f"2-rank distill: {time.monotonic() - started:.1f} s")
    return paths


def _env(digits: dict[str, Path]) -> dict[str, str]:
    return {"DATM_FAST_CACHE": str(digits["cache"])}


def _computed(run: Path) -> list[dict]:
    """metrics.jsonl's rows without the seconds and memory they took."""
    return [
        {k: v for k, v in r.items() if k not in ("seconds", "peak_memory_gb")} for r in RunDir(run).read_metrics().rows
    ]


def test_two_ranks_distil_the_set_of_one_rank_and_rank_0_alone_writes(digits, tmp_path, monkeypatch):
    """Against one rank splitting each step's 10 images as 2 ranks do (micro_batch 5): max |difference| / max |x|
    <= 1e-5 (measured 2026-12-04: 3.4e-7 for the images after 6 iterations). The split itself matters more than
    the ranks: float32 rounding, amplified by lr_img=100, makes one rank with the whole batch in one micro-batch
    differ from one rank with micro_batch 5 by 0.9% after 6 iterations (1.2e-7 after 2)."""
    monkeypatch.setattr("datm_fast.utils.retain_freed_memory", lambda: False)  # this process is pytest's
    # One thread, as each rank has: the 2 threads of this machine sum convolutions in another order, and
    # lr_img=100 made that 3.5e-3 by iteration 3 (2026-12-04).
    threads = torch.get_num_threads()
    monkeypatch.setenv("DATM_FAST_CACHE", str(digits["cache"]))
    one = tmp_path / "run1"
    torch.set_num_threads(1)
    try:
        assert main([*_distill_args(digits, one), "--quiet", "--set", "micro_batch=5"]) == 0
    finally:
        torch.set_num_threads(threads)
    two = digits["run"]
    for tag in ("1", "3", "5"):
        for a, b in zip(RunDir(one).set_files(tag), RunDir(two).set_files(tag)):
            x, y = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
            assert ((x - y).abs().max() / x.abs().max()).item() <= 1e-5, (tag, a.name)
    rows_one, rows_two = _computed(one), _computed(two)
    assert [r["iteration"] for r in rows_two] == list(range(7))  # written once: by rank 0 alone
    assert [set(r) for r in rows_two] == [set(r) for r in rows_one]  # evaluated at the same iterations
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    stdout = digits["stdout"].read_text().splitlines()
    assert sum(line.startswith("done: ") for line in stdout) == 1, stdout  # the summary from rank 0 alone
    assert sum(line.startswith("distilling digits") and "on 2 ranks" in line for line in stdout) == 1, stdout


def test_two_ranks_deal_out_the_segments_of_one_rank(digits, tmp_path, monkeypatch):
    """segments=2 on 2 ranks: each rank matches its own segment and one all-reduce sums their gradients: the
    set of one rank matching both, bit for bit (the same sums: g0 / 2 + g1 / 2 either way)."""
    monkeypatch.setattr("datm_fast.utils.retain_freed_memory", lambda: False)  # this process is pytest's
    monkeypatch.setenv("DATM_FAST_CACHE", str(digits["cache"]))
    one, two = tmp_path / "one", tmp_path / "two"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank
    try:
        assert main([*_distill_args(digits, one), "--quiet", "--no-eval", "--set", "segments=2"]) == 0
    finally:
        torch.set_num_threads(threads)
    args = [*_distill_args(digits, two), "--quiet", "--no-eval", "--set", "segments=2"]
    done = torchrun(2, "-m", "datm_fast.cli", *args, env=_env(digits))
    assert done.returncode == 0, done.stderr[-3000:]
    for tag in ("1", "5"):
        for a, b in zip(RunDir(one).set_files(tag), RunDir(two).set_files(tag)):
            assert torch.equal(torch.load(a, weights_only=True), torch.load(b, weights_only=True)), (tag, a.name)
    rows = _computed(two)
    assert rows == _computed(one) and all(len(r["segments"]) == 2 for r in rows if "loss" in r)


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _rank_pid(torchrun_pid: int, rank: int, timeout: float = 120) -> int:
    """The pid of ``rank`` among torchrun's workers (by its RANK variable)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in _children(torchrun_pid):
            try:
                env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env:
                return child
        time.sleep(0.05)
    raise AssertionError(f"rank {rank} never started")


def _rows(run: Path) -> int:
    path = run / RunDir.METRICS
    return len(path.read_text().splitlines()) if path.is_file() else 0


def test_kill_9_of_rank_1_fails_the_job_then_resume_on_2_ranks_equals_uninterrupted(digits, tmp_path):
    rng = random.Random(FAULT_SEED + 7)
    after_rows = rng.randint(1, 4)  # of 7: at least two iterations still to come
    out = tmp_path / "run"
    env = {**os.environ, **_env(digits), "OMP_NUM_THREADS": "1"}
    stderr = tmp_path / "stderr.txt"
    with stderr.open("w") as err:
        job = subprocess.Popen(
            torchrun_command(2, "-m", "datm_fast.cli", *_distill_args(digits, out), "--quiet"),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        rank1 = _rank_pid(job.pid, 1)
        deadline = time.monotonic() + 120
        while _rows(out) < after_rows:
            assert job.poll() is None and time.monotonic() < deadline, "the kill point never came"
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.2))
        assert job.poll() is None, "the job finished before the kill"
        os.kill(rank1, signal.SIGKILL)
        killed = time.monotonic()
        job.wait(timeout=60)  # rank 0 fails in seconds (gloo: a closed socket), not at the 1800 s timeout
        took = time.monotonic() - killed
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    assert job.returncode != 0 and took < 60, (job.returncode, took)
    print(f"rank 0 failed {took:.2f} s after rank 1 was killed")
    # Rank 0 says why in one line: its collective failed (lost the other ranks), or torchrun stopped it first.
    errors = [line for line in stderr.read_text().splitlines() if line.startswith("datm-fast distill: error: ")]
    assert len(errors) == 1 and "rank 0 of 2" in errors[0], stderr.read_text()[-3000:]
    assert "lost the other ranks" in errors[0] or "stopped by SIGTERM" in errors[0], errors[0]

    again = "--resume" if RunDir(out).has_checkpoint() else "--overwrite"  # killed before its first checkpoint
    done = torchrun(2, "-m", "datm_fast.cli", *_distill_args(digits, out), "--quiet", again, env=_env(digits))
    assert done.returncode == 0, (after_rows, done.stderr[-3000:])
    for tag in ("best", "5"):
        for a, b in zip(RunDir(out).set_files(tag), RunDir(digits["run"]).set_files(tag)):
            assert torch.equal(torch.load(a, weights_only=True), torch.load(b, weights_only=True)), (tag, a.name)
    assert _computed(out) == _computed(digits["run"])  # each iteration once, the same numbers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_machines_by_c10d_rendezvous_distil_the_set_of_one_machine(digits, tmp_path):
    """README's multi-node command, as two "machines" of one rank each on this one (two torchrun agents
    meeting at a c10d rendezvous): the same set, bit for bit, as one torchrun of 2 ranks."""
    out = tmp_path / "run"
    launch = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d"]
    launch += ["--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "--rdzv-id", "two-machines"]
    command = [sys.executable, "-m", "torch.distributed.run", *launch, "-m", "datm_fast.cli"]
    command += [*_distill_args(digits, out), "--quiet"]
    env = {**os.environ, **_env(digits), "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    machines = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    machines.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [m.communicate(timeout=300) for m in machines]
    assert [m.returncode for m in machines] == [0, 0], [err[-3000:] for _, err in outputs]
    for tag in ("best", "5"):
        for a, b in zip(RunDir(out).set_files(tag), RunDir(digits["run"]).set_files(tag)):
            assert torch.equal(torch.load(a, weights_only=True), torch.load(b, weights_only=True)), (tag, a.name)


# ----- inputs the ranks disagree on ----------------------------------------------------------------------------
DISAGREE_SCRIPT = """
import json, sys, torch
sys.path.insert(0, {tests!r})
from test_distill_loop import BASE, _random_trajectories, _toy_data
from datm_fast.cli import main
from datm_fast.distill import EvalOutcome, distill, load_config
from datm_fast.distributed import RanksDisagree, from_environment

rows = {{}}
with from_environment("cpu", timeout_s=120) as ranks:
    # 1. The command, given another lr_img on each rank: refused on every rank before rank 0 takes the directory.
    code = main(["distill", "--config", {config!r}, "--buffer", {buffer!r}, "--out", {out!r} + "/cli", "--quiet",
                 "--set", f"lr_img={{100 if ranks.rank == 0 else 50}}"])
    rows["cli"] = code

    # 2. The library, given other data on rank 1: refused before any work.
    data, config = _toy_data(), load_config(BASE)
    experts = _random_trajectories(data, "ConvNetW32")
    other = _toy_data(seed=ranks.rank)
    try:
        distill(other, experts, config, run_dir={out!r} + "/data", progress=False, distributed=ranks)
    except RanksDisagree as exc:
        rows["data"] = str(exc)

    # 3. Rank 0 alone evaluates (the others pass no evaluator) and every rank gets its outcome and the same set.
    calls = []

    def evaluator(images, labels, lr, seed):
        calls.append(seed)
        return EvalOutcome((float(images.sum() % 1.0),))

    result = distill(
        data, experts, config, evaluator=evaluator if ranks.is_main else None, run_dir={out!r} + "/lib",
        progress=False, distributed=ranks,
    )
    rows["calls"] = len(calls)
    rows["best"] = [result.best_accuracy, result.iteration, result.lr, float(result.images.double().sum())]
    rows["updates"] = str(result.updates)
open({out!r} + f"/row{{ranks.rank}}.json", "w").write(json.dumps({{"rank": ranks.rank, **rows}}))
"""


def test_ranks_given_different_inputs_are_refused_on_every_rank_and_rank_0_evaluates(digits, tmp_path):
    script = tmp_path / "disagree.py"
    script.write_text(
        DISAGREE_SCRIPT.format(
            tests=str(Path(__file__).parent),
            config=str(digits["config"]),
            buffer=str(digits["buffer"]),
            out=str(tmp_path),
        )
        + LEAVE
    )
    done = torchrun(2, script, env=_env(digits))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = rank_rows(tmp_path, 2)
    assert [r["rank"] for r in rows] == [0, 1]
    # The command: exit 2 on both ranks and one line (rank 0's) naming both ranks' values; no run directory.
    errors = [line for line in done.stderr.splitlines() if line.startswith("datm-fast distill: error: ")]
    assert all(r["cli"] == 2 for r in rows) and len(errors) == 1, done.stderr[-3000:]
    assert "the ranks disagree on the config" in errors[0] and "rank 0: {" in errors[0] and "rank 1: {" in errors[0]
    assert "'lr_img': 100.0" in errors[0] and "'lr_img': 50.0" in errors[0], errors[0]
    assert not (tmp_path / "cli").exists()
    # The library: the same message on every rank, before anything is written.
    assert rows[0]["data"] == rows[1]["data"] and rows[0]["data"].startswith(
        "the ranks disagree on the dataset (rank 0"
    )
    assert not (tmp_path / "data").exists()
    # Evaluated on rank 0 alone; the outcome and the set are every rank's.
    assert rows[0]["calls"] == 3 and rows[1]["calls"] == 0  # eval_it 3 over iterations 0..7: 0, 3, 6
    assert rows[0]["best"] == rows[1]["best"] and rows[0]["updates"] == rows[1]["updates"]
    assert rows[0]["best"][0] is not None
    assert [r["iteration"] for r in RunDir(tmp_path / "lib").read_metrics().rows] == list(range(8))
