"""FiLo forward: batching, maps and scores, blur semantics, config presets."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.functional import gaussian_blur as tv_gaussian_blur

from filo.errors import FiloError
from filo.model import FiLo, FiLoConfig, InferenceOptions, build_filo, gaussian_blur


@pytest.fixture(scope="module")
def model(perturbed_tiny_filo):
    return perturbed_tiny_filo


def _images(n, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_batched_equals_per_image(model):
    images = _images(3)
    classes = ["bottle", "pcb2", "macaroni1"]
    positions = ["center", None, "top right"]
    with torch.no_grad():
        batch = model(images, classes, positions)
        for i in range(3):
            single = model(images[i:i + 1], classes[i:i + 1], positions[i:i + 1])
            for name in ("tap_probs", "anomaly_map", "image_score", "text_score"):
                torch.testing.assert_close(getattr(batch, name)[i], getattr(single, name)[0],
                                           atol=1e-5, rtol=1e-5)
    assert batch.tap_probs.shape == (3, 7, 2, 32, 32)
    assert batch.anomaly_map.shape == (3, 32, 32)
    assert batch.image_score.shape == batch.text_score.shape == (3,)


def test_maps_and_scores_follow_the_reference(model):
    images = _images(2, seed=2)
    with torch.no_grad():
        out = model(images, ["bottle", "wood"], None)
        feats, img = model.image_features(images)
        text = model.text_features(img, ["bottle", "wood"], [None, None])
    probs = out.tap_probs
    torch.testing.assert_close(probs.sum(dim=2), torch.ones(2, 7, 32, 32))
    # corner pixels of an align_corners=True upsample are the corner patches: softmax(100 f.T)
    f = model.decoder_linear.fc[1](feats.linear_taps[1][:, 1:])
    logits = 100 * F.normalize(f, dim=-1) @ text.transpose(1, 2)  # [B, 16, 2]
    torch.testing.assert_close(probs[:, 1, :, 0, 0], torch.softmax(logits[:, 0], dim=-1))
    torch.testing.assert_close(probs[:, 1, :, -1, -1], torch.softmax(logits[:, -1], dim=-1))
    # final map: mean over taps of torchvision-blurred p_abn
    blurred = torch.stack([tv_gaussian_blur(probs[:, k, 1], [3, 3], [4.0, 4.0]) for k in range(7)], 1)
    torch.testing.assert_close(out.anomaly_map, blurred.mean(1), atol=1e-6, rtol=1e-5)
    # text score: cosine of the adapted, normalized class token with T[1]
    torch.testing.assert_close(out.text_score, (img * text[:, 1]).sum(-1))
    expected = (out.text_score + out.anomaly_map.amax(dim=(1, 2))) / 2
    torch.testing.assert_close(out.image_score, expected)
    # |t| <= 1/sqrt(2) because T rows have norm 1/sqrt(2)
    assert torch.all(out.text_score.abs() <= 2 ** -0.5 + 1e-6)


def test_gaussian_blur_equals_torchvision():
    x = torch.rand(2, 5, 9, 11, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(gaussian_blur(x, 3, 4.0), tv_gaussian_blur(x, [3, 3], [4.0, 4.0]))
    torch.testing.assert_close(gaussian_blur(x, 5, 1.5), tv_gaussian_blur(x, [5, 5], [1.5, 1.5]))


def test_softmax_score_mode_and_predict(model):
    images = _images(2, seed=4)
    soft = FiLo(FiLoConfig.tiny(), options=InferenceOptions(score_mode="softmax"))
    soft.load_state_dict(model.state_dict())
    out = soft.predict(images, ["bottle", "bottle"])
    assert torch.all((out.text_score >= 0) & (out.text_score <= 1))
    assert not out.anomaly_map.requires_grad
    ref = model.predict(images, ["bottle", "bottle"])
    torch.testing.assert_close(out.anomaly_map, ref.anomaly_map)


def test_training_gradients_reach_heads_and_prompts_only(model):
    m = FiLo(FiLoConfig.tiny())
    m.load_state_dict(model.state_dict())
    m.train()
    out = m(_images(1, seed=5), ["bottle"], ["left"])
    (out.tap_probs[:, :, 1].mean() + out.text_score.sum()).backward()
    assert m.decoder_linear.fc[0].weight.grad is not None
    assert m.decoder_cov.fc_77[2].weight.grad is not None
    assert m.normal_prompt_learner.ctx.grad is not None
    assert m.abnormal_prompt_learner.meta_net.linear1.weight.grad is not None
    assert m.clip_model.visual.conv1.weight.grad is None


def test_input_errors(model):
    with pytest.raises(FiloError, match="2 images but 1 class names"):
        model(_images(2), ["bottle"])
    with pytest.raises(FiloError, match="'toaster' is not in prompt file"):
        model(_images(1), ["toaster"])
    with pytest.raises(FiloError, match="position 'middle'"):
        model(_images(1), ["bottle"], ["middle"])
    with pytest.raises(FiloError, match="score_mode"):
        FiLo(FiLoConfig.tiny(), options=InferenceOptions(score_mode="max"))


def test_config_presets_and_round_trip():
    big = FiLoConfig.vit_l_14_336()
    assert (big.clip.vision_layers, big.clip.vision_width, big.image_size) == (24, 1024, 518)
    assert (big.taps.dual_start, big.taps.mid_tap_blocks, big.taps.true_layers) == (
        6, (13, 19), (6, 12, 18, 24))
    tiny = FiLoConfig.tiny(blur_kernel=5)
    assert FiLoConfig.from_dict(tiny.to_dict()) == tiny
    m = build_filo(FiLoConfig.tiny(), device="cpu")
    assert next(m.parameters()).device.type == "cpu"
