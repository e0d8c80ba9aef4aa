"""Reference pools: unlabeled images of one class stored as MuSc features on disk.

A pool folder ``POOL/<class>/`` holds ``meta.json`` (settings, member names and input
digests, the tower's source, map statistics), ``normed.npy`` (the layer-normalised taps,
``[layers, N, C, g, g]`` float32, from which LNAMD of every degree is recomputed),
``feats.npy`` (image features ``[N, E]``) and ``raw.npy`` / ``scores.npy`` (each member's
image score from the mutual scoring within the pool, before and after RsCIN). Everything loads
with ``allow_pickle=False``; the taps are memory-mapped. docs/design.md section 16.6.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from filo.errors import FiloError
from filo.fileio import atomic_save_npy, atomic_write_text
from filo.heap import batch_work

POOL_FORMAT = 1
FILES = ("normed.npy", "feats.npy", "raw.npy", "scores.npy")


def pool_folder_key(directory: str | Path) -> str:
    """Content identity of a pool folder (every meta.json and the array files' stamps)."""
    h = hashlib.sha256()
    for meta in sorted(Path(directory).glob("*/meta.json")):
        h.update(meta.parent.name.encode())
        h.update(meta.read_bytes())
        for name in FILES:
            f = meta.parent / name
            if f.is_file():
                st = f.stat()
                h.update(f"{name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def map_stats(maps: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """Pixel and image mean / std (what the fusion z-scores with)."""
    return {"pixel_mean": float(np.mean(maps, dtype=np.float64)),
            "pixel_std": float(np.std(maps, dtype=np.float64)),
            "image_mean": float(np.mean(scores, dtype=np.float64)),
            "image_std": float(np.std(scores, dtype=np.float64))}


def save_pool(out: str | Path, cls_name: str, *, names: list[str], digests: list[str],
              normed: list[torch.Tensor], feats: torch.Tensor, raw: np.ndarray,
              scores: np.ndarray, settings: dict[str, Any], source: dict[str, Any],
              stats: dict[str, Any]) -> Path:
    d = Path(out) / cls_name
    d.mkdir(parents=True, exist_ok=True)
    atomic_save_npy(d / "normed.npy", torch.stack(normed).numpy().astype(np.float32))
    atomic_save_npy(d / "feats.npy", feats.numpy().astype(np.float32))
    atomic_save_npy(d / "raw.npy", np.asarray(raw, dtype=np.float64))
    atomic_save_npy(d / "scores.npy", np.asarray(scores, dtype=np.float64))
    meta = {"format": POOL_FORMAT, "class": cls_name, "n": len(names), "names": names,
            "digests": digests, "settings": settings, "source": source, "stats": stats}
    atomic_write_text(d / "meta.json", json.dumps(meta, indent=1) + "\n")
    return d


def _load(path: Path, what: str, mmap: bool = False) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except (OSError, ValueError) as err:
        raise FiloError(f"MuSc pool file {path} cannot be read ({type(err).__name__}: {what}); "
                        f"rebuild the pool with `python -m filo.musc pool`") from None


class Pool:
    """One class's pool, read lazily."""

    def __init__(self, directory: str | Path) -> None:
        self.path = Path(directory)
        meta_file = self.path / "meta.json"
        try:
            self.meta = json.loads(meta_file.read_text(encoding="utf-8"))
            self.n = int(self.meta["n"])
            self.digests = list(self.meta["digests"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise FiloError(f"MuSc pool metadata {meta_file} cannot be read "
                            f"({type(err).__name__}); rebuild it with `python -m filo.musc "
                            f"pool`") from None
        if self.meta.get("format") != POOL_FORMAT:
            raise FiloError(f"MuSc pool {meta_file} has format {self.meta.get('format')}, this "
                            f"filo reads {POOL_FORMAT}; rebuild it with `python -m filo.musc pool`")
        self._normed = _load(self.path / "normed.npy", "taps", mmap=True)
        self.feats = np.asarray(_load(self.path / "feats.npy", "image features"))
        self.raw = np.asarray(_load(self.path / "raw.npy", "image scores"))
        self.scores = np.asarray(_load(self.path / "scores.npy", "image scores"))
        if self._normed.shape[1] != self.n or len(self.feats) != self.n:
            raise FiloError(f"MuSc pool {self.path}: arrays do not match meta.json's {self.n} "
                            f"images; rebuild the pool")

    def normed(self, layer: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self._normed[layer], dtype=np.float32))

    def indices_of(self, digest: str) -> list[int]:
        return [i for i, d in enumerate(self.digests) if d == digest]

    @property
    def stats(self) -> dict[str, Any]:
        return self.meta.get("stats") or {}

    def check_settings(self, settings: dict[str, Any], source: dict[str, Any]) -> None:
        mine = self.meta.get("settings") or {}
        diff = [k for k in ("image_size", "layers", "r", "ratio") if mine.get(k) != settings.get(k)]
        if diff:
            k = diff[0]
            raise FiloError(f"MuSc pool {self.path} was built with {k} {mine.get(k)}, this run "
                            f"uses {settings.get(k)}; rebuild the pool with the same settings")
        if (self.meta.get("source") or {}).get("sha256") != source.get("sha256"):
            raise FiloError(f"MuSc pool {self.path} was built with CLIP weights "
                            f"{(self.meta.get('source') or {}).get('path')}, not "
                            f"{source.get('path')}; rebuild the pool with these weights")


class PoolSet:
    """The pools of a folder, per class."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.classes = sorted(p.parent.name for p in self.dir.glob("*/meta.json"))
        if not self.classes:
            raise FiloError(f"--musc_pool {self.dir} holds no pools (no <class>/meta.json); "
                            f"build one with `python -m filo.musc pool --class NAME --images DIR "
                            f"--out {self.dir}`")
        self._pools: dict[str, Pool] = {}

    def check_classes(self, class_names) -> None:
        missing = [c for c in class_names if c not in self.classes]
        if missing:
            raise FiloError(f"--musc_pool {self.dir} has no pool for class {missing[0]!r} (has "
                            f"{', '.join(self.classes)}); build it with `python -m filo.musc "
                            f"pool --class {missing[0]} --images DIR --out {self.dir}`")

    def get(self, cls_name: str) -> Pool:
        if cls_name not in self._pools:
            self.check_classes([cls_name])
            self._pools[cls_name] = Pool(self.dir / cls_name)
        return self._pools[cls_name]


@batch_work
def build_pool(scorer, paths, cls_name: str, out: str | Path, *, batch_size: int = 8,
               filo=None, log=print) -> Path:
    """Mutually score the images ``paths`` of one class with ``scorer`` and store them as the
    pool ``out/<cls_name>`` (``filo``: images -> (maps, scores) of FiLo, for the fused modes'
    statistics)."""
    from filo.data.transforms import clip_tensor, decode_image
    from filo.musc.scorer import input_digest

    paths = [Path(p) for p in paths]
    scorer.check_set(len(paths), f"--images of class {cls_name!r}")
    normed, feats, digests, fmaps, fscores = [], [], [], [], []
    for a in range(0, len(paths), batch_size):
        batch = torch.stack([clip_tensor(decode_image(p), scorer.settings.image_size)
                             for p in paths[a:a + batch_size]])
        n, f = scorer.extract(batch)
        normed.append(n)
        feats.append(f)
        digests += [input_digest(im) for im in batch]
        if filo is not None:
            m, s = filo(batch)
            fmaps.append(m)
            fscores.append(s)
    layers = [torch.cat([n[i] for n in normed]) for i in range(len(normed[0]))]
    feats_t = torch.cat(feats)
    res = scorer.score_set(layers, feats_t, [str(p) for p in paths],
                           what=f"the pool of {cls_name!r}")
    stats: dict[str, Any] = {"musc": map_stats(res.maps, res.scores)}
    if filo is not None:
        stats["filo"] = map_stats(np.concatenate(fmaps), np.concatenate(fscores))
    d = save_pool(out, cls_name, names=[str(p) for p in paths], digests=digests,
                  normed=layers, feats=feats_t, raw=res.raw, scores=res.scores,
                  settings=scorer.settings_key(), source=scorer.source_key(), stats=stats)
    log(f"[filo] MuSc pool of {cls_name}: {len(paths)} images -> {d}")
    return d
