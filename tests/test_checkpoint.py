"""FiLo checkpoints: research layout, round trip, wrong files, config inference."""

from __future__ import annotations

import pytest
import torch

from filo.checkpoint import (
    build_filo_from_checkpoint,
    infer_config_from_state_dict,
    load_filo_checkpoint,
    save_filo_checkpoint,
)
from filo.errors import FiloError
from filo.model import FiLo, FiLoConfig

RESEARCH_GROUPS = {"clip_model", "text_encoder", "decoder_linear", "decoder_cov", "adapter",
                   "normal_prompt_learner", "abnormal_prompt_learner"}


@pytest.fixture(scope="module")
def model(perturbed_tiny_filo):
    return perturbed_tiny_filo


def _research_state(model, surgery_names=True):
    """A state dict as the research code would save it (its own key naming, built by hand)."""
    state = {}
    for k, v in model.state_dict().items():
        key = k
        # after the first forward the research code renamed the attention of blocks past the
        # dual-path start to attn.qkv / attn.proj
        if surgery_names and k.startswith("clip_model.visual.transformer.resblocks."):
            block = int(k.split(".")[4])
            if block >= model.config.taps.dual_start:
                key = (k.replace("attn.in_proj_weight", "attn.qkv.weight")
                        .replace("attn.in_proj_bias", "attn.qkv.bias")
                        .replace("attn.out_proj.", "attn.proj."))
        state[key] = v.clone()
    return state


def test_state_dict_layout(model):
    keys = model.state_dict().keys()
    assert {k.split(".")[0] for k in keys} == RESEARCH_GROUPS
    for k in ("decoder_linear.fc.3.weight", "decoder_cov.fc_15.2.weight", "decoder_cov.fc_51.0.bias",
              "adapter.fc.0.weight", "adapter.fc.2.weight", "normal_prompt_learner.ctx",
              "abnormal_prompt_learner.meta_net.linear2.bias", "text_encoder.positional_embedding",
              "text_encoder.transformer.resblocks.1.attn.in_proj_weight",
              "clip_model.visual.proj", "clip_model.logit_scale"):
        assert k in keys, k
    assert model.state_dict()["decoder_cov.fc_15.0.weight"].shape[-2:] == (1, 5)
    assert "adapter.fc.0.bias" not in keys


def test_research_layout_loads_without_unexpected_keys(tmp_path, model):
    path = tmp_path / "research.pth"
    torch.save({"filo": _research_state(model)}, path)
    fresh = FiLo(FiLoConfig.tiny())
    report = load_filo_checkpoint(path, fresh)
    assert report.clean, report.summary()
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_heads_only_checkpoint_reports_missing_groups(tmp_path, model):
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(("clip_model", "text_"))}
    state["decoder_linear.extra"] = torch.zeros(1)
    path = tmp_path / "heads.pth"
    torch.save({"filo": state}, path)
    report = load_filo_checkpoint(path, FiLo(FiLoConfig.tiny()))
    assert set(report.missing) == {"clip_model.visual", "clip_model", "text_encoder"}
    assert report.unexpected == {"decoder_linear": ["decoder_linear.extra"]}
    with pytest.raises(FiloError, match="missing clip_model.visual"):
        load_filo_checkpoint(path, FiLo(FiLoConfig.tiny()), strict=True)


def test_save_load_round_trip_bit_identical(tmp_path, model):
    path = save_filo_checkpoint(tmp_path / "sub" / "filo.pth", model)
    assert not [p for p in path.parent.iterdir() if p.suffix == ".tmp"]
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert set(raw) == {"filo", "filo_config"}
    assert set(raw["filo"]) == set(model.state_dict())
    torch.manual_seed(123)
    fresh = FiLo(FiLoConfig.tiny())
    assert load_filo_checkpoint(path, fresh).clean
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    images = torch.randn(1, 3, 32, 32)
    a = model.predict(images, ["bottle"], ["top"])
    b = fresh.predict(images, ["bottle"], ["top"])
    assert torch.equal(a.anomaly_map, b.anomaly_map)


def test_build_from_checkpoint_infers_config(tmp_path, model):
    path = tmp_path / "noconf.pth"
    torch.save({"filo": _research_state(model)}, path)
    cfg = infer_config_from_state_dict(torch.load(path, weights_only=True)["filo"])
    assert (cfg.clip.vision_layers, cfg.clip.vision_width, cfg.clip.image_size) == (4, 64, 32)
    assert (cfg.clip.patch_size, cfg.clip.embed_dim, cfg.clip.text_width, cfg.n_ctx) == (8, 32, 32, 12)
    assert cfg.taps.mid_tap_blocks == (3, 4)
    # the saved config (with the real head count) wins when present
    saved = save_filo_checkpoint(tmp_path / "conf.pth", model)
    rebuilt = build_filo_from_checkpoint(saved, device="cpu")
    assert rebuilt.config.clip == model.config.clip
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(rebuilt.predict(images, ["wood", "pcb1"]).image_score,
                               model.predict(images, ["wood", "pcb1"]).image_score)
    # overrides by field name: FiLoConfig fields to the saved config, InferenceOptions fields
    # to the options; a misspelt one is an error, not ignored
    assert build_filo_from_checkpoint(saved, device="cpu",
                                      onednn_linear=False).options.onednn_linear is False
    assert build_filo_from_checkpoint(saved, device="cpu", blur_sigma=2.0).config.blur_sigma == 2.0
    with pytest.raises(TypeError, match="fast_kernels"):
        build_filo_from_checkpoint(saved, device="cpu", fast_kernels=False)


