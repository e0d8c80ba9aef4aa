"""Gather-based deformable attention == transformers' MultiScaleDeformableAttention."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from filo.detector.deform_attn import (
    GatherDeformableAttention,
    gather_deformable_attention,
    use_gather_deformable_attention,
)

hf = pytest.importorskip("transformers.models.grounding_dino.modeling_grounding_dino")
HFAttention = getattr(hf, "MultiScaleDeformableAttention", None)
pytestmark = pytest.mark.skipif(HFAttention is None or not isinstance(HFAttention, type),
                                reason="this transformers has no deformable-attention module")

SHAPES = [(9, 11), (5, 6), (3, 3), (2, 1)]  # non-square levels, a 2x1 level


def _inputs(batch=2, queries=37, heads=4, channels=8, points=3, seed=0, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    levels = len(SHAPES)
    s = sum(h * w for h, w in SHAPES)
    value = torch.randn(batch, s, heads, channels, generator=g)
    # locations also outside [0, 1] (zero padding) and exactly on borders
    loc = torch.rand(batch, queries, heads, levels, points, 2, generator=g)
    loc = loc * (1 + 2 * spread) - spread
    loc[0, 0, 0, :, 0] = 0.0
    loc[0, -1, 0, :, 0] = 1.0
    weights = torch.softmax(torch.randn(batch, queries, heads, levels * points, generator=g), -1)
    weights = weights.view(batch, queries, heads, levels, points)
    shapes_t = torch.tensor(SHAPES)
    areas = shapes_t[:, 0] * shapes_t[:, 1]
    start = torch.cat([torch.zeros(1, dtype=torch.long), areas.cumsum(0)[:-1]])
    return value, shapes_t, SHAPES, start, loc, weights


@pytest.mark.parametrize("seed, spread", [(0, 0.3), (1, 0.0), (2, 1.5)])
def test_gather_equals_transformers_module(seed, spread):
    args = _inputs(seed=seed, spread=spread)
    with torch.no_grad():
        expected = HFAttention()(*args, 64)
        got = GatherDeformableAttention(HFAttention())(*args, 64)
    assert got.shape == expected.shape == (2, 37, 4 * 8)
    assert expected.abs().max() > 0.1  # not all zeros: the comparison can fail
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=1e-5)


def test_second_implementation_by_hand_one_query():
    """A hand-written bilinear sample for one query/head, independent of both implementations."""
    value, _, shapes, start, loc, weights = _inputs(batch=1, queries=1, heads=1, channels=3,
                                                     points=2, seed=3)
    got = gather_deformable_attention(value, shapes, loc, weights)[0, 0]
    expected = torch.zeros(3, dtype=torch.float64)
    for lvl, (h, w) in enumerate(shapes):
        grid = value[0, int(start[lvl]):int(start[lvl]) + h * w, 0].double().view(h, w, 3)
        for p in range(2):
            x = float(loc[0, 0, 0, lvl, p, 0]) * w - 0.5  # pixel centres at i + 0.5
            y = float(loc[0, 0, 0, lvl, p, 1]) * h - 0.5
            x0, y0 = int(torch.floor(torch.tensor(x))), int(torch.floor(torch.tensor(y)))
            for xi, yi in ((x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)):
                if 0 <= xi < w and 0 <= yi < h:
                    wb = (1 - abs(x - xi)) * (1 - abs(y - yi))
                    expected += float(weights[0, 0, 0, lvl, p]) * wb * grid[yi, xi]
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


def test_other_dtypes_run_the_replaced_module():
    args = list(_inputs(seed=4))
    for i in (0, 4, 5):
        args[i] = args[i].double()
    module = HFAttention()
    with torch.no_grad():
        assert torch.equal(GatherDeformableAttention(module)(*args, 64), module(*args, 64))


def test_swap_in_a_model_keeps_state_dict():
    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.attn = HFAttention()

    model = nn.Sequential(Layer(), Layer())
    keys = list(model.state_dict())
    assert use_gather_deformable_attention(model) == 2
    assert all(isinstance(layer.attn, GatherDeformableAttention) for layer in model)
    assert list(model.state_dict()) == keys
    assert use_gather_deformable_attention(model) == 0
