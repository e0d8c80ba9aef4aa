"""Training: losses vs hand-computed values, mosaics, learning on generated data, resume, CLI."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from filo.checkpoint import build_filo_from_checkpoint, load_filo_checkpoint
from filo.data import EvalDataset, collate, flatten, load_split
from filo.data.synthetic import make_mvtec_like
from filo.data.transforms import clip_tensor, decode_image, load_mask, mask_tensor
from filo.errors import FiloError
from filo.metrics import pixel_auroc
from filo.training import (
    TrainDataset,
    Trainer,
    TrainSettings,
    adapter_loss,
    build_training_model,
    dice_loss,
    epoch_plan,
    focal_loss,
    mosaic_2x2,
    segmentation_loss,
    stage1_forward,
    stage2_cosines,
)
from filo.training.trainer import epoch_generator, load_prompts

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

CLASSES = ("carpet", "wood")  # real MVTec names: the bundled prompt table has them


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model is far faster on one thread on a shared 2-core machine (no spin-waits)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_data")
    make_mvtec_like(root, classes=CLASSES, n_train_good=1, n_test_good=4, n_test_defect=8,
                    size=64, seed=0)
    return root


@pytest.fixture(scope="module")
def heldout_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("heldout_data")
    make_mvtec_like(root, classes=CLASSES, n_train_good=1, n_test_good=2, n_test_defect=6,
                    size=64, seed=7)
    return root


def tiny_settings(data_root, save_dir, **kw) -> TrainSettings:
    base = dict(dataset="mvtec", data_path=data_root, save_dir=save_dir, model_config="tiny",
                epochs=1, adapter_epochs=0, batch_size=2, progress=False, seed=0)
    base.update(kw)
    return TrainSettings(**base)


# ------------------------------------------------------------------------------------------
# losses: slow scalar reference implementations written from the definitions
# ------------------------------------------------------------------------------------------

def focal_by_hand(p_norm: float, p_abn: float, label: int, gamma=2.0, s=1e-5) -> float:
    q = (1 - s, s) if label == 0 else (s, 1 - s)  # one-hot clamped to [s, 1 - s]
    pt = q[0] * p_norm + q[1] * p_abn + s
    return -((1 - pt) ** gamma) * math.log(pt)


def dice_by_hand(pred: list[float], target: list[float]) -> float:
    inter = sum(a * b for a, b in zip(pred, target, strict=True))
    return 1 - (2 * inter + 1) / (sum(pred) + sum(target) + 1)


def test_focal_loss_matches_hand_values():
    # pixel 0: normal, p = (0.8, 0.2); pixel 1: abnormal, p = (0.3, 0.7); pixel 2: abnormal, (0.9, 0.1)
    probs = torch.tensor([[[[0.8, 0.3, 0.9]], [[0.2, 0.7, 0.1]]]], dtype=torch.float64)
    target = torch.tensor([[[0, 1, 1]]])
    expected = (focal_by_hand(0.8, 0.2, 0) + focal_by_hand(0.3, 0.7, 1) + focal_by_hand(0.9, 0.1, 1)) / 3
    assert focal_loss(probs, target).item() == pytest.approx(expected, rel=1e-12)
    # explicit number for the first pixel: pt = 0.8(1-1e-5) + 0.2e-5 + 1e-5 = 0.800004
    pt = 0.800004
    assert focal_by_hand(0.8, 0.2, 0) == pytest.approx(-(0.2 - 4e-6) ** 2 * math.log(pt), rel=1e-9)
    # without smoothing and gamma 0 it is the negative log-likelihood
    nll = -(math.log(0.8) + math.log(0.7) + math.log(0.1)) / 3
    assert focal_loss(probs, target, gamma=0.0, smooth=0.0).item() == pytest.approx(nll, rel=1e-12)
    # a bool/float mask gives the same as integer labels
    assert focal_loss(probs, target.bool()).item() == pytest.approx(expected, rel=1e-12)


def test_dice_is_per_image_not_per_row():
    pred = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.5, 0.5], [0.0, 0.0]]])
    target = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [1.0, 1.0]]])
    # per image: dice_0 = (2*1+1)/(1+1+1) = 1; dice_1 = (0+1)/(1+2+1) = 0.25 -> 1 - 0.625
    assert dice_loss(pred, target).item() == pytest.approx(0.375)
    assert dice_loss(pred, target).item() == pytest.approx(
        (dice_by_hand([1, 0, 0, 0], [1, 0, 0, 0]) + dice_by_hand([0.5, 0.5, 0, 0], [0, 0, 1, 1])) / 2)
    # the research code (batch 1, mask squeezed to [H, W]) averaged a dice per ROW instead:
    # image 1 rows: (0+1)/(1+0+1) = 0.5 and (0+1)/(0+2+1) = 1/3 -> loss 0.5833, not 0.75
    per_row_img1 = 1 - (0.5 + 1 / 3) / 2
    assert dice_loss(pred[1:], target[1:]).item() == pytest.approx(0.75)
    assert dice_loss(pred[1:], target[1:]).item() != pytest.approx(per_row_img1)


def test_segmentation_loss_matches_slow_reference():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 2, 4, 5, generator=g, dtype=torch.float64)
    probs = torch.softmax(logits, dim=2)
    gt = torch.rand(2, 4, 5, generator=g) > 0.6
    expected = 0.0
    for k in range(3):
        focal = [focal_by_hand(probs[b, k, 0, i, j].item(), probs[b, k, 1, i, j].item(),
                               int(gt[b, i, j])) for b in range(2) for i in range(4) for j in range(5)]
        expected += sum(focal) / len(focal)
        for ch, tgt in ((1, gt.double()), (0, 1 - gt.double())):
            expected += sum(dice_by_hand(probs[b, k, ch].flatten().tolist(), tgt[b].flatten().tolist())
                            for b in range(2)) / 2
    assert segmentation_loss(probs, gt).item() == pytest.approx(expected, rel=1e-10)


def test_adapter_loss_is_cross_entropy_at_temperature():
    cos = torch.tensor([[0.5, 0.2], [0.1, 0.6]], dtype=torch.float64)
    labels = torch.tensor([1, 1])
    by_hand = 0.0
    for (c0, c1), y in zip(cos.tolist(), labels.tolist(), strict=True):
        z = [c0 / 0.07, c1 / 0.07]
        by_hand += -(z[y] - math.log(math.exp(z[0]) + math.exp(z[1])))
    assert adapter_loss(cos, labels).item() == pytest.approx(by_hand / 2, rel=1e-12)


# ------------------------------------------------------------------------------------------
# mosaic
# ------------------------------------------------------------------------------------------

def test_mosaic_2x2_layout():
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    imgs = [Image.new("RGB", (6, 4), c) for c in colours]
    masks = [np.zeros((4, 6), bool) for _ in range(4)]
    masks[3][1, 2] = True  # only the bottom-right tile has a defect pixel
    img, mask = mosaic_2x2(imgs, masks)
    arr = np.asarray(img)
    assert img.size == (12, 8) and mask.shape == (8, 12)
    assert tuple(arr[0, 0]) == colours[0] and tuple(arr[0, 11]) == colours[1]
    assert tuple(arr[7, 0]) == colours[2] and tuple(arr[7, 11]) == colours[3]
    assert mask.sum() == 1 and mask[4 + 1, 6 + 2]
    gray = mosaic_2x2([im.convert("L") for im in imgs], masks)[0]
    assert gray.mode == "L"  # resized first, made RGB by the CLIP transform


def test_mosaic_item_label_and_mask(data_root):
    samples = flatten(load_split(data_root, "mvtec", "test"))
    normal = [i for i, s in enumerate(samples) if s.cls_name == "carpet" and not s.anomaly]
    abnormal = [i for i, s in enumerate(samples) if s.cls_name == "carpet" and s.anomaly]
    one_bad = (normal[0], normal[1], abnormal[0], normal[2])  # anomaly in the bottom-left tile
    ds = TrainDataset(samples, data_root, 32, [one_bad, tuple(normal[:4]), (abnormal[1],)])
    item = ds[0]
    assert item["mosaic"] and item["label"] == 1  # the research code would have kept label 0
    tiles = [samples[i] for i in one_bad]
    tile_masks = [load_mask(data_root / t.mask_path) if t.anomaly
                  else np.zeros((64, 64), bool) for t in tiles]
    expected_mask = np.block([[tile_masks[0], tile_masks[1]], [tile_masks[2], tile_masks[3]]])
    assert expected_mask[64:, :64].any() and not expected_mask[:64].any()
    assert torch.equal(item["mask"], mask_tensor(expected_mask, 32))
    rows = [np.hstack([np.asarray(decode_image(data_root / tiles[2 * r + c].img_path))
                       for c in range(2)]) for r in range(2)]
    assert torch.equal(item["image"], clip_tensor(Image.fromarray(np.vstack(rows)), 32))
    assert ds[1]["label"] == 0 and not ds[1]["mask"].any()
    assert ds[2]["label"] == 1 and not ds[2]["mosaic"]


def test_epoch_plan_deterministic_same_class(data_root):
    samples = flatten(load_split(data_root, "mvtec", "test"))
    a = epoch_plan(samples, epoch_generator(5, 1, 0), 0.5)
    assert a == epoch_plan(samples, epoch_generator(5, 1, 0), 0.5)
    assert a != epoch_plan(samples, epoch_generator(5, 1, 1), 0.5)
    assert sorted(e[0] for e in epoch_plan(samples, epoch_generator(5, 1, 0), 0.0)) == \
        list(range(len(samples)))
    mosaics = [e for e in a if len(e) == 4]
    assert 0 < len(mosaics) < len(a)
    for e in mosaics:
        assert len({samples[i].cls_name for i in e}) == 1
    assert all(len(e) == 4 for e in epoch_plan(samples, epoch_generator(5, 1, 0), 1.0))


# ------------------------------------------------------------------------------------------
# model pieces agree with the model's own forward
# ------------------------------------------------------------------------------------------

def test_stage_forwards_match_model_forward(data_root, tmp_path):
    settings = tiny_settings(data_root, tmp_path).resolved()
    model = build_training_model(settings, load_prompts(settings)).eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    names = ["carpet", "wood"]
    with torch.no_grad():
        cos = stage2_cosines(model, images, names)
        out = model(images, names)  # use_adapter=True, research score: text_score = cos[:, 1]
        torch.testing.assert_close(cos[:, 1], out.text_score)
        model.config.use_adapter = False
        ref = model(images, names).tap_probs
        torch.testing.assert_close(stage1_forward(model, images, names), ref)


# ------------------------------------------------------------------------------------------
# training on generated data
# ------------------------------------------------------------------------------------------

def _heldout_auroc(model, root) -> float:
    ds = EvalDataset(flatten(load_split(root, "mvtec", "test")), root, image_size=32)
    batch = collate([ds[i] for i in range(len(ds))])
    out = model.predict(batch.images, batch.cls_names)
    return pixel_auroc(batch.masks.numpy(), out.anomaly_map.numpy())


def test_training_lowers_loss_and_improves_heldout_auroc(data_root, heldout_root, tmp_path):
    settings = tiny_settings(data_root, tmp_path, epochs=4, adapter_epochs=1, mosaic_prob=0.2)
    trainer = Trainer(settings)
    before = _heldout_auroc(build_training_model(trainer.settings, trainer.prompts), heldout_root)
    result = trainer.run()
    stage1 = [r for r in result.history if r.stage == 1]
    assert [r.epoch for r in stage1] == [1, 2, 3, 4] and sum(r.steps for r in stage1) == 48
    assert stage1[-1].loss < 0.7 * stage1[0].loss
    after = _heldout_auroc(trainer.model, heldout_root)
    print(f"stage-1 loss per epoch {[round(r.loss, 3) for r in stage1]}; "
          f"held-out pixel AUROC {before:.3f} -> {after:.3f}")
    assert after > before + 0.05
    # the file loads through the evaluation path with every key matched
    fresh = build_training_model(trainer.settings, trainer.prompts)
    report = load_filo_checkpoint(result.checkpoint, fresh)
    assert report.clean, report.summary()
    trained = trainer.model.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in fresh.state_dict().items())
    rebuilt = build_filo_from_checkpoint(result.checkpoint, prompts=trainer.prompts, device="cpu")
    assert _heldout_auroc(rebuilt, heldout_root) == pytest.approx(after)
    obj = torch.load(result.checkpoint, map_location="cpu", weights_only=True)
    assert set(obj) <= {"filo", "filo_config"} and "decoder_cov.fc_77.0.weight" in obj["filo"]
    assert result.log_path.is_file() and '"history"' in result.log_path.read_text()


def test_resume_after_epoch_one_is_bit_identical(data_root, tmp_path):
    from filo.cli.train import main

    common = ["--dataset", "mvtec", "--data_path", str(data_root), "--model_config", "tiny",
              "--classes", "carpet", "--batch_size", "3", "--mosaic_prob", "0.5", "--seed", "4",
              "--num_workers", "0", "--no_progress"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(common + ["--save_dir", str(full), "--epochs", "2", "--adapter_epochs", "1"]) == 0
    assert main(common + ["--save_dir", str(part), "--epochs", "1", "--adapter_epochs", "0"]) == 0
    assert main(common + ["--save_dir", str(part), "--epochs", "2", "--adapter_epochs", "1",
                          "--resume"]) == 0
    a = torch.load(full / "filo_train_on_mvtec.pth", map_location="cpu", weights_only=True)["filo"]
    b = torch.load(part / "filo_train_on_mvtec.pth", map_location="cpu", weights_only=True)["filo"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa = torch.load(full / "filo_train_on_mvtec.state.pt", map_location="cpu", weights_only=False)
    sb = torch.load(part / "filo_train_on_mvtec.state.pt", map_location="cpu", weights_only=False)
    assert [r["loss"] for r in sa["history"]] == [r["loss"] for r in sb["history"]]
    assert sb["done"] == {"1": 2, "2": 1}
    # a different data order cannot be resumed silently
    with pytest.raises(SystemExit) as exc:
        main(common[:-5] + ["--seed", "5", "--no_progress", "--save_dir", str(part), "--resume"])
    assert exc.value.code == 2

    # an interruption (Ctrl-C) right after epoch 1 of the full 2 + 1 epoch run, then --resume
    def stop_after_first(record):
        if record.stage == 1 and record.epoch == 1:
            raise KeyboardInterrupt

    cut = tmp_path / "cut"
    kw = dict(epochs=2, adapter_epochs=1, batch_size=3, mosaic_prob=0.5, seed=4,
              classes=["carpet"])
    with pytest.raises(KeyboardInterrupt):
        Trainer(tiny_settings(data_root, cut, **kw), on_epoch=stop_after_first).run()
    Trainer(tiny_settings(data_root, cut, resume=True, **kw)).run()
    c = torch.load(cut / "filo_train_on_mvtec.pth", map_location="cpu", weights_only=True)["filo"]
    assert all(torch.equal(a[k], c[k]) for k in a)


# ------------------------------------------------------------------------------------------
# CLI errors
# ------------------------------------------------------------------------------------------

def _one_line_error(capsys, argv) -> str:
    from filo.cli.train import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_cli_errors_are_one_line(capsys, tmp_path, data_root, monkeypatch):
    monkeypatch.delenv("MVTEC_ROOT", raising=False)
    missing = tmp_path / "no_such_dataset"
    err = _one_line_error(capsys, ["--dataset", "mvtec", "--data_path", str(missing),
                                   "--model_config", "tiny"])
    assert str(missing) in err and "--data_path" in err
    err = _one_line_error(capsys, ["--dataset", "mvtec", "--model_config", "tiny"])
    assert "--data_path" in err and "MVTEC_ROOT" in err
    weights = tmp_path / "ViT-L-14-336px.pt"
    err = _one_line_error(capsys, ["--dataset", "mvtec", "--data_path", str(data_root),
                                   "--clip_weights", str(weights)])
    assert str(weights) in err and "download" in err
    err = _one_line_error(capsys, ["--dataset", "mvtec", "--data_path", str(data_root),
                                   "--model_config", "tiny", "--save_dir", str(tmp_path / "x"),
                                   "--resume"])
    assert "filo_train_on_mvtec.state.pt" in err
    err = _one_line_error(capsys, ["--dataset", "folder", "--data_path", str(data_root),
                                   "--model_config", "tiny", "--save_dir", str(tmp_path / "y"),
                                   "--prompts", str(tmp_path / "nope.yaml")])
    assert "nope.yaml" in err


def test_clip_activation_follows_the_research_rule_and_is_recorded(data_root, tmp_path):
    from filo.checkpoint import save_filo_checkpoint
    from filo.training import build_model_config

    # ViT-L-14-336 from OpenAI weights: exact GELU unless 336 px (as the released checkpoints)
    assert build_model_config("vit-l-14-336", 518).clip.act == "gelu"
    assert build_model_config("vit-l-14-336", 336).clip.act == "quick_gelu"
    assert build_model_config("vit-l-14-336", 518, clip_act="quick_gelu").clip.act == "quick_gelu"
    assert tiny_settings(data_root, tmp_path).resolved().clip_act == "quick_gelu"
    settings = tiny_settings(data_root, tmp_path, clip_act="gelu").resolved()
    model = build_training_model(settings, load_prompts(settings))
    assert all(isinstance(b.mlp.gelu, torch.nn.GELU) for b in model.clip_model.visual.transformer.resblocks)
    path = save_filo_checkpoint(tmp_path / "trained.pth", model)
    assert build_filo_from_checkpoint(path, device="cpu").config.clip.act == "gelu"
    with pytest.raises(FiloError, match="--clip_act"):
        tiny_settings(data_root, tmp_path, clip_act="relu").validate()
