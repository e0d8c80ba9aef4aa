"""PatchCore (Roth et al., CVPR 2022) as a memory-bank scorer: patch features, coreset, kNN, maps.

What each step computes (the reference run: WideResNet-50-2 layers 2 and 3, patch size 3,
1024/1024 dims, 10 % approximate greedy coreset, 1 nearest neighbour):

1. :func:`patchify` / :func:`aggregate`: every layer's map is unfolded into 3 x 3 neighbourhoods
   (stride 1, zero padding 1, vector order channel, ky, kx) on its own grid; the unfolded
   ``C*9`` planes of deeper layers are then upsampled bilinearly (``align_corners=False``) to
   the first layer's grid. Each layer's ``C*9`` vector is average-pooled to ``pretrain_dim``
   with ``adaptive_avg_pool1d`` (overlapping adaptive windows), the layers are concatenated in
   order and pooled again to ``target_dim``. Rows: image by image, row-major over the grid.
2. :func:`approximate_greedy_coreset`: greedy k-center selection on a random 128-d projection,
   started from the mean distance to 10 random rows (details in the function). The projection
   and the start rows are the original run's for ``seed`` (``rng="original"``,
   :mod:`filo.memory.original_rng`) or come from filo's own ``torch.Generator`` seeded with
   ``seed`` (``rng="filo"``); either way picks are reproducible.
3. :class:`NearestNeighbourScorer`: patch score = mean over the ``k`` nearest bank rows of the
   SQUARED Euclidean distance (faiss ``IndexFlatL2`` semantics, no square root).
4. :func:`image_scores`: the maximum of the patch-score grid (before any upsampling) for
   PatchCore; ``topk_mean``, ``mean`` and ``var`` are alternatives.
5. :func:`score_map`: bilinear upsampling of the grid (``align_corners=False``), then a
   Gaussian filter with sigma 4 in scipy's semantics (reflect padding, truncate 4). Maps and
   scores are raw squared distances (they can exceed 1000).
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from filo.errors import FiloError
from filo.fileio import atomic_save_npy
from filo.memory.aggregation import fast_aggregate, patch_grid

logger = logging.getLogger(__name__)

__all__ = ["IMAGE_SCORE_RULES", "NN_BACKENDS", "NN_INDEXES", "NearestNeighbourScorer",
           "aggregate", "approximate_greedy_coreset", "faiss_available", "image_scores",
           "patch_grid", "patchify", "projection_matrix", "score_map"]

IMAGE_SCORE_RULES = ("max", "topk_mean", "mean", "var")
NN_BACKENDS = ("auto", "faiss", "torch")
NN_INDEXES = ("flat", "ivf", "hnsw")

# working-memory budget (bytes) of one chunk of a distance computation
_CHUNK_BYTES = 1 << 27
# relative rounding bound of |q|^2 - 2 q.b + |b|^2 in float32 (of |q|^2 + |b|^2): candidates
# closer than this are near-ties and re-ranked by exactly computed distances
_TIE_RTOL = 1e-5


# --------------------------------------------------------------------------------------------
# patch features


def _unfold(feat: torch.Tensor, patchsize: int, stride: int) -> torch.Tensor:
    """``[B, C*p*p, L]``: neighbourhoods as columns, vector order (channel, ky, kx)."""
    if feat.dim() != 4:
        raise ValueError(f"expected a [B, C, H, W] feature map, got shape {tuple(feat.shape)}")
    return F.unfold(feat, kernel_size=patchsize, stride=stride, padding=(patchsize - 1) // 2)


def patchify(feat: torch.Tensor, patchsize: int = 3, stride: int = 1) -> torch.Tensor:
    """``[B, C, H, W] -> [B, L, C, p, p]``: the ``p x p`` neighbourhood of every grid position.

    Zero padding ``(p-1)//2``; ``L = H*W`` for odd ``p`` and stride 1 (:func:`patch_grid`),
    positions in row-major order.
    """
    b, c = feat.shape[:2]
    cols = _unfold(feat, patchsize, stride)
    return cols.reshape(b, c, patchsize, patchsize, -1).permute(0, 4, 1, 2, 3)


def aggregate(features: Sequence[torch.Tensor], patchsize: int = 3, pretrain_dim: int = 1024,
              target_dim: int = 1024, stride: int = 1, *, out: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, tuple[int, int]]:
    """Locally aware patch features ``[B*H0*W0, target_dim]`` and the grid ``(H0, W0)``.

    ``features``: per layer ``[B, C_l, H_l, W_l]``, the first layer defines the grid. The result
    is the module docstring's step 1, computed as grouped convolutions at each layer's own grid
    followed by the upsampling (:mod:`filo.memory.aggregation`, docs/design.md §13.4), in the
    features' dtype and device. ``out``: optional ``[B*H0*W0, target_dim]`` tensor written in
    place (and returned).
    """
    return fast_aggregate(features, patchsize, pretrain_dim, target_dim, stride, out=out)


# --------------------------------------------------------------------------------------------
# coreset


def projection_matrix(in_dim: int, out_dim: int, generator: torch.Generator) -> torch.Tensor:
    """``[out_dim, in_dim]`` weight of a bias-free ``nn.Linear`` with PyTorch's default init.

    That init is ``kaiming_uniform_(a=sqrt(5))``: uniform on ``[-b, b]`` with
    ``b = sqrt(3) * sqrt(2 / (1 + a^2)) / sqrt(in_dim)``, drawn from ``generator`` on the CPU.
    """
    a = math.sqrt(5)
    bound = math.sqrt(3.0) * (math.sqrt(2.0 / (1 + a * a)) / math.sqrt(in_dim))
    return torch.empty(out_dim, in_dim).uniform_(-bound, bound, generator=generator)


def _euclidean_to(points: torch.Tensor, sq: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``[N, len(idx)]`` distances ``sqrt(clamp(|a|^2 - 2 a.b + |b|^2, 0))`` to rows ``idx``."""
    b = points[idx]
    out = torch.empty(points.shape[0], b.shape[0], device=points.device, dtype=points.dtype)
    step = max(1, _CHUNK_BYTES // (4 * max(1, b.shape[0])))
    for i in range(0, points.shape[0], step):
        ab = points[i:i + step] @ b.T
        out[i:i + step] = (-2 * ab + sq[i:i + step, None] + sq[idx][None]).clamp_(min=0).sqrt_()
    return out


def approximate_greedy_coreset(features: torch.Tensor | np.ndarray, percentage: float,
                               seed: int = 0, n_starts: int = 10, proj_dim: int = 128,
                               device: str | torch.device | None = None,
                               progress: bool = False, rng: str = "filo",
                               arch: str = "wrn50") -> torch.Tensor:
    """Indices (pick order) of PatchCore's approximate greedy coreset of ``features`` [N, D].

    * ``percentage >= 1``: all rows, ``arange(N)`` (no subsampling).
    * Projection: ``features @ W.T`` with ``W`` from :func:`projection_matrix`
      (``proj_dim x D``) drawn from ``torch.Generator().manual_seed(seed)``; like the original,
      features that already have ``proj_dim`` columns are not projected (nothing is drawn).
    * Start rows: the first ``min(n_starts, N)`` of ``torch.randperm(N)`` from the same
      generator (after the projection). Each row's distance to the coreset starts as its mean
      Euclidean distance to the start rows (the start rows are not part of the coreset).
    * Then ``int(N * percentage)`` times: pick the row with the largest distance (the first
      one on ties) and lower every row's distance to its distance from the pick.

    Distances: ``sqrt(clamp(|a|^2 - 2 a.b + |b|^2, 0))`` in float32 on ``device`` (default:
    the features' device). Memory: the projected features (``N x proj_dim``) plus O(N); the
    projection is chunked, so 200,000 x 1,024 needs about 100 MB besides the input.
    """
    n = int(features.shape[0])
    if percentage >= 1:
        return torch.arange(n)
    if percentage <= 0:
        raise FiloError(f"coreset fraction must be in (0, 1], got {percentage}")
    n_pick = int(n * percentage)
    if isinstance(features, np.ndarray):
        features = torch.from_numpy(features)
    device = torch.device(device) if device is not None else features.device
    d = int(features.shape[1])
    if rng == "original":
        from filo.memory.original_rng import original_draws

        weight, starts = original_draws(seed, n, d, proj_dim, n_starts, arch)
    elif rng == "filo":
        gen = torch.Generator().manual_seed(int(seed))
        weight = None if d == proj_dim else projection_matrix(d, proj_dim, gen)
        starts = torch.randperm(n, generator=gen)[: min(n_starts, n)]
    else:
        raise FiloError(f"coreset random numbers {rng!r}: use original or filo")
    weight = weight.to(device) if weight is not None else None
    starts = starts.to(device)
    if n_pick == 0:
        return torch.zeros(0, dtype=torch.long)

    out_dim = d if weight is None else proj_dim
    proj = torch.empty(n, out_dim, device=device, dtype=torch.float32)
    step = max(1, _CHUNK_BYTES // (4 * max(d, 1)))
    with torch.no_grad():
        for i in range(0, n, step):
            chunk = features[i:i + step].to(device=device, dtype=torch.float32)
            proj[i:i + step] = chunk if weight is None else chunk @ weight.T
        # squared norms as batched dot products, the original's arithmetic: a plain sum rounds
        # differently in the last bit, enough to flip a near-tie pick
        sq = torch.bmm(proj.unsqueeze(1), proj.unsqueeze(2)).reshape(-1)
        min_dist = _euclidean_to(proj, sq, starts).mean(1)
        picks = torch.empty(n_pick, dtype=torch.long, device=device)
        steps = range(n_pick)
        if progress:
            from tqdm import tqdm

            steps = tqdm(steps, desc="coreset", unit="pick", leave=False)
        dist = torch.empty_like(min_dist)
        with _pick_threads(device):
            for t in steps:
                i = torch.argmax(min_dist)  # stays on the device: no synchronisation per pick
                picks[t] = i
                torch.mv(proj, proj[i], out=dist)  # the same arithmetic, into one buffer
                dist.mul_(-2).add_(sq).add_(sq[i]).clamp_(min=0).sqrt_()
                torch.minimum(min_dist, dist, out=min_dist)
    return picks.cpu()


@contextmanager
def _pick_threads(device: torch.device):
    """The CPU pick loop runs on one thread: each pick is one pass over ``N x 128`` floats,
    which more threads do not speed up and a busy machine slows down 5-25x (measured on 2
    cores: docs/design.md §13.4). The caller's thread count is restored afterwards."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------
# nearest neighbours


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _auto_backend(device: torch.device, index: str) -> str:
    """``--nn_backend auto``: the faster path as measured (docs/design.md §13.4): faiss for
    approximate indexes and on the CPU when installed, the torch matrix product on a GPU
    unless faiss has a GPU build."""
    if not faiss_available():
        return "torch"
    if index != "flat" or device.type != "cuda":
        return "faiss"
    import faiss

    return "faiss" if _faiss_gpu_ok(faiss) else "torch"


def _faiss_gpu_ok(faiss) -> bool:
    try:
        return (torch.cuda.is_available() and hasattr(faiss, "StandardGpuResources")
                and faiss.get_num_gpus() > 0)
    except Exception:  # noqa: BLE001 - a broken GPU build just means CPU search
        return False


def _as_float32_matrix(x, what: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    arr = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if arr.ndim != 2:
        raise ValueError(f"{what}: expected a [rows, dim] matrix, got shape {arr.shape}")
    return arr


class NearestNeighbourScorer:
    """Patch scores against a memory bank: mean squared L2 distance to the ``k`` nearest rows.

    ``backend``: ``"faiss"`` (faiss index; a GPU index when CUDA and a GPU build of faiss are
    available and ``gpu`` is not False), ``"torch"`` (exact, chunked), ``"auto"``
    (:func:`_auto_backend`: faiss when importable, except the torch matrix product on a GPU
    without a faiss GPU build). ``index`` (faiss only): ``"flat"`` exact (``IndexFlatL2``),
    ``"ivf"`` (``IndexIVFFlat``, ``nlist`` default ``round(sqrt(M))`` clusters trained on the
    bank, ``nprobe`` default ``max(16, nlist // 8)`` capped at ``nlist``) or ``"hnsw"``
    (``IndexHNSWFlat``, ``hnsw_m`` links, ``ef_search``), approximate, for very large banks.

    ``refine`` (default True): the returned neighbours' squared distances are recomputed as
    sums of squared differences (float32), and for exact search the queries whose ``k``-th and
    ``(k+1)``-th candidates are near-ties are re-ranked over ``k + 8`` candidates by them
    (:meth:`search`), so every backend and device gives the same scores for exact search.
    faiss's BLAS route computes ``|q|^2 - 2 q.b + |b|^2``, which loses precision for near
    neighbours (up to ~6e-5 of a map's maximum); ``refine=False`` returns faiss's raw values as
    the original PatchCore did (the torch backend is always exact).

    The bank is kept as a float32 matrix (:attr:`bank`); :meth:`save` / :meth:`load` and
    :meth:`to_bytes` / :meth:`from_bytes` store only that matrix (``.npy``) and rebuild the
    index on load.
    """

    def __init__(self, bank: torch.Tensor | np.ndarray, k: int = 1, backend: str = "auto",
                 index: str = "flat", *, refine: bool = True, nlist: int | None = None,
                 nprobe: int | None = None, hnsw_m: int = 32, ef_search: int = 128,
                 gpu: bool | None = None, device: str | torch.device | None = None) -> None:
        self.bank = _as_float32_matrix(bank, "memory bank")
        m = self.bank.shape[0]
        if backend not in NN_BACKENDS:
            raise FiloError(f"nearest-neighbour backend {backend!r}: use one of "
                            f"{', '.join(NN_BACKENDS)}")
        if index not in NN_INDEXES:
            raise FiloError(f"nearest-neighbour index {index!r}: use one of "
                            f"{', '.join(NN_INDEXES)}")
        if m == 0:
            raise FiloError("the memory bank is empty")
        if not 1 <= k <= m:
            raise FiloError(f"{k} nearest neighbours asked of a memory bank of {m} rows")
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        if backend == "auto":
            backend = _auto_backend(self.device, index)
        if backend == "faiss" and not faiss_available():
            raise FiloError("nearest-neighbour backend faiss: faiss is not installed; "
                            "pip install faiss-cpu, or use the torch backend")
        if backend == "torch" and index != "flat":
            raise FiloError(f"the {index} index needs faiss (pip install faiss-cpu); the torch "
                            "backend searches exactly (index flat)")
        self.k = int(k)
        self.backend = backend
        self.index_kind = index
        self.refine = bool(refine)
        self._options = {"nlist": nlist, "nprobe": nprobe, "hnsw_m": hnsw_m,
                         "ef_search": ef_search, "gpu": gpu}
        self._bank_t: torch.Tensor | None = None  # the bank on self.device, when needed
        self._bank_sq: torch.Tensor | None = None
        self._faiss_index = self._build_faiss() if backend == "faiss" else None

    # ---- construction ------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.bank.shape[1]

    def __len__(self) -> int:
        return self.bank.shape[0]

    def _build_faiss(self):
        import faiss

        m, d = self.bank.shape
        o = self._options
        if self.index_kind == "flat":
            index = faiss.IndexFlatL2(d)
        elif self.index_kind == "ivf":
            nlist = int(o["nlist"] or max(1, round(math.sqrt(m))))
            if nlist > m:
                raise FiloError(f"ivf index: {nlist} clusters for a bank of {m} rows; use "
                                "fewer clusters or the flat index")
            quantizer = faiss.IndexFlatL2(d)
            index = faiss.IndexIVFFlat(quantizer, d, nlist)
            index.train(self.bank)
            index.nprobe = int(o["nprobe"] or min(nlist, max(16, nlist // 8)))
            self._quantizer = quantizer  # the index refers to it: keep it alive
        else:
            index = faiss.IndexHNSWFlat(d, int(o["hnsw_m"]))
            index.hnsw.efSearch = max(int(o["ef_search"]), self.k + 8)
        index.add(self.bank)
        want_gpu = o["gpu"]
        if (want_gpu or want_gpu is None) and self.index_kind != "hnsw" and _faiss_gpu_ok(faiss):
            self._gpu_resources = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, index)
        elif want_gpu:
            logger.warning("faiss GPU search unavailable (no GPU build, no CUDA or an hnsw "
                           "index); searching on the CPU")
        return index

    def _bank_on_device(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._bank_t is None:
            self._bank_t = torch.from_numpy(self.bank).to(self.device)
            self._bank_sq = (self._bank_t * self._bank_t).sum(1)
        assert self._bank_sq is not None
        return self._bank_t, self._bank_sq

    # ---- search ------------------------------------------------------------------------------
    def _torch_nearest(self, q: torch.Tensor, kc: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Approximate squared distances ``[N, kc]`` (ascending) and rows: one ``addmm``
        ``|b|^2 - 2 q.b`` per chunk into a reused buffer, ``|q|^2`` added after the selection."""
        bank, bank_sq = self._bank_on_device()
        n, m = q.shape[0], len(self)
        vals = torch.empty(n, kc, dtype=torch.float32, device=q.device)
        idx = torch.empty(n, kc, dtype=torch.long, device=q.device)
        step = max(1, min(n, _CHUNK_BYTES // (4 * m)))
        buf = torch.empty(step, m, dtype=torch.float32, device=q.device)
        bank_t = bank.T
        q_sq = (q * q).sum(1)
        for i in range(0, n, step):
            qc = q[i:i + step]
            b = buf[: qc.shape[0]]
            torch.addmm(bank_sq[None], qc, bank_t, alpha=-2, out=b)
            if kc == 1:
                v, ix = torch.min(b, dim=1, keepdim=True)
            else:
                v, ix = torch.topk(b, kc, dim=1, largest=False)
            vals[i:i + step] = v + q_sq[i:i + step, None]
            idx[i:i + step] = ix
        return vals, idx

    def _approximate(self, q: torch.Tensor, q_np: np.ndarray, kc: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.backend == "faiss":
            dist, idx = self._faiss_index.search(q_np, kc)
            if (idx[:, : self.k] < 0).any():
                raise FiloError(f"the {self.index_kind} index found fewer than {self.k} "
                                "neighbours for some patches; raise nprobe / ef_search or use "
                                "the flat index")
            return (torch.from_numpy(dist).to(self.device),
                    torch.from_numpy(idx.astype(np.int64)).to(self.device))
        return self._torch_nearest(q, kc)

    def _exact_rerank(self, q: torch.Tensor, idx: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared distances ``sum((q - b)^2)`` to the candidate rows, best ``k`` first."""
        bank, _ = self._bank_on_device()
        kc = idx.shape[1]
        dist = torch.empty(idx.shape, dtype=torch.float32, device=q.device)
        step = max(1, _CHUNK_BYTES // (4 * kc * self.dim))
        for i in range(0, q.shape[0], step):
            diff = q[i:i + step, None, :] - bank[idx[i:i + step]]
            dist[i:i + step] = (diff * diff).sum(-1)
        if kc == 1:
            return dist, idx
        dist, order = torch.sort(dist, dim=1, stable=True)
        return dist[:, : self.k], torch.gather(idx, 1, order[:, : self.k])

    def search(self, queries: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(squared distances [N, k] float32, bank rows [N, k] int64)``, nearest first.

        Exact search (flat index; faiss with ``refine``): the approximate ``k + 1`` nearest rows
        come from one matrix product (torch) or faiss; rows whose ``k``-th and ``(k+1)``-th
        approximate distances lie closer than the expansion's rounding bound (``_TIE_RTOL`` of
        ``|q|^2 + max |b|^2``) are searched again with ``k + 8`` candidates; the returned
        distances are recomputed as sums of squared differences and ranked by them.
        """
        q_np = _as_float32_matrix(queries, "queries")
        if q_np.shape[1] != self.dim:
            raise FiloError(f"patch features of dimension {q_np.shape[1]} do not fit the memory "
                            f"bank's {self.dim}; rebuild the bank with the same feature settings")
        if self.backend == "faiss" and not self.refine:
            dist, idx = self._faiss_index.search(q_np, self.k)
            if (idx < 0).any():
                raise FiloError(f"the {self.index_kind} index found fewer than {self.k} "
                                "neighbours for some patches; raise nprobe / ef_search or use "
                                "the flat index")
            return dist, idx.astype(np.int64)
        exact = self.index_kind == "flat"
        q = torch.from_numpy(q_np).to(self.device)
        m = len(self)
        kc = min(m, self.k + 1) if exact else self.k
        approx, idx = self._approximate(q, q_np, kc)
        dist, best = self._exact_rerank(q, idx[:, : self.k].contiguous())
        if exact and kc > self.k:
            _, bank_sq = self._bank_on_device()
            tol = _TIE_RTOL * ((q * q).sum(1) + bank_sq.max())
            ties = torch.nonzero(approx[:, self.k] - approx[:, self.k - 1] <= tol).flatten()
            if len(ties):
                qt = q[ties]
                _, tidx = self._approximate(qt, np.ascontiguousarray(q_np[ties.cpu().numpy()]),
                                            min(m, self.k + 8))
                dist[ties], best[ties] = self._exact_rerank(qt, tidx)
        return dist.cpu().numpy(), best.cpu().numpy()

    def scores(self, queries: torch.Tensor | np.ndarray) -> np.ndarray:
        """Patch scores ``[N]`` float32: mean squared L2 distance to the ``k`` nearest rows."""
        dist, _ = self.search(queries)
        return dist.mean(axis=1, dtype=np.float32) if self.k > 1 else dist[:, 0].copy()

    # ---- storage -----------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the bank matrix as a float32 ``.npy`` file (atomically)."""
        return atomic_save_npy(path, self.bank)

    @classmethod
    def load(cls, path: str | Path, k: int = 1, backend: str = "auto", index: str = "flat",
             **options) -> NearestNeighbourScorer:
        """Read a bank written by :meth:`save` and rebuild the index."""
        return cls(_load_npy(path, "memory bank"), k, backend, index, **options)

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.save(buf, self.bank)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, k: int = 1, backend: str = "auto", index: str = "flat",
                   **options) -> NearestNeighbourScorer:
        try:
            bank = np.load(io.BytesIO(data), allow_pickle=False)
        except Exception as err:  # noqa: BLE001 - any decode failure is a bad blob
            raise FiloError(f"memory bank bytes cannot be decoded ({type(err).__name__}): not "
                            "an .npy matrix or truncated") from err
        return cls(bank, k, backend, index, **options)


def _load_npy(path: str | Path, what: str) -> np.ndarray:
    """``np.load(allow_pickle=False)`` of a 2-D array; one-line FiloError otherwise."""
    p = Path(path)
    if not p.is_file():
        raise FiloError(f"{what} not found: {p} does not exist")
    try:
        arr = np.load(p, allow_pickle=False)
    except Exception as err:  # noqa: BLE001 - corrupt, truncated, pickled: all a bad file
        raise FiloError(f"cannot read {what} {p} ({type(err).__name__}): the file is corrupt, "
                        "truncated or not an .npy matrix; rebuild it") from err
    if not isinstance(arr, np.ndarray) or arr.ndim != 2 or not np.issubdtype(arr.dtype,
                                                                             np.floating):
        raise FiloError(f"{what} {p}: expected a 2-D float matrix, got "
                        f"{getattr(arr, 'dtype', type(arr).__name__)} of shape "
                        f"{getattr(arr, 'shape', '?')}; rebuild it")
    return arr


# --------------------------------------------------------------------------------------------
# maps and image scores


def _to_numpy32(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float32).numpy()
    return np.asarray(x, dtype=np.float32)


def score_map(patch_scores: np.ndarray | torch.Tensor, grid: tuple[int, int],
              out_size: int | tuple[int, int], sigma: float = 4.0
              ) -> tuple[np.ndarray, np.ndarray]:
    """``(maps [B, H, W] float32, image_grid [B, H0, W0] float32)`` from patch scores.

    ``patch_scores``: ``[B, H0*W0]`` (or ``[B, H0, W0]``) in row-major grid order. The grid is
    upsampled bilinearly (``align_corners=False``) to ``out_size`` and every map is smoothed by
    ``scipy.ndimage.gaussian_filter(sigma)`` (reflect padding, truncate 4); ``sigma <= 0``
    skips the smoothing.
    """
    h0, w0 = int(grid[0]), int(grid[1])
    s = _to_numpy32(patch_scores)
    image_grid = s.reshape(-1, h0, w0)
    size = (out_size, out_size) if isinstance(out_size, int) else tuple(out_size)
    up = F.interpolate(torch.from_numpy(np.ascontiguousarray(image_grid))[:, None], size=size,
                       mode="bilinear", align_corners=False)[:, 0].numpy()
    if sigma > 0:
        up = np.stack([ndimage.gaussian_filter(m, sigma=sigma) for m in up]) if len(up) else up
    return up.astype(np.float32, copy=False), image_grid


def image_scores(grid_scores: np.ndarray | torch.Tensor, rule: str = "max", topk: int = 10
                 ) -> np.ndarray:
    """Image scores ``[B]`` float32 from patch scores ``[B, H0, W0]`` or ``[B, P]``.

    ``max`` (PatchCore): the largest patch score; ``topk_mean``: mean of the ``topk`` largest
    (all patches if fewer); ``mean``; ``var``: population variance (ddof 0) of the patch
    scores. Computed in float64 on the patch grid, before upsampling and smoothing.
    """
    s = _to_numpy32(grid_scores)
    s = s.reshape(s.shape[0], -1).astype(np.float64)
    if rule == "max":
        out = s.max(axis=1)
    elif rule == "topk_mean":
        if topk < 1:
            raise FiloError(f"topk must be at least 1, got {topk}")
        k = min(int(topk), s.shape[1])
        out = np.sort(s, axis=1)[:, -k:].mean(axis=1)
    elif rule == "mean":
        out = s.mean(axis=1)
    elif rule == "var":
        out = s.var(axis=1)
    else:
        raise FiloError(f"image score rule {rule!r}: use one of {', '.join(IMAGE_SCORE_RULES)}")
    return out.astype(np.float32)
