"""MuSc against slow, obvious re-computations written here (docs/design.md section 16).

Tiny seeded CLIP towers (12 blocks of width 128, 64-wide heads, 32 px, 4 x 4 patches) and a few
random images; every expectation is computed independently of filo.musc (numpy loops).
Tolerances: 1e-5 absolute on maps (float32 distances of unit vectors), 1e-6 on image scores.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from filo.backbone import ClipConfig, build_clip
from filo.errors import FiloError
from filo.musc.config import MuscSettings, default_layers
from filo.musc.lnamd import lnamd
from filo.musc.msm import mutual_scores, nearest_table, scores_against
from filo.musc.rscin import rscin
from filo.musc.scorer import MuscScorer, input_digest, subsets, upsample
from filo.musc.tower import load_tower

TINY = dict(embed_dim=32, image_size=32, patch_size=8, vision_width=128, vision_layers=12,
            vision_heads=2, text_width=32, text_heads=2, text_layers=1, text_vocab_size=100,
            text_context_length=8)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these tensors are tiny, and spinning threads on a shared CPU cost
    seconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    torch.manual_seed(0)
    clip = build_clip(ClipConfig(**TINY, act="gelu"))
    path = tmp_path_factory.mktemp("musc") / "tiny_clip.pt"
    torch.save(clip.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def tower(clip_file):
    return load_tower(clip_file, 32)


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    return torch.randn(7, 3, 32, 32, generator=g)


# ---- slow references ------------------------------------------------------------------------

def slow_lnamd(tokens: np.ndarray, r: int) -> np.ndarray:
    """[B, 1+L, C] -> [B, L, C]: per-image LayerNorm over all (C, H, W), r x r zero-padded mean
    per channel, then unit length; plain loops."""
    b, n, c = tokens.shape
    g = int(round((n - 1) ** 0.5))
    out = np.zeros((b, g * g, c))
    for i in range(b):
        x = tokens[i, 1:].astype(np.float64).reshape(g, g, c)
        x = (x - x.mean()) / np.sqrt(x.var() + 1e-5)
        pad = (r - 1) // 2
        xp = np.zeros((g + 2 * pad, g + 2 * pad, c))
        xp[pad:pad + g, pad:pad + g] = x
        for y in range(g):
            for xx in range(g):
                v = xp[y:y + r, xx:xx + r].reshape(-1, c).sum(0) / (r * r)
                out[i, y * g + xx] = v / np.linalg.norm(v)
    return out


def slow_msm(z: np.ndarray, ratio: float = 0.3) -> np.ndarray:
    n, length, _ = z.shape
    k = int((n - 1) * ratio)
    out = np.zeros((n, length))
    for i in range(n):
        for p in range(length):
            d = [min(np.linalg.norm(z[i, p] - z[j, q]) for q in range(length))
                 for j in range(n) if j != i]
            out[i, p] = np.mean(sorted(d)[:k])
    return out


def slow_rscin(a: np.ndarray, x: np.ndarray, ks) -> np.ndarray:
    s = (a - a.min()) / (a.max() - a.min())
    w = x @ x.T
    res = []
    for k in ks:
        row_out = []
        for i in range(len(a)):
            keep = np.argsort(-w[i], kind="stable")[:k]
            row_out.append(sum(w[i, j] * s[j] for j in keep) / sum(w[i, j] for j in keep))
        res.append(row_out)
    return np.mean(res, axis=0)


# ---- the steps --------------------------------------------------------------------------------

@pytest.mark.parametrize("r", [1, 3, 5])
def test_lnamd_matches_slow_reference(r):
    tokens = torch.randn(2, 1 + 25, 6, generator=torch.Generator().manual_seed(r)) * 3 + 1
    want = slow_lnamd(tokens.numpy(), r)
    np.testing.assert_allclose(lnamd(tokens, r).numpy(), want, atol=1e-5)
    np.testing.assert_allclose(lnamd(tokens, r, exact=True).numpy(), want, atol=1e-5)


def test_lnamd_rejects_even_degree():
    with pytest.raises(FiloError, match="odd"):
        lnamd(torch.randn(1, 17, 4), 2)


@pytest.mark.parametrize("block_rows", [16, 1 << 20])
def test_msm_matches_slow_reference(block_rows):
    z = torch.nn.functional.normalize(torch.randn(8, 9, 5, generator=torch.Generator()
                                                  .manual_seed(3)), dim=-1)
    got = mutual_scores(z, 0.3, block_rows=block_rows).numpy()
    np.testing.assert_allclose(got, slow_msm(z.numpy().astype(np.float64)), atol=1e-5)


def test_msm_blocks_equal_one_image_cdist():
    """Blocked products (several blocks) = the original's one-image-against-all cdist."""
    z = torch.nn.functional.normalize(torch.randn(11, 16, 12, generator=torch.Generator()
                                                  .manual_seed(4)), dim=-1)
    n, length, c = z.shape
    k = int((n - 1) * 0.3)
    want = []
    for i in range(n):
        ref = torch.cat([z[:i], z[i + 1:]]).reshape(-1, c)
        d = torch.cdist(z[i:i + 1], ref[None])[0].reshape(length, n - 1, length).amin(-1)
        want.append(torch.topk(d, k, largest=False).values.mean(-1))
    got = mutual_scores(z, 0.3, block_rows=40)  # 2 images per block: 6 x 6 blocks
    assert torch.max(torch.abs(got - torch.stack(want))) < 1e-5


