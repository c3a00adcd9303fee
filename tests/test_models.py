"""Tests for datm_fast.models: ConvNet spec / functional form / module, init, eval archs, registry."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from datm_fast.models import (
    ACTIVATIONS,
    NORMS,
    POOLINGS,
    ConvNet,
    ConvNetSpec,
    convnet_forward,
    convnet_names,
    convnet_spec_from_name,
    default_convnet_name,
    flatten_params,
    get_network,
    init_flat_params,
    network_names,
    unflatten_params,
)


# ----- a faithful re-statement of upstream's ConvNet (MTT/DATM networks.py) ---------------------
class UpstreamConvNet(nn.Module):
    """Upstream's ConvNet, layer for layer (names, order, the 28 -> 32 rule), for comparison only."""

    def __init__(self, channel, num_classes, net_width, net_depth, net_act, net_norm, net_pooling, im_size=(32, 32)):
        super().__init__()
        layers = []
        in_channels = channel
        if im_size[0] == 28:
            im_size = (32, 32)
        shape_feat = [in_channels, im_size[0], im_size[1]]
        for d in range(net_depth):
            layers += [nn.Conv2d(in_channels, net_width, kernel_size=3, padding=3 if channel == 1 and d == 0 else 1)]
            shape_feat[0] = net_width
            if net_norm == "batchnorm":
                layers += [nn.BatchNorm2d(shape_feat[0], affine=True)]
            elif net_norm == "layernorm":
                layers += [nn.LayerNorm(shape_feat, elementwise_affine=True)]
            elif net_norm == "instancenorm":
                layers += [nn.GroupNorm(shape_feat[0], shape_feat[0], affine=True)]
            elif net_norm == "groupnorm":
                layers += [nn.GroupNorm(4, shape_feat[0], affine=True)]
            layers += [
                {"sigmoid": nn.Sigmoid(), "relu": nn.ReLU(inplace=True), "leakyrelu": nn.LeakyReLU(0.01)}[net_act]
            ]
            in_channels = net_width
            if net_pooling != "none":
                layers += [{"maxpooling": nn.MaxPool2d(2, 2), "avgpooling": nn.AvgPool2d(2, 2)}[net_pooling]]
                shape_feat[1] //= 2
                shape_feat[2] //= 2
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(shape_feat[0] * shape_feat[1] * shape_feat[2], num_classes)

    def forward(self, x):
        out = self.features(x)
        out = out.view(out.size(0), -1)
        return self.classifier(out)


_UP_NORM = {
    "instance": "instancenorm",
    "batch": "batchnorm",
    "layer": "layernorm",
    "group": "groupnorm",
    "none": "none",
}
_UP_POOL = {"avg": "avgpooling", "max": "maxpooling", "none": "none"}


def upstream_for(spec: ConvNetSpec) -> UpstreamConvNet:
    return UpstreamConvNet(
        spec.channels,
        spec.num_classes,
        spec.width,
        spec.depth,
        spec.activation,
        _UP_NORM[spec.norm],
        _UP_POOL[spec.pooling],
        spec.image_size,
    )


# Specs upstream can build: 1-channel 28 px, 3-channel 32 px, 3-channel 64 px depth 4, across options.
UPSTREAM_SPECS = [
    ConvNetSpec(3, 10, 32),
    ConvNetSpec(1, 10, 28),
    ConvNetSpec(3, 200, 64, depth=4),
    ConvNetSpec(3, 10, 32, width=16, depth=1, norm="none"),
    ConvNetSpec(3, 7, 32, width=16, depth=2, norm="batch", activation="leakyrelu", pooling="max"),
    ConvNetSpec(1, 10, 28, width=16, depth=3, norm="layer", activation="sigmoid", pooling="none"),
    ConvNetSpec(3, 100, 32, width=32, depth=5, norm="group", pooling="max"),
    ConvNetSpec(3, 200, 64, width=16, depth=4, norm="layer", activation="leakyrelu"),
]
SPEC_IDS = [
    f"c{s.channels}-{s.image_size[0]}px-w{s.width}-d{s.depth}-{s.norm}-{s.activation}-{s.pooling}"
    for s in UPSTREAM_SPECS
]


