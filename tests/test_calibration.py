"""Calibration (docs/design.md section 13.2): which images calibrate, leave-one-out scores, the
standard-deviation floor, the non-saturating squash, and the original's coreset random numbers.
Expectations are hand-computed values or brute force written out here."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch

from filo.calibration import floored_std, image_statistics, pixel_statistics, squash, zscore
from filo.data.records import Sample
from filo.memory.config import MemoryConfig


class PixelEmbedder:
    """Patch feature = the pixel's RGB: an image of H x W pixels is an H x W patch grid."""

    device = torch.device("cpu")

    def __init__(self, cfg):
        self.cfg = cfg

    def preprocess(self, img):
        return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)

    def embed(self, x, out=None):
        rows = x.permute(0, 2, 3, 1).reshape(-1, 3)
        if out is not None:
            out.copy_(rows)
            rows = out
        return rows, (x.shape[2], x.shape[3])


def test_image_statistics_match_hand_computed_values():
    st = image_statistics([1.0, 2.0, 3.0, 6.0], 0.5)
    assert st["n_images"] == 4 and st["image_mean"] == pytest.approx(3.0)
    # population std: sqrt((4 + 1 + 0 + 9) / 4)
    assert st["image_std"] == pytest.approx(np.sqrt(3.5)) == st["image_std_measured"]
    assert st["image_threshold"] == pytest.approx(2.5)  # median of 1, 2, 3, 6
    assert image_statistics([], 0.99) == {"n_images": 0}


def test_a_zero_std_is_floored_with_a_warning_naming_the_class(caplog):
    with caplog.at_level(logging.WARNING, logger="filo.calibration"):
        st = image_statistics([40.0, 40.0], 0.99, "obj_e")
    assert st["image_std_measured"] == 0.0
    assert st["image_std"] == pytest.approx(0.05 * 40.0)  # the floor: 5 % of |mean|
    assert any("obj_e" in r.getMessage() and "floor" in r.getMessage() for r in caplog.records)
    px = pixel_statistics(np.zeros((2, 4, 4)), 0.999, "obj_e", 2)
    assert px["pixel_std"] == pytest.approx(1e-6) and px["pixel_threshold"] == 0.0
    # records without the floor (older banks) are floored when used
    assert zscore(44.0, {"image_mean": 40.0, "image_std": 0.0}, "image") == pytest.approx(2.0)
    assert floored_std(-10.0, 3.0) == 3.0


def test_squash_is_monotonic_never_overflows_and_keeps_large_scores_apart():
    assert squash(0.0) == 0.5 and squash(1.0) == pytest.approx(0.75)
    assert squash(-3.0) == pytest.approx(0.125)  # 1/2 - 3 / (2 * 4)
    z = np.array([-1e300, -50.0, 0.0, 40.0, 1e3, 1e6, 1e300])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an overflow in exp would be a RuntimeWarning
        s = squash(z)
    assert np.all(np.diff(s) > 0) and np.all((s >= 0) & (s <= 1))
    assert len(set(s[1:-1].tolist())) == 5 and s[3] < 1.0 and s[5] < 1.0  # not saturated


def _samples(n: int) -> list[Sample]:
    return [Sample(f"c/train/good/{i:03d}.png", "", "c", "good", 0) for i in range(n)]


@pytest.mark.parametrize("n,fraction,bank,held", [
    (4, 0.0, 4, None),   # default: the paper's bank, leave-one-out
    (4, 0.1, 4, None),   # 10 % of 4 would hold out 1 image (< 3): leave-one-out instead
    (10, 0.2, 10, None),  # 2 images (< 3): leave-one-out
    (6, 0.5, 3, 3),      # 3 held out: a real hold-out
])
def test_choose_images_holds_out_only_three_or_more(n, fraction, bank, held):
    from filo.memory.build import choose_images

    b, c = choose_images(_samples(n), MemoryConfig(calib_fraction=fraction), "c")
    assert len(b) == bank and (c is None if held is None else len(c) == held)
    if c is not None:
        assert not {s.img_path for s in b} & {s.img_path for s in c}