def test_wrong_files(tmp_path, model):
    with pytest.raises(FiloError, match=r"missing\.pth does not exist.*filo_train_on_mvtec\.pth"):
        load_filo_checkpoint(tmp_path / "missing.pth", model)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(FiloError, match="corrupt.pth.*corrupt, truncated"):
        load_filo_checkpoint(corrupt, model)
    gdino = tmp_path / "grounding.pth"
    torch.save({"backbone.0.patch_embed.proj.weight": torch.zeros(1),
                "transformer.encoder.layers.0.norm1.weight": torch.zeros(1),
                "bert.embeddings.word_embeddings.weight": torch.zeros(1)}, gdino)
    with pytest.raises(FiloError, match="grounding.pth looks like a GroundingDINO checkpoint"):
        load_filo_checkpoint(gdino, model)
    wrapped = tmp_path / "groundingdino_swint_ogc.pth"
    torch.save({"model": {"backbone.0.x": torch.zeros(1)}}, wrapped)
    with pytest.raises(FiloError, match="looks like a GroundingDINO checkpoint"):
        load_filo_checkpoint(wrapped, model)
    clip_file = tmp_path / "clip.pt"
    torch.save({"visual.proj": torch.zeros(1)}, clip_file)
    with pytest.raises(FiloError, match="plain CLIP weight file"):
        load_filo_checkpoint(clip_file, model)


def test_shape_mismatch_is_an_error(tmp_path, model):
    state = _research_state(model, surgery_names=False)
    state["decoder_linear.fc.0.weight"] = torch.zeros(768, 1024)
    path = tmp_path / "vitl_heads.pth"
    torch.save({"filo": state}, path)
    with pytest.raises(FiloError, match=r"vitl_heads\.pth: checkpoint does not fit this model .*"
                                        r"decoder_linear\.fc\.0\.weight \(768, 1024\)"):
        load_filo_checkpoint(path, FiLo(FiLoConfig.tiny()))


def test_position_embedding_resized_for_other_input_size(tmp_path, model):
    path = save_filo_checkpoint(tmp_path / "filo.pth", model)
    cfg = FiLoConfig.tiny()
    cfg.clip.image_size = 48
    bigger = FiLo(cfg)
    report = load_filo_checkpoint(path, bigger)
    assert report.clean and report.resized == ["clip_model.visual.positional_embedding"]
    assert bigger.predict(torch.randn(1, 3, 48, 48), ["bottle"]).anomaly_map.shape == (1, 48, 48)


def test_research_layout_checkpoint_runs_clip_with_exact_gelu(tmp_path, model):
    """No recorded config: the research rule (GELU unless 336 px); a recorded one is kept;
    ``clip_act`` overrides both. Maps follow the activation of the model they are built with."""
    import dataclasses

    assert model.config.clip.act == "quick_gelu"
    research = tmp_path / "research.pth"
    torch.save({"filo": _research_state(model)}, research)
    built = build_filo_from_checkpoint(research, device="cpu")
    assert built.config.clip.act == "gelu"
    assert isinstance(built.clip_model.visual.transformer.resblocks[0].mlp.gelu, torch.nn.GELU)
    assert isinstance(built.clip_model.transformer.resblocks[0].mlp.gelu, torch.nn.GELU)
    # independent expectation: the same weights in a model configured for GELU by hand (one
    # attention head per 64 channels, as shape inference assumes)
    cfg = dataclasses.replace(model.config, clip=dataclasses.replace(
        model.config.clip, act="gelu", vision_heads=1, text_heads=1))
    by_hand = FiLo(cfg, model.prompts)
    by_hand.load_state_dict(model.state_dict())
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(21))
    got = built.predict(images, ["wood", "pcb1"])
    exp = by_hand.predict(images, ["wood", "pcb1"])
    torch.testing.assert_close(got.anomaly_map, exp.anomaly_map, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.image_score, exp.image_score, atol=1e-6, rtol=0)
    cfg_q = dataclasses.replace(cfg, clip=dataclasses.replace(cfg.clip, act="quick_gelu"))
    quick_model = FiLo(cfg_q, model.prompts)
    quick_model.load_state_dict(model.state_dict())
    quick = quick_model.predict(images, ["wood", "pcb1"])
    assert (quick.anomaly_map - got.anomaly_map).abs().max() > 1e-5  # not a vacuous check
    # override, and a recorded activation wins over the rule
    assert build_filo_from_checkpoint(research, device="cpu",
                                      clip_act="quick_gelu").config.clip.act == "quick_gelu"
    recorded = save_filo_checkpoint(tmp_path / "recorded.pth", built)
    assert torch.load(recorded, weights_only=True)["filo_config"]["clip"]["act"] == "gelu"
    assert build_filo_from_checkpoint(recorded, device="cpu").config.clip.act == "gelu"
    assert build_filo_from_checkpoint(
        save_filo_checkpoint(tmp_path / "q.pth", model), device="cpu").config.clip.act == "quick_gelu"
    with pytest.raises(FiloError, match="clip activation must be one of"):
        build_filo_from_checkpoint(research, device="cpu", clip_act="relu")
    # a research-layout file for CLIP's native 336 px keeps QuickGELU
    state = _research_state(model)
    pos = state["clip_model.visual.positional_embedding"]
    state["clip_model.visual.positional_embedding"] = torch.zeros(1 + 42 * 42, pos.shape[1])
    assert infer_config_from_state_dict(state).clip.act == "quick_gelu"  # 42 * 8 = 336
    assert infer_config_from_state_dict(_research_state(model)).clip.act == "gelu"
