"""Tests for datm_fast.evaluate: the protocol (schedule, losses), the engines (vectorised = one at a
time = an upstream-style loop), a real run, upstream-format files and run directories, baselines,
errors, reports and the CLI.

Networks are small (ConvNetW32 on 16 px images, a few epochs) so that the file runs in well under
a minute and a half on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import cuda_only

import datm_fast.evaluate._engine as engine
from datm_fast.augment import DSAConfig, apply_dsa, sample_dsa_params
from datm_fast.data import DataSpec, ImageDataset, load_dataset
from datm_fast.distill import RunDir, RunRecord
from datm_fast.evaluate import (
    EVAL_POOLS,
    EvalConfig,
    EvalResult,
    evaluate_against_random_real,
    evaluate_models,
    evaluate_run_dir,
    evaluate_synset,
    format_table,
    load_synset,
    random_real_baseline,
    random_real_subset,
    resolve_models,
    train_loss,
    whole_dataset_baseline,
    write_results,
)
from datm_fast.evaluate.cli import add_parser
from datm_fast.models import get_network
from datm_fast.ops import soft_cross_entropy

SMALL = "ConvNetW32"
CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These networks are tiny: one thread is as fast, and it does not stall when the 2 shared cores are
    busy (with two threads, every op waits for the other to be scheduled: up to 100x slower here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _toy(n: int = 24, classes: int = 4, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.arange(n) % classes


def _train(data, lr, cfg, rngs):
    """The functional engine on ``rngs``: final parameters as one row per run ``(k, P)``, and losses."""
    st = engine._stack(SMALL, 4, data.image_shape, rngs, CPU)
    losses = engine._train_stack(st, data, lr, cfg, rngs, CPU, int)
    return torch.cat([p.detach().reshape(len(rngs), -1) for p in st.params], 1), losses


def _toy_dataset(n_train: int = 40, n_test: int = 20, classes: int = 4, size: int = 16) -> ImageDataset:
    x, y = _toy(n_train, classes, size, seed=1)
    tx, ty = _toy(n_test, classes, size, seed=2)
    return ImageDataset("toy", x, y, tx, ty, tuple(f"c{i}" for i in range(classes)))


# ----- the protocol: schedule ---------------------------------------------------------------------
def _upstream_lrs(epochs: int, lr: float) -> list[float]:
    """The lr of every pass of upstream's evaluate_synset loop, re-stated."""
    lr_schedule = [epochs // 2 + 1]
    out = []
    for ep in range(epochs + 1):
        out.append(lr)
        if ep in lr_schedule:
            lr *= 0.1
    return out


@pytest.mark.parametrize("epochs", [0, 1, 2, 3, 10, 299, 1000])
def test_schedule_is_upstreams(epochs):
    cfg = EvalConfig(epochs=epochs)
    lr = 0.0123
    ours = [cfg.lr_at(ep, lr) for ep in range(cfg.num_passes)]
    assert ours == _upstream_lrs(epochs, lr)  # bit for bit
    assert [ep for ep in range(cfg.num_passes) if cfg.resets_momentum(ep)] == [
        ep for ep in (0, epochs // 2 + 2) if ep < cfg.num_passes
    ]


def test_schedule_default_1000_epochs():
    cfg = EvalConfig()
    assert (cfg.momentum, cfg.weight_decay, cfg.lr_decay, cfg.batch_size) == (0.9, 5e-4, 0.1, 256)
    assert cfg.num_passes == 1001 and cfg.decay_epoch == 501
    lrs = [cfg.lr_at(ep, 1.0) for ep in range(cfg.num_passes)]
    assert lrs.count(1.0) == 502 and lrs[502:] == [0.1] * 499  # x0.1 exactly after pass 501
    with pytest.raises(ValueError, match="epoch must be in"):
        cfg.lr_at(1001, 1.0)


def test_module_engine_builds_sgd_with_protocol_values(monkeypatch):
    made = []
    real_sgd = torch.optim.SGD

    def recording_sgd(params, **kw):
        made.append(kw)
        return real_sgd(params, **kw)

    monkeypatch.setattr(engine.torch.optim, "SGD", recording_sgd)
    x, y = _toy(8)
    tx, ty = _toy(8, seed=3)
    cfg = EvalConfig(model=SMALL, runs=1, epochs=4, batch_size=8, engine="module")
    evaluate_synset(x, y, 0.02, tx, ty, cfg, generator=_gen(), progress=False)
    # epochs 4: passes 0..4, lr x0.1 after pass 3 with a fresh optimiser (zero momentum), as upstream.
    assert made == [
        {"lr": 0.02, "momentum": 0.9, "weight_decay": 5e-4},
        {"lr": 0.02 * 0.1, "momentum": 0.9, "weight_decay": 5e-4},
    ]


def _reference_run(x, y_targets, lr, epochs, batch, rng, reset_momentum=True):
    """An upstream-style loop: nn.Module, torch.optim.SGD, a new optimiser after pass epochs // 2 + 1."""
    dsa = DSAConfig()
    net = get_network(SMALL, x.shape[1], 4, tuple(x.shape[2:]), generator=rng.init)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    for ep in range(epochs + 1):
        perm = torch.randperm(x.shape[0], generator=rng.data)
        for s in range(0, x.shape[0], batch):
            idx = perm[s : s + batch]
            p = sample_dsa_params(dsa, idx.numel(), x.shape[2], x.shape[3], generator=rng.data, host_generator=rng.host)
            out = net(apply_dsa(x[idx], p))
            loss = torch.sum(-F.log_softmax(out, 1) * y_targets[idx]) / out.shape[0]
            opt.zero_grad()
            loss.backward()
            opt.step()
        if ep == epochs // 2 + 1:
            lr *= 0.1
            if reset_momentum:
                opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
            else:
                for group in opt.param_groups:
                    group["lr"] = lr
    return torch.cat([q.detach().reshape(-1) for q in net.parameters()])


def test_functional_engine_equals_upstream_style_loop():
    x, _ = _toy(10)
    logits = torch.randn(10, 4, generator=_gen(5))
    targets = F.softmax(logits, 1)
    cfg = EvalConfig(model=SMALL, runs=1, epochs=4, batch_size=4)
    ours, _ = _train(engine.TrainSet(x, targets), 0.05, cfg, engine.make_run_rngs(_gen(), 1, CPU))
    ref = _reference_run(x, targets, 0.05, 4, 4, engine.make_run_rngs(_gen(), 1, CPU)[0])
    torch.testing.assert_close(ours[0], ref, rtol=1e-5, atol=1e-6)
    # The comparison has teeth: keeping the momentum across the lr decay gives other parameters.
    no_reset = _reference_run(x, targets, 0.05, 4, 4, engine.make_run_rngs(_gen(), 1, CPU)[0], reset_momentum=False)
    assert (no_reset - ref).abs().max() > 1e-4


# ----- losses -------------------------------------------------------------------------------------
def test_soft_cross_entropy_is_datms_formula():
    g = _gen(3)
    logits, target = (
        torch.randn(7, 5, generator=g, dtype=torch.float64),
        torch.randn(7, 5, generator=g, dtype=torch.float64),
    )
    p = torch.exp(target) / torch.exp(target).sum(1, keepdim=True)
    logp = logits - torch.log(torch.exp(logits).sum(1, keepdim=True))
    expected = -(p * logp).sum()
    torch.testing.assert_close(soft_cross_entropy(logits, target, reduction="sum"), expected)
    torch.testing.assert_close(soft_cross_entropy(logits, target, reduction="mean"), expected / 7)
    # The evaluation's form, probabilities computed once per set, is the same number.
    torch.testing.assert_close(soft_cross_entropy(logits, target_probs=p, reduction="mean"), expected / 7)
    torch.testing.assert_close(train_loss(logits, p), expected / 7)
    # With probability targets, PyTorch's cross_entropy computes the same quantity.
    torch.testing.assert_close(soft_cross_entropy(logits, target, reduction="mean"), F.cross_entropy(logits, p))
    with pytest.raises(ValueError, match=r"\(B, K\)"):
        soft_cross_entropy(logits, target[:, :3], reduction="mean")
    with pytest.raises(ValueError, match="reduction"):
        soft_cross_entropy(logits, target, reduction="none")
    with pytest.raises(ValueError, match="exactly one"):
        soft_cross_entropy(logits, target, target_probs=p, reduction="sum")


def test_hard_labels_use_cross_entropy():
    g = _gen(4)
    logits, y = torch.randn(9, 6, generator=g), torch.randint(0, 6, (9,), generator=g)
    torch.testing.assert_close(train_loss(logits, y), F.cross_entropy(logits, y))
    onehot = F.one_hot(y, 6).float()
    torch.testing.assert_close(train_loss(logits, onehot), F.cross_entropy(logits, y))


def test_logit_labels_train_with_soft_ce():
    x, y = _toy(12)
    tx, ty = _toy(8, seed=3)
    cfg = EvalConfig(model=SMALL, runs=1, epochs=2, batch_size=6)
    hard = evaluate_synset(x, y, 0.01, tx, ty, cfg, generator=_gen(), progress=False)
    # Logits whose softmax is exactly one-hot train as the hard labels do (to rounding).
    one_hot_logits = 100.0 * F.one_hot(y, 4).float()
    soft = evaluate_synset(x, one_hot_logits, 0.01, tx, ty, cfg, generator=_gen(), progress=False)
    assert soft.train_losses == pytest.approx(hard.train_losses, rel=1e-4)
    # Genuinely soft labels give another loss: the engine does read them as distributions.
    flat = evaluate_synset(x, torch.zeros(12, 4), 0.01, tx, ty, cfg, generator=_gen(), progress=False)
    assert flat.train_losses[0] == pytest.approx(math.log(4), rel=0.05)
    assert abs(flat.train_losses[0] - hard.train_losses[0]) > 1e-3


# ----- engines agree --------------------------------------------------------------------------------
def test_vectorised_runs_equal_one_at_a_time():
    x, _ = _toy(14)
    targets = F.softmax(torch.randn(14, 4, generator=_gen(6)), 1)
    data = engine.TrainSet(x, targets)
    cfg = EvalConfig(model=SMALL, runs=3, epochs=3, batch_size=5)  # 3 steps per pass, the last one short
    together, loss_t = _train(data, 0.02, cfg, engine.make_run_rngs(_gen(), 3, CPU))
    alone = [_train(data, 0.02, cfg, [r]) for r in engine.make_run_rngs(_gen(), 3, CPU)]
    torch.testing.assert_close(together, torch.cat([p for p, _ in alone]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss_t, torch.cat([v for _, v in alone]), rtol=1e-4, atol=1e-5)
    assert (together[0] - together[1]).abs().max() > 1e-3  # each run its own init, order and DSA


def test_vectorised_per_run_sets_equal_one_at_a_time():
    ds = _toy_dataset()
    base = EvalConfig(model=SMALL, runs=3, epochs=2, batch_size=8)
    one = random_real_baseline(ds, 3, base.replace(parallel_runs=1), generator=_gen(), progress=False)
    vec = random_real_baseline(ds, 3, base.replace(parallel_runs=3), generator=_gen(), progress=False)
    assert vec.train_losses == pytest.approx(one.train_losses, rel=1e-4)
    assert vec.accuracies == pytest.approx(one.accuracies, abs=1.0 / 20 + 1e-9)  # at most one test image flips


def test_module_engine_equals_functional_engine():
    x, y = _toy(12)
    tx, ty = _toy(10, seed=3)
    cfg = EvalConfig(model=SMALL, runs=2, epochs=2, batch_size=5)
    fun = evaluate_synset(x, y, 0.01, tx, ty, cfg, generator=_gen(), progress=False)
    mod = evaluate_synset(x, y, 0.01, tx, ty, cfg.replace(engine="module"), generator=_gen(), progress=False)
    assert fun.train_losses == mod.train_losses and fun.accuracies == mod.accuracies  # bit for bit on CPU


def test_other_architectures_vectorise_too():
    g = _gen(11)
    x, tx = torch.rand(12, 1, 28, 28, generator=g), torch.rand(6, 1, 28, 28, generator=g)
    y, ty = torch.arange(12) % 10, torch.arange(6)
    cfg = EvalConfig(model="LeNet", runs=2, epochs=2, batch_size=5)
    one = evaluate_synset(x, y, 0.01, tx, ty, cfg.replace(parallel_runs=1), generator=_gen(), progress=False)
    vec = evaluate_synset(x, y, 0.01, tx, ty, cfg.replace(parallel_runs=2), generator=_gen(), progress=False)
    mod = evaluate_synset(x, y, 0.01, tx, ty, cfg.replace(engine="module"), generator=_gen(), progress=False)
    assert vec.train_losses == pytest.approx(one.train_losses, rel=1e-4)
    assert one.train_losses == mod.train_losses


def test_bfloat16_autocast_trains_close_to_float32():
    x, y = _toy(12)
    tx, ty = _toy(10, seed=3)
    cfg = EvalConfig(model=SMALL, runs=1, epochs=2, batch_size=6)
    f32 = evaluate_synset(x, y, 0.01, tx, ty, cfg, generator=_gen(), progress=False)
    bf16 = evaluate_synset(x, y, 0.01, tx, ty, cfg.replace(precision="bfloat16"), generator=_gen(), progress=False)
    assert not bf16.diverged and bf16.train_losses != f32.train_losses
    assert bf16.train_losses == pytest.approx(f32.train_losses, rel=0.05)


def test_seeded_and_reproducible():
    x, y = _toy(12)
    tx, ty = _toy(10, seed=3)
    cfg = EvalConfig(model=SMALL, runs=2, epochs=1, batch_size=6)
    a = evaluate_synset(x, y, 0.01, tx, ty, cfg, generator=_gen(7), progress=False)
    b = evaluate_synset(x, y, 0.01, tx, ty, cfg, generator=_gen(7), progress=False)
    c = evaluate_synset(x, y, 0.01, tx, ty, cfg, generator=_gen(8), progress=False)
    assert a.train_losses == b.train_losses and a.accuracies == b.accuracies
    assert a.train_losses != c.train_losses


def test_batchnorm_networks_use_the_module_engine():
    for model in ("ConvNetBN", "VGG11BN", "ResNet18BN"):
        assert not engine.stackable(model, 10, (3, 32, 32))
    for model in ("ConvNet", "ConvNetD4", "AlexNet", "VGG11", "ResNet18", "LeNet", "MLP"):
        assert engine.stackable(model, 10, (3, 32, 32)), model
    x, y = _toy(4)
    cfg = EvalConfig(model="ConvNetBN", engine="functional", epochs=0)
    with pytest.raises(ValueError, match="engine='functional' needs a network without batch norm"):
        evaluate_synset(x, y, 0.01, x, y, cfg, generator=_gen())


def test_cross_architecture_pool():
    assert resolve_models("M") == ("ConvNet", "AlexNet", "VGG11", "ResNet18")
    assert resolve_models("ConvNet, LeNet,ConvNet") == ("ConvNet", "LeNet")
    assert set(EVAL_POOLS["N"]) >= {"ConvNetBN", "ConvNetIN"}
    g = _gen(9)
    x, tx = torch.rand(10, 1, 28, 28, generator=g), torch.rand(6, 1, 28, 28, generator=g)
    y, ty = torch.arange(10) % 10, torch.arange(6)
    res = evaluate_models(
        x, y, 0.01, tx, ty, [SMALL, "LeNet"], EvalConfig(runs=1, epochs=1), generator=g, progress=False
    )
    assert [r.model for r in res] == [SMALL, "LeNet"]
    assert all(0 <= r.mean <= 1 and r.runs == 1 and not r.diverged for r in res)
    with pytest.raises(ValueError, match="Did you mean 'AlexNet'"):
        evaluate_models(x, y, 0.01, tx, ty, "ConvNet,AlexNt", EvalConfig(runs=1), generator=g)


# ----- a real run -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mnist(shared_data, session_cache_dir) -> ImageDataset:
    ds = load_dataset("mnist", root=shared_data, cache_dir=session_cache_dir)
    return ds.replace(test_images=ds.test_images[:300], test_labels=ds.test_labels[:300])


def test_real_mnist_subset_beats_chance(mnist):
    cfg = EvalConfig(model=SMALL, runs=1, epochs=14, batch_size=256)
    res = random_real_baseline(mnist, 5, cfg, generator=_gen(), progress=False)
    assert res.num_images == 50 and res.runs == 1
    assert res.mean > 0.35, res  # chance is 0.10; this run measured about 0.6
    assert res.train_losses[0] < math.log(10)


# ----- baselines --------------------------------------------------------------------------------------
def test_random_real_subset_picks_ipc_per_class_and_is_seeded():
    ds = _toy_dataset(n_train=40, classes=4)
    x, y = random_real_subset(ds, 3, generator=_gen(1))
    assert x.shape == (12, 3, 16, 16) and torch.equal(torch.bincount(y, minlength=4), torch.full((4,), 3))
    assert y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    rows = [int(torch.nonzero((ds.train_images == img).all(dim=(1, 2, 3))).item()) for img in x]
    assert len(set(rows)) == 12 and all(ds.train_labels[r] == y[i] for i, r in enumerate(rows))
    x2, _ = random_real_subset(ds, 3, generator=_gen(1))
    x3, _ = random_real_subset(ds, 3, generator=_gen(2))
    assert torch.equal(x, x2) and not torch.equal(x, x3)
    with pytest.raises(ValueError, match=r"class 0 \('c0'\) of 'toy' has 10 train images, fewer than ipc=11"):
        random_real_subset(ds, 11, generator=_gen())


def test_whole_dataset_baseline_runs_on_the_train_split():
    ds = _toy_dataset(n_train=16, n_test=8)
    res = whole_dataset_baseline(ds, EvalConfig(model=SMALL, runs=1, epochs=1), generator=_gen(), progress=False)
    assert res.num_images == 16 and res.lr == 0.01 and res.name == "whole toy"
    assert len(res.accuracies) == 1 and 0 <= res.mean <= 1


def test_evaluate_against_random_real_equals_the_two_calls_and_writes_both(tmp_path):
    ds = _toy_dataset(n_train=40, n_test=8, classes=4)
    x, _ = _toy(8, 4)
    labels = torch.randn(8, 4, generator=_gen(3))
    cfg = EvalConfig(model=SMALL, runs=2, epochs=1, batch_size=8)
    path = tmp_path / "eval_best.json"
    distilled, baseline = evaluate_against_random_real(
        x, labels, 0.02, ds, 2, cfg, seed=5, results_path=path, name="mine", meta={"dataset": "toy"}, progress=False
    )
    alone = evaluate_synset(x, labels, 0.02, ds.test_images, ds.test_labels, cfg, generator=_gen(5), progress=False)
    base = random_real_baseline(ds, 2, cfg, generator=_gen(5), progress=False)
    assert distilled.accuracies == alone.accuracies and baseline.accuracies == base.accuracies
    assert distilled.name == "mine" and baseline.num_images == 8
    written = json.loads(path.read_text())
    assert [r["name"] for r in written["results"]] == ["mine", base.name]
    assert written["ipc"] == 2 and written["baseline"] == "random-real" and written["dataset"] == "toy"


def test_evaluator_on_test_set_is_the_loops_seeded_evaluation():
    from datm_fast.distill import EvalOutcome
    from datm_fast.evaluate import evaluator_on_test_set

    ds = _toy_dataset(n_train=40, n_test=8, classes=4)
    x, _ = _toy(8, 4)
    labels = torch.randn(8, 4, generator=_gen(3))
    cfg = EvalConfig(model=SMALL, runs=2, epochs=1, batch_size=8)
    evaluator = evaluator_on_test_set(ds, cfg)
    outcome = evaluator(x, labels, 0.02, 7)
    alone = evaluate_synset(x, labels, 0.02, ds.test_images, ds.test_labels, cfg, generator=_gen(7), progress=False)
    assert isinstance(outcome, EvalOutcome) and outcome.accuracies == tuple(alone.accuracies)
    assert evaluator(x, labels, 0.02, 7) == outcome  # seeded: the same call, the same accuracies
    with pytest.raises(ValueError, match="ImageDataset"):
        evaluator_on_test_set((x, labels), cfg)


# ----- files, run directories ---------------------------------------------------------------------------
def _save_upstream(directory, n=12, classes=4, size=16, tag="best"):
    """Files as upstream DATM writes them: tensors saved with requires_grad, lr a 0-d tensor."""
    directory.mkdir(parents=True, exist_ok=True)
    x, _ = _toy(n, classes, size)
    torch.save(x.clone().requires_grad_(True), directory / f"images_{tag}.pt")
    torch.save(torch.randn(n, classes).requires_grad_(True), directory / f"labels_{tag}.pt")
    torch.save(torch.tensor(0.01).requires_grad_(True), directory / f"lr_{tag}.pt")
    return x


def test_upstream_format_files_evaluate(tmp_path):
    run = tmp_path / "logged" / "Normal"
    x = _save_upstream(run)
    synset = load_synset(run / "images_best.pt", run / "labels_best.pt", run / "lr_best.pt")
    assert torch.equal(synset.images, x) and synset.soft and synset.lr == pytest.approx(0.01)
    assert not synset.images.requires_grad
    ds = _toy_dataset()
    cfg = EvalConfig(model=SMALL, runs=2, epochs=1, batch_size=8)
    # The parent of upstream's Normal/ folder works as a run directory too.
    (res,) = evaluate_run_dir(tmp_path / "logged", cfg, dataset=ds, generator=_gen(), device="cpu", progress=False)
    assert res.runs == 2 and res.num_images == 12 and res.lr == pytest.approx(0.01)
    assert res.name == str(tmp_path / "logged")
    # Integer labels saved as upstream MTT does also evaluate.
    torch.save(torch.arange(12) % 4, run / "labels_best.pt")
    (res,) = evaluate_run_dir(run, cfg, dataset=ds, generator=_gen(), device="cpu", progress=False)
    assert not res.diverged


def test_run_dir_with_run_json_loads_its_dataset(tmp_path, shared_data, session_cache_dir):
    ds = load_dataset("breastmnist", root=shared_data, cache_dir=session_cache_dir)
    run = tmp_path / "run"
    run.mkdir()
    torch.save(torch.rand(4, 1, 28, 28), run / "images_best.pt")
    torch.save(torch.tensor([0, 1, 0, 1]), run / "labels_best.pt")
    torch.save(torch.tensor(0.01), run / "lr_best.pt")
    spec = DataSpec("breastmnist", root=shared_data, preprocessing="normalize")
    RunDir(run).write_record(RunRecord(spec, "LeNet", ipc=2))
    assert RunDir(run).read_record() == RunRecord(spec, "LeNet", 2)
    cfg = EvalConfig(model="LeNet", runs=1, epochs=1)
    (res,) = evaluate_run_dir(
        run, cfg, data_root=shared_data, cache_dir=session_cache_dir, generator=_gen(), device="cpu", progress=False
    )
    assert res.model == "LeNet" and 0 <= res.mean <= 1
    assert len(ds.test_labels) == 156  # tested on the whole official test split
    # A dataset in another space than run.json says is refused.
    with pytest.raises(ValueError, match="preprocessing 'normalize' but the dataset given is 'none'"):
        evaluate_run_dir(run, cfg, dataset=ds, generator=_gen(), progress=False)


def test_run_dir_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no images_best.pt.*no images_\\*.pt files at all"):
        evaluate_run_dir(empty, generator=_gen(), dataset=_toy_dataset())
    _save_upstream(empty, tag="5000")
    with pytest.raises(FileNotFoundError, match="tags present: 5000"):
        evaluate_run_dir(empty, generator=_gen(), dataset=_toy_dataset())
    with pytest.raises(ValueError, match="no run.json; pass dataset="):
        evaluate_run_dir(empty, tag="5000", generator=_gen())
    with pytest.raises(ValueError, match=r"images are \(3, 16, 16\) but 'toy' images are \(3, 8, 8\)"):
        evaluate_run_dir(empty, tag="5000", generator=_gen(), dataset=_toy_dataset(size=8))


def test_bad_files_are_named(tmp_path):
    good_x, good_y = tmp_path / "images.pt", tmp_path / "labels.pt"
    torch.save(torch.randn(6, 3, 8, 8), good_x)
    torch.save(torch.arange(6), good_y)

    def bad(name, obj):
        path = tmp_path / name
        torch.save(obj, path)
        return path

    cases = [
        (lambda: load_synset(bad("i3.pt", torch.randn(6, 8, 8)), good_y), r"i3\.pt: expected .*\(6, 8, 8\)"),
        (lambda: load_synset(bad("iint.pt", torch.zeros(6, 3, 8, 8, dtype=torch.uint8)), good_y), r"iint\.pt.*uint8"),
        (lambda: load_synset(good_x, bad("l5.pt", torch.arange(5))), r"l5\.pt: 5 labels for 6 images"),
        (lambda: load_synset(good_x, bad("l3d.pt", torch.zeros(6, 2, 2))), r"l3d\.pt: expected \(6,\) integer"),
        (lambda: load_synset(good_x, bad("lrow.pt", torch.zeros(5, 10))), r"lrow\.pt: 5 label rows for 6 images"),
        (lambda: load_synset(good_x, good_y, bad("lrv.pt", torch.ones(2))), r"lrv\.pt: expected a scalar lr.*\(2,\)"),
        (lambda: load_synset(good_x, good_y, bad("lrn.pt", torch.tensor(-0.1))), r"lrn\.pt: the learned lr is -0\.1"),
        (
            lambda: load_synset(bad("nan.pt", torch.full((6, 3, 8, 8), math.nan)), good_y),
            r"nan\.pt: images contain NaN",
        ),
        (lambda: load_synset(bad("dict.pt", {"a": torch.zeros(1)}), good_y), r"dict\.pt: expected .*got dict"),
        (lambda: load_synset(good_x, tmp_path / "missing.pt"), r"missing\.pt: labels file not found"),
    ]
    for call, pattern in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=pattern):
            call()
    # A file whose payload is not plain tensors is refused by weights_only, and named.
    (tmp_path / "evil.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"evil\.pt: cannot read images"):
        load_synset(tmp_path / "evil.pt", good_y)


def test_bad_arguments_are_named():
    x, y = _toy(8)
    cfg = EvalConfig(model=SMALL, runs=1, epochs=0)
    kw = {"generator": _gen(), "progress": False}
    with pytest.raises(ValueError, match=r"labels must have shape \(8,\), got \(7,\)"):
        evaluate_synset(x, y[:7], 0.01, x, y, cfg, **kw)
    with pytest.raises(ValueError, match=r"test_labels span \[0, 5\], expected \[0, 3\]"):
        evaluate_synset(x, y, 0.01, x, torch.arange(8) % 6, cfg, num_classes=4, **kw)
    with pytest.raises(ValueError, match=r"test_images are \(3, 8, 8\)"):
        evaluate_synset(x, y, 0.01, torch.randn(2, 3, 8, 8), y[:2], cfg, **kw)
    with pytest.raises(ValueError, match="lr must be positive and finite, got nan"):
        evaluate_synset(x, y, float("nan"), x, y, cfg, **kw)
    with pytest.raises(ValueError, match="labels have 4 logits per image but num_classes=10"):
        evaluate_synset(x, torch.randn(8, 4), 0.01, x, y, cfg, num_classes=10, **kw)
    with pytest.raises(ValueError, match="images contain NaN"):
        evaluate_synset(torch.full_like(x, math.nan), y, 0.01, x, y, cfg, **kw)
    with pytest.raises(ValueError, match="EvalConfig.batch_size must be an int >= 1, got 0"):
        EvalConfig(batch_size=0)
    with pytest.raises(ValueError, match="EvalConfig.engine"):
        EvalConfig(engine="vmap")


# ----- reports and the CLI ------------------------------------------------------------------------------
def test_results_json_and_table(tmp_path):
    r = EvalResult("ConvNet", (0.5, 0.7), (1.0, float("nan")), 3.0, 10, 0.01, 100, name="run")
    assert r.mean == pytest.approx(0.6) and r.std == pytest.approx(0.1) and r.diverged
    table = format_table([r])
    assert "ConvNet" in table and "60.00 ± 10.00" in table and "(diverged)" in table
    path = write_results(tmp_path / "out" / "res.json", [r], config=EvalConfig(), meta={"seed": 3})
    data = json.loads(path.read_text())
    assert data["results"][0]["accuracies"] == [0.5, 0.7] and data["results"][0]["train_losses"] == [1.0, None]
    assert data["seed"] == 3 and data["config"]["epochs"] == 1000 and "torch" in data["environment"]
    assert not list(path.parent.glob(".*.tmp"))  # written atomically, no temporary left


def _cli(argv):
    parser = argparse.ArgumentParser(prog="datm-fast")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_evaluates_files_and_baselines(tmp_path, shared_data, session_cache_dir, capsys):
    run = tmp_path / "run"
    torch.save(torch.rand(4, 1, 28, 28), tmp_path / "images_7.pt")
    torch.save(torch.randn(4, 2), tmp_path / "labels_7.pt")
    torch.save(torch.tensor(0.02), tmp_path / "lr_7.pt")
    common = ["--dataset", "breastmnist", "--data-root", str(shared_data), "--cache-dir", str(session_cache_dir)]
    quick = ["--runs", "1", "--epochs", "1", "--model", "LeNet", "--device", "cpu", "--quiet"]
    files = [str(tmp_path / f) for f in ("lr_7.pt", "images_7.pt", "labels_7.pt")]  # any order, by name
    assert _cli(["eval", *files, *common, *quick, "--preprocess", "none"]) == 0
    out = capsys.readouterr().out
    assert "LeNet" in out and "±" in out
    data = json.loads((tmp_path / "eval_images_7.json").read_text())
    assert data["results"][0]["lr"] == pytest.approx(0.02) and data["data"]["preprocessing"] == "none"

    assert _cli(["eval", "--baseline", "random-real", "--ipc", "2", *common, *quick, "--out", str(run / "b.json")]) == 0
    data = json.loads((run / "b.json").read_text())
    assert data["baseline"] == "random-real" and data["results"][0]["num_images"] == 4

    with pytest.raises(ValueError, match="no run.json says how the images were preprocessed"):
        _cli(["eval", *files, *common, *quick])
    with pytest.raises(ValueError, match="--baseline random-real needs --ipc"):
        _cli(["eval", "--baseline", "random-real", *common, *quick])


# ----- GPU ------------------------------------------------------------------------------------------------
@cuda_only
def test_cuda_vectorised_equals_one_at_a_time():
    x, y = _toy(64)
    tx, ty = _toy(32, seed=3)
    cfg = EvalConfig(model=SMALL, runs=3, epochs=3, batch_size=16)
    one = evaluate_synset(x, y, 0.01, tx, ty, cfg.replace(parallel_runs=1), generator=_gen(), device="cuda")
    vec = evaluate_synset(x, y, 0.01, tx, ty, cfg.replace(parallel_runs=3), generator=_gen(), device="cuda")
    assert vec.train_losses == pytest.approx(one.train_losses, rel=1e-3)


# ----- static steps (graphs="on") ---------------------------------------------------------------------
class _CountingGraphs(engine.StepGraphs):
    """StepGraphs that counts the static steps it builds and the calls made through them."""

    built: list[tuple] = []
    calls = 0

    def step(self, key, owner, build, example):
        found = super().step(key, owner, build, example)
        if key not in _CountingGraphs.built:
            _CountingGraphs.built.append(key)

        def call(**values):
            _CountingGraphs.calls += 1
            return found(**values)

        return call


@pytest.mark.parametrize("runs, parallel, soft", [(1, 1, False), (3, 3, True), (3, 2, False)])
def test_static_step_training_equals_eager(monkeypatch, runs, parallel, soft):
    """graphs='on' trains through StaticStep (on CPU: its function on its buffers, all but the capture
    call): every step goes through it, one step per batch shape, and the runs equal the eager ones bit
    for bit, with DSA, soft labels, a last partial batch, the lr decay and groups of runs."""
    monkeypatch.setattr(engine, "StepGraphs", _CountingGraphs)
    _CountingGraphs.built, _CountingGraphs.calls = [], 0
    x, y = _toy(11)
    labels = torch.randn(11, 4, generator=_gen(5)).softmax(1) if soft else y
    tx, ty = _toy(10, seed=3)
    cfg = EvalConfig(model=SMALL, runs=runs, epochs=3, batch_size=4, parallel_runs=parallel, compile=False)
    eager = evaluate_synset(x, labels, 0.01, tx, ty, cfg, generator=_gen(), progress=False)
    assert _CountingGraphs.calls == 0
    static = evaluate_synset(x, labels, 0.01, tx, ty, cfg.replace(graphs="on"), generator=_gen(), progress=False)
    groups = -(-runs // parallel)
    assert _CountingGraphs.calls == groups * cfg.num_passes * 3  # 11 images in batches of 4: 3 steps a pass
    assert {key[1][1] for key in _CountingGraphs.built} == {4, 3}  # a full and the last partial batch
    assert static.train_losses == eager.train_losses and static.accuracies == eager.accuracies


def test_graphs_option_rules():
    with pytest.raises(ValueError, match="EvalConfig.graphs must be 'off' or 'on'"):
        EvalConfig(graphs="auto")
    with pytest.raises(ValueError, match="compile=True and graphs='on'"):
        EvalConfig(graphs="on", compile=True)
    assert not EvalConfig(graphs="on").should_compile("cpu", 10**6)  # auto stays eager under graphs
    x, y = _toy(4)
    cfg = EvalConfig(model="ConvNetBN", epochs=0, runs=1, graphs="on")
    with pytest.warns(RuntimeWarning, match="graphs='on' applies to the functional engine; ConvNetBN"):
        evaluate_synset(x, y, 0.01, x, y, cfg, generator=_gen(), progress=False)


# ----- compiling ----------------------------------------------------------------------------------------
def test_compile_rule():
    auto = EvalConfig()
    assert auto.should_compile("cpu", 500) and not auto.should_compile("cpu", 499)
    assert not auto.should_compile("cuda", 10**6)
    assert EvalConfig(compile=True).should_compile("cuda", 1) and not EvalConfig(compile=False).should_compile(
        "cpu", 10**6
    )
    with pytest.raises(ValueError, match="EvalConfig.compile must be True, False or 'auto'"):
        EvalConfig(compile="yes")


def test_compiled_step_matches_eager():
    x, y = _toy(12)
    tx, ty = _toy(10, seed=3)
    cfg = EvalConfig(model=SMALL, runs=1, epochs=1, batch_size=6)
    eager = evaluate_synset(x, y, 0.01, tx, ty, cfg.replace(compile=False), generator=_gen(), progress=False)
    compiled = evaluate_synset(x, y, 0.01, tx, ty, cfg.replace(compile=True), generator=_gen(), progress=False)
    assert compiled.train_losses == pytest.approx(eager.train_losses, rel=1e-4)


def test_compile_failure_falls_back_to_eager(monkeypatch):
    def broken_compile(fn, **kwargs):
        def fail(*args):
            raise RuntimeError("no C++ compiler")

        return fail

    monkeypatch.setattr(engine.torch, "compile", broken_compile)
    x, y = _toy(12)
    tx, ty = _toy(10, seed=3)
    cfg = EvalConfig(model=SMALL, runs=1, epochs=1, batch_size=6)
    with pytest.warns(RuntimeWarning, match="no C.. compiler.*training eagerly"):
        fallback = evaluate_synset(x, y, 0.01, tx, ty, cfg.replace(compile=True), generator=_gen(), progress=False)
    eager = evaluate_synset(x, y, 0.01, tx, ty, cfg.replace(compile=False), generator=_gen(), progress=False)
    assert fallback.train_losses == eager.train_losses


@cuda_only
def test_cuda_graphs_equal_eager_training():
    """The captured training step (one CUDA graph per batch shape, replayed) trains the runs as the eager
    step does: DSA and the update stay eager around it, so only the capture itself is new here."""
    x, y = _toy(70)
    tx, ty = _toy(32, seed=3)
    cfg = EvalConfig(model=SMALL, runs=3, epochs=4, batch_size=16, parallel_runs=3)
    eager = evaluate_synset(x, y, 0.01, tx, ty, cfg, generator=_gen(), device="cuda", progress=False)
    graphs = evaluate_synset(x, y, 0.01, tx, ty, cfg.replace(graphs="on"), generator=_gen(), device="cuda")
    assert graphs.train_losses == pytest.approx(eager.train_losses, rel=1e-5)
    assert graphs.accuracies == pytest.approx(eager.accuracies, abs=1 / 32)