def test_leave_one_out_scores_each_image_against_the_other_images_rows():
    """Brute force: image i's patch score = min over bank rows NOT from image i of the squared
    distance; image score = max over its patches."""
    from filo.memory.build import leave_one_out

    rng = np.random.default_rng(3)
    feats = torch.from_numpy(rng.normal(size=(4, 6, 5)).astype(np.float32))  # 4 images, 2x3 grid
    cfg = MemoryConfig(imagesize=8, nn_backend="torch")
    for bank_idx in (torch.arange(24), torch.tensor([0, 5, 7, 8, 13, 20, 23])):
        res = leave_one_out(feats, bank_idx, (2, 3), cfg)
        flat = feats.reshape(-1, 5).numpy().astype(np.float64)
        for i in range(4):
            rows = [int(j) for j in bank_idx if int(j) // 6 != i]
            d2 = ((flat[i * 6:(i + 1) * 6, None] - flat[rows][None]) ** 2).sum(-1).min(1)
            assert res.scores[i] == pytest.approx(d2.max(), rel=1e-5)
        assert res.maps.shape == (4, 8, 8)
    st = image_statistics(res.scores, 0.99)
    assert st["image_std"] > 0


def test_a_four_image_class_keeps_every_patch_and_calibrates_with_spread(tmp_path):
    """build_class_bank with default settings on 4 train images: all 4 x P rows in the bank, 4
    leave-one-out calibration scores with std > 0 equal to the brute-force ones."""
    from PIL import Image

    from filo.memory.build import build_class_bank

    rng = np.random.default_rng(0)
    samples = _samples(4)
    for s in samples:
        (tmp_path / s.img_path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)).save(tmp_path / s.img_path)

    cfg = MemoryConfig(coreset=1.0, imagesize=4, nn_backend="torch")
    bank, meta = build_class_bank(tmp_path, "c", samples, cfg, PixelEmbedder(cfg))
    assert bank.shape == (4 * 16, 3) and meta["n_images"] == 4
    cal = meta["calibration"]
    assert cal["n_images"] == 4 and "leave-one-out" in cal["method"] and cal["image_std"] > 0
    px = np.stack([np.asarray(Image.open(tmp_path / s.img_path), np.float64).reshape(-1, 3) / 255
                   for s in samples])
    want = [((px[i][:, None] - np.concatenate([px[j] for j in range(4) if j != i])[None]) ** 2
             ).sum(-1).min(1).max() for i in range(4)]
    np.testing.assert_allclose(cal["image_scores"], want, rtol=1e-5)
    assert cal["image_std"] == pytest.approx(np.std(want), rel=1e-5)


def test_calib_dir_images_are_scored_against_the_whole_bank(tmp_path):
    from PIL import Image

    from filo.errors import FiloError
    from filo.memory.build import build_class_bank

    rng = np.random.default_rng(1)
    samples = _samples(3)
    for s in samples:
        (tmp_path / s.img_path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (2, 2, 3), dtype=np.uint8)).save(tmp_path / s.img_path)
    cal_dir = tmp_path / "normal" / "c"
    cal_dir.mkdir(parents=True)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (2, 2, 3), dtype=np.uint8)).save(cal_dir / f"{i}.png")

    cfg = MemoryConfig(coreset=1.0, imagesize=2, nn_backend="torch",
                       calib_dir=tmp_path / "normal")
    with pytest.raises(FiloError, match="holds 2 image"):  # fewer than 3: one clear line
        build_class_bank(tmp_path, "c", samples, cfg, PixelEmbedder(cfg))
    Image.fromarray(rng.integers(0, 255, (2, 2, 3), dtype=np.uint8)).save(cal_dir / "2.png")
    bank, meta = build_class_bank(tmp_path, "c", samples, cfg, PixelEmbedder(cfg))
    assert bank.shape == (3 * 4, 3) and meta["n_images"] == 3  # every train image in the bank
    cal = meta["calibration"]
    assert cal["n_images"] == 3 and "--calib_dir" in cal["method"]
    bank64 = bank.astype(np.float64)
    for f, got in zip(sorted(cal_dir.glob("*.png")), cal["image_scores"], strict=True):
        q = np.asarray(Image.open(f), np.float64).reshape(-1, 3) / 255
        assert got == pytest.approx(((q[:, None] - bank64[None]) ** 2).sum(-1).min(1).max(),
                                    rel=1e-5)


def test_original_draws_replay_the_original_runs_random_numbers(monkeypatch):
    """The original's steps written out: seed everything, build the backbone, iterate a data
    loader once, create nn.Linear(D, 128, bias=False), np.random.choice the start points. (A
    ResNet-18 stands in for the WideResNet here, on both sides: same sequence, faster.)"""
    import torchvision

    from filo.memory import original_rng
    from filo.memory.original_rng import original_draws

    monkeypatch.setattr(torchvision.models, "wide_resnet50_2", torchvision.models.resnet18)
    original_rng._projection_state.cache_clear()

    n, d, seed = 50, 24, 3
    np_state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        np.random.seed(seed)
        torch.manual_seed(seed)
        torchvision.models.wide_resnet50_2(weights=None)
        for _ in torch.utils.data.DataLoader(list(range(4)), batch_size=2):
            pass
        want_w = torch.nn.Linear(d, 128, bias=False).weight.detach().clone()
        want_s = np.random.choice(n, 10, replace=False)
    np.random.set_state(np_state)
    before = torch.get_rng_state()
    w, starts = original_draws(seed, n, d)
    assert torch.equal(torch.get_rng_state(), before)  # nothing global changed
    torch.testing.assert_close(w, want_w, rtol=0, atol=0)
    assert starts.tolist() == want_s.tolist()
    original_rng._projection_state.cache_clear()  # (the stand-in's state must not stay cached)
