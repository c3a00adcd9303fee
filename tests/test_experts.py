"""Expert trajectories: GSAM, batched training, buffer files, upstream buffers, resume, real data."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import cuda_only
from safetensors.torch import load_file

import datm_fast
import datm_fast.step_graphs as step_graphs_module
from datm_fast.augment import apply_dsa, sample_dsa_params
from datm_fast.data import DataSpec, ImageDataset, subset_dataset
from datm_fast.experts import (
    BufferWriter,
    ExpertBuffer,
    ExpertBufferError,
    ExpertConfig,
    ExpertTrainer,
    build_buffer,
    convert_upstream,
    expert_seed,
    gsam_direction,
    gsam_perturbation,
    gsam_step,
    infer_upstream_spec,
    sgd_step,
)
from datm_fast.experts._batched import batched_logits, stack_inputs
from datm_fast.experts.buffer import spec_to_dict
from datm_fast.experts.cli import main as cli_main
from datm_fast.experts.train import _ExpertRNG
from datm_fast.models import ConvNet, ConvNetSpec, convnet_forward, init_flat_params

REPO = Path(__file__).resolve().parents[1]
CPU_BACKENDS = ["torch"] + (["cpp"] if datm_fast.backend_info()["cpp"].live else [])
TINY = ConvNetSpec(channels=3, num_classes=4, image_size=16, width=8, depth=2)


@pytest.fixture(autouse=True)
def _one_thread():
    # These networks are tiny: on a 2-core machine shared with other jobs, a second thread mostly
    # waits to be scheduled at every op (measured: a few-step run going from 0.2 s to 10+ s).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def toy_dataset(n_train: int = 96, n_test: int = 40, *, seed: int = 0, size: int = 16) -> ImageDataset:
    """Random images whose class shifts one channel's mean, so a net can learn something."""
    g = torch.Generator().manual_seed(seed)
    ytr = torch.randint(0, 4, (n_train,), generator=g)
    yte = torch.randint(0, 4, (n_test,), generator=g)
    xtr = torch.randn(n_train, 3, size, size, generator=g) + 0.5 * ytr.view(-1, 1, 1, 1).float()
    xte = torch.randn(n_test, 3, size, size, generator=g) + 0.5 * yte.view(-1, 1, 1, 1).float()
    return ImageDataset("toy", xtr, ytr, xte, yte, classes=("a", "b", "c", "d"), fingerprint=f"toy-{seed}")


# ----- GSAM ---------------------------------------------------------------------------------------------------
def test_gsam_step_hand_derived_plain():
    # L(w) = 0.5 * w^T A w, A = diag(1, 2), w = (1, 1): g = (1, 2), |g| = sqrt(5).
    # rho = sqrt(5) / 10 -> e = g / 10 = (0.1, 0.2); g_p = A (w + e) = (1.1, 2.4).
    # <g, g_p> = 5.9, |g_p|^2 = 6.97; g_orth = g - 5.9 / 6.97 * g_p = (0.48, -0.22) / 6.97  (orthogonal to g_p).
    # alpha = 0.5: d = g_p - 0.5 g_orth = (1.1 - 0.24 / 6.97, 2.4 + 0.11 / 6.97); lr = 0.1: w' = w - 0.1 d.
    a = torch.tensor([1.0, 2.0], dtype=torch.float64)
    w = torch.tensor([1.0, 1.0], dtype=torch.float64)
    e = gsam_perturbation(w, a * w, math.sqrt(5) / 10, adaptive=False)
    torch.testing.assert_close(e, torch.tensor([0.1, 0.2], dtype=torch.float64))
    d = gsam_direction(a * w, a * (w + e), 0.5)
    torch.testing.assert_close(d, torch.tensor([1.1 - 0.24 / 6.97, 2.4 + 0.11 / 6.97], dtype=torch.float64))
    new = gsam_step(w, lambda v: a * v, lr=0.1, rho=math.sqrt(5) / 10, alpha=0.5, adaptive=False)
    torch.testing.assert_close(new, w - 0.1 * d)


