"""The optimized inference path gives the research-code-like path's maps and scores (1e-4).

Research-like = batch 1, torch.no_grad, all nine positions' prompts encoded, full 77-token
context, six separate MMCI convolutions, BLAS linears (filo.model.RESEARCH_LIKE_SWITCHES,
InferenceOptions fields).
Optimized = the defaults, batched, FiLo.predict (inference_mode, fused MMCI, subset + truncated
text, oneDNN linears).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from filo.heads import MMCIHeads
from filo.model import (
    RESEARCH_LIKE_SWITCHES,
    FiLo,
    FiLoConfig,
    InferenceOptions,
    fused_mmci_weights,
)

CLASSES = ["bottle", "pcb2", "macaroni1", "bottle", "wood"]
POSITIONS = ["center", None, "top right", "bottom left", "left"]


def _pair():
    torch.manual_seed(0)
    fast = FiLo(FiLoConfig.tiny()).eval()
    with torch.no_grad():
        for p in fast.parameters():
            p.add_(0.05 * torch.randn_like(p))
    slow = FiLo(FiLoConfig.tiny(), options=InferenceOptions(**RESEARCH_LIKE_SWITCHES)).eval()
    slow.load_state_dict(fast.state_dict())
    return fast, slow


@pytest.fixture(scope="module")
def pair():
    return _pair()


def _images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_switches_default_off_and_research_like_on():
    c = InferenceOptions()
    assert (c.encode_all_positions, c.truncate_context, c.fuse_mmci, c.onednn_linear,
            c.autocast) == (False, True, True, True, "none")
    r = InferenceOptions(**RESEARCH_LIKE_SWITCHES)
    assert (r.encode_all_positions, r.truncate_context, r.fuse_mmci, r.onednn_linear) == (
        True, False, False, False)
    assert FiLo(FiLoConfig.tiny(), options=r).options == r


def test_optimized_batch_equals_research_like_per_image(pair):
    fast, slow = pair
    images = _images(len(CLASSES))
    out = fast.predict(images, CLASSES, POSITIONS)
    for i in range(len(CLASSES)):
        with torch.no_grad():
            ref = slow(images[i:i + 1], CLASSES[i:i + 1], POSITIONS[i:i + 1])
        assert (out.anomaly_map[i] - ref.anomaly_map[0]).abs().max() <= 1e-4
        assert (out.tap_probs[i] - ref.tap_probs[0]).abs().max() <= 1e-4
        assert abs(float(out.image_score[i] - ref.image_score[0])) <= 1e-4
        assert abs(float(out.text_score[i] - ref.text_score[0])) <= 1e-4
    # the check can fail: the classes/positions give different maps
    assert (out.anomaly_map[0] - out.anomaly_map[3]).abs().max() > 1e-3
    assert abs(float(out.text_score[0] - out.text_score[3])) > 1e-5


def test_each_switch_alone_keeps_the_result(pair):
    fast, _ = pair
    images = _images(3, seed=2)
    classes, positions = CLASSES[:3], POSITIONS[:3]
    base = fast.predict(images, classes, positions)
    for switch, value in RESEARCH_LIKE_SWITCHES.items():
        m = FiLo(FiLoConfig.tiny(), options=InferenceOptions(**{switch: value})).eval()
        m.load_state_dict(fast.state_dict())
        out = m.predict(images, classes, positions)
        torch.testing.assert_close(out.anomaly_map, base.anomaly_map, atol=1e-5, rtol=0)
        torch.testing.assert_close(out.image_score, base.image_score, atol=1e-5, rtol=0)


def test_all_positions_text_equals_subset(pair):
    fast, _ = pair
    img = F.normalize(torch.randn(3, 32, generator=torch.Generator().manual_seed(3)), dim=-1)
    with torch.no_grad():
        sub = fast.text_features(img, CLASSES[:3], POSITIONS[:3], all_positions=False)
        full = fast.text_features(img, CLASSES[:3], POSITIONS[:3], all_positions=True,
                                  truncate=False)
    torch.testing.assert_close(sub, full, atol=1e-6, rtol=1e-5)


def _slow_mmci(heads: MMCIHeads, tap: torch.Tensor, i: int) -> torch.Tensor:
    """Second implementation: each of the six convolutions on its own, zero padding by hand."""
    patches = tap[:, 1:]
    b, n, c = patches.shape
    side = int(n ** 0.5)
    grid = patches.reshape(b, side, side, c).permute(0, 3, 1, 2)
    total = 0
    for name in ("fc_11", "fc_33", "fc_55", "fc_77", "fc_15", "fc_51"):
        conv = getattr(heads, name)[i]
        kh, kw = conv.kernel_size
        padded = F.pad(grid, (kw // 2, kw // 2, kh // 2, kh // 2))
        total = total + F.conv2d(padded, conv.weight, conv.bias)
    return total.permute(0, 2, 3, 1).reshape(b, n, -1)


def test_fused_mmci_equals_six_convolutions_and_cache_follows_weights(pair):
    fast, _ = pair
    heads = fast.decoder_cov
    g = torch.Generator().manual_seed(4)
    shared = torch.randn(2, 17, 64, generator=g)
    other = torch.randn(2, 17, 64, generator=g)
    taps = [shared, other, shared]  # taps 0 and 2 share their input: one conv for both
    w, b = fused_mmci_weights(heads, [0, 2])
    assert w.shape == (2 * 32, 64, 7, 7) and b.shape == (64,)
    with torch.no_grad():
        got = fast._fused_mmci(taps)
        for i, tap in enumerate(taps):
            torch.testing.assert_close(got[i], _slow_mmci(heads, tap, i), atol=1e-5, rtol=1e-5)
        # a weight change (e.g. loading a checkpoint) must invalidate the fused-weight cache
        heads.fc_33[1].weight.add_(0.5)
        got = fast._fused_mmci(taps)  # (a stale cache would be off by O(1), not float rounding)
        torch.testing.assert_close(got[1], _slow_mmci(heads, other, 1), atol=1e-4, rtol=1e-4)
        heads.fc_33[1].weight.sub_(0.5)


def test_fused_path_not_used_with_autograd(pair):
    fast, _ = pair
    m = FiLo(FiLoConfig.tiny())
    m.load_state_dict(fast.state_dict())
    out = m(_images(1, seed=5), ["bottle"], ["left"])
    out.tap_probs[:, 4:, 1].mean().backward()  # MMCI taps only
    assert m.decoder_cov.fc_51[0].weight.grad is not None


def test_autocast_option_validated_and_close(pair):
    fast, _ = pair
    images = _images(2, seed=6)
    ref = fast.predict(images, CLASSES[:2], POSITIONS[:2])
    low = fast.predict(images, CLASSES[:2], POSITIONS[:2], autocast="bf16")
    assert low.anomaly_map.dtype == torch.float32
    assert (low.anomaly_map - ref.anomaly_map).abs().max() < 0.1  # bf16: close, not exact
    with pytest.raises(Exception, match="autocast"):
        fast.predict(images, CLASSES[:2], POSITIONS[:2], autocast="int8")