def images(spec: ConvNetSpec, n: int = 4, dtype=torch.float32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *spec.input_shape, generator=g, dtype=dtype)


# ----- spec: parameter order and shapes ------------------------------------------------------
@pytest.mark.parametrize("spec", UPSTREAM_SPECS, ids=SPEC_IDS)
def test_param_order_and_shapes_match_upstream(spec):
    up = upstream_for(spec)
    expected = [(n, p.shape) for n, p in up.named_parameters()]
    assert spec.param_shapes() == expected
    assert [(n, p.shape) for n, p in ConvNet(spec).named_parameters()] == expected
    assert spec.num_params == sum(p.numel() for p in up.parameters())
    # state_dict keys (batch norm running stats included) match too, so upstream state_dicts load.
    assert list(ConvNet(spec).state_dict()) == list(up.state_dict())
    assert spec.num_features == up.classifier.in_features


def test_known_sizes():
    s = ConvNetSpec(3, 10, 32)
    assert s.num_params == 320010  # the MTT/DATM CIFAR-10 ConvNet
    assert s.feature_shape == (128, 4, 4)
    assert ConvNetSpec(1, 10, 28).feature_shape == (128, 4, 4)  # 28 px padded to 32 by the first conv
    assert ConvNetSpec(3, 200, 64, depth=4).feature_shape == (128, 4, 4)
    assert ConvNetSpec(3, 10, 32, pooling="none").feature_shape == (128, 32, 32)
    # closed form: per layer conv (9*c_in*w + w) + norm (2*w), head
    w, c = 128, 3
    assert s.num_params == (9 * c * w + w + 2 * w) + 2 * (9 * w * w + w + 2 * w) + 2048 * 10 + 10
    ln = ConvNetSpec(3, 10, 32, norm="layer")
    assert ln.param_shapes()[2] == ("features.1.weight", torch.Size([128, 32, 32]))


# ----- loading upstream checkpoints ---------------------------------------------------------
@pytest.mark.parametrize("spec", UPSTREAM_SPECS, ids=SPEC_IDS)
def test_upstream_layout_loads_unchanged(spec):
    up = upstream_for(spec).double()
    for p in up.parameters():  # make norm affine parameters non-trivial
        with torch.no_grad():
            p.add_(0.1 * torch.randn_like(p))
    epoch_entry = [p.detach().clone() for p in up.parameters()]  # one epoch of an upstream buffer
    x = images(spec, dtype=torch.float64)
    ref = up(x)

    ours = ConvNet(spec).double().load_flat_(epoch_entry)
    torch.testing.assert_close(ours(x), ref, rtol=1e-12, atol=1e-12)
    # the flat form of that entry drives the functional forward to the same logits
    flat = flatten_params(epoch_entry)
    torch.testing.assert_close(convnet_forward(spec, flat, x), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.flat_parameters(), flat, rtol=0, atol=0)
    # an upstream state_dict loads strictly
    other = ConvNet(spec).double()
    other.load_state_dict(up.state_dict())
    torch.testing.assert_close(other(x), ref, rtol=1e-12, atol=1e-12)


def test_load_flat_accepts_flattened_entries_and_rejects_bad_ones():
    spec = ConvNetSpec(3, 10, 32, width=8, depth=2)
    net = ConvNet(spec, generator=torch.Generator().manual_seed(0))
    entry = [p.detach().clone().reshape(-1) for p in net.parameters()]
    other = ConvNet(spec).load_flat_(entry)
    assert torch.equal(other.flat_parameters(), net.flat_parameters())
    with pytest.raises(ValueError, match="expected 10 tensors"):
        other.load_flat_(entry[:-1])
    bad = list(entry)
    bad[0] = torch.zeros(7)
    with pytest.raises(ValueError, match="features.0.weight"):
        other.load_flat_(bad)
    with pytest.raises(ValueError, match=rf"\({spec.num_params},\)"):
        other.load_flat_(torch.zeros(spec.num_params + 1))


