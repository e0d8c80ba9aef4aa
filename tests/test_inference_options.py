"""FiLoConfig (architecture, saved) vs InferenceOptions (how the model runs, never saved)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from filo.checkpoint import build_filo_from_checkpoint, save_filo_checkpoint
from filo.errors import FiloError
from filo.model import (
    RESEARCH_LIKE_SWITCHES,
    FiLo,
    FiLoConfig,
    InferenceOptions,
    build_filo,
    split_overrides,
)

RUNTIME = {f.name for f in dataclasses.fields(InferenceOptions)}
# what FiLoConfig.to_dict wrote before the split, besides the architecture
OLD_RUNTIME_VALUES = {"device": "cuda", "dtype": "float16", "score_mode": "softmax",
                      "legacy_macaroni": True, "encode_all_positions": True,
                      "truncate_context": False, "fuse_mmci": False, "onednn_linear": False,
                      "autocast": "bf16"}


def test_fields_are_split():
    arch = {f.name for f in dataclasses.fields(FiLoConfig)}
    assert arch == {"clip", "taps", "n_ctx", "use_adapter", "logit_scale", "blur_kernel",
                    "blur_sigma"}
    assert RUNTIME == set(OLD_RUNTIME_VALUES) - {"device"}
    assert set(RESEARCH_LIKE_SWITCHES) <= RUNTIME
    with pytest.raises(TypeError):
        FiLoConfig.tiny(score_mode="softmax")  # runtime fields are not architecture


def test_options_validate_and_are_frozen():
    for bad in ({"score_mode": "max"}, {"dtype": "int8"}, {"autocast": "fp8"}):
        with pytest.raises(FiloError, match=next(iter(bad))):
            InferenceOptions(**bad).validate()
        with pytest.raises(FiloError, match=next(iter(bad))):
            FiLo(FiLoConfig.tiny(), options=InferenceOptions(**bad))
    with pytest.raises(dataclasses.FrozenInstanceError):
        InferenceOptions().score_mode = "softmax"  # type: ignore[misc]


def test_old_saved_config_reads_without_runtime_fields():
    arch = FiLoConfig.tiny(blur_sigma=2.0).to_dict()
    assert not set(arch) & set(OLD_RUNTIME_VALUES)
    old = {**arch, **OLD_RUNTIME_VALUES}
    old["clip"] = {k: v for k, v in arch["clip"].items() if k != "act"} | {"quick_gelu": False}
    cfg = FiLoConfig.from_dict(old)
    assert cfg.blur_sigma == 2.0 and cfg.clip.act == "gelu"
    assert cfg == dataclasses.replace(FiLoConfig.from_dict(arch), clip=cfg.clip)
    with pytest.raises(FiloError, match="unknown field.*n_layers"):
        FiLoConfig.from_dict({**arch, "n_layers": 3})


def test_checkpoints_store_no_runtime_fields_and_old_ones_still_build(tmp_path,
                                                                      perturbed_tiny_filo):
    model = perturbed_tiny_filo
    path = save_filo_checkpoint(tmp_path / "new.pth", model)
    saved = torch.load(path, map_location="cpu", weights_only=True)["filo_config"]
    assert not set(saved) & (RUNTIME | {"device"})
    # a checkpoint written before the split: its runtime fields are ignored, not applied
    old = tmp_path / "old.pth"
    torch.save({"filo": model.state_dict(), "filo_config": {**saved, **OLD_RUNTIME_VALUES}}, old)
    built = build_filo_from_checkpoint(old, device="cpu")
    assert built.options == InferenceOptions()
    assert next(built.parameters()).dtype == torch.float32
    images = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(built.predict(images, ["bottle"]).anomaly_map,
                               model.predict(images, ["bottle"]).anomaly_map)


def test_build_from_checkpoint_options_and_overrides(tmp_path, perturbed_tiny_filo):
    path = save_filo_checkpoint(tmp_path / "f.pth", perturbed_tiny_filo)
    base = InferenceOptions(**RESEARCH_LIKE_SWITCHES)
    # the keyword form the CLIs use: InferenceOptions fields by name, on top of ``options``
    m = build_filo_from_checkpoint(path, device="cpu", options=base, legacy_macaroni=True,
                                   score_mode="softmax", autocast="bf16", onednn_linear=True,
                                   dtype="bfloat16", blur_kernel=5)
    assert m.options == dataclasses.replace(base, legacy_macaroni=True, score_mode="softmax",
                                            autocast="bf16", onednn_linear=True,
                                            dtype="bfloat16")
    assert m.config.blur_kernel == 5 and m.prompts.legacy_macaroni
    assert next(m.parameters()).dtype == torch.bfloat16
    with pytest.raises(TypeError, match="fast_kernels, typo"):
        build_filo_from_checkpoint(path, device="cpu", fast_kernels=False, typo=1)


def test_split_overrides():
    assert split_overrides({"n_ctx": 4, "score_mode": "softmax"}) == (
        {"n_ctx": 4}, {"score_mode": "softmax"})
    with pytest.raises(TypeError, match="device"):
        split_overrides({"device": "cpu"})


def test_set_options_follows_legacy_macaroni_and_keeps_results(perturbed_tiny_filo):
    m = FiLo(FiLoConfig.tiny(), options=InferenceOptions(**RESEARCH_LIKE_SWITCHES)).eval()
    m.load_state_dict(perturbed_tiny_filo.state_dict())
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    slow = m.predict(images, ["bottle", "macaroni1"], ["left", None])
    m.set_options(InferenceOptions(legacy_macaroni=True))
    assert m.prompts.legacy_macaroni and m.options.fuse_mmci
    m.set_options(InferenceOptions())
    assert not m.prompts.legacy_macaroni
    fast = m.predict(images, ["bottle", "macaroni1"], ["left", None])
    torch.testing.assert_close(fast.anomaly_map, slow.anomaly_map, atol=1e-5, rtol=0)
    with pytest.raises(FiloError, match="score_mode"):
        m.set_options(InferenceOptions(score_mode="max"))


def test_build_filo_device_and_dtype_are_arguments():
    m = build_filo(FiLoConfig.tiny(), device="cpu", options=InferenceOptions(dtype="bfloat16"))
    p = next(m.parameters())
    assert (p.device.type, p.dtype) == ("cpu", torch.bfloat16)
