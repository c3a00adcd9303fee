"""The DATM outer loop: seeded, resumable, skips bad updates, and lowers the matching loss on real data."""

from __future__ import annotations

import importlib
import json
import warnings

import pytest
import torch

from datm_fast.backends import backend_info
from datm_fast.data import ImageDataset
from datm_fast.distill.config import load_config
from datm_fast.distill.loop import (
    DistillationFailed,
    EvalOutcome,
    UpdateCounts,
    derived_seed,
    distill,
    expert_for_iteration,
    initialize_synthetic_set,
)
from datm_fast.distill.rundir import RunDir, RunDirError
from datm_fast.models import convnet_forward, convnet_spec_from_name, init_flat_params
from datm_fast.step_graphs import StaticStep


class TensorTrajectories:
    """Expert trajectories held in one (experts, epochs + 1, P) tensor."""

    def __init__(self, params: torch.Tensor) -> None:
        self.tensor = params

    @property
    def num_experts(self) -> int:
        return self.tensor.shape[0]

    @property
    def num_epochs(self) -> int:
        return self.tensor.shape[1] - 1

    def params(self, expert: int, epoch: int) -> torch.Tensor:
        return self.tensor[expert, epoch]


def _toy_data(num_classes=3, per_class=12, px=8, seed=0) -> ImageDataset:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    # Class-dependent mean so that the classes are separable.
    images = torch.rand(len(labels), 3, px, px, generator=g) * 0.5 + labels.view(-1, 1, 1, 1) / num_classes / 2
    return ImageDataset("toy", images, labels, images[:6], labels[:6], tuple(f"c{i}" for i in range(num_classes)))


def _random_trajectories(data: ImageDataset, model: str, experts=2, epochs=5, seed=0) -> TensorTrajectories:
    spec = convnet_spec_from_name(model, data.channels, data.num_classes, data.image_size)
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(experts, epochs + 1, spec.num_params)
    for e in range(experts):
        theta = init_flat_params(spec, g)
        for t in range(epochs + 1):
            out[e, t] = theta
            theta = theta + 0.01 * torch.randn(spec.num_params, generator=g)
    return TensorTrajectories(out)


BASE = dict(
    model="ConvNetW32",
    ipc=2,
    syn_steps=3,
    expert_epochs=1,
    min_start_epoch=0,
    current_max_start_epoch=2,
    max_start_epoch=4,
    expansion_end_epoch=4,
    batch_syn=4,
    iterations=7,
    lr_img=10.0,
    lr_lr=1e-5,
    lr_y=2.0,
    lr_teacher=0.01,
    pix_init="real",
    eval_it=3,
    checkpoint_every=2,
    device="cpu",
    zca=False,
    threshold=10.0,
)


def _fake_evaluator(images, labels, lr, seed):
    # Deterministic in its inputs, so that resumed and uninterrupted runs must agree on the best set.
    g = torch.Generator().manual_seed(seed)
    score = float((images.sum() * 1e-3 + torch.rand((), generator=g)) % 1.0)
    return EvalOutcome((score, score / 2))