def test_gsam_step_hand_derived_adaptive():
    # A = diag(2, 1), w = (1, 2): g = (2, 2); | |w| g | = |(2, 4)| = 2 sqrt(5).
    # Adaptive: e = rho * w^2 * g / (2 sqrt(5)) = rho (1, 4) / sqrt(5); rho = sqrt(5) / 10 -> e = (0.1, 0.4).
    # g_p = A (1.1, 2.4) = (2.2, 2.4); <g, g_p> = 9.2, |g_p|^2 = 10.6; g_orth = (0.96, -0.88) / 10.6.
    a = torch.tensor([2.0, 1.0], dtype=torch.float64)
    w = torch.tensor([1.0, 2.0], dtype=torch.float64)
    e = gsam_perturbation(w, a * w, math.sqrt(5) / 10, adaptive=True)
    torch.testing.assert_close(e, torch.tensor([0.1, 0.4], dtype=torch.float64))
    d = gsam_direction(a * w, a * (w + e), 0.3)
    want = torch.tensor([2.2 - 0.3 * 0.96 / 10.6, 2.4 + 0.3 * 0.88 / 10.6], dtype=torch.float64)
    torch.testing.assert_close(d, want)
    # Rows are independent experts: a stacked (K, P) call equals per-row calls.
    w2 = torch.stack([w, 2 * w])
    g2 = torch.stack([a * w, a * 2 * w])
    torch.testing.assert_close(
        gsam_perturbation(w2, g2, 0.2, adaptive=True)[1], gsam_perturbation(2 * w, a * 2 * w, 0.2, adaptive=True)
    )


def test_sgd_step_matches_torch_sgd():
    g = torch.Generator().manual_seed(0)
    w0, g1, g2 = (torch.randn(7, generator=g) for _ in range(3))
    p = torch.nn.Parameter(w0.clone())
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=0.01)
    buf = torch.zeros(7)
    w = w0.clone()
    for grad in (g1, g2):
        p.grad = grad.clone()
        opt.step()
        w = sgd_step(w, grad, 0.1, momentum=0.9, weight_decay=0.01, momentum_buffer=buf)
    torch.testing.assert_close(w, p.detach(), rtol=0, atol=1e-7)


def _upstream_gsam_step(net, x, y, *, lr, rho, alpha, eps=1e-12):
    """The reference GSAM step (juntang-zhuang/GSAM as DATM runs it: adaptive, SGD without momentum),
    written the way upstream loops over parameter tensors, on an nn.Module."""
    params = list(net.parameters())

    def grads():
        for p in params:
            p.grad = None
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        return [p.grad.clone() for p in params]

    old = grads()
    with torch.no_grad():
        norm = torch.norm(torch.stack([(p.abs() * g).norm(p=2) for p, g in zip(params, old)]), p=2)
        scale = rho / (norm + eps)
        e_ws = []
        for p, g in zip(params, old):
            e_w = g * scale
            e_w *= torch.pow(p, 2)
            p.add_(e_w)
            e_ws.append(e_w)
    new = grads()
    with torch.no_grad():
        inner = sum(torch.sum(o * n) for o, n in zip(old, new))
        new_norm = torch.norm(torch.stack([n.norm(p=2) for n in new]), p=2)
        old_norm = torch.norm(torch.stack([o.norm(p=2) for o in old]), p=2)
        cosine = inner / (new_norm * old_norm + eps)
        for p, o, n, e_w in zip(params, old, new, e_ws):
            vertical = o - cosine * old_norm * n / (new_norm + eps)
            d = n.add(vertical, alpha=-alpha)
            p.sub_(e_w)
            p.add_(d, alpha=-lr)


def test_trainer_step_equals_upstream_gsam_on_a_module():
    # One epoch of one step (N == batch size): the trainer's epoch-1 parameters must be what the
    # upstream procedure computes from the same init, batch order and DSA draws.
    ds = toy_dataset(n_train=32)
    cfg = ExpertConfig(epochs=1, batch_size=32, lr=0.05, rho=0.05, alpha=0.3)
    traj = ExpertTrainer(ds, TINY, cfg, backend="torch", channels_last=False).train([3])[0].trajectory
    rng = _ExpertRNG(cfg.seed, 3)
    net = ConvNet(TINY).load_flat_(init_flat_params(TINY, rng.init))
    torch.testing.assert_close(net.flat_parameters().detach(), traj[0], rtol=0, atol=0)
    order = torch.randperm(32, generator=rng.order)
    x = apply_dsa(ds.train_images[order], sample_dsa_params(cfg.dsa, 32, 16, 16, generator=rng.dsa))
    _upstream_gsam_step(net, x, ds.train_labels[order], lr=cfg.lr, rho=cfg.rho, alpha=cfg.alpha)
    torch.testing.assert_close(traj[1], net.flat_parameters().detach(), rtol=1e-5, atol=1e-6)