def test_nearest_table_symmetry_and_self():
    z = torch.nn.functional.normalize(torch.randn(5, 4, 3), dim=-1)
    d = nearest_table(z, block_rows=8)
    assert torch.isinf(d[torch.arange(5), :, torch.arange(5)]).all()
    d2 = nearest_table(z, z.clone(), block_rows=8)
    off = ~torch.eye(5, dtype=torch.bool)
    assert torch.allclose(d.permute(0, 2, 1)[off], d2.permute(0, 2, 1)[off], atol=1e-6)


def test_rscin_matches_slow_reference():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(9, 6)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    a = rng.random(9)
    for ks in ([1, 2, 3], [1, 8, 9]):
        np.testing.assert_allclose(rscin(a, x, ks), slow_rscin(a, x.astype(np.float64), ks),
                                   atol=1e-6)
    assert np.array_equal(rscin(a, x, [0]), a)
    with pytest.raises(FiloError, match="largest k"):
        rscin(a[:3], x[:3], [1, 8, 9])


def test_upsample_is_bilinear_align_corners_and_max():
    grid = np.arange(16, dtype=np.float64).reshape(1, 16)
    maps, top = upsample(grid, 7)
    # align_corners=True: the corners are the grid corners, the centre is their mean
    assert maps[0, 0, 0] == 0 and maps[0, -1, -1] == 15 and maps[0, 0, -1] == 3
    assert abs(maps[0, 3, 3] - 7.5) < 1e-6 and top[0] == 15


def test_subsets_follow_the_original_rule():
    paths = [f"cls/test/{t}/{i}.png" for t in ("a", "good") for i in range(5)]
    parts = subsets(paths, 2, seed=42)
    assert sorted(parts[0] + parts[1]) == list(range(10))
    assert len(parts[0]) == 6 and len(parts[1]) == 4  # 3 + 3 first elements, 2 + 2 seconds
    assert subsets(paths, 1) == [list(range(10))]


# ---- the tower and the whole scorer ----------------------------------------------------------

def test_default_layers_and_taps(tower):
    assert default_layers(24) == (5, 11, 17, 23) and default_layers(12) == (2, 5, 8, 11)
    assert tower.layers == (2, 5, 8, 11) and tower.source.act == "quick_gelu"  # native 32 px


def test_tower_taps_are_block_outputs(tower, images):
    """The taps equal open_clip's own blocks run one by one (its MHA module, need_weights)."""
    taps, feat = tower(images[:2])
    visual = tower.visual
    from filo.backbone import vision_embed

    x = vision_embed(visual, images[:2])
    want = []
    for idx, block in enumerate(visual.transformer.resblocks):
        h = block.ln_1(x)
        x = x + block.attn(h, h, h, need_weights=True)[0]
        x = x + block.mlp(block.ln_2(x))
        if idx in tower.layers:
            want.append(x)
    for t, w in zip(taps, want, strict=True):
        assert torch.allclose(t, w, atol=1e-5)
    f = visual.ln_post(x[:, 0]) @ visual.proj
    assert torch.allclose(feat, f / f.norm(dim=-1, keepdim=True), atol=1e-6)


def test_gelu_rule_off_native_size(clip_file):
    assert load_tower(clip_file, 48).source.act == "gelu"
    with pytest.raises(FiloError, match="multiple of the patch size"):
        load_tower(clip_file, 36)


@pytest.fixture(scope="module")
def scorer(tower):
    return MuscScorer(tower, MuscSettings(image_size=32, k_list=(1, 2, 3)))


@pytest.fixture(scope="module")
def set_result(scorer, images):
    normed, feats = scorer.extract(images)
    return normed, feats, scorer.score_set(normed, feats)


