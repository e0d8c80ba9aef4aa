"""filo.weights: one reader for weight files (errors, containers, prefixes, position resize),
and every weight file read once per model build."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from filo.backbone import ClipConfig, build_clip, read_clip_state_dict
from filo.checkpoint import build_filo_from_checkpoint, load_filo_checkpoint, read_filo_state_dict
from filo.detector.convert import read_checkpoint
from filo.errors import FiloError
from filo.model import FiLo, FiLoConfig
from filo.weights import (
    clean_state_dict,
    fit_pos_embed,
    read_weights,
    resize_pos_embed,
    unwrap,
)


class Opaque:
    """A pickled Python object: what ``weights_only`` loading refuses."""


# (reader, what its errors call the file, a phrase of its hint)
READERS = [
    (read_filo_state_dict, "FiLo checkpoint", "filo_train_on_mvtec.pth"),
    (read_clip_state_dict, "CLIP weights", "ckpt/ViT-L-14-336px.pt"),
    (read_checkpoint, "GroundingDINO checkpoint", "groundingdino_swint_ogc.pth"),
]


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    good = tmp_path / "good.pth"
    torch.save({"filo": {"decoder_linear.fc.0.weight": torch.randn(64, 64)}}, good)
    data = good.read_bytes()
    files = {
        "text": b"hello world\n",
        "empty": b"",
        "truncated": data[: len(data) // 2],
        "zip_header_only": b"PK\x03\x04 truncated",
        "legacy_pickle_garbage": b"\x80\x02}q\x00.",
    }
    out = {}
    for name, content in files.items():
        out[name] = tmp_path / f"{name}.pth"
        out[name].write_bytes(content)
    out["pickled_object"] = tmp_path / "pickled_object.pth"
    torch.save({"filo": Opaque()}, out["pickled_object"])
    return out


@pytest.mark.parametrize("reader,what,hint", READERS)
def test_every_decode_failure_is_one_filo_error_line(tmp_path, reader, what, hint):
    for kind, path in _bad_files(tmp_path).items():
        with pytest.raises(FiloError) as err:
            reader(path)
        msg = str(err.value)
        assert "\n" not in msg, kind
        assert f"cannot read {what} {path}" in msg, (kind, msg)
        assert "corrupt, truncated" in msg and hint in msg, (kind, msg)


@pytest.mark.parametrize("reader,what,hint", READERS)
def test_missing_file_or_directory(tmp_path, reader, what, hint):
    with pytest.raises(FiloError,
                       match=rf"{what} not found: .*absent\.pth does not exist;.*{hint}"):
        reader(tmp_path / "absent.pth")
    with pytest.raises(FiloError, match=rf"{what} not found: .* is a directory"):
        reader(tmp_path)


def test_read_weights_loads_only_tensors_on_cpu(tmp_path):
    path = tmp_path / "w.pth"
    torch.save({"a": torch.ones(2), "meta": {"n": 3, "names": ["x"]}}, path)
    obj = read_weights(path, what="test weights", hint="fix it")
    assert obj["a"].device.type == "cpu" and obj["meta"] == {"n": 3, "names": ["x"]}


def test_unwrap_and_clean_state_dict():
    sd = {"module.a": 1, "b": 2, "module.module.c": 3, 7: 4}
    assert clean_state_dict(sd) == {"a": 1, "b": 2, "module.c": 3, 7: 4}
    assert unwrap({"state_dict": sd, "model": {}}, ("model", "state_dict")) == ({}, "model")
    assert unwrap({"state_dict": sd}, ("model", "state_dict")) == (sd, "state_dict")
    assert unwrap({"model": "not a dict"}, ("model",)) == ({"model": "not a dict"}, None)
    assert unwrap([1], ("model",)) == ([1], None)


def test_fit_pos_embed_resizes_only_other_grids():
    pos = torch.randn(1 + 9, 8)
    state = {"pos": pos}
    assert not fit_pos_embed(state, "pos", torch.zeros(10, 8), (3, 3))
    assert state["pos"] is pos
    assert not fit_pos_embed(state, "absent", torch.zeros(17, 8), (4, 4))
    assert fit_pos_embed(state, "pos", torch.zeros(17, 8), (4, 4))
    torch.testing.assert_close(state["pos"], resize_pos_embed(pos, 4))
    assert state["pos"].shape == (17, 8)


def test_data_parallel_prefixes_are_stripped_for_every_reader(tmp_path, perturbed_tiny_filo):
    model = perturbed_tiny_filo
    path = tmp_path / "dp.pth"
    torch.save({"filo": {"module." + k: v for k, v in model.state_dict().items()}}, path)
    fresh = FiLo(FiLoConfig.tiny())
    assert load_filo_checkpoint(path, fresh).clean
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())
    clip = tmp_path / "clip.pt"
    torch.save({"state_dict": {"module." + k: v
                               for k, v in build_clip(ClipConfig.tiny()).state_dict().items()}},
               clip)
    assert all(k.startswith(("visual.", "transformer.", "token_embedding", "positional",
                             "ln_final", "text_projection", "logit_scale"))
               for k in read_clip_state_dict(clip))


def test_load_filo_checkpoint_takes_a_state_dict(tmp_path, perturbed_tiny_filo):
    state = perturbed_tiny_filo.state_dict()
    fresh = FiLo(FiLoConfig.tiny())
    report = load_filo_checkpoint(state, fresh)
    assert report.clean and report.path == "<state dict>"
    assert load_filo_checkpoint(state, fresh, source="mine.pth").path == "mine.pth"
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())


# ---- each file read once --------------------------------------------------------------------


@pytest.fixture
def load_counter(monkeypatch):
    """Counts torch.load calls per resolved file path (the only loader of non-TorchScript files)."""
    counts: Counter[str] = Counter()
    real_load = torch.load

    def key(f) -> str:
        return str(Path(f).resolve()) if isinstance(f, (str, Path)) else repr(f)

    def counting_load(f, *args, **kwargs):
        counts[key(f)] += 1
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    return counts


def test_build_filo_from_checkpoint_reads_each_file_once(tmp_filo_files, load_counter):
    ckpt, clip = tmp_filo_files
    model = build_filo_from_checkpoint(ckpt, device="cpu", score_mode="softmax")
    assert load_counter == {str(ckpt.resolve()): 1}
    assert model.options.score_mode == "softmax"
    load_counter.clear()
    build_filo_from_checkpoint(ckpt, device="cpu", clip_weights=clip)
    assert load_counter == {str(ckpt.resolve()): 1, str(clip.resolve()): 1}


@pytest.fixture
def tmp_filo_files(tmp_path, tiny_filo_ckpt):
    """The tiny FiLo checkpoint and a tiny CLIP weight file."""
    clip = tmp_path / "clip_tiny.pt"
    torch.save(build_clip(ClipConfig.tiny()).state_dict(), clip)
    return tiny_filo_ckpt[0], clip


def test_load_detector_reads_the_checkpoint_once(tiny_grounding_ckpt, bert_vocab_dir,
                                                 load_counter):
    from filo.detector.inference import load_detector

    detector = load_detector(tiny_grounding_ckpt, device="cpu", bert_dir=bert_vocab_dir)
    assert load_counter == {str(Path(tiny_grounding_ckpt).resolve()): 1}
    assert detector.model is not None