# ----- batched training -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw", [{}, {"norm": "batch"}, {"norm": "layer"}, {"norm": "group"}, {"activation": "sigmoid", "pooling": "max"}]
)
def test_batched_logits_equal_convnet_forward(kw):
    spec = TINY.replace(**kw)
    params = torch.stack([init_flat_params(spec, torch.Generator().manual_seed(i)) for i in range(3)])
    x = torch.randn(3, 5, 3, 16, 16)
    want = torch.stack([convnet_forward(spec, params[k], x[k]) for k in range(3)])
    for channels_last in (False, True):
        got = batched_logits(spec, params, stack_inputs(x, channels_last))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    shared = batched_logits(spec, params, x[0], shared_input=True)
    torch.testing.assert_close(shared, torch.stack([convnet_forward(spec, params[k], x[0]) for k in range(3)]))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fused_blocks_of_k_experts_match_pytorch_ops(backend):
    """The experts' block runs through the one dispatcher (datm_fast.ops.norm_relu_pool) on K experts'
    channels at once: logits and the gradient of every expert's parameters as PyTorch's separate ops."""
    params = torch.stack([init_flat_params(TINY, torch.Generator().manual_seed(i)) for i in range(3)])
    x = stack_inputs(torch.randn(3, 5, 3, 16, 16), channels_last=True)
    outs = []
    for block_backend in (backend, None):
        p = params.clone().requires_grad_()
        logits = batched_logits(TINY, p, x, block_backend=block_backend)
        (grad,) = torch.autograd.grad(logits.square().sum(), p)
        outs.append((logits, grad))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("optimizer", ["gsam", "sgd"])
def test_batched_experts_equal_one_at_a_time(optimizer):
    ds = toy_dataset()
    momentum = 0.5 if optimizer == "sgd" else 0.0
    cfg = ExpertConfig(epochs=3, batch_size=32, optimizer=optimizer, lr=0.05, momentum=momentum, seed=7)
    trainer = ExpertTrainer(ds, TINY, cfg, backend="torch")
    together = trainer.train([4, 0, 9])
    alone = [trainer.train([i])[0] for i in (4, 0, 9)]
    for a, b in zip(together, alone):
        assert a.index == b.index and a.seed == b.seed == expert_seed(7, a.index)
        assert torch.equal(a.trajectory[0], b.trajectory[0])  # same init, bit for bit
        moved = (b.trajectory - b.trajectory[0]).norm(dim=1)[1:]
        diff = (a.trajectory - b.trajectory).norm(dim=1)[1:]
        # Float rounding only (grouped convolutions sum in another order): typically 1e-6 of the distance
        # moved. A ReLU unit whose input is within rounding of 0 may switch and give a larger, still small,
        # kink that later steps carry along (2.6e-4 measured in epoch 3 of SGD with momentum, 2026-12-04);
        # a wrong gradient would be off by the order of the distance itself.
        assert (diff <= 1e-3 * moved).all(), (diff / moved).tolist()
        assert a.train_acc == pytest.approx(b.train_acc, abs=1.5 / 96)
        assert a.test_acc == pytest.approx(b.test_acc, abs=1.5 / 40)
    assert not torch.equal(together[0].trajectory[0], together[1].trajectory[0])  # experts differ


@pytest.mark.parametrize("optimizer, backend", [("gsam", CPU_BACKENDS[-1]), ("sgd", "torch")])
def test_static_step_training_equals_eager(monkeypatch, optimizer, backend):
    """graphs=True trains through StaticStep (on CPU: its function on its buffers, all but the capture
    call), one step per batch shape, every step through it, and gives the eager trajectories bit for bit."""
    calls: list[tuple] = []
    original = step_graphs_module.StaticStep.__call__

    def counted(self, **values):
        calls.append(tuple(values["x"].shape))
        return original(self, **values)

    monkeypatch.setattr(step_graphs_module.StaticStep, "__call__", counted)
    ds = toy_dataset(n_train=80)
    momentum = 0.5 if optimizer == "sgd" else 0.0
    cfg = ExpertConfig(epochs=2, batch_size=32, optimizer=optimizer, lr=0.05, momentum=momentum, seed=3)
    eager = ExpertTrainer(ds, TINY, cfg, backend=backend).train([2, 5])
    assert not calls
    static = ExpertTrainer(ds, TINY, cfg, backend=backend, graphs=True).train([2, 5])
    assert len(calls) == 2 * 3 and {shape[0] for shape in calls} == {32, 16}  # 80 = 32 + 32 + 16; (b, K * C, H, W)
    for a, b in zip(eager, static):
        assert torch.equal(a.trajectory, b.trajectory) and a.train_acc == b.train_acc and a.test_acc == b.test_acc


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_block_backends_train_alike(backend):
    ds = toy_dataset()
    cfg = ExpertConfig(epochs=2, batch_size=32, lr=0.05)
    trainer = ExpertTrainer(ds, TINY, cfg, backend=backend)
    assert trainer.block_backend == backend
    if backend == "cpp":
        assert ExpertTrainer(ds, TINY, cfg).block_backend == "cpp"  # the default on CPU where built
    a = trainer.train([1])[0].trajectory
    b = ExpertTrainer(ds, TINY, cfg, backend="torch").train([1])[0].trajectory
    moved = (b - b[0]).norm(dim=1)[1:]
    assert ((a - b).norm(dim=1)[1:] <= 1e-4 * moved).all()


