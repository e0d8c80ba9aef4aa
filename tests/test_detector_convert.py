"""Original-layout -> transformers key map on the tiny config: every key accounted for."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from filo.detector.__main__ import main as detector_main
from filo.detector.config import DetectorArch
from filo.detector.convert import (
    HF_FORMAT,
    NAMING_V4,
    NAMING_V5,
    canonical_state_dict,
    convert_state_dict,
    detect_layout,
    hf_only_rule,
    installed_naming,
    read_checkpoint,
    rename_key,
    to_naming,
)
from filo.detector.model import build_model, load_state_dict_checked
from filo.errors import FiloError

FIXTURE_DIR = Path(__file__).parent / "fixtures" / "gdino"


@pytest.fixture(scope="module")
def original_sd():
    spec = importlib.util.spec_from_file_location("gdino_make_fixture",
                                                  FIXTURE_DIR / "make_fixture.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    fx = json.loads((FIXTURE_DIR / "fixture.json").read_text())
    sd = mod.seeded_state_dict(fx["float_keys"], fx["seed"])
    for key, shape in fx["buffer_keys"]:
        sd[key] = torch.zeros(shape, dtype=torch.long)
    # leftovers real checkpoints carry
    sd["label_enc.weight"] = torch.zeros(2001, 256)
    sd["bert.embeddings.position_ids"] = torch.arange(512)[None]
    return sd


@pytest.fixture(scope="module")
def hf_keys():
    return build_model(DetectorArch.tiny()).state_dict()


def _check_against(converted, hf_keys, naming):
    """Renamed for ``naming``, the converted dict fills exactly the model keys minus the
    documented harmless ones, with the right shapes."""
    renamed = to_naming(converted, naming)
    assert len(renamed) == len(converted)
    assert set(renamed) <= set(hf_keys)
    for key, value in renamed.items():
        assert tuple(value.shape) == tuple(hf_keys[key]), key
    return set(hf_keys) - set(renamed)


def test_every_key_accounted_for(original_sd, hf_keys):
    converted, report = convert_state_dict(original_sd)
    assert report.unknown == []
    assert set(report.converted) | set(report.ignored) == set(original_sd)
    assert set(report.ignored) == {k for k in original_sd if "relative_position_index" in k} | {
        "label_enc.weight", "bert.embeddings.position_ids", "bert.pooler.dense.weight",
        "bert.pooler.dense.bias"}
    # every key of the INSTALLED transformers' model filled except the documented harmless ones
    naming = installed_naming(hf_keys)
    shapes = {k: tuple(v.shape) for k, v in hf_keys.items()}
    missing = _check_against(converted, shapes, naming)
    if naming == NAMING_V5:
        assert missing == {"model.backbone.conv_encoder.model.swin.layernorm.weight",
                           "model.backbone.conv_encoder.model.swin.layernorm.bias"}
    else:
        assert missing == {k for k in hf_keys if k.endswith("relative_position_index")}
    assert all(hf_only_rule(k, naming) for k in missing)


def test_v4_names_match_recorded_transformers_4_model(original_sd):
    """The 4.x rename table against the key list recorded from transformers 4.40.2 / 4.57.6."""
    recorded = json.loads((FIXTURE_DIR / "hf_keys_v4.json").read_text())["keys"]
    assert installed_naming(recorded) == NAMING_V4
    converted, _ = convert_state_dict(original_sd)
    missing = _check_against(converted, recorded, NAMING_V4)
    # 4.x keeps the Swin relative_position_index buffers (one per block, 5 blocks in tiny)
    assert len(missing) == 5
    assert all(k.endswith(".attention.self.relative_position_index") for k in missing)
    assert all(hf_only_rule(k, NAMING_V4)[1] == "keep" for k in missing)
    # a few hand-checked renames
    swin = "model.backbone.conv_encoder.model.swin.encoder.layers.2.blocks.1."
    assert rename_key(swin + "attention.q_proj.weight", NAMING_V4) == \
        "model.backbone.conv_encoder.model.encoder.layers.2.blocks.1.attention.self.query.weight"
    assert rename_key(swin + "mlp.fc2.bias", NAMING_V4) == \
        "model.backbone.conv_encoder.model.encoder.layers.2.blocks.1.output.dense.bias"
    assert rename_key("model.backbone.conv_encoder.model.hidden_states_norms.stage2.weight",
                      NAMING_V4) == "model.backbone.conv_encoder.model.hidden_states_norms.stage2.weight"
    assert rename_key("model.text_backbone.encoder.layer.0.output.dense.bias", NAMING_V4) == \
        "model.text_backbone.encoder.layer.0.output.dense.bias"
    # a Swin key no rule knows is not silently passed through
    assert rename_key("model.backbone.conv_encoder.model.swin.something.weight", NAMING_V4) is None


def test_v4_canonical_round_trip():
    """Recorded 4.x keys -> canonical (5.x) names -> back to 4.x: the same keys minus buffers."""
    recorded = json.loads((FIXTURE_DIR / "hf_keys_v4.json").read_text())["keys"]
    fake = {k: torch.zeros(1) for k in recorded}
    canonical = canonical_state_dict(fake)
    assert not any(k.startswith("model.backbone.conv_encoder.model.embeddings") for k in canonical)
    assert all(".swin." in k for k in canonical if k.startswith("model.backbone.conv_encoder"
                                                                 ".model.") and "norms" not in k)
    back = to_naming(canonical, NAMING_V4)
    assert set(back) == {k for k in recorded if not k.endswith("relative_position_index")}


def test_v4_rename_tables_are_inverses(original_sd):
    """V4_RENAMES and the inverse generated from the same pairs: canonical -> 4.x -> canonical
    is the identity on every converted key, and keys outside the Swin keep their names."""
    converted, _ = convert_state_dict(original_sd)
    v4 = to_naming(converted, NAMING_V4)
    assert sum(k != rename_key(k, NAMING_V4) for k in converted) > 0  # not vacuous
    assert canonical_state_dict(v4) == converted
    swin_v4 = "model.backbone.conv_encoder.model.encoder.layers.0.blocks.0."
    assert canonical_state_dict({**v4, swin_v4 + "attention.self.relative_position_index":
                                 torch.zeros(1)}) == converted  # 4.x-only buffer dropped
    with pytest.raises(FiloError, match="no canonical name"):
        canonical_state_dict({**v4, swin_v4 + "unknown.weight": torch.zeros(1)})


def test_canonical_of_installed_model_matches_converted(original_sd, hf_keys):
    converted, _ = convert_state_dict(original_sd)
    canonical = canonical_state_dict(dict(hf_keys))
    assert set(converted) <= set(canonical)
    v5_only = {"model.backbone.conv_encoder.model.swin.layernorm.weight",
               "model.backbone.conv_encoder.model.swin.layernorm.bias"}
    expected = v5_only if installed_naming(hf_keys) == NAMING_V5 else set()
    assert set(canonical) - set(converted) == expected


def test_unknown_naming_rejected():
    with pytest.raises(FiloError, match="transformers .*not known"):
        installed_naming(["model.foo.weight"])


def test_specific_mappings(original_sd):
    converted, _ = convert_state_dict(original_sd)
    qkv = original_sd["backbone.0.layers.1.blocks.0.attn.qkv.weight"]  # [3*64, 64]
    base = "model.backbone.conv_encoder.model.swin.encoder.layers.1.blocks.0.attention."
    assert torch.equal(converted[base + "q_proj.weight"], qkv[:64])
    assert torch.equal(converted[base + "k_proj.weight"], qkv[64:128])
    assert torch.equal(converted[base + "v_proj.weight"], qkv[128:])
    inp = original_sd["transformer.decoder.layers.1.ca_text.in_proj_bias"]
    assert torch.equal(converted["model.decoder.layers.1.encoder_attn_text.value.bias"], inp[512:])
    assert torch.equal(converted["model.backbone.conv_encoder.model.hidden_states_norms.stage2.weight"],
                       original_sd["backbone.0.norm1.weight"])
    assert torch.equal(converted["model.text_projection.weight"], original_sd["feat_map.weight"])
    assert torch.equal(converted["model.encoder.layers.0.fusion_layer.vision_param"],
                       original_sd["transformer.encoder.fusion_layers.0.gamma_v"])
    assert torch.equal(converted["model.query_position_embeddings.weight"],
                       original_sd["transformer.tgt_embed.weight"])
    assert torch.equal(converted["model.encoder_output_bbox_embed.layers.2.bias"],
                       original_sd["transformer.enc_out_bbox_embed.layers.2.bias"])


def test_unknown_and_missing_reported(original_sd):
    sd = dict(original_sd)
    sd["transformer.something_new.weight"] = torch.zeros(3)
    del sd["feat_map.bias"]
    converted, report = convert_state_dict(sd)
    assert report.unknown == ["transformer.something_new.weight"]
    model = build_model(DetectorArch.tiny())
    with pytest.raises(FiloError, match="1 missing.*model.text_projection.bias"):
        load_state_dict_checked(model, converted)


def test_unshared_box_heads_rejected(original_sd):
    sd = dict(original_sd)
    sd["bbox_embed.1.layers.0.bias"] = sd["bbox_embed.1.layers.0.bias"] + 1
    with pytest.raises(FiloError, match="box heads"):
        convert_state_dict(sd)


def test_layout_detection(original_sd, tmp_path):
    assert detect_layout(original_sd)[0] == "original"
    assert detect_layout({"model": {"module." + k: v for k, v in original_sd.items()}})[0] \
        == "original"
    with pytest.raises(FiloError) as err:
        detect_layout({"filo": {"x": torch.zeros(1)}}, "ckpt/filo_train_on_visa.pth")
    assert "FiLo checkpoint" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(FiloError, match="not a GroundingDINO checkpoint"):
        detect_layout({"state": 1}, "x.pth")
    missing = tmp_path / "absent.pth"
    with pytest.raises(FiloError, match="not found"):
        read_checkpoint(missing)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(FiloError, match="cannot read"):
        read_checkpoint(garbage)


def test_convert_cli_round_trip(original_sd, tmp_path, capsys):
    src, dst = tmp_path / "orig.pth", tmp_path / "hf.pth"
    torch.save(original_sd, src)
    assert detector_main(["convert", str(src), str(dst)]) == 0
    assert "known leftovers ignored, 0 unknown" in capsys.readouterr().out
    payload = torch.load(dst, map_location="cpu", weights_only=True)
    assert payload["format"] == HF_FORMAT
    loaded = read_checkpoint(dst)
    assert loaded.layout == "transformers"
    converted, _ = convert_state_dict(original_sd)
    assert set(loaded.state_dict) == set(converted)
    assert all(torch.equal(loaded.state_dict[k], converted[k]) for k in converted)
    # a FiLo checkpoint given to the CLI: one clean error line, exit code 2
    filo = tmp_path / "filo.pth"
    torch.save({"filo": {"a": torch.zeros(1)}}, filo)
    with pytest.raises(SystemExit) as exit_info:
        detector_main(["convert", str(filo), str(tmp_path / "o.pth")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
