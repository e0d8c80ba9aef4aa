"""filo.kernels: the oneDNN linear equals F.linear, is taken only where it should be, and the
module swap keeps parameters, state dict and results."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from filo import kernels
from filo.model import FiLo, FiLoConfig, InferenceOptions

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(),
                                reason="this torch build has no oneDNN")


@pytest.fixture
def conv_calls(monkeypatch):
    """Counts the convolutions filo.kernels runs (the oneDNN route)."""
    calls = []
    real = F.conv2d

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels.F, "conv2d", spy)
    return calls


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "x_shape, out_features, with_bias",
    [((37, 70), 300, True), ((2, 17, 64), 256, True), ((3, 5, 9, 48), 96, False)],
)
def test_onednn_route_equals_f_linear(conv_calls, x_shape, out_features, with_bias):
    x = _rand(*x_shape, seed=1)
    w = _rand(out_features, x_shape[-1], seed=2)
    b = _rand(out_features, seed=3) if with_bias else None
    with torch.inference_mode():
        got = kernels.linear(x, w, b, min_macs=0)
        expected = F.linear(x, w, b)
    assert len(conv_calls) == 1  # the oneDNN route really ran
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert got.is_contiguous()


def test_non_contiguous_input(conv_calls):
    x = _rand(64, 40, seed=4).t()  # [40, 64], transposed view
    w, b = _rand(128, 64, seed=5), _rand(128, seed=6)
    with torch.no_grad():
        torch.testing.assert_close(kernels.linear(x, w, b, min_macs=0), x @ w.t() + b,
                                   rtol=1e-5, atol=1e-5)
    assert len(conv_calls) == 1


def test_falls_back_to_f_linear_with_autograd_small_layers_and_other_dtypes(conv_calls):
    x, w, b = _rand(50, 64, seed=7), _rand(128, 64, seed=8), _rand(128, seed=9)
    # autograd on (training): exactly F.linear, gradients flow
    w_train = w.clone().requires_grad_(True)
    y = kernels.linear(x, w_train, b, min_macs=0)
    assert torch.equal(y, F.linear(x, w_train, b))
    y.sum().backward()
    assert w_train.grad is not None
    with torch.no_grad():
        # below the size threshold
        assert torch.equal(kernels.linear(x, w, b, min_macs=50 * 64 * 128 + 1), F.linear(x, w, b))
        # float64
        x64, w64, b64 = x.double(), w.double(), b.double()
        assert torch.equal(kernels.linear(x64, w64, b64, min_macs=0), F.linear(x64, w64, b64))
        # no rows at all
        assert kernels.linear(x[:0], w, b, min_macs=0).shape == (0, 128)
    assert conv_calls == []


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(32, 64)
        self.attn = nn.MultiheadAttention(64, 4, batch_first=True)
        self.body = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64, bias=False))
        self.head = nn.Linear(64, 32)
        self.tied = nn.Linear(64, 32)
        self.tied.weight = self.head.weight  # tied parameters must stay tied

    def forward(self, x):
        h = self.inp(x)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.head(self.body(h))


def _net():
    torch.manual_seed(0)
    return _Net().eval()


def test_use_onednn_linears_swaps_plain_linears_and_keeps_parameters(conv_calls):
    net = _net()
    before = {k: v.data_ptr() for k, v in net.state_dict().items()}
    x = _rand(3, 20, 32, seed=10)
    with torch.no_grad():
        expected = net(x)
    assert kernels.use_onednn_linears(net) == 5  # inp, body.0, body.2, head, tied (not out_proj)
    assert type(net.attn.out_proj) is not kernels.OneDNNLinear
    assert isinstance(net.body[0], kernels.OneDNNLinear) and net.body[2].bias is None
    assert {k: v.data_ptr() for k, v in net.state_dict().items()} == before
    assert net.tied.weight is net.head.weight
    assert kernels.use_onednn_linears(net) == 0  # idempotent
    with torch.no_grad():
        got = net(x)
    assert len(conv_calls) > 0
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # autograd on: the swapped model is the original model, bit for bit, and trains
    got = net(x)
    assert torch.equal(got, _net()(x))
    got.sum().backward()
    assert net.inp.weight.grad is not None


def test_filo_towers_take_the_onednn_route_only_when_switched_on(monkeypatch):
    torch.manual_seed(0)
    model = FiLo(FiLoConfig.tiny()).eval()
    ref = FiLo(FiLoConfig.tiny(), options=InferenceOptions(onednn_linear=False)).eval()
    ref.load_state_dict(model.state_dict())
    taken = []
    real = kernels.linear

    def spy(x, w, b=None, **kw):
        taken.append(kernels.onednn_applies(x, w, b))
        return real(x, w, b, **kw)

    monkeypatch.setattr(kernels, "linear", spy)
    images = _rand(2, 3, 32, 32, seed=11)
    out = model.predict(images, ["bottle", "wood"], ["center", None])
    n_fast = len(taken)
    # 4 vision blocks x (qkv, out_proj ori, mlp x 2) + vv out_projs + text blocks: dozens of calls
    assert n_fast > 20 and sum(taken) > 20
    base = ref.predict(images, ["bottle", "wood"], ["center", None])
    assert len(taken) == n_fast  # onednn_linear=False never calls filo.kernels.linear
    torch.testing.assert_close(out.anomaly_map, base.anomaly_map, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.image_score, base.image_score, atol=1e-5, rtol=0)