def test_experts_differ_and_seeds_are_stable():
    seeds = [expert_seed(0, i) for i in range(100)]
    assert len(set(seeds)) == 100 and all(0 <= s < 2**63 for s in seeds)
    assert expert_seed(0, 5) == expert_seed(0, 5) != expert_seed(1, 5)


def test_bad_config_and_inputs_are_named():
    with pytest.raises(ValueError, match="ExpertConfig.optimizer"):
        ExpertConfig(optimizer="adam")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ExpertConfig.lr"):
        ExpertConfig(lr=0)
    with pytest.raises(ValueError, match="ExpertConfig.epochs"):
        ExpertConfig(epochs=0)
    with pytest.raises(ValueError, match="model spec expects"):
        ExpertTrainer(toy_dataset(), TINY.replace(num_classes=10), ExpertConfig(), backend="torch")
    assert ExpertConfig.from_dict(ExpertConfig(dsa=None).to_dict()) == ExpertConfig(dsa=None)
    assert ExpertConfig.from_dict(ExpertConfig().to_dict()) == ExpertConfig()


# ----- storage --------------------------------------------------------------------------------------------------
def _header(spec=TINY, epochs=3, fingerprint="toy-0"):
    return {
        "model": {"name": "tiny", "spec": spec_to_dict(spec)},
        "dataset": {"name": "toy", "fingerprint": fingerprint},
        "config": {"epochs": epochs},
        "num_epochs": epochs,
        "num_params": spec.num_params,
    }


def _write_buffer(root, n=3, epochs=3, spec=TINY):
    trajs = [torch.randn(epochs + 1, spec.num_params, generator=torch.Generator().manual_seed(i)) for i in range(n)]
    with BufferWriter(root, _header(spec, epochs)) as w:
        for i, t in enumerate(trajs):
            w.add(i, t, {"seed": i, "test_acc": [0.1 * (e + 1) for e in range(epochs)]})
        with pytest.raises(ExpertBufferError, match="is writing this buffer"):
            BufferWriter(root, _header(spec, epochs))
    return trajs


def test_buffer_roundtrip_and_lazy_verification(tmp_path):
    trajs = _write_buffer(tmp_path)
    buf = ExpertBuffer.open(tmp_path, spec=TINY, dataset="toy-0")
    assert (buf.num_experts, buf.num_epochs, buf.spec) == (3, 3, TINY)
    assert not any(e.verified for e in buf._native)  # lazy: nothing hashed yet
    assert torch.equal(buf.params(1, 2), trajs[1][2])
    assert [e.verified for e in buf._native] == [False, True, False]
    assert torch.equal(buf.trajectory(2), trajs[2])
    assert buf.stats(0)["test_acc"] == pytest.approx([0.1, 0.2, 0.3])
    with pytest.raises(IndexError, match="epoch 4 out of range"):
        buf.params(0, 4)
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary files left behind


def test_truncated_file_is_refused(tmp_path):
    _write_buffer(tmp_path)
    path = tmp_path / "expert_00001.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ExpertBufferError, match="expert_00001.safetensors: truncated"):
        ExpertBuffer.open(tmp_path)


def test_tampered_file_is_refused(tmp_path):
    trajs = _write_buffer(tmp_path)
    path = tmp_path / "expert_00002.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x40  # same size, one flipped bit in the last epoch's parameters
    path.write_bytes(bytes(data))
    buf = ExpertBuffer.open(tmp_path)
    assert torch.equal(buf.params(0, 1), trajs[0][1])  # other experts still read
    with pytest.raises(ExpertBufferError, match="expert_00002.safetensors: checksum mismatch"):
        buf.params(2, 0)
    with pytest.raises(ExpertBufferError, match="expert_00002.safetensors: checksum mismatch"):
        ExpertBuffer.open(tmp_path, verify="eager")
    with pytest.warns(RuntimeWarning, match="expert_00002.safetensors does not match its checksum"):
        with BufferWriter(tmp_path, _header()) as w:
            done = w.finished()
    assert done == {0, 1}  # on resume the bad expert is trained again