def test_resumed_run_equals_uninterrupted(tmp_path):
    data = _toy_data()
    experts = _random_trajectories(data, "ConvNetW32")
    config = load_config(BASE)
    full = distill(data, experts, config, evaluator=_fake_evaluator, run_dir=tmp_path / "a", progress=False)

    # Stopped after 3 iterations (graceful), then resumed.
    distill(data, experts, config, evaluator=_fake_evaluator, run_dir=tmp_path / "b", progress=False, max_iterations=3)
    resumed = distill(
        data, experts, config, evaluator=_fake_evaluator, run_dir=tmp_path / "b", progress=False, resume=True
    )

    # Killed at iteration 5 (an exception mid-run); the checkpoint at iteration 4 is the restart point.
    def crash(row):
        if row["iteration"] == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill(
            data, experts, config, evaluator=_fake_evaluator, run_dir=tmp_path / "c", progress=False, callback=crash
        )
    killed = distill(
        data, experts, config, evaluator=_fake_evaluator, run_dir=tmp_path / "c", progress=False, resume=True
    )

    for other in (resumed, killed):
        assert torch.equal(other.images, full.images)
        assert torch.equal(other.labels, full.labels)
        assert other.lr == full.lr and other.iteration == full.iteration
        assert other.best_accuracy == full.best_accuracy
        assert other.updates == full.updates  # counted over the whole run, across the resume
    for name in ("images_best.pt", "labels_best.pt", "lr_best.pt"):
        a = torch.load(tmp_path / "a" / name, weights_only=True)
        for d in ("b", "c"):
            assert torch.equal(a, torch.load(tmp_path / d / name, weights_only=True)), (d, name)
    # metrics.jsonl: one row per iteration, no duplicates after the resume.
    for d in ("a", "b", "c"):
        rows = [json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
        assert [r["iteration"] for r in rows] == list(range(config.iterations + 1)), d
    assert (tmp_path / "a" / "images_best.png").exists() and (tmp_path / "a" / "config.yaml").exists()
    assert load_config(tmp_path / "a" / "config.yaml") == config


def test_resume_refuses_another_config_but_takes_other_placement(tmp_path):
    """A run resumes only under the config it was started with, but for where and how fast it runs
    (device, backend, micro-batch, ...) and for a longer ``iterations``: the same function goes on."""
    data = _toy_data()
    experts = _random_trajectories(data, "ConvNetW32")
    config = load_config(BASE)
    distill(data, experts, config, run_dir=tmp_path, progress=False, max_iterations=2)
    before = (tmp_path / "config.yaml").read_text()
    with pytest.raises(ValueError, match=r"another config: syn_steps \(3 -> 5\), lr_img \(10.0 -> 50.0\)") as info:
        distill(data, experts, config.replace(lr_img=50, syn_steps=5), run_dir=tmp_path, progress=False, resume=True)
    assert "unroll" not in str(info.value)
    assert (tmp_path / "config.yaml").read_text() == before  # nothing written by the refused call
    longer = config.replace(micro_batch=2, backend="torch", iterations=9, checkpoint_every=3)
    result = distill(data, experts, longer, run_dir=tmp_path, progress=False, resume=True)
    assert result.history[-1]["iteration"] == 9
    assert load_config(tmp_path / "config.yaml") == longer  # config.yaml says what ran last


def test_a_run_directory_belongs_to_one_run(tmp_path):
    """Starting into a directory that holds a run is refused unless resumed or overwritten; a second
    writer is refused while the first holds the directory; a refused start leaves nothing behind."""
    data = _toy_data()
    experts = _random_trajectories(data, "ConvNetW32")
    config = load_config(BASE, iterations=3)
    run = tmp_path / "run"
    first = distill(data, experts, config, run_dir=run, progress=False)
    files = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with pytest.raises(RunDirError, match=r"holds a run already \(.*checkpoint.pt.*--resume continues it, --overwrite"):
        distill(data, experts, config.replace(lr_img=50), run_dir=run, progress=False)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == files  # nothing changed

    again = distill(data, experts, config.replace(lr_img=50), run_dir=run, progress=False, overwrite=True)
    assert not torch.equal(again.images, first.images)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3]  # the old run's rows are gone, not appended to
    assert load_config(run / "config.yaml").lr_img == 50

    held = RunDir(run).start(resume=True)
    try:
        with pytest.raises(RunDirError, match=r"process \d+ is writing this run directory"):
            distill(data, experts, config.replace(lr_img=50), run_dir=run, progress=False, resume=True)
    finally:
        held.finish()
    with pytest.raises(RunDirError, match="nothing to resume"):
        distill(data, experts, config, run_dir=tmp_path / "new", progress=False, resume=True)
    assert not (tmp_path / "new").exists()  # a refused start leaves no directory behind


def test_same_seed_same_run_and_different_seed_differs():
    data = _toy_data()
    experts = _random_trajectories(data, "ConvNetW32")
    config = load_config(BASE, iterations=3)
    a = distill(data, experts, config, progress=False)
    b = distill(data, experts, config, progress=False)
    c = distill(data, experts, config.replace(seed=1), progress=False)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)


def test_schedule_draws():
    # Every expert once per pass, in a fresh order each pass.
    orders = [[expert_for_iteration(0, p * 5 + i, 5) for i in range(5)] for p in range(4)]
    assert all(sorted(o) == list(range(5)) for o in orders)
    assert len({tuple(o) for o in orders}) > 1
    assert derived_seed(0, "x", 1) != derived_seed(0, "x", 2) != derived_seed(1, "x", 1)