# ----- functional == module --------------------------------------------------------------------
FUNCTIONAL_SPECS = (
    [
        ConvNetSpec(c, 10, s, width=12, depth=d, norm=n)
        for (c, s, d) in ((1, 28, 3), (3, 32, 3), (3, 64, 4))
        for n in NORMS
    ]
    + [ConvNetSpec(3, 10, 32, width=12, depth=2, activation=a, pooling=p) for a in ACTIVATIONS for p in POOLINGS]
    + [ConvNetSpec(3, 10, 32), ConvNetSpec(1, 10, 28, depth=1), ConvNetSpec(3, 5, 20, width=8, depth=3)]
)


@pytest.mark.parametrize(
    "spec",
    FUNCTIONAL_SPECS,
    ids=[
        f"c{s.channels}-{s.image_size[0]}-w{s.width}-d{s.depth}-{s.norm}-{s.activation}-{s.pooling}"
        for s in FUNCTIONAL_SPECS
    ],
)
def test_functional_matches_module_float64(spec):
    net = ConvNet(spec, generator=torch.Generator().manual_seed(3)).double().train()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = images(spec, dtype=torch.float64).requires_grad_(True)
    out_mod = net(x)
    flat = net.flat_parameters().detach().requires_grad_(True)
    out_fn = convnet_forward(spec, flat, x)
    assert out_fn.shape == (x.shape[0], spec.num_classes)
    assert out_fn.dtype == torch.float64
    torch.testing.assert_close(out_fn, out_mod, rtol=1e-12, atol=1e-12)

    # and the gradients agree, w.r.t. parameters and input
    gout = torch.randn_like(out_mod)
    g_mod = torch.autograd.grad(out_mod, [x, *net.parameters()], gout)
    g_fn = torch.autograd.grad(out_fn, [x, flat], gout)
    torch.testing.assert_close(g_fn[0], g_mod[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_fn[1], torch.cat([g.reshape(-1) for g in g_mod[1:]]), rtol=1e-10, atol=1e-12)


def test_functional_float32_matches_module():
    spec = ConvNetSpec(3, 10, 32)
    net = ConvNet(spec, generator=torch.Generator().manual_seed(0))
    x = images(spec)
    torch.testing.assert_close(convnet_forward(spec, net.flat_parameters(), x), net(x), rtol=1e-5, atol=1e-5)


def test_functional_vmaps_over_parameter_stacks():
    spec = ConvNetSpec(3, 10, 16, width=8, depth=2)
    flats = torch.stack(
        [init_flat_params(spec, torch.Generator().manual_seed(i), dtype=torch.float64) for i in range(3)]
    )
    x = images(spec, dtype=torch.float64)
    out = torch.func.vmap(lambda f: convnet_forward(spec, f, x))(flats)
    ref = torch.stack([convnet_forward(spec, f, x) for f in flats])
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_batchnorm_functional_uses_batch_statistics():
    spec = ConvNetSpec(3, 10, 16, width=8, depth=2, norm="batch")
    net = ConvNet(spec, generator=torch.Generator().manual_seed(0)).double()
    x = images(spec, n=6, dtype=torch.float64) * 3 + 1
    flat = net.flat_parameters().detach()
    before = [b.clone() for b in net.buffers()]
    out = convnet_forward(spec, flat, x)
    # train-mode module output (batch statistics) matches; eval-mode (running statistics) doesn't
    torch.testing.assert_close(out, net.train()(x), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out, net.eval()(x))
    # the functional form never touched the module's running statistics (only net.train()(x) did)
    fresh = ConvNet(spec).double()
    assert all(torch.equal(a, b) for a, b in zip(before, fresh.buffers()))


def test_unflatten_returns_views_of_flat():
    spec = ConvNetSpec(3, 10, 32, width=8, depth=2, norm="layer")
    flat = torch.arange(spec.num_params, dtype=torch.float64)
    views = unflatten_params(spec, flat)
    assert [v.shape for v in views] == [s for _, s in spec.param_shapes()]
    ptr = flat.untyped_storage().data_ptr()
    assert all(v.untyped_storage().data_ptr() == ptr for v in views)
    flat[-1] = -5.0
    assert views[-1][-1].item() == -5.0
    torch.testing.assert_close(torch.cat([v.reshape(-1) for v in views]), flat, rtol=0, atol=0)
    with pytest.raises(ValueError, match="flat parameters must have shape"):
        unflatten_params(spec, flat[:-1])
    with pytest.raises(ValueError, match="flat parameters must have shape"):
        unflatten_params(spec, flat.reshape(1, -1))


def test_forward_rejects_bad_input():
    spec = ConvNetSpec(3, 10, 32, width=8, depth=2)
    flat = init_flat_params(spec, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"x must have shape \(N, 3, 32, 32\)"):
        convnet_forward(spec, flat, torch.zeros(2, 3, 28, 28))
    with pytest.raises(ValueError, match=r"x must have shape"):
        convnet_forward(spec, flat, torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="flat parameters"):
        convnet_forward(spec, flat[1:], torch.zeros(2, 3, 32, 32))


# ----- double backward -----------------------------------------------------------------------
TINY_SPECS = [
    dict(norm="instance", activation="relu", pooling="avg"),
    dict(norm="batch", activation="leakyrelu", pooling="max"),
    dict(norm="layer", activation="sigmoid", pooling="avg", channels=1),
    dict(norm="group", activation="sigmoid", pooling="none"),
    dict(norm="none", activation="leakyrelu", pooling="avg"),
]


def _tiny(size: int, channels: int = 2, **kw) -> ConvNetSpec:
    return ConvNetSpec(channels, 3, size, width=4, depth=2, **kw)


@pytest.mark.parametrize("kw", TINY_SPECS, ids=[f"{k['norm']}-{k['activation']}-{k['pooling']}" for k in TINY_SPECS])
def test_gradcheck_and_gradgradcheck(kw):
    """First and second derivatives of the flat functional form w.r.t. parameters and images against
    finite differences (float64), for every norm, activation and pooling: full Jacobians on 4x4 images
    (a second each). The layers are PyTorch's own; what this checks is that every block is differentiable
    twice through the views of one flat vector (an 8x8 fast-mode pass added nothing and took 1.5x more)."""
    spec = _tiny(4, **kw)
    g = torch.Generator().manual_seed(0)
    flat = init_flat_params(spec, g, dtype=torch.float64)
    flat = (flat + 0.1 * torch.randn(flat.shape, generator=g, dtype=torch.float64)).requires_grad_(True)
    x = torch.randn(2, *spec.input_shape, generator=g, dtype=torch.float64, requires_grad=True)
    f = lambda p, inp: convnet_forward(spec, p, inp)  # noqa: E731
    assert torch.autograd.gradcheck(f, (flat, x))
    assert torch.autograd.gradgradcheck(f, (flat, x))


def test_differentiates_through_an_sgd_step():
    """d/dx of the loss after one SGD step on x (the distillation gradient) vs finite differences."""
    spec = ConvNetSpec(3, 3, 8, width=4, depth=2)
    g = torch.Generator().manual_seed(1)
    theta0 = init_flat_params(spec, g, dtype=torch.float64)
    x_syn = torch.randn(3, 3, 8, 8, generator=g, dtype=torch.float64, requires_grad=True)
    y_syn = torch.tensor([0, 1, 2])
    x_real = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
    y_real = torch.tensor([0, 1, 2, 0])
    lr = 0.5

    def outer(xs):
        th = theta0.clone().requires_grad_(True)
        inner = F.cross_entropy(convnet_forward(spec, th, xs), y_syn)
        (grad,) = torch.autograd.grad(inner, th, create_graph=True)
        return F.cross_entropy(convnet_forward(spec, th - lr * grad, x_real), y_real)

    assert torch.autograd.gradcheck(outer, (x_syn,))


# ----- initialisation --------------------------------------------------------------------------
@pytest.mark.parametrize("spec", UPSTREAM_SPECS[:4], ids=SPEC_IDS[:4])
def test_init_is_bit_identical_to_pytorch_default_init(spec):
    torch.manual_seed(1234)
    up = upstream_for(spec)
    ref = flatten_params(up).detach()
    flat = init_flat_params(spec, torch.Generator().manual_seed(1234))
    assert torch.equal(flat, ref)
    net = ConvNet(spec, generator=torch.Generator().manual_seed(1234))
    assert torch.equal(net.flat_parameters().detach(), ref)


def test_init_determinism_and_bounds():
    spec = ConvNetSpec(3, 10, 32, norm="batch")
    a = init_flat_params(spec, torch.Generator().manual_seed(7))
    b = init_flat_params(spec, torch.Generator().manual_seed(7))
    c = init_flat_params(spec, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.dtype == torch.float32 and a.shape == (spec.num_params,) and not a.requires_grad
    shapes = dict(spec.param_shapes())
    for (name, _), v in zip(spec.param_shapes(), unflatten_params(spec, a)):
        weight_shape = shapes[name.rsplit(".", 1)[0] + ".weight"]
        if len(weight_shape) in (2, 4):  # conv / linear weight or bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            bound = 1 / math.sqrt(weight_shape[1:].numel())
            assert v.abs().max() <= bound
            if v.numel() >= 1000:  # uniform over the whole range, centred
                assert v.abs().max() > 0.99 * bound
                assert abs(v.mean().item()) < 0.05 * bound
                assert abs(v.std().item() - bound / math.sqrt(3)) < 0.05 * bound
        else:  # norm layers: weight 1, bias 0
            assert torch.equal(v, torch.ones_like(v) if name.endswith("weight") else torch.zeros_like(v))
    d64 = init_flat_params(spec, torch.Generator().manual_seed(7), dtype=torch.float64)
    assert d64.dtype == torch.float64


def test_generator_init_never_touches_global_rng():
    state = torch.get_rng_state()
    spec = ConvNetSpec(3, 10, 32)
    init_flat_params(spec, torch.Generator().manual_seed(0))
    ConvNet(spec, generator=torch.Generator().manual_seed(0))
    get_network("ResNet18BN", 3, 10, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(state, torch.get_rng_state())


def test_module_generator_init_matches_init_flat_params_and_runs_on_real_storage():
    spec = ConvNetSpec(3, 10, 32, norm="batch")
    net = ConvNet(spec, generator=torch.Generator().manual_seed(5))
    assert torch.equal(net.flat_parameters(), init_flat_params(spec, torch.Generator().manual_seed(5)))
    assert all(p.device.type == "cpu" for p in net.parameters())
    bn = net.features[1]
    assert torch.equal(bn.running_mean, torch.zeros(128)) and torch.equal(bn.running_var, torch.ones(128))
    assert bn.num_batches_tracked.item() == 0


EVAL_ARCHS = ["MLP", "LeNet", "AlexNet", "VGG11", "VGG11BN", "ResNet18", "ResNet18BN", "ResNet18_AP", "ResNet18BN_AP"]


@pytest.mark.parametrize("name", EVAL_ARCHS + ["ConvNetBN"])
def test_eval_arch_generator_init_is_pytorch_default_init(name):
    """Built with a generator seeded s == built plainly (PyTorch's constructors) after manual_seed(s)."""
    torch.manual_seed(11)
    plain = get_network(name, 3, 10, 32)
    seeded = get_network(name, 3, 10, 32, generator=torch.Generator().manual_seed(11))
    sd_plain, sd_seeded = plain.state_dict(), seeded.state_dict()
    assert list(sd_plain) == list(sd_seeded)
    for k in sd_plain:
        assert torch.equal(sd_plain[k], sd_seeded[k]), k
    other = get_network(name, 3, 10, 32, generator=torch.Generator().manual_seed(12))
    assert not torch.equal(flatten_params(other), flatten_params(seeded))


# ----- evaluation architectures ------------------------------------------------------------------
@pytest.mark.parametrize("name", EVAL_ARCHS)
@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
def test_eval_arch_forward_backward(name, channels, size):
    net = get_network(name, channels, 10, size, generator=torch.Generator().manual_seed(0))
    x = torch.randn(3, channels, size, size, requires_grad=True)
    out = net(x)
    assert out.shape == (3, 10)
    F.cross_entropy(out, torch.tensor([0, 1, 2])).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for n, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n


@pytest.mark.parametrize("name", ["LeNet", "AlexNet", "VGG11", "ResNet18BN", "MLP"])
def test_eval_arch_64px(name):
    net = get_network(name, 3, 200, 64, generator=torch.Generator().manual_seed(0))
    assert net(torch.randn(2, 3, 64, 64)).shape == (2, 200)


def test_eval_arch_parameter_layout_matches_upstream():
    # Upstream names (so upstream state_dicts load) and well-known sizes of the CIFAR-10 networks.
    r = get_network("ResNet18", 3, 10, 32)
    names = [n for n, _ in r.named_parameters()]
    assert names[:3] == ["conv1.weight", "bn1.weight", "bn1.bias"]
    assert "layer2.0.shortcut.0.weight" in names and "layer2.0.shortcut.1.weight" in names
    assert names[-2:] == ["classifier.weight", "classifier.bias"]
    assert sum(p.numel() for p in r.parameters()) == 11173962
    assert isinstance(r.bn1, nn.GroupNorm) and r.bn1.num_groups == 64
    assert isinstance(get_network("ResNet18BN", 3, 10, 32).bn1, nn.BatchNorm2d)
    ap = get_network("ResNet18_AP", 3, 10, 32)
    assert isinstance(ap.layer2[0].shortcut[1], nn.AvgPool2d)
    assert ap.classifier.in_features == 512 * 4 * 4
    assert get_network("ResNet18BN_AP", 1, 10, 28).classifier.in_features == 512 * 3 * 3  # upstream's 1-channel head
    v = get_network("VGG11", 3, 10, 32)
    assert sum(p.numel() for p in v.parameters()) == 9231114
    assert isinstance(v.features[1], nn.GroupNorm) and v.features[0].padding == (1, 1)
    assert get_network("VGG11", 1, 10, 28).features[0].padding == (3, 3)
    assert isinstance(get_network("VGG11BN", 3, 10, 32).features[1], nn.BatchNorm2d)
    a = get_network("AlexNet", 3, 10, 32)
    assert a.fc.in_features == 192 * 4 * 4 and [n for n, _ in a.named_parameters()][-2:] == ["fc.weight", "fc.bias"]
    assert get_network("LeNet", 1, 10, 28).fc_1.in_features == 16 * 5 * 5
    assert get_network("LeNet", 3, 10, 32).fc_1.in_features == 16 * 5 * 5
    assert get_network("MLP", 1, 10, 28).fc_1.in_features == 28 * 28


# ----- registry ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,changes",
    [
        ("ConvNet", {}),
        ("ConvNetD1", {"depth": 1}),
        ("ConvNetD4", {"depth": 4}),
        ("ConvNetD5", {"depth": 5}),
        ("ConvNetW32", {"width": 32}),
        ("ConvNetW256", {"width": 256}),
        ("ConvNetAS", {"activation": "sigmoid"}),
        ("ConvNetAR", {}),
        ("ConvNetAL", {"activation": "leakyrelu"}),
        ("ConvNetNN", {"norm": "none"}),
        ("ConvNetBN", {"norm": "batch"}),
        ("ConvNetIN", {}),
        ("ConvNetLN", {"norm": "layer"}),
        ("ConvNetGN", {"norm": "group"}),
        ("ConvNetNP", {"pooling": "none"}),
        ("ConvNetMP", {"pooling": "max"}),
        ("ConvNetAP", {}),
        ("ConvNetD4BN", {"depth": 4, "norm": "batch"}),
        ("ConvNetKIP", {"width": 1024, "norm": "none"}),
    ],
)
def test_convnet_names(name, changes):
    spec = convnet_spec_from_name(name, 3, 10, 32)
    assert spec == dataclasses.replace(ConvNetSpec(3, 10, 32), **changes)
    assert name in convnet_names() and name in network_names()


def test_get_network_builds_convnets_and_eval_archs():
    net = get_network("ConvNetD4", 3, 200, 64, generator=torch.Generator().manual_seed(0))
    assert isinstance(net, ConvNet) and net.spec == ConvNetSpec(3, 200, 64, depth=4)
    assert net(torch.randn(2, 3, 64, 64)).shape == (2, 200)
    assert default_convnet_name(64) == "ConvNetD4" and default_convnet_name((32, 32)) == "ConvNet"
    for name in network_names():
        if name.startswith("ConvNet") and name not in ("ConvNetW512", "ConvNetW1024", "ConvNetKIP"):
            if name in ("ConvNetD6", "ConvNetD7", "ConvNetD8"):
                with pytest.raises(ValueError, match="too small"):  # 32 px pools away to nothing
                    get_network(name, 3, 10, 32)
                continue
            assert get_network(name, 1, 10, 28)(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert type(get_network("ResNet18_Tiny", 3, 10, 64)).__name__ == "ResNet18"


def test_unknown_names_suggest_the_closest():
    with pytest.raises(ValueError, match=r"unknown network name 'ConvNetD44'. Did you mean 'ConvNetD4'\?") as e:
        get_network("ConvNetD44", 3, 10, 32)
    assert "ResNet18BN_AP" in str(e.value) and "ConvNetGN" in str(e.value)
    with pytest.raises(ValueError, match="Did you mean 'ResNet18'"):
        get_network("resnet18", 3, 10, 32)
    with pytest.raises(ValueError, match="unknown ConvNet name 'VGG11'"):
        convnet_spec_from_name("VGG11", 3, 10, 32)


# ----- validation --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"norm": "instant"}, r"ConvNetSpec.norm must be one of 'instance', 'batch', 'layer', 'group', 'none'"),
        ({"activation": "gelu"}, r"ConvNetSpec.activation must be one of 'relu', 'leakyrelu', 'sigmoid'"),
        ({"pooling": "mean"}, r"ConvNetSpec.pooling must be one of 'avg', 'max', 'none'"),
        ({"channels": 0}, r"ConvNetSpec.channels must be an int >= 1"),
        ({"num_classes": 2.5}, r"ConvNetSpec.num_classes must be an int"),
        ({"width": True}, r"ConvNetSpec.width must be an int"),
        ({"depth": 0}, r"ConvNetSpec.depth must be an int >= 1"),
        ({"image_size": (32,)}, r"ConvNetSpec.image_size must be"),
        ({"image_size": "32"}, r"ConvNetSpec.image_size must be"),
        ({"image_size": 8, "depth": 4}, r"too small for depth 4"),
        ({"norm": "group", "width": 6}, r"width must be divisible by 4"),
    ],
)
def test_spec_validation(kwargs, match):
    args = {"channels": 3, "num_classes": 10, "image_size": 32, **kwargs}
    with pytest.raises(ValueError, match=match):
        ConvNetSpec(**args)


def test_spec_normalises_aliases_and_is_frozen_and_hashable():
    s = ConvNetSpec(3, 10, 32, norm="instancenorm", pooling="avgpooling", activation="LeakyReLU")
    assert (s.norm, s.pooling, s.activation, s.image_size) == ("instance", "avg", "leakyrelu", (32, 32))
    assert s == ConvNetSpec(3, 10, (32, 32), activation="leakyrelu")
    assert hash(s) == hash(ConvNetSpec(3, 10, (32, 32), activation="leakyrelu"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.width = 64  # type: ignore[misc]
    assert s.replace(width=64).width == 64
    rect = ConvNetSpec(3, 10, (32, 48), width=8)
    assert rect.feature_shape == (8, 4, 6)
    net = ConvNet(rect)
    torch.testing.assert_close(
        convnet_forward(rect, net.flat_parameters(), torch.ones(1, 3, 32, 48)), net(torch.ones(1, 3, 32, 48))
    )


def test_import_does_not_initialise_cuda():
    import datm_fast.models  # noqa: F401

    assert not torch.cuda.is_initialized()