def test_corrupted_manifest_and_wrong_model_or_dataset(tmp_path):
    _write_buffer(tmp_path)
    with pytest.raises(ExpertBufferError, match="buffer is for ConvNetSpec"):
        ExpertBuffer.open(tmp_path, spec=TINY.replace(width=16))
    with pytest.raises(ExpertBufferError, match="fingerprint 'toy-0', expected 'cifar10"):
        ExpertBuffer.open(tmp_path, dataset="cifar10-abc")
    with pytest.raises(ExpertBufferError, match=r"manifest.json: this buffer was made with a different dataset"):
        BufferWriter(tmp_path, _header(fingerprint="other"))
    with pytest.raises(ExpertBufferError, match=r"manifest.json: this buffer was made with a different model"):
        BufferWriter(tmp_path, _header(spec=TINY.replace(depth=1)))
    (tmp_path / "manifest.json").write_text('{"format": "datm_fast.expert_buffer", "format_')
    with pytest.raises(ExpertBufferError, match="manifest.json: corrupted manifest"):
        ExpertBuffer.open(tmp_path)
    with pytest.raises(ExpertBufferError, match="expert_00000.safetensors: a file, not a buffer directory"):
        ExpertBuffer.open(tmp_path / "expert_00000.safetensors")  # a file, not a buffer directory
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ExpertBufferError, match="neither a datm_fast buffer"):
        ExpertBuffer.open(empty)