def test_threshold_and_nonfinite_losses_skip_the_update_and_a_run_without_updates_fails(tmp_path):
    data = _toy_data()
    experts = _random_trajectories(data, "ConvNetW32")
    # A threshold no loss is under: every update is skipped, the set stays as initialised, and the run
    # ends with DistillationFailed that counts what became of each iteration.
    config = load_config(BASE, iterations=2, threshold=1e-9)
    init = distill(data, experts, config, progress=False, max_iterations=0)
    rows: list[dict] = []
    with pytest.raises(DistillationFailed, match=r"0 of 3 updates applied \(0 non-finite, 3 above the threshold\)"):
        distill(data, experts, config, progress=False, callback=rows.append, run_dir=tmp_path / "threshold")
    assert len(rows) == 3 and all(row["skipped"] and not row["nonfinite"] for row in rows)
    assert torch.equal(RunDir(tmp_path / "threshold").load_set("best").images, init.images)

    # A NaN in the buffer: reported with the iteration, skipped, never written into the set.
    broken = TensorTrajectories(experts.tensor.clone())
    broken.tensor[:, :, 0] = float("nan")
    rows.clear()
    with warnings.catch_warnings(record=True) as caught, pytest.raises(DistillationFailed, match="3 non-finite"):
        warnings.simplefilter("always")
        distill(data, broken, load_config(BASE, iterations=2), progress=False, callback=rows.append)
    assert any("iteration 0: non-finite loss" in str(w.message) for w in caught)
    assert len(rows) == 3 and all(row["nonfinite"] and row["skipped"] for row in rows)

    # Some updates skipped, some applied: a result, with the counts.
    result = distill(data, experts, load_config(BASE, iterations=2, threshold=1.0), progress=False)
    applied = sum(not row["skipped"] for row in result.history)
    assert result.updates == UpdateCounts(applied, 0, 3 - applied)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_an_overflowing_distance_is_skipped_on_every_backend(backend):
    """Target epochs 1e20 away from the start: the squared distance overflows float32. The fused op gives
    inf as PyTorch does (it aborted the run before) and the loop skips the update on either backend."""
    if not backend_info()[backend].live:
        pytest.skip(f"backend {backend} is not live here: {backend_info()[backend].detail}")
    data = _toy_data()
    experts = _random_trajectories(data, "ConvNetW32")
    experts.tensor[:, 1:3] += 1e20  # the targets of start epochs 0 and 1 (expert_epochs 1)
    rows: list[dict] = []
    config = load_config(BASE, iterations=1, backend=backend)
    with pytest.warns(RuntimeWarning, match="non-finite loss"), pytest.raises(DistillationFailed, match="2 non-finite"):
        distill(data, experts, config, progress=False, callback=rows.append)
    assert len(rows) == 2 and all(row["nonfinite"] and row["skipped"] for row in rows)


@pytest.mark.parametrize(
    ("keys", "what"),
    [
        ({"lr_img": 1e38}, "images reached"),
        ({"lr_y": 1e38}, "label logits reached"),
        ({"lr_lr": 1e30}, "learned lr reached"),
    ],
)
def test_a_set_that_leaves_the_sane_range_stops_the_run(tmp_path, keys, what):
    """A diverged set stops the run at once, naming what diverged; the checkpoint stays the last sane one."""
    data = _toy_data()
    experts = _random_trajectories(data, "ConvNetW32")
    config = load_config(BASE, iterations=4, checkpoint_every=1, **keys)
    rows: list[dict] = []
    with pytest.raises(DistillationFailed, match=f"iteration 0: the {what}.*diverged"):
        distill(data, experts, config, run_dir=tmp_path, progress=False, callback=rows.append)
    assert [row["iteration"] for row in rows] == [0] and not rows[0]["skipped"]
    assert not RunDir(tmp_path).has_checkpoint()  # nothing diverged was saved to resume from


def test_bad_inputs_fail_before_any_work(tmp_path):
    data = _toy_data()
    experts = _random_trajectories(data, "ConvNetW32", epochs=3)
    with pytest.raises(ValueError, match="max_start_epoch"):
        distill(data, experts, load_config(BASE), progress=False)  # 4 + 1 > 3 epochs
    with pytest.raises(ValueError, match="ipc"):
        distill(data, _random_trajectories(data, "ConvNetW32"), load_config(BASE, ipc=13), progress=False)
    with pytest.raises(ValueError, match="resume"):
        distill(data, _random_trajectories(data, "ConvNetW32"), load_config(BASE), run_dir=tmp_path, resume=True)


def _train_expert(spec, images, labels, epochs, seed):
    """A plain SGD expert (lr 0.01, batch 32): its per-epoch parameters."""
    g = torch.Generator().manual_seed(seed)
    theta = init_flat_params(spec, g).requires_grad_(True)
    out = [theta.detach().clone()]
    for _ in range(epochs):
        perm = torch.randperm(len(images), generator=g)
        for i in range(0, len(images), 32):
            idx = perm[i : i + 32]
            loss = torch.nn.functional.cross_entropy(convnet_forward(spec, theta, images[idx]), labels[idx])
            (grad,) = torch.autograd.grad(loss, theta)
            with torch.no_grad():
                theta -= 0.05 * grad
        out.append(theta.detach().clone())
    return torch.stack(out)


