"""Two-stream CLIP backbone: taps against a slow hand-written forward, weights, position resize."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from filo.backbone import (
    ClipConfig,
    TapConfig,
    build_clip,
    encode_image_two_stream,
    load_clip_weights,
)
from filo.errors import FiloError
from filo.weights import resize_pos_embed


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    model = build_clip(ClipConfig.tiny()).eval()
    # random init of open_clip is small; make attention weights large enough that errors show
    with torch.no_grad():
        for p in model.visual.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _ln(x, ln):
    return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


def _slow_attention(x, block, qkv_source: str):
    """Attention by hand, head by head, with explicit matmuls. qkv_source: 'qkv' or 'vvv'."""
    w, b = block.attn.in_proj_weight, block.attn.in_proj_bias
    width = x.shape[-1]
    q = x @ w[:width].T + b[:width]
    k = x @ w[width:2 * width].T + b[width:2 * width]
    v = x @ w[2 * width:].T + b[2 * width:]
    if qkv_source == "vvv":
        q, k = v, v
    heads = block.attn.num_heads
    d = width // heads
    outs = []
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        scores = q[..., sl] @ k[..., sl].transpose(-1, -2) / math.sqrt(d)
        scores = scores - scores.max(dim=-1, keepdim=True).values
        p = scores.exp() / scores.exp().sum(dim=-1, keepdim=True)
        outs.append(p @ v[..., sl])
    o = torch.cat(outs, dim=-1)
    return o @ block.attn.out_proj.weight.T + block.attn.out_proj.bias


def _slow_mlp(x, block):
    h = x @ block.mlp.c_fc.weight.T + block.mlp.c_fc.bias
    h = h * torch.sigmoid(1.702 * h)  # QuickGELU
    return h @ block.mlp.c_proj.weight.T + block.mlp.c_proj.bias


def _slow_forward(visual, images, dual_start):
    x = F.conv2d(images, visual.conv1.weight, stride=visual.conv1.stride)
    b, c = x.shape[:2]
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(b, 1, c), x], 1) + visual.positional_embedding
    ori = _ln(x, visual.ln_pre)
    vv = None
    states = {"ori": {0: ori}, "mid": {}, "vv": {}}
    for k, block in enumerate(visual.transformer.resblocks, start=1):
        h = _ln(ori, block.ln_1)
        mid = ori + _slow_attention(h, block, "qkv")
        if k > dual_start:
            vv = (ori if vv is None else vv) + _slow_attention(h, block, "vvv")
            states["vv"][k] = vv
        ori = mid + _slow_mlp(_ln(mid, block.ln_2), block)
        states["mid"][k] = mid
        states["ori"][k] = ori
    states["global"] = _ln(ori, visual.ln_post) @ visual.proj
    return states


def test_reference_taps_match_slow_forward(clip):
    torch.manual_seed(1)
    images = torch.randn(2, 3, 32, 32)
    taps = TapConfig.for_depth(4)
    assert (taps.dual_start, taps.mid_tap_blocks, taps.true_layers) == (1, (3, 4), (1, 2, 3, 4))
    with torch.no_grad():
        feats = encode_image_two_stream(clip.visual, images, taps)
        slow = _slow_forward(clip.visual, images, dual_start=1)
    expected_linear = [slow["vv"][4], slow["mid"][3], slow["mid"][4], slow["ori"][4]]
    assert len(feats.linear_taps) == 4 and len(feats.mmci_taps) == 3
    for got, exp in zip(feats.linear_taps, expected_linear, strict=True):
        torch.testing.assert_close(got, exp, atol=1e-5, rtol=1e-5)
    for got in feats.mmci_taps:
        torch.testing.assert_close(got, slow["vv"][4], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(feats.global_tokens, slow["global"], atol=1e-5, rtol=1e-5)
    # the vv stream really differs from the ori stream (the test would be vacuous otherwise)
    assert (slow["vv"][4] - slow["ori"][4]).abs().max() > 1e-2
    assert (slow["mid"][3] - slow["ori"][3]).abs().max() > 1e-2


def test_true_taps_match_slow_forward(clip):
    torch.manual_seed(2)
    images = torch.randn(1, 3, 32, 32)
    taps = TapConfig.for_depth(4, mode="true")
    with torch.no_grad():
        feats = encode_image_two_stream(clip.visual, images, taps)
        slow = _slow_forward(clip.visual, images, dual_start=1)
    for got, layer in zip(feats.linear_taps, (1, 2, 3, 4), strict=True):
        torch.testing.assert_close(got, slow["ori"][layer], atol=1e-5, rtol=1e-5)
    for got, layer in zip(feats.mmci_taps, (2, 3, 4), strict=True):
        torch.testing.assert_close(got, slow["vv"][layer], atol=1e-5, rtol=1e-5)


def test_global_class_token_equals_open_clip_encoder(clip):
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        feats = encode_image_two_stream(clip.visual, images)
        pooled = clip.encode_image(images)
    torch.testing.assert_close(feats.global_tokens[:, 0], pooled, atol=1e-5, rtol=1e-5)


def test_resize_pos_embed_identity_and_shape():
    from open_clip.model import resize_pos_embed as oc_resize

    torch.manual_seed(4)
    pos = torch.randn(1 + 16, 8)
    assert resize_pos_embed(pos, 4) is pos
    out = resize_pos_embed(pos, 6)
    assert out.shape == (37, 8)
    assert torch.equal(out[0], pos[0])
    # independent implementation: open_clip's own resize, without antialias as in the research code
    class _M:
        class visual:
            grid_size = (6, 6)

    sd = {"visual.positional_embedding": pos.clone()}
    oc_resize(sd, _M, antialias=False)
    torch.testing.assert_close(out, sd["visual.positional_embedding"])
    # a constant grid stays constant under bicubic interpolation
    const = torch.cat([torch.zeros(1, 3), torch.full((16, 3), 2.5)])
    torch.testing.assert_close(resize_pos_embed(const, 7)[1:], torch.full((49, 3), 2.5))


def test_load_weights_plain_and_openai_layout(tmp_path, clip):
    # OpenAI-style file: fp16, 3x3 position grid (smaller model input), extra scalar entries
    small_cfg = ClipConfig.tiny()
    small_cfg.image_size = 24
    torch.manual_seed(5)
    src = build_clip(small_cfg)
    state = {k: v.half() for k, v in src.state_dict().items()}
    state["input_resolution"] = torch.tensor(24)
    path = tmp_path / "clip.pt"
    torch.save(state, path)
    dst = build_clip(ClipConfig.tiny())
    load_clip_weights(dst, path)
    torch.testing.assert_close(dst.visual.conv1.weight, src.visual.conv1.weight.half().float())
    assert dst.visual.positional_embedding.shape == (17, 64)
    expected = resize_pos_embed(src.visual.positional_embedding.detach().half(), 4).float()
    torch.testing.assert_close(dst.visual.positional_embedding.detach(), expected)


def test_load_weights_torchscript_archive(tmp_path):
    torch.manual_seed(6)
    src = build_clip(ClipConfig.tiny())

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = src.visual
            self.transformer = src.transformer
            self.token_embedding = src.token_embedding
            self.positional_embedding = src.positional_embedding
            self.ln_final = src.ln_final
            self.text_projection = src.text_projection
            self.logit_scale = src.logit_scale

        def forward(self, x):
            return x * self.logit_scale

    traced = torch.jit.trace(Holder(), torch.ones(1))
    path = tmp_path / "ViT-tiny.pt"
    traced.save(str(path))
    dst = build_clip(ClipConfig.tiny())
    load_clip_weights(dst, path)
    torch.testing.assert_close(dst.visual.proj, src.visual.proj)
    torch.testing.assert_close(dst.token_embedding.weight, src.token_embedding.weight)


def test_missing_or_wrong_weight_file(tmp_path):
    clip = build_clip(ClipConfig.tiny())
    with pytest.raises(FiloError, match=r"nowhere\.pt.*ckpt/ViT-L-14-336px\.pt"):
        load_clip_weights(clip, tmp_path / "nowhere.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(FiloError, match="bad.pt"):
        load_clip_weights(clip, bad)
    other = tmp_path / "other.pt"
    torch.save({"backbone.0.weight": torch.zeros(1)}, other)
    with pytest.raises(FiloError, match="no CLIP vision weights"):
        load_clip_weights(clip, other)


def test_vit_l_14_336_construction():
    model = build_clip(ClipConfig.vit_l_14_336(image_size=336))
    n = sum(p.numel() for p in model.parameters())
    assert 427_000_000 < n < 429_000_000
    assert model.visual.positional_embedding.shape == (577, 1024)
    assert model.visual.transformer.resblocks[0].attn.num_heads == 16
    assert model.transformer.resblocks[0].attn.num_heads == 12


# ---- MLP activation: exact GELU (released checkpoints at 518) vs QuickGELU --------------------


def test_research_activation_rule():
    from filo.backbone import research_clip_act

    assert research_clip_act(336) == "quick_gelu"
    assert research_clip_act(518) == "gelu" and research_clip_act(224) == "gelu"
    assert ClipConfig.vit_l_14_336(518).act == "gelu"
    assert ClipConfig.vit_l_14_336(336).act == "quick_gelu"
    assert ClipConfig.vit_l_14_336(518, act="quick_gelu").act == "quick_gelu"
    # configs saved before the setting existed still read
    assert ClipConfig.from_dict({**ClipConfig.tiny().to_dict(), "act": "gelu"}).act == "gelu"
    old = {k: v for k, v in ClipConfig.tiny().to_dict().items() if k != "act"}
    assert ClipConfig.from_dict({**old, "quick_gelu": True}).act == "quick_gelu"
    assert ClipConfig.from_dict({**old, "quick_gelu": False}).act == "gelu"
    with pytest.raises(FiloError, match="act must be one of"):
        build_clip(ClipConfig(act="relu"))


def _slow_mlp_gelu(x, block):
    h = x @ block.mlp.c_fc.weight.T + block.mlp.c_fc.bias
    h = 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))  # exact GELU by its definition
    return h @ block.mlp.c_proj.weight.T + block.mlp.c_proj.bias


@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
def test_both_towers_run_the_configured_activation(act):
    """Vision taps and text features against slow forwards with the activation written by hand."""
    from filo.backbone import mlp_act
    from filo.kernels import linear as onednn_linear

    cfg = ClipConfig.tiny()
    cfg.act = act
    torch.manual_seed(11)
    model = build_clip(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    blocks = [*model.visual.transformer.resblocks, *model.transformer.resblocks]
    assert {mlp_act(b) for b in blocks} == {act}
    slow_mlp = _slow_mlp_gelu if act == "gelu" else _slow_mlp
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        for lin in (F.linear, onednn_linear):  # the oneDNN route keeps the activation too
            feats = encode_image_two_stream(model.visual, images, linear=lin)
            # slow forward with this activation
            x = F.conv2d(images, model.visual.conv1.weight, stride=model.visual.conv1.stride)
            b, c = x.shape[:2]
            x = x.flatten(2).transpose(1, 2)
            x = torch.cat([model.visual.class_embedding.expand(b, 1, c), x], 1)
            ori = _ln(x + model.visual.positional_embedding, model.visual.ln_pre)
            for block in model.visual.transformer.resblocks:
                mid = ori + _slow_attention(_ln(ori, block.ln_1), block, "qkv")
                ori = mid + slow_mlp(_ln(mid, block.ln_2), block)
            torch.testing.assert_close(feats.linear_taps[-1], ori, atol=1e-5, rtol=1e-5)
        # text tower: our written-out encoder against open_clip's own forward with its module
        from filo.text import TextEncoder

        ids = torch.randint(1, 400, (3, 10), generator=torch.Generator().manual_seed(13))
        ids[:, -1] = 49407
        emb = model.token_embedding(ids)
        ours = TextEncoder(model)(emb, ids)
        torch.testing.assert_close(ours, model.encode_text(
            torch.nn.functional.pad(ids, (0, 77 - 10))), atol=1e-5, rtol=1e-5)
    # and the two activations really give different features (the test would be vacuous)
    other = ClipConfig.tiny()
    other.act = "gelu" if act == "quick_gelu" else "quick_gelu"
    twin = build_clip(other).eval()
    twin.load_state_dict(model.state_dict())
    with torch.no_grad():
        a = encode_image_two_stream(model.visual, images).linear_taps[-1]
        b = encode_image_two_stream(twin.visual, images).linear_taps[-1]
    assert (a - b).abs().max() > 1e-4
