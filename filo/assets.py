"""Registry of every local file the pipeline can use, where it lives and how to verify it.

filo never downloads anything at run time. Each model file is an :class:`Asset` with a default
location under the project (overridable through environment variables set by ``env.sh``), its
public source, and its size / sha256 where they are known. ``python -m filo doctor`` checks them
(:mod:`filo.doctor`); ``python -m filo download`` (:mod:`filo.download`) fetches them on a machine
with internet: files hosted on the Hugging Face Hub through ``huggingface_hub`` at a pinned
revision (:mod:`filo.hub`), the others over plain HTTPS.

Checksums of multi-GB files are cached by (path, size, mtime) in a small JSON file so that a
second check is instant.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from filo.fileio import atomic_write_text

HF_DEFAULT_ENDPOINT = "https://huggingface.co"


@dataclass(frozen=True)
class HubRepo:
    """A Hugging Face Hub model repository, the revision filo downloads from it and the
    environment variable that replaces that revision."""

    repo_id: str
    revision: str  # a commit hash (pinned) or, where none is known, a branch
    revision_var: str


# The released FiLo and fine-tuned GroundingDINO checkpoints. No commit of this repository is
# known here, so it follows the `main` branch; pin one with FILO_HF_REVISION_FILO=<commit hash>.
FILO_REPO = HubRepo("FantasticGNU/FiLo", "main", "FILO_HF_REVISION_FILO")
# bert-base-uncased at the commit whose vocab.txt hashes to BERT_VOCAB_SHA256
BERT_REPO = HubRepo("google-bert/bert-base-uncased", "86b5e0934494bd15c9632b12f734a8a67f723594",
                    "FILO_HF_REVISION_BERT")
HUB_REPOS = (FILO_REPO, BERT_REPO)

OPENAI_CLIP_L14_336_SHA256 = "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02"
OPENAI_CLIP_L14_336 = (
    f"https://openaipublic.azureedge.net/clip/models/{OPENAI_CLIP_L14_336_SHA256}/ViT-L-14-336px.pt"
)
GDINO_SWINT_OGC = (
    "https://github.com/IDEA-Research/GroundingDINO/releases/download/"
    "v0.1.0-alpha/groundingdino_swint_ogc.pth"
)

TORCHVISION_MODELS = "https://download.pytorch.org/models"
# torchvision's ImageNet WideResNets (PatchCore feature backbones); the file names carry the
# first 8 hex digits of each file's sha256, which torchvision itself checks
WIDE_RESNETS = {"wide-resnet50-2": "wide_resnet50_2-95faca4d.pth",
                "wide-resnet101-2": "wide_resnet101_2-32ee1156.pth"}

BERT_VOCAB_SHA256 = "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"


@dataclass(frozen=True)
class AssetFile:
    """One downloadable file: where it comes from and what it must hash to (when known)."""

    relpath: str  # path inside the asset (the file name for single-file assets)
    url: str
    size: int | None = None
    sha256: str | None = None
    required: bool = True  # a directory asset may hold optional files (config.json)
    sha256_prefix: str | None = None  # torchvision model files name the first hex digits
    # files hosted on the Hugging Face Hub: repository, file name in it, pinned revision and the
    # environment variable that overrides the revision (``url`` is then the public address)
    hf_repo: str | None = None
    hf_filename: str | None = None
    hf_revision: str | None = None
    hf_revision_var: str | None = None

    @property
    def on_hub(self) -> bool:
        return self.hf_repo is not None

    def hub_revision(self, env: Mapping[str, str] | None = None) -> str:
        """The revision to download: the override variable when set, else the pinned one."""
        env = os.environ if env is None else env
        override = env.get(self.hf_revision_var, "").strip() if self.hf_revision_var else ""
        return override or self.hf_revision or "main"


def hub_file(repo: HubRepo, filename: str, **kwargs) -> AssetFile:
    """An :class:`AssetFile` downloaded from ``repo`` on the Hub (``relpath`` = ``filename``)."""
    url = f"{HF_DEFAULT_ENDPOINT}/{repo.repo_id}/resolve/{repo.revision}/{filename}"
    return AssetFile(filename, url, hf_repo=repo.repo_id, hf_filename=filename,
                     hf_revision=repo.revision, hf_revision_var=repo.revision_var, **kwargs)


@dataclass(frozen=True)
class Asset:
    """A model file or directory the pipeline can use."""

    name: str
    description: str
    path: Path  # resolved location (file, or directory for kind == "dir")
    kind: str  # "file" or "dir"
    files: tuple[AssetFile, ...]
    env_var: str  # the variable that moves it
    source_page: str
    note: str = ""

    def file_paths(self) -> list[tuple[AssetFile, Path]]:
        if self.kind == "file":
            return [(self.files[0], self.path)]
        return [(f, self.path / f.relpath) for f in self.files]


@dataclass(frozen=True)
class DatasetRoot:
    """A dataset directory and the file whose presence shows it is laid out as expected."""

    name: str
    description: str
    path: Path
    marker: str  # relative path that must exist inside the root
    env_var: str
    source_page: str


# name -> (environment variable, default folder under data/, marker, description, source)
EXTRA_DATASETS = {
    "mpdd": ("MPDD_ROOT", "MPDD", "bracket_black/test", "MPDD (metal parts)",
             "https://github.com/stepanje/MPDD"),
    "btad": ("BTAD_ROOT", "BTAD", "01/test", "BTAD (beanTech)",
             "https://github.com/pankajmishra000/VT-ADL"),
    "mvtec_ad2": ("MVTEC_AD2_ROOT", "mvtec_ad_2", "can/test_public", "MVTec AD 2",
                  "https://www.mvtec.com/company/research/datasets/mvtec-ad-2"),
    "realiad": ("REALIAD_ROOT", "Real-IAD", "realiad_jsons", "Real-IAD (realiad_1024 + realiad_jsons)",
                "https://realiad4ad.github.io/Real-IAD/"),
}


@dataclass
class AssetPaths:
    """Where assets and datasets live; built from the environment that ``env.sh`` exports."""

    root: Path
    ckpt_dir: Path
    bert_dir: Path
    mvtec_root: Path
    visa_root: Path
    clip_weights: Path
    overrides: dict[str, Path] = field(default_factory=dict)
    # further datasets (mpdd, btad, mvtec_ad2) -> their roots
    dataset_roots: dict[str, Path] = field(default_factory=dict)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> AssetPaths:
        env = os.environ if env is None else env
        root = Path(env.get("FILO_ROOT") or Path(__file__).resolve().parent.parent)
        ckpt = Path(env.get("CKPT_DIR") or root / "ckpt")

        def rel(value: str | None, default: Path) -> Path:
            if not value:
                return default
            p = Path(value)
            return p if p.is_absolute() else root / p

        return cls(
            root=root,
            ckpt_dir=rel(str(ckpt), root / "ckpt"),
            bert_dir=rel(env.get("FILO_BERT_LOCAL"), root / "third_party" / "bert-base-uncased"),
            mvtec_root=rel(env.get("MVTEC_ROOT"), root / "data" / "mvtec_anomaly_detection"),
            visa_root=rel(env.get("VISA_ROOT"), root / "data" / "VisA_20220922"),
            clip_weights=rel(env.get("FILO_CLIP_WEIGHTS"), ckpt / "ViT-L-14-336px.pt"),
            dataset_roots={name: rel(env.get(var), root / "data" / folder)
                           for name, (var, folder, _, _, _) in EXTRA_DATASETS.items()},
        )


def build_registry(paths: AssetPaths) -> dict[str, Asset]:
    """Every asset the pipeline knows, keyed by name, at the locations ``paths`` gives."""
    ck = paths.ckpt_dir
    assets = [
        Asset(
            name="clip-vit-l-14-336",
            description="OpenAI CLIP ViT-L/14@336 weights (OpenAI .pt archive or open_clip state dict)",
            path=paths.clip_weights,
            kind="file",
            files=(AssetFile("ViT-L-14-336px.pt", OPENAI_CLIP_L14_336,
                             sha256=OPENAI_CLIP_L14_336_SHA256),),
            env_var="FILO_CLIP_WEIGHTS",
            source_page="https://github.com/openai/CLIP",
            note="needed to train; testing needs it only if the FiLo checkpoint lacks clip_model.*",
        ),
        Asset(
            name="bert-base-uncased",
            description="bert-base-uncased tokenizer directory (vocab.txt; config.json optional)",
            path=paths.bert_dir,
            kind="dir",
            files=(
                hub_file(BERT_REPO, "vocab.txt", size=231508, sha256=BERT_VOCAB_SHA256),
                hub_file(BERT_REPO, "config.json", required=False),
            ),
            env_var="FILO_BERT_LOCAL",
            source_page="https://huggingface.co/google-bert/bert-base-uncased",
            note="GroundingDINO's text tokenizer; its weights come from the grounding checkpoint",
        ),
        Asset(
            name="groundingdino-swint-ogc",
            description="public GroundingDINO Swin-T OGC checkpoint",
            path=ck / "groundingdino_swint_ogc.pth",
            kind="file",
            files=(AssetFile("groundingdino_swint_ogc.pth", GDINO_SWINT_OGC, size=693_997_677,
                             sha256="3b3ca2563c77c69f651d7bd133e97139c186df06231157a64c507099c52bc799"),),
            env_var="CKPT_DIR",
            source_page="https://github.com/IDEA-Research/GroundingDINO",
            note="GroundingDINO-only runs with the public, not fine-tuned, detector",
        ),
    ]
    for name, fname in WIDE_RESNETS.items():
        assets.append(Asset(
            name=name,
            description=f"torchvision ImageNet {fname.split('-')[0]} "
                        "(PatchCore memory-bank backbone)",
            path=ck / fname,
            kind="file",
            files=(AssetFile(fname, f"{TORCHVISION_MODELS}/{fname}",
                             sha256_prefix=fname.rsplit("-", 1)[1].split(".")[0]),),
            env_var="CKPT_DIR",
            source_page="https://pytorch.org/vision/stable/models.html",
            note="memory-bank mode only (python -m filo.memory build --backbone wrn50/wrn101)",
        ))
    for ds in ("mvtec", "visa"):
        assets.append(Asset(
            name=f"filo-train-on-{ds}",
            description=f"released FiLo checkpoint trained on {'MVTec AD' if ds == 'mvtec' else 'VisA'}",
            path=ck / f"filo_train_on_{ds}.pth",
            kind="file",
            files=(hub_file(FILO_REPO, f"filo_train_on_{ds}.pth"),),
            env_var="CKPT_DIR",
            source_page="https://huggingface.co/FantasticGNU/FiLo",
        ))
        assets.append(Asset(
            name=f"grounding-train-on-{ds}",
            description=f"released GroundingDINO fine-tuned on {'MVTec AD' if ds == 'mvtec' else 'VisA'}",
            path=ck / f"grounding_train_on_{ds}.pth",
            kind="file",
            files=(hub_file(FILO_REPO, f"grounding_train_on_{ds}.pth"),),
            env_var="CKPT_DIR",
            source_page="https://huggingface.co/FantasticGNU/FiLo",
        ))
    return {a.name: a for a in assets}


def build_datasets(paths: AssetPaths) -> dict[str, DatasetRoot]:
    return {
        "mvtec": DatasetRoot(
            name="mvtec", description="MVTec AD", path=paths.mvtec_root,
            marker="bottle/test", env_var="MVTEC_ROOT",
            source_page="https://www.mvtec.com/company/research/datasets/mvtec-ad",
        ),
        "visa": DatasetRoot(
            name="visa", description="VisA (VisA_20220922)", path=paths.visa_root,
            marker="split_csv/1cls.csv", env_var="VISA_ROOT",
            source_page="https://github.com/amazon-science/spot-diff",
        ),
        **{name: DatasetRoot(name=name, description=desc, path=paths.dataset_roots[name],
                             marker=marker, env_var=var, source_page=src)
           for name, (var, _, marker, desc, src) in EXTRA_DATASETS.items()
           if name in paths.dataset_roots},
    }


# --------------------------------------------------------------------------- checksums

def default_checksum_cache() -> Path:
    base = os.environ.get("FILO_CACHE_DIR") or os.environ.get("XDG_CACHE_HOME")
    base_path = Path(base) if base else Path.home() / ".cache"
    if not os.environ.get("FILO_CACHE_DIR"):
        base_path = base_path / "filo"
    return base_path / "sha256.json"


class ChecksumCache:
    """sha256 of files, remembered by (absolute path, size, mtime_ns)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or default_checksum_cache()
        self._entries: dict[str, dict] | None = None
        self.hits = 0
        self.misses = 0

    def _load(self) -> dict[str, dict]:
        if self._entries is None:
            try:
                self._entries = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self._entries = {}
        return self._entries

    def sha256(self, file: Path) -> str:
        st = file.stat()
        key = str(file.resolve())
        entries = self._load()
        hit = entries.get(key)
        if hit and hit.get("size") == st.st_size and hit.get("mtime_ns") == st.st_mtime_ns:
            self.hits += 1
            return hit["sha256"]
        self.misses += 1
        digest = sha256_file(file)
        entries[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
        self._save()
        return digest

    def remember(self, file: Path, digest: str) -> None:
        """Record ``digest`` for ``file`` as it is now (a download just verified it)."""
        st = file.stat()
        self._load()[str(file.resolve())] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                             "sha256": digest}
        self._save()

    def _save(self) -> None:
        try:
            atomic_write_text(self.path, json.dumps(self._entries, indent=1, sort_keys=True))
        except OSError:
            pass  # a cache that cannot be written only costs time


def sha256_file(file: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def looks_like_torch_file(file: Path) -> bool:
    """A torch checkpoint is a zip archive (torch >= 1.6, TorchScript) or a raw pickle."""
    try:
        with open(file, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return False
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"