@pytest.mark.slow
def test_matching_loss_falls_on_real_mnist(shared_data, session_cache_dir):
    from datm_fast.data import load_dataset, preprocess

    raw = load_dataset("mnist", root=shared_data, cache_dir=session_cache_dir)
    g = torch.Generator().manual_seed(0)
    keep = torch.cat([torch.nonzero(raw.train_labels == c).flatten()[:60] for c in range(10)])
    keep = keep[torch.randperm(len(keep), generator=g)]
    small = raw.replace(train_images=raw.train_images[keep], train_labels=raw.train_labels[keep], fingerprint=None)
    data, transform = preprocess(small, "normalize", cache=False)
    spec = convnet_spec_from_name("ConvNetW32", 1, 10, (28, 28))
    experts = TensorTrajectories(_train_expert(spec, data.train_images, data.train_labels, 4, seed=0).unsqueeze(0))
    config = load_config(
        BASE,
        ipc=1,
        syn_steps=10,
        batch_syn=10,
        expert_epochs=2,
        min_start_epoch=0,
        max_start_epoch=1,
        sequential_generation=False,
        iterations=30,
        lr_img=1000.0,
        threshold=10.0,
    )
    result = distill(data, experts, config, transform=transform, progress=False)
    losses = [row["loss"] for row in result.history]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.9 * first, (first, last)


def test_static_steps_give_the_same_run(monkeypatch):
    """graphs=on (one StepGraphs per run, steps built in the first iteration and reused) changes how the
    steps run, not what they compute: the same set, bit for bit, after several outer updates."""
    data = _toy_data()
    experts = _random_trajectories(data, "ConvNetW32")
    config = load_config(BASE, iterations=3)
    eager = distill(data, experts, config, progress=False)
    calls = []
    original = StaticStep.__call__
    monkeypatch.setattr(StaticStep, "__call__", lambda self, **values: calls.append(1) or original(self, **values))
    static = distill(data, experts, config.replace(graphs="on"), progress=False)
    assert len(calls) >= 4 * config.syn_steps  # every roll-out and reverse micro-step ran as a static step
    assert torch.equal(static.images, eager.images) and torch.equal(static.labels, eager.labels)
    assert static.lr == eager.lr


def test_several_segments_average_their_losses_and_gradients(tmp_path, monkeypatch):
    """segments=2 (datm_fast's change of algorithm): the loss is the mean of the two segments' losses and the
    first update moves the images by lr_img times the mean of their gradients (SGD's first momentum step
    is the gradient); segment 0 is the one segments=1 matches, segment 1 the next expert of the order."""
    loop_module = importlib.import_module("datm_fast.distill.loop")
    data = _toy_data()
    experts = _random_trajectories(data, "ConvNetW32", experts=3)
    real = loop_module.trajectory_matching_loss
    seen: list[tuple[float, torch.Tensor, torch.Tensor]] = []

    def spy(spec, start, target, images, labels, lr, **options):
        x = images.detach().clone().requires_grad_()
        loss = real(spec, start, target, x, labels.detach(), lr.detach(), **options)
        seen.append((float(loss.detach()), torch.autograd.grad(loss, x)[0], start))
        return real(spec, start, target, images, labels, lr, **options)

    monkeypatch.setattr(loop_module, "trajectory_matching_loss", spy)
    config = load_config(BASE, segments=2)
    result = distill(data, experts, config, run_dir=tmp_path / "two", max_iterations=1, progress=False)
    row = result.history[0]
    assert len(seen) == 2 and not row["skipped"]
    assert row["loss"] == pytest.approx((seen[0][0] + seen[1][0]) / 2, rel=1e-6)
    order = [expert_for_iteration(config.run.seed, k, 3) for k in (0, 1)]
    assert [e for e, _ in row["segments"]] == order and row["expert"] == order[0]
    for (expert, epoch), (_, _, start) in zip(row["segments"], seen):
        assert torch.equal(start, experts.params(expert, epoch))
    spec = convnet_spec_from_name("ConvNetW32", data.channels, data.num_classes, data.image_size)
    before = initialize_synthetic_set(data, experts, config, spec, device=torch.device("cpu"))[0]
    after = RunDir(tmp_path / "two").load_checkpoint()["images"]
    moved = -config.learning.lr_img * (seen[0][1] + seen[1][1]) / 2
    torch.testing.assert_close(after - before, moved, rtol=1e-4, atol=1e-6)

    seen.clear()
    single = distill(data, experts, load_config(BASE), max_iterations=1, progress=False).history[0]
    assert len(seen) == 1 and "segments" not in single
    assert (single["expert"], single["start_epoch"]) == tuple(row["segments"][0]) and single["loss"] == seen[0][0]