def test_set_scores_match_slow_pipeline(tower, images, set_result):
    """The whole set path against the slow steps: LNAMD, MSM, mean over layers then r,
    max of the upsampled map, RsCIN."""
    _, _, res = set_result
    taps, feats = tower(images)
    per_r = []
    for r in (1, 3, 5):
        per_r.append(np.mean([slow_msm(slow_lnamd(t.numpy(), r)) for t in taps], axis=0))
    grid = np.mean(per_r, axis=0)
    np.testing.assert_allclose(res.grid, grid, atol=1e-5)
    maps, top = upsample(grid, 32)
    np.testing.assert_allclose(res.maps, maps, atol=1e-5)
    np.testing.assert_allclose(res.raw, top, atol=1e-5)
    np.testing.assert_allclose(res.scores, slow_rscin(top, feats.numpy().astype(np.float64),
                                                      (1, 2, 3)), atol=1e-5)


def test_set_is_permutation_invariant(scorer, images, set_result):
    _, _, res = set_result
    perm = torch.tensor([3, 0, 6, 1, 5, 2, 4])
    normed, feats = scorer.extract(images[perm])
    res_p = scorer.score_set(normed, feats)
    np.testing.assert_allclose(res_p.maps, res.maps[perm.numpy()], atol=1e-5)
    np.testing.assert_allclose(res_p.scores, res.scores[perm.numpy()], atol=1e-6)


def test_small_set_is_refused_in_one_line(scorer, images):
    normed, feats = scorer.extract(images[:4])
    with pytest.raises(FiloError, match="at least 5 images") as err:
        scorer.score_set(normed, feats, what="class 'x'")
    assert "\n" not in str(err.value)


def test_pool_path_equals_set_path(tmp_path, scorer, images, set_result):
    """The whole set as the pool: every member scored against it = the set path."""
    from filo.musc.pool import Pool, map_stats, save_pool

    normed, feats, res = set_result
    digests = [input_digest(im) for im in images]
    save_pool(tmp_path, "c", names=[f"{i}.png" for i in range(7)], digests=digests,
              normed=normed, feats=feats, raw=res.raw, scores=res.scores,
              settings=scorer.settings_key(), source=scorer.source_key(),
              stats={"musc": map_stats(res.maps, res.scores)})
    pool = Pool(tmp_path / "c")
    got = scorer.score_pool(pool, [x[[2, 5]] for x in normed], feats[[2, 5]],
                            [digests[2], digests[5]])
    np.testing.assert_allclose(got.maps, res.maps[[2, 5]], atol=1e-6)
    np.testing.assert_allclose(got.scores, res.scores[[2, 5]], atol=1e-6)
    # a new image: scored against all 7 members (k = int(0.3 * 7) = 2)
    new = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    n_new, f_new = scorer.extract(new)
    out = scorer.score_pool(pool, n_new, f_new, [input_digest(new[0])])
    assert out.maps.shape == (1, 32, 32) and np.isfinite(out.scores).all()


def test_scores_against_excludes_self():
    z = torch.nn.functional.normalize(torch.randn(6, 4, 3), dim=-1)
    full = mutual_scores(z, 0.5)
    got = scores_against(z[1:2], z, 0.5, exclude=[[1]])
    assert torch.allclose(got[0], full[1], atol=1e-6)


def test_pool_file_loads_without_pickle(tmp_path):
    from filo.musc.pool import Pool

    d = tmp_path / "c"
    d.mkdir()
    (d / "meta.json").write_text('{"format": 1, "n": 1, "digests": ["x"]}')
    np.save(d / "normed.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(FiloError, match="cannot be read"):
        Pool(d)


def test_original_mask_rules(tmp_path):
    """A 30 x 40 box in a 100 x 100 mask at 37 px: == 255 (MVTec/BTAD) keeps only the pixels
    fully inside, > 0 (VisA) every touched pixel, filo's > 0.5 lies between."""
    from PIL import Image

    from filo.data.transforms import mask_tensor
    from filo.musc.masks import original_mask

    arr = np.zeros((100, 100), dtype=np.uint8)
    arr[13:43, 21:61] = 255
    Image.fromarray(arr).save(tmp_path / "m.png")
    resized = np.asarray(Image.fromarray(arr).resize((37, 37), Image.Resampling.BILINEAR))
    strict = original_mask(tmp_path / "m.png", 37, "mvtec")
    loose = original_mask(tmp_path / "m.png", 37, "visa")
    assert np.array_equal(strict, resized == 255) and np.array_equal(loose, resized > 0)
    ours = mask_tensor(arr > 0, 37).numpy()
    assert strict.sum() < ours.sum() < loose.sum()