def test_unlisted_complete_file_is_adopted_foreign_one_is_not(tmp_path):
    trajs = _write_buffer(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    del manifest["experts"]["2"]  # as if killed between the file's rename and the manifest's
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    other = tmp_path / "other"
    _write_buffer(other, n=4, epochs=3, spec=TINY.replace(num_classes=5))
    os.replace(other / "expert_00003.safetensors", tmp_path / "expert_00003.safetensors")  # another run's file
    with BufferWriter(tmp_path, _header()) as w:
        assert w.finished() == {0, 1, 2}
    buf = ExpertBuffer.open(tmp_path, verify="eager")
    assert buf.num_experts == 3 and torch.equal(buf.params(2, 3), trajs[2][3])


# ----- upstream buffers -----------------------------------------------------------------------------------------
def _upstream_buffer(root: Path, spec: ConvNetSpec, files=(2, 1), epochs=2):
    """replay_buffer_<n>.pt as upstream's buffer.py writes them: experts -> epochs -> parameters() tensors."""
    flats = []
    for n, count in enumerate(files):
        experts = []
        for _ in range(count):
            net = ConvNet(spec, generator=torch.Generator().manual_seed(len(flats)))
            timestamps = [[p.detach().clone() for p in net.parameters()]]
            for _ in range(epochs):
                with torch.no_grad():
                    for p in net.parameters():
                        p.add_(0.01 * torch.randn_like(p))
                timestamps.append([p.detach().clone() for p in net.parameters()])
            experts.append(timestamps)
            flats.append(torch.stack([torch.cat([t.reshape(-1) for t in ts]) for ts in timestamps]))
        torch.save(experts, root / f"replay_buffer_{n}.pt")
    return flats


def test_upstream_buffer_reads_identically_and_converts(tmp_path):
    spec = ConvNetSpec(channels=3, num_classes=10, image_size=32, width=8, depth=3)
    (tmp_path / "up").mkdir()
    flats = _upstream_buffer(tmp_path / "up", spec)
    up = ExpertBuffer.open(tmp_path / "up")  # spec inferred from the shapes
    assert (up.kind, up.num_experts, up.num_epochs, up.spec) == ("upstream", 3, 2, spec)
    for i, f in enumerate(flats):
        assert torch.equal(up.trajectory(i), f)
        assert torch.equal(up.params(i, 1), f[1])
    net = ConvNet(spec).load_flat_(up.params(2, 2))  # the same network upstream had
    assert torch.equal(net.flat_parameters().detach(), flats[2][2])

    ds = {"name": "cifar10", "fingerprint": "fp"}
    assert cli_main(["buffer", "convert", str(tmp_path / "up"), "--out", str(tmp_path / "native")]) == 0
    native = convert_upstream(tmp_path / "up", tmp_path / "native2", dataset=ds)
    for buf in (ExpertBuffer.open(tmp_path / "native", verify="eager"), native):
        assert (buf.kind, buf.num_experts, buf.num_epochs, buf.spec) == ("native", 3, 2, spec)
        for i, f in enumerate(flats):
            assert torch.equal(buf.trajectory(i), f)
    assert native.manifest["dataset"] == ds and native.manifest["config"] is None

    with pytest.raises(ExpertBufferError, match="replay_buffer_0.pt: expert 0 epoch 0 has parameter shapes"):
        ExpertBuffer.open(tmp_path / "up", spec=spec.replace(width=16))
    data = (tmp_path / "up" / "replay_buffer_1.pt").read_bytes()
    (tmp_path / "up" / "replay_buffer_1.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(ExpertBufferError, match="replay_buffer_1.pt: cannot be read as an upstream replay buffer"):
        ExpertBuffer.open(tmp_path / "up")


def test_upstream_buffer_never_runs_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save([[[Evil()]]], tmp_path / "replay_buffer_0.pt")
    with pytest.raises(ExpertBufferError, match="replay_buffer_0.pt: cannot be read"):
        ExpertBuffer.open(tmp_path)
    assert not (tmp_path / "pwned").exists()


def test_unreadable_upstream_buffer_error_does_not_advise_weights_only_false(tmp_path):
    # torch's own refusal advises re-running with weights_only=False, which would unpickle (run) the file.
    # Pickled here: a reference to os.system and an instance of a harmless class; neither is ever called.
    import fractions

    for obj, global_name in ([[[os.system]]], f"{os.system.__module__}.system"), ([fractions.Fraction(1, 3)], None):
        torch.save(obj, tmp_path / "replay_buffer_0.pt")
        with pytest.raises(ExpertBufferError) as info:
            ExpertBuffer.open(tmp_path)
        msg = str(info.value)
        assert str(tmp_path / "replay_buffer_0.pt") in msg
        assert "weights_only" not in msg and "safe_globals" not in msg
        assert "cannot be read as an upstream replay buffer" in msg and "tensors only" in msg
        assert (global_name or "fractions.Fraction") in msg
    (tmp_path / "replay_buffer_0.pt").write_bytes(b"not a pickle")
    with pytest.raises(ExpertBufferError, match="replay_buffer_0.pt: cannot be read as an upstream") as info:
        ExpertBuffer.open(tmp_path)
    assert "weights_only" not in str(info.value)


def test_upstream_spec_prefers_common_image_sizes(tmp_path, capsys):
    # Reported: `buffer info` said image_size=(4, 4) for an 8x8 digits buffer, because a depth-3 net on
    # 4..11 px 1-channel images has the same parameter shapes (all pooled to 1x1).
    digits = ConvNetSpec(channels=1, num_classes=10, image_size=8, width=8, depth=3)
    _upstream_buffer(tmp_path, digits, files=(1,), epochs=1)
    assert ExpertBuffer.open(tmp_path).spec == digits
    assert cli_main(["buffer", "info", str(tmp_path)]) == 0
    assert "image_size=(8, 8)" in capsys.readouterr().out

    def shapes_of(spec: ConvNetSpec) -> list[torch.Tensor]:
        return [torch.empty(shape) for _, shape in spec.param_shapes()]

    for channels, size, depth in [(1, 28, 3), (3, 32, 3), (3, 64, 4), (3, 128, 5), (1, 16, 3), (3, 28, 3)]:
        spec = ConvNetSpec(channels=channels, num_classes=10, image_size=size, width=8, depth=depth)
        assert infer_upstream_spec(shapes_of(spec)) == spec
    # 1-channel nets fitting both 28 and 32 px are MNIST-like (upstream's "28 means 32" convention).
    mnist_d4 = ConvNetSpec(channels=1, num_classes=10, image_size=28, width=8, depth=4)
    assert infer_upstream_spec(shapes_of(mnist_d4)) == mnist_d4
    # Truly ambiguous: refused with the candidates, rather than a silent guess.
    rgb_d4 = ConvNetSpec(channels=3, num_classes=10, image_size=28, width=8, depth=4)
    with pytest.raises(ExpertBufferError, match=r"16\.\.31 px; cannot tell which of 16, 28 px .* explicit spec"):
        infer_upstream_spec(shapes_of(rgb_d4))
    odd = ConvNetSpec(channels=1, num_classes=10, image_size=21, width=8, depth=3)
    with pytest.raises(ExpertBufferError, match=r"cannot tell which of 20, 21, 22, .*, 27 px"):
        infer_upstream_spec(shapes_of(odd))
    # No pooling: the size is determined exactly, common or not.
    flat = ConvNetSpec(channels=1, num_classes=10, image_size=21, pooling="none")  # ConvNetNP
    assert infer_upstream_spec(shapes_of(flat), "ConvNetNP") == flat


# ----- building, resuming -----------------------------------------------------------------------------------------
def test_build_buffer_resumes_and_extends(tmp_path):
    ds = toy_dataset()
    cfg = ExpertConfig(epochs=2, batch_size=32, optimizer="sgd", lr=0.05)
    s1 = build_buffer(tmp_path, ds, TINY, cfg, 2, backend="torch")
    assert s1.trained == (0, 1) and s1.skipped == ()
    s2 = build_buffer(tmp_path, ds, TINY, cfg, 3, backend="torch")
    assert s2.trained == (2,) and s2.skipped == (0, 1)
    assert "3 experts x 2 epochs" in s2.line()
    buf = ExpertBuffer.open(tmp_path, spec=TINY, dataset=ds)
    again = ExpertTrainer(ds, TINY, cfg, backend="torch").train([2])[0]
    assert torch.equal(buf.trajectory(2), again.trajectory)  # deterministic: same seed, same trajectory
    assert buf.stats(2)["test_acc"] == pytest.approx(list(again.test_acc))
    with pytest.raises(ExpertBufferError, match="different config"):
        build_buffer(tmp_path, ds, TINY, cfg.replace(lr=0.1), 3, backend="torch")
    with pytest.raises(ExpertBufferError, match="different dataset"):
        build_buffer(tmp_path, subset_dataset(ds, 50, seed=1), TINY, cfg, 3, backend="torch")


def test_a_buffer_written_with_the_old_fingerprint_resumes_and_checks(tmp_path):
    """Buffers written before fingerprints had content roots (2026-12-05) recorded the source files'
    metadata root: they are still this dataset's buffers (ExpertBuffer.check), and build_buffer
    extends one with the identity its files carry, so the experts there are adopted, not retrained."""
    content = toy_dataset().replace(fingerprint="c0ffee+zca(eps=0.1)", source_fingerprint="5ca1ab1e")
    old = content.replace(fingerprint=content.legacy_fingerprint)  # how the old code named it
    assert old.fingerprint == "5ca1ab1e+zca(eps=0.1)"
    cfg = ExpertConfig(epochs=1, batch_size=32, optimizer="sgd", lr=0.05)
    build_buffer(tmp_path, old, TINY, cfg, 2, backend="torch")
    identity = json.loads((tmp_path / "manifest.json").read_text())["identity"]
    ExpertBuffer.open(tmp_path, spec=TINY, dataset=content)  # checks the dataset: the legacy name is known
    grown = build_buffer(tmp_path, content, TINY, cfg, 3, backend="torch")
    assert grown.trained == (2,) and grown.skipped == (0, 1)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["identity"] == identity and manifest["dataset"]["fingerprint"] == old.fingerprint
    # Another dataset is still another dataset, under either name.
    other = content.replace(fingerprint="c0ffee+zca(eps=0.2)")
    with pytest.raises(ExpertBufferError, match="fingerprint"):
        ExpertBuffer.open(tmp_path, spec=TINY, dataset=other)
    with pytest.raises(ExpertBufferError, match="different dataset"):
        build_buffer(tmp_path, other, TINY, cfg, 3, backend="torch")


def test_select_limits_files_and_experts(tmp_path):
    ds = toy_dataset()
    cfg = ExpertConfig(epochs=1, batch_size=32, optimizer="sgd", lr=0.05)
    build_buffer(tmp_path, ds, TINY, cfg, 3, backend="torch")
    buf = ExpertBuffer.open(tmp_path)
    two = buf.select(max_files=2)
    assert (two.num_experts, two.expert_ids, buf.num_experts) == (2, (0, 1), 3)
    assert torch.equal(two.params(1, 1), buf.params(1, 1))
    assert buf.select(max_experts=1).num_experts == 3  # a native file holds one expert
    with pytest.raises(ValueError, match="max_files must be an int >= 1"):
        buf.select(max_files=0)
    # Upstream files hold several experts each: the first max_experts of each of the first max_files.
    shapes = [shape for _, shape in TINY.param_shapes()]

    def upstream_expert(i):  # a list of epochs, each a list of parameter tensors in parameters() order
        return [[t.view(shape) for t, shape in zip(buf.params(i, e).split([s.numel() for s in shapes]), shapes)]
                for e in range(2)]  # fmt: skip

    (tmp_path / "up").mkdir()
    for n in range(2):
        torch.save([upstream_expert(i) for i in range(3)], tmp_path / "up" / f"replay_buffer_{n}.pt")
    up = ExpertBuffer.open(tmp_path / "up", spec=TINY)
    assert up.num_experts == 6
    picked = up.select(max_files=1, max_experts=2)
    assert picked.num_experts == 2 and torch.equal(picked.params(1, 1), buf.params(1, 1))


def test_killed_run_resumes_and_completes(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 160)
    x = rng.integers(0, 256, (160, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "toy.npz", x_train=x[:128], y_train=labels[:128], x_test=x[128:], y_test=labels[128:])
    out = tmp_path / "buf"
    args = [sys.executable, "-m", "datm_fast.experts", "buffer", "--dataset", str(tmp_path / "toy.npz")]
    args += ["--cache-dir", str(tmp_path / "cache"), "--model", "ConvNetW32", "--experts", "4", "--epochs", "6"]
    args += ["--batch-size", "32", "--out", str(out), "--backend", "torch", "--no-progress", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (out / "expert_00000.safetensors").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert (out / "expert_00000.safetensors").exists(), f"the first run never wrote an expert: {err.decode()[-2000:]}"
    assert proc.returncode == -signal.SIGKILL, "the run finished before it was killed; the test proves nothing"
    for path in out.glob("expert_*.safetensors"):  # every file under its final name is complete
        load_file(path)
    if (out / "manifest.json").exists():  # and the manifest lists only verified experts
        assert ExpertBuffer.open(out, verify="eager").num_experts < 4
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "4 experts x 6 epochs" in done.stdout and "already done" in done.stdout
    buf = ExpertBuffer.open(out, verify="eager")
    assert buf.num_experts == 4 and not list(out.glob(".*.tmp"))
    # The resumed buffer is the buffer an uninterrupted run makes (same seeds, same trajectories).
    ds, _ = DataSpec(tmp_path / "toy.npz", preprocessing="normalize").load(cache_dir=tmp_path / "cache")
    assert buf.data_spec == DataSpec(tmp_path / "toy.npz", preprocessing="normalize")  # what the manifest records
    cfg = ExpertConfig.from_dict(buf.manifest["config"])
    ref = ExpertTrainer(ds, buf.spec, cfg, backend="torch").train([0])[0]
    torch.testing.assert_close(buf.trajectory(0), ref.trajectory, rtol=0, atol=0)


def test_cli_trains_with_progress_then_info(tmp_path, capsys):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (100, 16, 16, 3), dtype=np.uint8)
    y = rng.integers(0, 4, 100)
    np.savez(tmp_path / "toy.npz", x_train=x[:80], y_train=y[:80], x_test=x[80:], y_test=y[80:])
    out = tmp_path / "buf"
    argv = ["buffer", "--dataset", str(tmp_path / "toy.npz"), "--cache-dir", str(tmp_path / "cache")]
    argv += ["--model", "ConvNetW32", "--experts", "2", "--epochs", "2", "--batch-size", "32", "--out", str(out)]
    argv += ["--backend", "torch", "--optimizer", "sgd", "--max-train-images", "64", "--device", "cpu"]
    assert cli_main(argv) == 0
    captured = capsys.readouterr()
    assert "expert-epochs" in captured.err and "test acc" in captured.err  # the progress bar
    assert "2 experts x 2 epochs" in captured.out and "final test acc" in captured.out
    buf = ExpertBuffer.open(out)
    assert buf.manifest["dataset"]["train_images"] == 64 and "subset" in buf.manifest["dataset"]["fingerprint"]
    # The manifest records the data spec: it rebuilds the very data the experts saw (same fingerprint).
    assert buf.data_spec.max_train == 64 and buf.data_spec.preprocessing == "normalize"
    rebuilt, _ = buf.data_spec.load(cache_dir=tmp_path / "cache")
    buf.check(dataset=rebuilt)
    assert cli_main(["buffer", "info", str(out), "--verify"]) == 0
    assert "all checksums match" in capsys.readouterr().out
    assert cli_main([a if a != "sgd" else "gsam" for a in argv]) == 2  # same buffer, other optimizer
    assert "different config" in capsys.readouterr().err


# ----- real data ----------------------------------------------------------------------------------------------------
def test_cifar10_subset_accuracy_rises(shared_data, session_cache_dir):
    data = DataSpec("cifar10", shared_data, preprocessing="normalize", max_train=2000, max_test=1000)
    ds, _ = data.load(cache_dir=session_cache_dir)
    assert (len(ds.train_labels), len(ds.test_labels)) == (2000, 1000)
    spec = ConvNetSpec(channels=3, num_classes=10, image_size=32, width=32)
    cfg = ExpertConfig(epochs=4, optimizer="sgd", lr=0.01, momentum=0.9)  # momentum: learn in 32 steps
    expert = ExpertTrainer(ds, spec, cfg, backend="torch").train([0])[0]
    acc = expert.test_acc
    assert acc[-1] > 0.2 and acc[-1] > acc[0] + 0.03, acc
    assert expert.train_acc[-1] > expert.train_acc[0], expert.train_acc


def test_import_does_not_initialise_cuda():
    code = "import torch, datm_fast.experts, datm_fast.experts.cli; print(torch.cuda.is_initialized())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ})
    assert out.stdout.strip() == "False", out.stderr


@cuda_only
def test_cuda_graphs_equal_eager_experts():
    """The captured GSAM step (a CUDA graph per batch shape, replayed) trains the experts the eager step
    does: DSA and the SGD update stay eager around it."""
    ds = toy_dataset(n_train=80)
    cfg = ExpertConfig(epochs=2, batch_size=32, lr=0.05, seed=3)
    eager = ExpertTrainer(ds, TINY, cfg, device="cuda").train([2, 5])
    static = ExpertTrainer(ds, TINY, cfg, device="cuda", graphs=True).train([2, 5])
    for a, b in zip(eager, static):
        moved = (a.trajectory - a.trajectory[0]).norm(dim=1)[1:]
        assert ((a.trajectory - b.trajectory).norm(dim=1)[1:] <= 1e-4 * moved).all()
