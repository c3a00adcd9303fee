"""DSA (datm_fast.augment) against the per-sample reference, upstream's rules, and its own contracts."""

from __future__ import annotations

import dataclasses
import math
import time

import pytest
import torch
import torch.nn.functional as F
from conftest import cuda_only
from torch.utils._python_dispatch import TorchDispatchMode

from datm_fast.augment import DSA_GROUPS, DSAConfig, DSAParams, apply_dsa, dsa, sample_dsa_params
from datm_fast.reference.augment import apply_dsa_reference

SHAPES = [(1, 7, 9), (3, 12, 12), (3, 16, 11), (2, 5, 6)]  # (C, H, W): odd, even, non-square, tiny
FULL = "color_crop_cutout_flip_scale_rotate"


def _gen(seed: int, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _params(strategy: str, b: int, h: int, w: int, seed: int = 0, mode: str = "M", dtype=torch.float64, **kw):
    cfg = DSAConfig(strategy=strategy, mode=mode, **kw)
    return sample_dsa_params(cfg, b, h, w, generator=_gen(seed), dtype=dtype)


def _assert_params_equal(a: DSAParams, b: DSAParams) -> None:
    assert (a.groups, a.batch_size, a.height, a.width, a.cutout_size) == (
        b.groups,
        b.batch_size,
        b.height,
        b.width,
        b.cutout_size,
    )
    ta, tb = a.tensors(), b.tensors()
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


class _OpLog(TorchDispatchMode):
    """Records every aten op dispatched (and the devices of scalar read-backs)."""

    def __init__(self):
        super().__init__()
        self.ops: list = []
        self.item_devices: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        if func is torch.ops.aten._local_scalar_dense.default:
            self.item_devices.append(args[0].device.type)
        return func(*args, **(kwargs or {}))


# --- configuration -----------------------------------------------------------------------------------


def test_config_defaults_are_upstreams():
    cfg = DSAConfig()
    assert cfg.groups == DSA_GROUPS and cfg.mode == "S"
    assert (cfg.brightness, cfg.saturation, cfg.contrast) == (1.0, 2.0, 0.5)
    assert (cfg.ratio_crop_pad, cfg.ratio_cutout, cfg.prob_flip, cfg.ratio_scale, cfg.ratio_rotate) == (
        0.125,
        0.5,
        0.5,
        1.2,
        15.0,
    )
    assert cfg.crop_shift(32, 32) == (4, 4) and cfg.crop_shift(64, 28) == (8, 4)  # int(side / 8 + 0.5)
    assert cfg.cutout_size(32, 32) == (16, 16) and cfg.cutout_size(7, 9) == (4, 5)  # int(side / 2 + 0.5)


@pytest.mark.parametrize("bad", [dict(mode="X"), dict(strategy="crop_blur"), dict(strategy="crop_crop")])
def test_config_rejects(bad):
    with pytest.raises(ValueError):
        DSAConfig(**bad)


@pytest.mark.parametrize("strategy", ["none", "None", ""])
def test_none_strategy_is_identity(strategy):
    x = torch.randn(4, 3, 8, 8)
    cfg = DSAConfig(strategy=strategy)
    assert cfg.groups == ()
    p = sample_dsa_params(cfg, 4, 8, 8, generator=_gen(0))
    assert p.groups == () and p.tensors() == {} and len(p) == 4
    assert apply_dsa(x, p) is x
    assert dsa(x, cfg, generator=_gen(0)) is x
    assert len(p[1:3]) == 2 and len(p.select(torch.tensor([True, False, True, True]))) == 3


def test_params_validation():
    p = _params("crop", 4, 8, 8)
    with pytest.raises(ValueError):
        dataclasses.replace(p, groups=("crop", "flip"))  # flip values missing
    with pytest.raises(ValueError):
        dataclasses.replace(p, batch_size=5)
    with pytest.raises(ValueError):
        apply_dsa(torch.randn(4, 3, 8, 9), p)
    with pytest.raises(ValueError):
        apply_dsa(torch.randn(5, 3, 8, 8), p)


# --- against the per-sample reference ---------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("group", DSA_GROUPS)
def test_group_matches_reference_float64(group, shape):
    c, h, w = shape
    for seed in range(3):
        x = torch.randn(9, c, h, w, dtype=torch.float64)
        p = _params(group, 9, h, w, seed=seed)
        assert p.groups == (group,)
        torch.testing.assert_close(apply_dsa(x, p), apply_dsa_reference(x, p), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_mode_m_all_groups_matches_reference(shape):
    c, h, w = shape
    x = torch.randn(10, c, h, w, dtype=torch.float64)
    p = _params(FULL, 10, h, w, seed=1)
    assert p.groups == DSA_GROUPS
    torch.testing.assert_close(apply_dsa(x, p), apply_dsa_reference(x, p), rtol=1e-12, atol=1e-12)
    # Another order of the same groups is another composition, and is honoured.
    p2 = _params("rotate_flip_crop", 10, h, w, seed=1)
    assert p2.groups == ("rotate", "flip", "crop")
    torch.testing.assert_close(apply_dsa(x, p2), apply_dsa_reference(x, p2), rtol=1e-12, atol=1e-12)


def test_mode_s_matches_reference_and_draws_one_group():
    cfg = DSAConfig()
    g = _gen(3)
    seen = set()
    for _ in range(30):
        x = torch.randn(5, 3, 10, 10, dtype=torch.float64)
        p = sample_dsa_params(cfg, 5, 10, 10, generator=g, dtype=torch.float64)
        assert len(p.groups) == 1
        seen.add(p.groups[0])
        torch.testing.assert_close(apply_dsa(x, p), apply_dsa_reference(x, p), rtol=1e-12, atol=1e-12)
    assert seen == set(DSA_GROUPS)


@pytest.mark.parametrize("shape", SHAPES)
def test_float32_matches_reference(shape):
    c, h, w = shape
    x = torch.randn(8, c, h, w)
    p = _params(FULL, 8, h, w, seed=2, dtype=torch.float32)
    out = apply_dsa(x, p)
    assert out.dtype == torch.float32 and out.shape == x.shape
    # float32 vs a float64 evaluation of the same params: allow twice the reference's own float32 error.
    ref64 = apply_dsa_reference(x.double(), p)
    err_ref = (apply_dsa_reference(x, p).double() - ref64).abs().max()
    assert (out.double() - ref64).abs().max() <= 2 * err_ref + 1e-5


# --- upstream's rules, checked directly ---------------------------------------------------------------


def test_crop_matches_upstream_pad_and_clamp_rule():
    # Upstream: pad by 1, clamp (i + shift + 1) into [0, H + 1], index; shift 0 = rows (dim 2), 1 = cols (dim 3).
    b, c, h, w = 9, 2, 7, 9
    x = torch.randn(b, c, h, w, dtype=torch.float64)
    shifts = torch.tensor([[-3, 0], [0, 4], [2, -2], [-1, 1], [7, 0], [0, -9], [-8, 10], [0, 0], [1, 2]])
    p = DSAParams(groups=("crop",), batch_size=b, height=h, width=w, crop=shifts)
    xp = F.pad(x, [1, 1, 1, 1])
    rows = (torch.arange(h)[None, :] + shifts[:, :1] + 1).clamp(0, h + 1)
    cols = (torch.arange(w)[None, :] + shifts[:, 1:] + 1).clamp(0, w + 1)
    bi = torch.arange(b)[:, None, None]
    expect = xp.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    assert torch.equal(apply_dsa(x, p), expect)
    assert torch.equal(apply_dsa_reference(x, p), expect)
    # Direct meaning: out[:, i, j] = x[:, i + dy, j + dx].
    out = apply_dsa(x, p)
    assert torch.equal(out[0, :, 3:, :], x[0, :, :-3, :]) and (out[0, :, :3] == 0).all()
    assert torch.equal(out[1, :, :, :-4], x[1, :, :, 4:]) and (out[1, :, :, -4:] == 0).all()


def test_cutout_matches_upstream_clamp_rule_everywhere():
    # Every offset upstream can draw, for even and odd window sizes: fast mask == clamp-each-index rule.
    for h, w in [(8, 8), (7, 9), (5, 6)]:
        cfg = DSAConfig(strategy="cutout")
        ch, cw = cfg.cutout_size(h, w)
        offs = torch.cartesian_prod(torch.arange(h + 1 - ch % 2), torch.arange(w + 1 - cw % 2))
        x = torch.rand(offs.shape[0], 1, h, w, dtype=torch.float64) + 1  # strictly positive
        n = offs.shape[0]
        p = DSAParams(groups=("cutout",), batch_size=n, height=h, width=w, cutout_size=(ch, cw), cutout=offs)
        out = apply_dsa(x, p)
        assert torch.equal(out, apply_dsa_reference(x, p))
        zeroed = (out == 0).flatten(1).sum(1)
        top, left = offs[:, 0] - ch // 2, offs[:, 1] - cw // 2
        area = (torch.minimum(top + ch, torch.tensor(h)) - top.clamp(min=0)) * (
            torch.minimum(left + cw, torch.tensor(w)) - left.clamp(min=0)
        )
        assert torch.equal(zeroed, area) and (area > 0).all()  # the window always overlaps the image
        assert torch.equal(out[out != 0], x[out != 0])


def test_identity_like_params():
    b, c, h, w = 4, 3, 9, 11
    x = torch.randn(b, c, h, w, dtype=torch.float64)
    base = dict(batch_size=b, height=h, width=w)
    ones, zeros = torch.ones(b, dtype=torch.float64), torch.zeros(b, dtype=torch.float64)
    color = DSAParams(groups=("color",), brightness=zeros, saturation=ones, contrast=ones, **base)
    torch.testing.assert_close(apply_dsa(x, color), x, rtol=0, atol=1e-13)
    crop = DSAParams(groups=("crop",), crop=torch.zeros(b, 2, dtype=torch.long), **base)
    assert torch.equal(apply_dsa(x, crop), x)
    flip2 = DSAParams(groups=("flip", "flip"), flip=torch.ones(b, dtype=torch.bool), **base)
    assert torch.equal(apply_dsa(x, flip2), x)
    flip = DSAParams(groups=("flip",), flip=torch.tensor([True, False, True, False]), **base)
    out = apply_dsa(x, flip)
    assert torch.equal(out[0], x[0].flip(-1)) and torch.equal(out[1], x[1])
    scale = DSAParams(groups=("scale",), scale=torch.ones(b, 2, dtype=torch.float64), **base)
    torch.testing.assert_close(apply_dsa(x, scale), x, rtol=0, atol=1e-12)
    rotate = DSAParams(groups=("rotate",), rotate=zeros, **base)
    torch.testing.assert_close(apply_dsa(x, rotate), x, rtol=0, atol=1e-12)
    # +90 degrees is an anticlockwise quarter turn (upstream: "90: anticlockwise 90 degree").
    xs = torch.randn(b, c, 9, 9, dtype=torch.float64)
    sq = dict(batch_size=b, height=9, width=9)
    quarter = DSAParams(groups=("rotate",), rotate=torch.full((b,), math.pi / 2, dtype=torch.float64), **sq)
    torch.testing.assert_close(apply_dsa(xs, quarter), torch.rot90(xs, 1, dims=(2, 3)), rtol=0, atol=1e-12)
    # sx = 2 samples the input at twice the x coordinate: the middle row's centre pixel stays, columns
    # far from the centre fall outside and become 0.
    sx2 = DSAParams(groups=("scale",), scale=torch.tensor([[2.0, 1.0]] * b, dtype=torch.float64), **sq)
    out = apply_dsa(xs, sx2)
    torch.testing.assert_close(out[:, :, :, 4], xs[:, :, :, 4], rtol=0, atol=1e-12)
    torch.testing.assert_close(out[:, :, :, 6], xs[:, :, :, 8], rtol=0, atol=1e-12)
    assert (out[:, :, :, 0] == 0).all() and (out[:, :, :, 8] == 0).all()


# --- the draws -------------------------------------------------------------------------------------------


def test_draw_ranges_and_distributions():
    n, h, w = 20000, 32, 13
    cfg = DSAConfig(mode="M")
    p = sample_dsa_params(cfg, n, h, w, generator=_gen(5))
    b, s, c = p.brightness, p.saturation, p.contrast
    assert b.min() >= -0.5 and b.max() < 0.5 and b.min() < -0.49 and b.max() > 0.49 and abs(b.mean()) < 0.01
    assert s.min() >= 0 and s.max() < 2 and s.max() > 1.98 and abs(s.mean() - 1) < 0.02
    assert c.min() >= 0.5 and c.max() < 1.5 and abs(c.mean() - 1) < 0.01
    # crop: int(32/8 + .5) = 4 rows, int(13/8 + .5) = 2 cols, every value drawn, roughly uniformly.
    dy, dx = p.crop[:, 0], p.crop[:, 1]
    assert p.crop.dtype == torch.int64
    assert set(dy.tolist()) == set(range(-4, 5)) and set(dx.tolist()) == set(range(-2, 3))
    assert torch.bincount(dy + 4).min() > n / 9 * 0.85
    # cutout: 16 x 7 windows; offsets in [0, H + 1 - size % 2).
    assert p.cutout_size == (16, 7)
    assert set(p.cutout[:, 0].tolist()) == set(range(33)) and set(p.cutout[:, 1].tolist()) == set(range(13))
    f = p.flip.double().mean()
    assert p.flip.dtype == torch.bool and abs(f - 0.5) < 0.015
    sc = p.scale
    assert sc.min() >= 1 / 1.2 and sc.max() < 1.2 and sc.min() < 1 / 1.2 + 0.01 and sc.max() > 1.19
    assert abs(sc.mean() - (1.2 + 1 / 1.2) / 2) < 0.01
    assert abs(torch.corrcoef(sc.T)[0, 1]) < 0.05  # sx and sy independent
    deg = p.rotate * 180 / math.pi
    assert deg.min() >= -15 - 1e-4 and deg.max() <= 15 + 1e-4 and deg.min() < -14.9 and deg.max() > 14.9
    # Each value is its own draw: no two fields share a stream.
    assert abs(torch.corrcoef(torch.stack([b, s, c, p.rotate]))[~torch.eye(4, dtype=torch.bool)]).max() < 0.05


def test_flip_probability_is_configurable():
    p = _params("flip", 20000, 8, 8, seed=1, prob_flip=0.2)
    assert abs(p.flip.double().mean() - 0.2) < 0.015


def test_mode_s_group_frequencies_uniform():
    cfg = DSAConfig()
    g = _gen(7)
    counts = dict.fromkeys(DSA_GROUPS, 0)
    for _ in range(3000):
        counts[sample_dsa_params(cfg, 1, 8, 8, generator=g).groups[0]] += 1
    assert all(400 < v < 600 for v in counts.values()), counts  # expected 500, sd 20
    sub = DSAConfig(strategy="crop_flip")
    picks = [sample_dsa_params(sub, 1, 8, 8, generator=g).groups for _ in range(400)]
    assert set(picks) == {("crop",), ("flip",)} and 150 < picks.count(("crop",)) < 250


def test_same_seed_same_params_and_host_generator():
    cfg = DSAConfig()
    g1, g2, g3 = _gen(11), _gen(11), _gen(12)
    differ = 0
    for _ in range(12):
        a = sample_dsa_params(cfg, 6, 10, 12, generator=g1)
        _assert_params_equal(a, sample_dsa_params(cfg, 6, 10, 12, generator=g2))
        c = sample_dsa_params(cfg, 6, 10, 12, generator=g3)
        differ += a.groups != c.groups or any(not torch.equal(a.tensors()[k], c.tensors()[k]) for k in a.tensors())
    assert differ == 12
    # The group comes from host_generator alone; values from generator alone.
    groups = [sample_dsa_params(cfg, 2, 8, 8, generator=_gen(i), host_generator=_gen(99)).groups for i in range(5)]
    assert len(set(groups)) == 1
    h = _gen(1)
    seq_a = [sample_dsa_params(cfg, 2, 8, 8, generator=_gen(0), host_generator=h).groups for _ in range(20)]
    h = _gen(1)
    seq_b = [sample_dsa_params(cfg, 2, 8, 8, generator=_gen(5), host_generator=h).groups for _ in range(20)]
    assert seq_a == seq_b and len(set(seq_a)) > 1


def test_dsa_is_sample_then_apply():
    x = torch.randn(7, 3, 10, 10, dtype=torch.float64)
    cfg = DSAConfig()
    for seed in range(6):
        p = sample_dsa_params(cfg, 7, 10, 10, generator=_gen(seed), dtype=torch.float64)
        assert torch.equal(dsa(x, cfg, generator=_gen(seed)), apply_dsa(x, p))


# --- gradients ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("group", DSA_GROUPS)
def test_gradcheck_each_group(group):
    x = torch.randn(2, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    p = _params(group, 2, 5, 6, seed=4)
    assert torch.autograd.gradcheck(lambda t: apply_dsa(t, p), (x,))


@pytest.mark.parametrize("group", [*DSA_GROUPS, FULL])
def test_gradients_match_reference(group):
    x = torch.randn(6, 3, 9, 8, dtype=torch.float64, requires_grad=True)
    p = _params(group, 6, 9, 8, seed=6)
    grad_out = torch.randn(6, 3, 9, 8, dtype=torch.float64)
    (g_fast,) = torch.autograd.grad(apply_dsa(x, p), x, grad_out)
    (g_ref,) = torch.autograd.grad(apply_dsa_reference(x, p), x, grad_out)
    assert g_fast.abs().sum() > 0
    torch.testing.assert_close(g_fast, g_ref, rtol=1e-12, atol=1e-12)


# --- replay and micro-batches -----------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", [*DSA_GROUPS, FULL])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_replay_is_bit_identical_and_sliceable(strategy, dtype):
    b, c, h, w = 16, 3, 12, 10
    x = torch.randn(b, c, h, w, dtype=dtype, requires_grad=True)
    p = _params(strategy, b, h, w, seed=8, dtype=torch.float32)
    grad_out = torch.randn(b, c, h, w, dtype=dtype)
    y1 = apply_dsa(x, p)
    (g1,) = torch.autograd.grad(y1, x, grad_out)
    x2 = x.detach().clone().requires_grad_()
    y2 = apply_dsa(x2, p)
    (g2,) = torch.autograd.grad(y2, x2, grad_out)
    assert torch.equal(y1, y2) and torch.equal(g1, g2)
    # Micro-batches: params[i:j] on x[i:j] is exactly the slice of the whole batch, gradients too.
    bounds = [0, 5, 6, 13, 16]
    parts = [apply_dsa(x[i:j], p[i:j]) for i, j in zip(bounds[:-1], bounds[1:])]
    assert torch.equal(torch.cat(parts), y1)
    g_parts = [torch.autograd.grad(apply_dsa(x[i:j], p[i:j]), x, grad_out[i:j])[0] for i, j in zip(bounds, bounds[1:])]
    assert torch.equal(sum(g_parts), g1)
    perm = torch.randperm(b)
    assert torch.equal(apply_dsa(x[perm], p.select(perm)), y1[perm])
    mask = torch.rand(b) < 0.5
    assert torch.equal(apply_dsa(x[mask], p.select(mask)), y1[mask])
    assert torch.equal(apply_dsa(x[3:4], p[3]), y1[3:4]) and torch.equal(apply_dsa(x[-1:], p[-1]), y1[-1:])
    assert torch.equal(apply_dsa(x[[1, 4]], p.select([1, 4])), y1[[1, 4]])


@pytest.mark.parametrize("strategy", ["color", "scale", "rotate", FULL])
def test_micro_batches_bit_identical_on_large_images(strategy):
    # 3x128x96 per sample is past the size where a CPU reduction splits one sample's sum across threads
    # (and on CUDA the split depends on the batch size at any size): per-sample results must not change.
    b, c, h, w = 6, 3, 128, 96
    x = torch.randn(b, c, h, w)
    p = sample_dsa_params(DSAConfig(strategy=strategy, mode="M"), b, h, w, generator=_gen(9))
    y = apply_dsa(x, p)
    assert torch.equal(torch.cat([apply_dsa(x[i : i + 1], p[i]) for i in range(b)]), y)
    assert torch.equal(torch.cat([apply_dsa(x[:4], p[:4]), apply_dsa(x[4:], p[4:])]), y)


def test_params_to_device_roundtrip():
    p = _params(FULL, 4, 8, 8)
    q = p.to("cpu")
    _assert_params_equal(p, q)
    assert q.device == torch.device("cpu")
    p32 = sample_dsa_params(DSAConfig(mode="M"), 4, 8, 8, generator=_gen(0), device="cpu")
    assert p32.brightness.dtype == torch.float32 and p32.crop.dtype == torch.int64 and p32.flip.dtype == torch.bool


# --- vectorised, no host sync -------------------------------------------------------------------------------


def test_op_count_independent_of_batch_and_no_item_in_apply():
    def ops(b: int, strategy: str = FULL, mode: str = "M"):
        x = torch.randn(b, 3, 12, 12, requires_grad=True)
        cfg = DSAConfig(strategy=strategy, mode=mode)
        with _OpLog() as draw:
            p = sample_dsa_params(cfg, b, 12, 12, generator=_gen(0))
        with _OpLog() as app:
            apply_dsa(x, p).sum().backward()
        return draw, app

    d_small, a_small = ops(3)
    d_big, a_big = ops(300)
    assert [str(o) for o in a_small.ops] == [str(o) for o in a_big.ops]
    assert [str(o) for o in d_small.ops] == [str(o) for o in d_big.ops]
    assert a_big.item_devices == [] and d_big.item_devices == []  # mode M: no read-back at all
    # Mode S reads back exactly one CPU scalar: the group.
    d_s, a_s = ops(300, mode="S")
    assert d_s.item_devices == ["cpu"] and a_s.item_devices == []


def test_large_batch_is_fast():
    b = 4096
    x = torch.randn(b, 3, 32, 32)
    cfg = DSAConfig(mode="M")
    t0 = time.perf_counter()
    p = sample_dsa_params(cfg, b, 32, 32, generator=_gen(0))
    out = apply_dsa(x, p)
    elapsed = time.perf_counter() - t0
    assert out.shape == x.shape and torch.isfinite(out).all()
    # All six groups on 4096 CIFAR-sized images: ~1 s on 2 CPU cores; a per-sample loop takes far longer.
    assert elapsed < 10, elapsed


# --- CUDA ---------------------------------------------------------------------------------------------------


@cuda_only
def test_cuda_matches_reference_without_sync():
    cfg = DSAConfig()
    gen, host = _gen(0, "cuda"), _gen(0)
    x = torch.randn(64, 3, 32, 32, device="cuda", dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError):
        sample_dsa_params(cfg, 64, 32, 32, generator=gen)  # mode S needs a CPU host generator
    for _ in range(12):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            p = sample_dsa_params(cfg, 64, 32, 32, generator=gen, host_generator=host, dtype=torch.float64)
            y = apply_dsa(x, p)
            y2 = apply_dsa(x, p)
            (g,) = torch.autograd.grad(y.square().sum(), x)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert p.device.type == "cuda" and torch.equal(y, y2)
        assert torch.equal(torch.cat([apply_dsa(x[:20], p[:20]), apply_dsa(x[20:], p[20:])]), y)
        torch.testing.assert_close(y, apply_dsa_reference(x, p), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(y.cpu(), apply_dsa(x.detach().cpu(), p.to("cpu")), rtol=1e-12, atol=1e-12)
        assert g.abs().sum() > 0


@cuda_only
def test_cuda_same_seed_same_params():
    cfg = DSAConfig()
    a = sample_dsa_params(cfg, 32, 16, 16, generator=_gen(3, "cuda"), host_generator=_gen(4))
    b = sample_dsa_params(cfg, 32, 16, 16, generator=_gen(3, "cuda"), host_generator=_gen(4))
    _assert_params_equal(a, b)
    c = sample_dsa_params(cfg, 32, 16, 16, generator=_gen(3), device="cuda")  # CPU draws, moved over
    assert c.device.type == "cuda"
