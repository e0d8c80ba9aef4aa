"""PatchCore memory-bank core (filo.memory): each step against a slow, independent version."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from filo.backbone import TapConfig, build_clip, encode_image_two_stream
from filo.errors import FiloError
from filo.memory import (
    BankMeta,
    ClipTowerFeatures,
    NearestNeighbourScorer,
    WideResNetFeatures,
    aggregate,
    apply_bn_quirk,
    approximate_greedy_coreset,
    build_wide_resnet,
    faiss_available,
    image_scores,
    list_bank_classes,
    load_bank,
    patchcore_mask,
    patchcore_tensor,
    patchify,
    projection_matrix,
    save_bank,
    score_map,
)
from filo.model import FiLoConfig

BACKENDS = ["torch", pytest.param("faiss", marks=pytest.mark.skipif(
    not faiss_available(), reason="faiss not installed"))]


# --------------------------------------------------------------------------------------------
# slow reference helpers (plain python loops, float64)


def slow_bilinear(plane: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bilinear resize with align_corners=False (half-pixel centres, edge clamp)."""
    in_h, in_w = plane.shape
    out = np.zeros((out_h, out_w))

    def coords(o: int, n_in: int, n_out: int) -> tuple[int, int, float]:
        src = max((o + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(math.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        return i0, i1, src - i0

    for y in range(out_h):
        y0, y1, ly = coords(y, in_h, out_h)
        for x in range(out_w):
            x0, x1, lx = coords(x, in_w, out_w)
            top = plane[y0, x0] * (1 - lx) + plane[y0, x1] * lx
            bottom = plane[y1, x0] * (1 - lx) + plane[y1, x1] * lx
            out[y, x] = top * (1 - ly) + bottom * ly
    return out


def slow_adaptive_avg(vec: list[float], out_len: int) -> list[float]:
    n = len(vec)
    res = []
    for i in range(out_len):
        start = (i * n) // out_len
        end = -((-(i + 1) * n) // out_len)  # ceil
        res.append(sum(vec[start:end]) / (end - start))
    return res


def slow_neighbourhood(fmap: np.ndarray, y: int, x: int, p: int) -> list[float]:
    """The p x p zero-padded neighbourhood of (y, x), order (channel, ky, kx)."""
    c, h, w = fmap.shape
    pad = (p - 1) // 2
    vals = []
    for ch in range(c):
        for ky in range(p):
            for kx in range(p):
                yy, xx = y + ky - pad, x + kx - pad
                vals.append(float(fmap[ch, yy, xx]) if 0 <= yy < h and 0 <= xx < w else 0.0)
    return vals


def slow_aggregate(layers: list[np.ndarray], p: int, pre: int, target: int) -> np.ndarray:
    """layers: per layer [B, C, H, W]; the first layer's grid is the reference."""
    b, _, h0, w0 = layers[0].shape
    rows = []
    for img in range(b):
        per_layer_rows = []  # per layer: [h0*w0][pre]
        for li, feat in enumerate(layers):
            _, c, h, w = feat.shape
            # unfolded planes at the layer's own grid: [C*p*p, h, w]
            planes = np.zeros((c * p * p, h, w))
            for y in range(h):
                for x in range(w):
                    planes[:, y, x] = slow_neighbourhood(feat[img], y, x, p)
            if li > 0:
                planes = np.stack([slow_bilinear(pl, h0, w0) for pl in planes])
            per_layer_rows.append([slow_adaptive_avg(list(planes[:, y, x]), pre)
                                   for y in range(h0) for x in range(w0)])
        for pos in range(h0 * w0):
            stacked = [v for layer_rows in per_layer_rows for v in layer_rows[pos]]
            rows.append(slow_adaptive_avg(stacked, target))
    return np.array(rows)


def slow_knn_scores(bank: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    out = []
    for q in queries.astype(np.float64):
        d = sorted(sum((float(a) - float(b)) ** 2 for a, b in zip(q, row, strict=True))
                   for row in bank.astype(np.float64))
        out.append(sum(d[:k]) / k)
    return np.array(out)


# --------------------------------------------------------------------------------------------
# patch features


def test_patchify_order_and_padding():
    feat = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(1, 2, 3, 4)
    patches = patchify(feat, patchsize=3)
    assert patches.shape == (1, 12, 2, 3, 3)
    f = feat[0].numpy()
    for pos in range(12):
        y, x = divmod(pos, 4)
        want = np.array(slow_neighbourhood(f, y, x, 3)).reshape(2, 3, 3)
        np.testing.assert_array_equal(patches[0, pos].numpy(), want)


def test_aggregate_matches_hand_computation():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(2, 2, 4, 4, generator=gen)   # first layer: the 4 x 4 grid
    b = torch.randn(2, 3, 2, 2, generator=gen)   # deeper layer on a 2 x 2 grid
    got, grid = aggregate([a, b], patchsize=3, pretrain_dim=7, target_dim=5)
    assert grid == (4, 4)
    assert got.shape == (2 * 16, 5)
    want = slow_aggregate([a.double().numpy(), b.double().numpy()], 3, 7, 5)
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5, atol=1e-6)


def test_aggregate_reference_dims_pooling():
    # 2048 -> 1024 is the mean of adjacent pairs; 4608 -> 1024 uses overlapping windows
    v = torch.randn(1, 1, 2048, dtype=torch.float64)
    pooled = torch.nn.functional.adaptive_avg_pool1d(v, 1024)[0, 0]
    torch.testing.assert_close(pooled, v[0, 0].reshape(1024, 2).mean(1))
    x = list(np.random.default_rng(0).standard_normal(4608))
    got = torch.nn.functional.adaptive_avg_pool1d(torch.tensor(x)[None, None], 1024)[0, 0]
    np.testing.assert_allclose(got.numpy(), slow_adaptive_avg(x, 1024), rtol=1e-12)


def reference_aggregate(features, patchsize=3, pretrain_dim=1024, target_dim=1024):
    """filo's former aggregation, kept as the slow reference: unfold every layer into C*p*p
    planes, upsample the deeper layers' planes, pool each position's vector twice."""
    from filo.memory.patchcore import patch_grid

    pooled, ref = [], None
    batch = features[0].shape[0]
    for feat in features:
        cols = torch.nn.functional.unfold(feat, patchsize, padding=(patchsize - 1) // 2)
        grid = patch_grid(feat.shape[-2], feat.shape[-1], patchsize)
        width = cols.shape[1]
        if ref is None:
            ref = grid
        elif grid != ref:
            planes = torch.nn.functional.interpolate(cols.reshape(batch, width, *grid), size=ref,
                                                     mode="bilinear", align_corners=False)
            cols = planes.reshape(batch, width, ref[0] * ref[1])
        rows = cols.transpose(1, 2).reshape(-1, 1, width)
        pooled.append(torch.nn.functional.adaptive_avg_pool1d(rows, pretrain_dim).squeeze(1))
    stacked = torch.stack(pooled, dim=1).reshape(len(pooled[0]), 1, -1)
    return torch.nn.functional.adaptive_avg_pool1d(stacked, target_dim).squeeze(1), ref


@pytest.mark.parametrize("channels,sizes,pre,target,grouped", [
    ((512, 1024), ((12, 10), (6, 5)), 1024, 1024, True),   # the reference run's dimensions
    ((64, 96), ((8, 8), (4, 4)), 576, 576, True),          # other grouped structure
    ((2, 3), ((5, 4), (3, 2)), 8, 5, True),                # a final window across both layers
    ((64, 96), ((8, 8), (4, 4)), 1000, 700, False),        # general pool-then-upsample path
    ((16, 24, 8), ((9, 7), (5, 4), (3, 2)), 100, 64, False),
])
def test_aggregate_equals_the_former_unfold_implementation(channels, sizes, pre, target,
                                                           grouped):
    from filo.memory.aggregation import grouped_kernels

    assert (grouped_kernels(channels, 3, pre, target) is not None) == grouped
    gen = torch.Generator().manual_seed(1)
    feats = [torch.randn(2, c, *hw, generator=gen).relu()
             for c, hw in zip(channels, sizes, strict=True)]
    want, want_grid = reference_aggregate(feats, 3, pre, target)
    got, grid = aggregate(feats, 3, pre, target)
    assert grid == want_grid and got.shape == want.shape
    rel = float((got - want).abs().max() / want.abs().max())
    assert rel <= 1e-6, rel
    buf = torch.empty(got.shape, dtype=torch.float16)  # written in place, converted
    out, _ = aggregate(feats, 3, pre, target, out=buf)
    assert out is buf
    torch.testing.assert_close(buf.float(), want, rtol=2e-3, atol=1e-3)


def test_reference_dims_reduce_to_small_kernels():
    from filo.memory.aggregation import grouped_kernels

    layer2, layer3 = grouped_kernels((512, 1024), 3, 1024, 1024)
    # layer2: output j (< 512) is one depthwise 3x3 kernel of channel j: (all 9 + centre) / 10
    assert layer2.groups == 512 and tuple(layer2.weight.shape) == (512, 1, 3, 3)
    want = torch.full((3, 3), 0.1, dtype=torch.float64)
    want[1, 1] = 0.2
    torch.testing.assert_close(layer2.weight[7, 0], want)
    # layer3: output 512 + j averages channels 2j, 2j+1 over 3x3
    assert layer3.groups == 512 and tuple(layer3.weight.shape) == (512, 2, 3, 3)
    torch.testing.assert_close(layer3.weight[3], torch.full((2, 3, 3), 1 / 18,
                                                            dtype=torch.float64))
    assert list(layer3.rows) == list(range(512, 1024))


# --------------------------------------------------------------------------------------------
# coreset


def slow_greedy_coreset(x: np.ndarray, percentage: float, seed: int, n_starts: int,
                        proj_dim: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    n, d = x.shape
    if d != proj_dim:
        w = torch.empty(proj_dim, d)
        torch.nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=gen)
        proj = x @ w.double().numpy().T
    else:
        proj = x
    starts = torch.randperm(n, generator=gen)[:n_starts].tolist()

    def dist(i: int, j: int) -> float:
        return math.sqrt(sum((float(a) - float(b)) ** 2 for a, b in zip(proj[i], proj[j],
                                                                          strict=True)))

    min_d = [sum(dist(i, s) for s in starts) / len(starts) for i in range(n)]
    picks = []
    for _ in range(int(n * percentage)):
        best = max(range(n), key=lambda i: (min_d[i], -i))  # first index on ties
        picks.append(best)
        min_d = [min(min_d[i], dist(i, best)) for i in range(n)]
    return picks


def test_projection_matrix_is_pytorch_default_linear_init():
    w = torch.empty(8, 20)
    torch.nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(projection_matrix(20, 8, torch.Generator().manual_seed(3)), w,
                               rtol=0, atol=0)


@pytest.mark.parametrize(("dim", "proj_dim"), [(20, 8), (8, 8)])
def test_coreset_matches_brute_force(dim, proj_dim):
    x = np.random.default_rng(1).standard_normal((60, dim)).astype(np.float32)
    got = approximate_greedy_coreset(torch.from_numpy(x), 0.25, seed=5, n_starts=4,
                                     proj_dim=proj_dim)
    want = slow_greedy_coreset(x.astype(np.float64), 0.25, 5, 4, proj_dim)
    assert got.dtype == torch.long
    assert got.tolist() == want
    # numpy input and an explicit device give the same picks
    assert approximate_greedy_coreset(x, 0.25, seed=5, n_starts=4, proj_dim=proj_dim,
                                      device="cpu").tolist() == want


def test_coreset_full_and_invalid():
    x = torch.randn(17, 6)
    assert approximate_greedy_coreset(x, 1.0).tolist() == list(range(17))
    assert approximate_greedy_coreset(x, 0.01).numel() == 0  # int(17 * 0.01) == 0
    with pytest.raises(FiloError):
        approximate_greedy_coreset(x, 0.0)


# --------------------------------------------------------------------------------------------
# nearest neighbours


@pytest.fixture(scope="module")
def knn_data():
    rng = np.random.default_rng(2)
    bank = (rng.standard_normal((50, 16)) * 3 + 1).astype(np.float32)
    # 30 queries (faiss takes its BLAS route from 20 on), a few close to bank rows
    queries = (rng.standard_normal((30, 16)) * 3 + 1).astype(np.float32)
    queries[:5] = bank[:5] + 0.01 * rng.standard_normal((5, 16)).astype(np.float32)
    return bank, queries


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("backend", BACKENDS)
def test_knn_near_ties_are_ranked_by_exact_distances(backend, k):
    # queries far from the origin with bank rows 0.01 apart from them: |q|^2 ~ 6e7, so the
    # expansion |q|^2 - 2 q.b + |b|^2 cannot tell the candidates apart in float32
    rng = np.random.default_rng(5)
    centre = np.full(64, 1000.0)
    queries = (centre + rng.standard_normal((24, 64))).astype(np.float32)
    near = [queries + s * rng.standard_normal(queries.shape).astype(np.float32)
            for s in (0.01, 0.013, 0.016)]
    far = (centre + 20 * rng.standard_normal((40, 64))).astype(np.float32)
    bank = np.concatenate([*near, far])
    scorer = NearestNeighbourScorer(bank, k=k, backend=backend, device="cpu")
    dist, idx = scorer.search(queries)
    d64 = ((queries[:, None, :].astype(np.float64) - bank[None].astype(np.float64)) ** 2).sum(-1)
    want_idx = np.argsort(d64, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_allclose(dist, np.take_along_axis(d64, want_idx, 1), rtol=1e-4)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("backend", BACKENDS)
def test_knn_scores_match_loops(knn_data, backend, k):
    bank, queries = knn_data
    want = slow_knn_scores(bank, queries, k)
    scorer = NearestNeighbourScorer(torch.from_numpy(bank), k=k, backend=backend, device="cpu")
    got = scorer.scores(torch.from_numpy(queries))
    assert got.dtype == np.float32 and got.shape == (30,)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    dist, idx = scorer.search(queries)
    assert dist.shape == idx.shape == (30, k)
    assert np.all(np.diff(dist, axis=1) >= 0)


@pytest.mark.skipif(not faiss_available(), reason="faiss not installed")
@pytest.mark.parametrize("k", [1, 3])
def test_knn_backends_agree(knn_data, k):
    bank, queries = knn_data
    ref = NearestNeighbourScorer(bank, k=k, backend="torch", device="cpu").scores(queries)
    refined = NearestNeighbourScorer(bank, k=k, backend="faiss").scores(queries)
    np.testing.assert_array_equal(refined, ref)  # same neighbours, same float32 arithmetic
    raw = NearestNeighbourScorer(bank, k=k, backend="faiss", refine=False).scores(queries)
    np.testing.assert_allclose(raw, ref, rtol=1e-4, atol=1e-4 * ref.max())
    # ivf with every list probed is exact; hnsw finds real rows (never closer than exact)
    ivf = NearestNeighbourScorer(bank, k=k, backend="faiss", index="ivf", nlist=4, nprobe=4)
    np.testing.assert_allclose(ivf.scores(queries), ref, rtol=1e-6)
    hnsw = NearestNeighbourScorer(bank, k=k, backend="faiss", index="hnsw").scores(queries)
    assert np.all(hnsw >= ref * (1 - 1e-6))


def test_knn_storage_round_trip(knn_data, tmp_path):
    bank, queries = knn_data
    scorer = NearestNeighbourScorer(bank, k=2, backend="torch", device="cpu")
    path = scorer.save(tmp_path / "bank.npy")
    loaded = NearestNeighbourScorer.load(path, k=2, backend="torch", device="cpu")
    np.testing.assert_array_equal(loaded.bank, bank)
    np.testing.assert_array_equal(loaded.scores(queries), scorer.scores(queries))
    again = NearestNeighbourScorer.from_bytes(scorer.to_bytes(), k=2, backend="auto")
    np.testing.assert_allclose(again.scores(queries), scorer.scores(queries), rtol=1e-6)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(FiloError, match="truncated") as err:
        NearestNeighbourScorer.load(path)
    assert "\n" not in str(err.value)


def test_knn_invalid_settings(knn_data):
    bank, queries = knn_data
    with pytest.raises(FiloError, match="51 nearest"):
        NearestNeighbourScorer(bank, k=51, backend="torch")
    with pytest.raises(FiloError, match="needs faiss"):
        NearestNeighbourScorer(bank, backend="torch", index="ivf")
    with pytest.raises(FiloError, match="dimension 15"):
        NearestNeighbourScorer(bank, backend="torch", device="cpu").scores(queries[:, :15])


# --------------------------------------------------------------------------------------------
# maps and image scores


def test_score_map_matches_direct_computation():
    rng = np.random.default_rng(3)
    patch = (rng.random((2, 7 * 7)) * 1000).astype(np.float32)
    maps, grid = score_map(torch.from_numpy(patch), (7, 7), 28, sigma=4.0)
    assert maps.dtype == np.float32 and maps.shape == (2, 28, 28)
    np.testing.assert_array_equal(grid, patch.reshape(2, 7, 7))
    for i in range(2):
        up = slow_bilinear(patch[i].reshape(7, 7).astype(np.float64), 28, 28)
        want = ndimage.gaussian_filter(up, sigma=4.0, mode="reflect", truncate=4.0)
        np.testing.assert_allclose(maps[i], want, rtol=1e-5, atol=1e-3)
    unsmoothed, _ = score_map(patch, (7, 7), (14, 21), sigma=0)
    np.testing.assert_allclose(unsmoothed[1], slow_bilinear(patch[1].reshape(7, 7), 14, 21),
                               rtol=1e-5, atol=1e-3)


def test_image_score_rules_by_hand():
    grid = np.array([[[1.0, 5.0], [3.0, 2.0]], [[4.0, 4.0], [0.0, 8.0]]], dtype=np.float32)
    np.testing.assert_allclose(image_scores(grid, "max"), [5.0, 8.0])
    np.testing.assert_allclose(image_scores(grid, "topk_mean", topk=2), [4.0, 6.0])
    np.testing.assert_allclose(image_scores(grid.reshape(2, 4), "topk_mean", topk=10),
                               [11 / 4, 16 / 4])
    np.testing.assert_allclose(image_scores(grid, "mean"), [11 / 4, 4.0])
    var0 = sum((v - 11 / 4) ** 2 for v in (1, 5, 3, 2)) / 4
    var1 = sum((v - 4) ** 2 for v in (4, 4, 0, 8)) / 4
    np.testing.assert_allclose(image_scores(torch.from_numpy(grid), "var"), [var0, var1],
                               rtol=1e-6)
    with pytest.raises(FiloError, match="rule"):
        image_scores(grid, "median")


# --------------------------------------------------------------------------------------------
# bank files


def _meta(**kw) -> BankMeta:
    return BankMeta(backbone="wrn50", weights="ckpt/w.pth", layers=["layer2", "layer3"],
                    target_dim=8, n_images=2, grid=[2, 2], image_paths=["a.png", "b.png"], **kw)


def test_bank_round_trip_and_listing(tmp_path):
    bank = torch.randn(6, 8)
    meta = _meta(calibration={"image_threshold": np.float32(1.5), "stats": np.arange(2)})
    folder = save_bank(tmp_path, "bottle", bank, meta)
    assert folder == tmp_path / "bottle"
    got, got_meta = load_bank(tmp_path, "bottle", expect={"layers": ("layer2", "layer3"),
                                                          "patchsize": 3, "crop": True})
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, bank.numpy())
    assert got_meta.n_patches == 6 and got_meta.grid == [2, 2]
    assert got_meta.calibration == {"image_threshold": 1.5, "stats": [0, 1]}
    assert got_meta.image_paths == ["a.png", "b.png"]
    save_bank(tmp_path, "cable", np.zeros((3, 8), np.float32), _meta())
    (tmp_path / "half").mkdir()
    assert list_bank_classes(tmp_path) == ["bottle", "cable"]
    assert list_bank_classes(tmp_path / "nowhere") == []


def test_bank_settings_mismatch_message(tmp_path):
    save_bank(tmp_path, "bottle", np.zeros((4, 8), np.float32), _meta())
    with pytest.raises(FiloError) as err:
        load_bank(tmp_path, "bottle", expect={"backbone": "wrn50", "imagesize": 320})
    msg = str(err.value)
    assert "\n" not in msg
    assert "meta.json" in msg and "imagesize=224" in msg and "imagesize=320" in msg
    assert "rebuild the bank" in msg


def test_bank_damaged_files_are_one_line_errors(tmp_path):
    with pytest.raises(FiloError, match="no memory bank for class bottle"):
        load_bank(tmp_path, "bottle")
    folder = save_bank(tmp_path, "bottle", np.ones((4, 8), np.float32), _meta())
    data = (folder / "bank.npy").read_bytes()
    (folder / "bank.npy").write_bytes(data[: len(data) - 20])
    with pytest.raises(FiloError) as err:
        load_bank(tmp_path, "bottle")
    assert "bank.npy" in str(err.value) and "truncated" in str(err.value)
    assert "\n" not in str(err.value)
    # rows disagreeing with the meta
    np.save(folder / "bank.npy", np.ones((5, 8), np.float32))
    with pytest.raises(FiloError, match="5 x 8 but meta.json says 4 x 8"):
        load_bank(tmp_path, "bottle")
    # pickled object arrays are refused
    np.save(folder / "bank.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(FiloError, match="bank.npy"):
        load_bank(tmp_path, "bottle")
    (folder / "meta.json").write_text("{not json")
    with pytest.raises(FiloError, match="meta.json"):
        load_bank(tmp_path, "bottle")
    (folder / "meta.json").write_text(json.dumps({"backbone": "wrn50"}))
    with pytest.raises(FiloError, match="lacks"):
        load_bank(tmp_path, "bottle")
    with pytest.raises(FiloError, match="folder name"):
        save_bank(tmp_path, "../x", np.ones((1, 8), np.float32), _meta())


# --------------------------------------------------------------------------------------------
# transforms


def test_patchcore_tensor_resize_crop_and_grayscale():
    rng = np.random.default_rng(4)
    gray = Image.fromarray(rng.integers(0, 256, (300, 400), dtype=np.uint8), "L")
    got = patchcore_tensor(gray, 256, 224)
    # by hand: RGB first, shorter side 256, longer int(256 * 400 / 300) = 341, crop offsets
    # int(round((n - 224) / 2)): top 16, left round(58.5) = 58
    rgb = gray.convert("RGB").resize((341, 256), Image.BILINEAR)
    arr = np.asarray(rgb, dtype=np.float32)[16:240, 58:282] / 255.0
    want = (arr - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    assert got.shape == (3, 224, 224)
    np.testing.assert_allclose(got.permute(1, 2, 0).numpy(), want, rtol=1e-5, atol=1e-5)
    square = patchcore_tensor(gray, imagesize=64, crop=False, mean=(0.5,) * 3, std=(0.25,) * 3)
    arr = np.asarray(gray.convert("RGB").resize((64, 64), Image.BILINEAR), np.float32) / 255
    np.testing.assert_allclose(square.permute(1, 2, 0).numpy(), (arr - 0.5) / 0.25, atol=1e-5)


def test_patchcore_mask_keeps_only_full_pixels():
    m = np.zeros((300, 400), np.uint8)
    m[100:171, 150:233] = 255
    mask = Image.fromarray(m, "L")
    got = patchcore_mask(mask, 256, 224)
    resized = np.asarray(mask.resize((341, 256), Image.BILINEAR))[16:240, 58:282]
    assert got.dtype == torch.bool and got.shape == (224, 224)
    np.testing.assert_array_equal(got.numpy(), resized == 255)
    assert ((resized > 0) & (resized < 255)).any()  # blurred border pixels exist, not counted
    whole = patchcore_mask(mask, imagesize=32, crop=False)
    np.testing.assert_array_equal(whole.numpy(),
                                  np.asarray(mask.resize((32, 32), Image.BILINEAR)) == 255)


# --------------------------------------------------------------------------------------------
# backbones


@pytest.fixture(scope="module")
def wrn50():
    torch.manual_seed(0)
    return build_wide_resnet("wrn50", None, bn_quirk=False)


def _bn_buffers(model: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items()
            if k.startswith(prefix) and ("running_" in k or "num_batches" in k)}


def test_wide_resnet_feature_shapes(wrn50):
    assert not wrn50.training
    feats = WideResNetFeatures(wrn50, ("layer2", "layer3"))(torch.randn(1, 3, 224, 224))
    assert [tuple(f.shape) for f in feats] == [(1, 512, 28, 28), (1, 1024, 14, 14)]
    assert not feats[0].requires_grad
    with pytest.raises(FiloError, match="layer"):
        WideResNetFeatures(wrn50, ("layer5",))


def test_bn_quirk_is_one_train_forward_of_ones(wrn50):
    quirked = copy.deepcopy(wrn50)
    apply_bn_quirk(quirked, 224, "layer3")
    assert not quirked.training
    manual = copy.deepcopy(wrn50)
    manual.train()
    with torch.no_grad():
        x = manual.maxpool(manual.relu(manual.bn1(manual.conv1(torch.ones(1, 3, 224, 224)))))
        manual.layer3(manual.layer2(manual.layer1(x)))
    got, want, before = _bn_buffers(quirked), _bn_buffers(manual), _bn_buffers(wrn50)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0)
    changed = [k for k in want if "running_mean" in k and not torch.equal(want[k], before[k])]
    assert any(k.startswith("layer3") for k in changed) and any(k == "bn1.running_mean"
                                                                for k in changed)
    # layer4 is never reached (the original stops after the last layer it uses)
    for key, value in _bn_buffers(wrn50, "layer4").items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0)


def test_wide_resnet_weights_loading(wrn50, tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(3, 3), "extra.bias": torch.zeros(1)}, bad)
    with pytest.raises(FiloError) as err:
        build_wide_resnet("wrn50", bad, bn_quirk=False)
    msg = str(err.value)
    assert "\n" not in msg and str(bad) in msg and "missing" in msg and "extra.bias" in msg
    assert "wide_resnet50_2-95faca4d.pth" in msg
    with pytest.raises(FiloError, match="not found"):
        build_wide_resnet("wrn50", tmp_path / "absent.pth")
    with pytest.raises(FiloError, match="unknown WideResNet"):
        build_wide_resnet("wrn18", None)
    # a matching file loads strictly (saved in DataParallel layout to exercise the cleaning)
    good = tmp_path / "good.pth"
    torch.save({f"module.{k}": v for k, v in wrn50.state_dict().items()}, good)
    loaded = build_wide_resnet("wrn50", good, bn_quirk=False)
    for key, value in wrn50.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_clip_tower_equals_two_stream_ori_taps():
    torch.manual_seed(1)
    cfg = FiLoConfig.tiny()
    visual = build_clip(cfg.clip).visual.eval()
    x = torch.randn(2, 3, cfg.clip.image_size, cfg.clip.image_size)
    tower = ClipTowerFeatures(visual, blocks=(3, 2))
    got = tower(x)
    n = cfg.clip.vision_layers
    taps = TapConfig.for_depth(n, mode="true")  # ori after blocks 1..4
    with torch.no_grad():
        ref = encode_image_two_stream(visual, x, taps).linear_taps
    g = cfg.clip.grid_size
    for feat, block in zip(got, (3, 2), strict=True):
        assert feat.shape == (2, cfg.clip.vision_width, g, g)
        want = ref[taps.true_layers.index(block)][:, 1:].reshape(2, g, g, -1).permute(0, 3, 1, 2)
        torch.testing.assert_close(feat, want, rtol=1e-6, atol=1e-6)
    assert tower.mean == (0.48145466, 0.4578275, 0.40821073)
    with pytest.raises(FiloError, match="1-based"):
        ClipTowerFeatures(visual, blocks=(0,))
