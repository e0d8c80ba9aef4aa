"""Text side: encoder vs open_clip, subset/truncated encodings vs the full computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from filo.model import FiLo, FiLoConfig
from filo.text import PromptLearner, PromptTokens, encode_prompts


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = FiLo(FiLoConfig.tiny()).eval()
    with torch.no_grad():  # make prompt learners and text tower non-trivial
        for p in m.normal_prompt_learner.parameters():
            p.add_(0.3 * torch.randn_like(p))
        for p in m.abnormal_prompt_learner.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return m


def test_encoder_matches_open_clip_encode_text(model):
    """With ctx = the frozen embedding of 'X', our encoder must equal open_clip's encode_text."""
    tokens = model.prompt_tokens.get("bottle").abnormal[:20]
    emb_x = model.clip_model.token_embedding.weight[model.prompt_tokens.placeholder_id]
    ctx = emb_x.expand(tokens.shape[0], model.config.n_ctx, -1)
    with torch.no_grad():
        expected = model.clip_model.encode_text(tokens)
        full = encode_prompts(model.text_encoder, model.clip_model.token_embedding, tokens, ctx,
                              truncate=False)
        short = encode_prompts(model.text_encoder, model.clip_model.token_embedding, tokens, ctx)
    torch.testing.assert_close(full, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(short, expected, atol=1e-5, rtol=1e-5)


def _full_reference(model, img, cls_name, position):
    """All prompts of the class, 77 tokens, then select and average (the research computation)."""
    tok = model.prompt_tokens.get(cls_name)
    emb = model.clip_model.token_embedding
    out = []
    for learner, ids in ((model.normal_prompt_learner, tok.normal),
                         (model.abnormal_prompt_learner, tok.abnormal)):
        ctx = (learner.ctx + learner.meta_net(img)).expand(ids.shape[0], -1, -1)
        f = encode_prompts(model.text_encoder, emb, ids, ctx, truncate=False)
        assert ids.shape[1] == 77
        out.append(f / f.norm(dim=-1, keepdim=True))
    normal, abnormal = out
    if position is not None:
        idx = model.prompts.positions.index(position)
        abnormal = abnormal[idx::9]
        assert abnormal.shape[0] == 15
    n = normal.mean(0)
    n = n / n.norm()
    a = abnormal.mean(0)
    a = a / a.norm()
    t = torch.stack([n, a])
    return t / torch.sqrt((t ** 2).sum())


def test_subset_and_truncation_equal_full(model):
    torch.manual_seed(1)
    img = F.normalize(torch.randn(3, 32), dim=-1)
    classes = ["bottle", "metal_nut", "bottle"]
    positions = ["top left", None, "bottom right"]
    with torch.no_grad():
        got = model.text_features(img, classes, positions)
        for i in range(3):
            exp = _full_reference(model, img[i:i + 1], classes[i], positions[i])
            torch.testing.assert_close(got[i], exp, atol=1e-5, rtol=1e-5)
    # each row has norm 1/sqrt(2)
    torch.testing.assert_close(got.norm(dim=-1), torch.full((3, 2), 2 ** -0.5))
    # positions matter (otherwise the test above could not tell subsets apart)
    assert (got[0, 1] - got[2, 1]).abs().max() > 1e-4


def test_token_cache_per_instance(model):
    tokens = model.prompt_tokens
    first = tokens.get("bottle")
    assert tokens.get("bottle") is first
    assert first.normal.shape == (7, 77) and first.abnormal.shape == (135, 77)
    other = PromptTokens(model.prompts, n_ctx=12)
    assert "bottle" not in other._cache
    # placeholder positions 1..12, then the sentence, the EOT is the argmax
    assert torch.all(first.normal[:, 1:13] == tokens.placeholder_id)
    assert int(first.abnormal[0].argmax()) > 13


def test_prompt_learner_shapes_and_bias():
    torch.manual_seed(2)
    learner = PromptLearner(n_ctx=12, ctx_dim=768, feature_dim=768)
    assert learner.meta_net.linear1.weight.shape == (48, 768)
    assert learner.meta_net.linear2.weight.shape == (768, 48)
    feats = torch.randn(2, 768)
    out = learner(feats)
    assert out.shape == (2, 12, 768)
    bias = learner.meta_net.linear2(torch.relu(learner.meta_net.linear1(feats)))
    torch.testing.assert_close(out[1, 5], learner.ctx[5] + bias[1])
