"""Dataset layouts: MVTec AD, VisA (``split_csv/1cls.csv``), a generic folder layout, ``meta.json``,
MPDD, BTAD, MVTec AD 2 and Real-IAD (JSON split files).

Every scanner returns ``{cls_name: [Sample, ...]}`` in dataset order:

- MVTec: the research code's class order (``MVTEC_CLASSES``), then any extra class folders
  sorted by name; within a class, defect folders sorted by name, images sorted by file name.
- VisA: the research code's class order (``VISA_CLASSES``) for the known classes, then any other
  class in order of first appearance in the csv; within a class, csv row order.
- folder: classes sorted by name; otherwise as MVTec.
- meta: the key order of ``meta.json`` (what the research code iterates).
- Real-IAD: classes in order of first appearance in the JSON split files read in name order
  (one file per class, or one multi-class file); within a class, the file's item order.

Real-IAD split files (see :func:`scan_realiad`)::

    ROOT/
      realiad_1024/<class>/OK/S0001/<class>_0001_OK_C1_<time>.jpg        images, 5 views C1..C5
      realiad_1024/<class>/NG/<defect>/S0002/..._C1_<time>.jpg / .png  anomalous image + mask
      realiad_jsons/realiad_jsons/<class>.json       multi-view splits (read by default)
      realiad_jsons/realiad_jsons_sv/<class>.json    single-view splits (one view per sample)
      realiad_jsons/realiad_jsons_fuiad_0.0 .. _0.4/ fully-unsupervised splits (noisy train)
      realiad_jsons/<any folder>/<name>.json         a multi-class file: items of many classes

The archive may also be unpacked flat (``ROOT/realiad_jsons/<class>.json`` beside
``ROOT/realiad_jsons_sv/`` ...). Without an explicit ``split_path`` the default multi-view
folder is read; to run a variant from the command line, point the dataset root at a folder
holding ``realiad_1024`` and a ``realiad_jsons`` that is (or links to) the variant.
"""

from __future__ import annotations

import csv
import errno
import json
import logging
import os
import posixpath
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from filo.data.records import Sample
from filo.errors import FiloError
from filo.fileio import atomic_write_text, check_name

logger = logging.getLogger(__name__)

MVTEC_CLASSES: tuple[str, ...] = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)
VISA_CLASSES: tuple[str, ...] = (
    "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2",
    "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum",
)
MPDD_CLASSES: tuple[str, ...] = (
    "bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate", "tubes",
)
BTAD_CLASSES: tuple[str, ...] = ("01", "02", "03")
MVTEC_AD2_CLASSES: tuple[str, ...] = (
    "can", "fabric", "fruit_jelly", "rice", "sheet_metal", "vial", "wallplugs", "walnuts",
)
DATASETS = ("mvtec", "visa", "folder", "meta", "mpdd", "btad", "mvtec_ad2", "realiad")
REALIAD_VIEWS = 5
SPLITS = ("train", "test")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
VISA_CSV = Path("split_csv") / "1cls.csv"
VISA_COLUMNS = ("object", "split", "label", "image", "mask")
META_NAME = "meta.json"
GOOD = "good"


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def _check_root(root: str | os.PathLike, source: str) -> Path:
    path = Path(root)
    if not str(root):
        raise FiloError(f"no dataset root given; set it with {source}")
    if not path.exists():
        raise FiloError(f"dataset root {path} does not exist; set the right folder with {source}")
    if not path.is_dir():
        raise FiloError(f"dataset root {path} is not a folder; set the right folder with {source}")
    return path


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise FiloError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    return split


def _normalize_classes(classes: str | Sequence[str] | None) -> list[str] | None:
    if classes is None:
        return None
    if isinstance(classes, str):
        classes = [c for c in (part.strip() for part in classes.split(",")) if c]
    out = list(classes)
    return out or None


def _select(found: dict[str, list[Sample]], classes: str | Sequence[str] | None,
            where: str) -> dict[str, list[Sample]]:
    wanted = _normalize_classes(classes)
    if wanted is None:
        return found
    unknown = [c for c in wanted if c not in found]
    if unknown:
        raise FiloError(f"unknown class {', '.join(repr(c) for c in unknown)} in {where}; "
                        f"available: {', '.join(found) or '(none)'}")
    keep = set(wanted)
    return {c: s for c, s in found.items() if c in keep}


def _check_link(path: Path) -> None:
    """One FiloError line for a symbolic link that loops (``is_dir``/``is_file`` would just say
    False and the folder or image would be skipped without a word)."""
    if path.is_symlink():
        try:
            os.stat(path)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise FiloError(f"{path} is a symbolic link loop (it leads back to itself); "
                                f"remove the link or point it at a real folder or image"
                                ) from None
            logger.warning("skipping %s: a symbolic link to a missing target", path)


def _is_image(path: Path) -> bool:
    _check_link(path)
    return path.is_file() and not path.name.startswith(".") and \
        path.suffix.lower() in IMAGE_EXTENSIONS


def _subdirs(path: Path) -> list[Path]:
    if not path.is_dir():
        return []
    out = []
    for p in path.iterdir():
        if p.name.startswith("."):
            continue
        _check_link(p)
        if p.is_dir():
            out.append(p)
    return sorted(out)


def refuse_duplicates(samples: Sequence[Sample], wheres: Sequence[str], source: str) -> None:
    """One FiloError line naming both entries when an image is listed twice in a split (its
    scores would count twice in every metric)."""
    first: dict[str, str] = {}
    for sample, where in zip(samples, wheres, strict=True):
        key = posixpath.normpath(sample.img_path.replace("\\", "/"))
        if key in first:
            raise FiloError(f"{where} lists {sample.img_path} again (already at {first[key]}); "
                            f"each image must appear once per split: delete the duplicate "
                            f"entry from {source}")
        first[key] = where


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


# --------------------------------------------------------------------------------------------
# MVTec-like trees: MVTec AD, folder, MPDD, BTAD, MVTec AD 2
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TreeLayout:
    """How a class-per-folder dataset is laid out.

    ``{root}/{cls}/{split_dirs[split]}/{defect}/<images>``; folders named in ``normal`` hold
    normal images; the mask of ``{defect}/{name}.<ext>`` is in ``gt_dir`` (a template with
    ``{split_dir}`` and ``{defect}``, relative to the class folder) as ``{name}_mask.png``
    (``strict_masks``) or any of ``{name}_mask.<ext>`` / ``{name}.<ext>``.
    """

    name: str
    classes: tuple[str, ...] = ()  # known class order; other class folders follow, sorted
    normal: tuple[str, ...] = (GOOD,)
    split_dirs: tuple[tuple[str, str], ...] = (("train", "train"), ("test", "test"))
    gt_dir: str = "ground_truth/{defect}"
    strict_masks: bool = False
    masks_per_defect: bool = False  # a defect folder without a mask folder: image level only


    def split_dir(self, split: str) -> str:
        return dict(self.split_dirs)[split]


TREE_LAYOUTS = {
    "mvtec": TreeLayout("MVTec", MVTEC_CLASSES, strict_masks=True),
    "folder": TreeLayout("folder", masks_per_defect=True),
    "mpdd": TreeLayout("MPDD", MPDD_CLASSES),
    "btad": TreeLayout("BTAD", BTAD_CLASSES, normal=("ok",)),
    # MVTec AD 2: ground truth is public for test_public only (test_private*: scores only)
    "mvtec_ad2": TreeLayout("MVTec AD 2", MVTEC_AD2_CLASSES,
                            split_dirs=(("train", "train"), ("test", "test_public")),
                            gt_dir="{split_dir}/ground_truth/{defect}", strict_masks=True),
}

def _mask_candidates(gt_dir: Path, stem: str, strict_mvtec: bool) -> list[Path]:  # noqa: D401
    if strict_mvtec:
        return [gt_dir / f"{stem}_mask.png"]
    names = [f"{stem}_mask{ext}" for ext in IMAGE_EXTENSIONS] + \
            [f"{stem}{ext}" for ext in IMAGE_EXTENSIONS]
    return [gt_dir / n for n in names]


def _find_mask(gt_dir: Path, stem: str, strict_mvtec: bool) -> Path | None:
    for cand in _mask_candidates(gt_dir, stem, strict_mvtec):
        if cand.is_file():
            return cand
    if not strict_mvtec and gt_dir.is_dir():
        # case-insensitive extensions (e.g. 000_mask.PNG)
        wanted = {c.name.lower() for c in _mask_candidates(gt_dir, stem, strict_mvtec)}
        for p in sorted(gt_dir.iterdir()):
            if p.name.lower() in wanted and p.is_file():
                return p
    return None


def _scan_class_dir(root: Path, cls_dir: Path, split: str, layout: TreeLayout) -> list[Sample]:
    """Samples of one class folder. An anomalous image without a mask is an error, unless the
    class has no ground-truth folder at all (then it is evaluated at image level only)."""
    cls_name = cls_dir.name
    split_dir = layout.split_dir(split)
    samples: list[Sample] = []
    gt_root = cls_dir / layout.gt_dir.format(split_dir=split_dir, defect="").rstrip("/")
    maskless = not gt_root.is_dir()
    for specie_dir in _subdirs(cls_dir / split_dir):
        specie = specie_dir.name
        if specie == "ground_truth":
            continue
        images = sorted((p for p in specie_dir.iterdir() if _is_image(p)), key=lambda p: p.name)
        abnormal = specie not in layout.normal
        gt_dir = cls_dir / layout.gt_dir.format(split_dir=split_dir, defect=specie)
        no_masks = maskless or (layout.masks_per_defect and not gt_dir.is_dir())
        if abnormal and images and no_masks and not maskless:
            logger.warning("class %s: defect folder %s has no mask folder (%s): its images count "
                           "at image level only", cls_name, specie_dir, gt_dir)
        for img in images:
            mask_rel = ""
            if abnormal and not no_masks:
                mask = _find_mask(gt_dir, img.stem, layout.strict_masks)
                if mask is None:
                    expected = _mask_candidates(gt_dir, img.stem, layout.strict_masks)[0]
                    raise FiloError(f"anomalous image {img} has no mask: expected {expected} "
                                    f"(normal images belong in "
                                    f"{cls_dir / split_dir / layout.normal[0]})")
                mask_rel = _rel(mask, root)
            samples.append(Sample(img_path=_rel(img, root), mask_path=mask_rel, cls_name=cls_name,
                                  specie_name=specie, anomaly=int(abnormal)))
    if maskless and any(s.anomaly for s in samples):
        logger.warning("class %s has no ground-truth folder (%s): image-level metrics only",
                       cls_name, gt_root)
    return samples


def _class_dirs(root: Path, layout: TreeLayout | None = None) -> list[Path]:
    """Folders of ``root`` that look like classes (they hold a train or test folder)."""
    names = {"train", "test"} | ({d for _, d in layout.split_dirs} if layout else set())
    return [d for d in _subdirs(root) if any((d / n).is_dir() for n in names)]


def scan_mvtec(root: str | os.PathLike, split: str = "test",
               classes: str | Sequence[str] | None = None, *, source: str = "--root",
               ) -> dict[str, list[Sample]]:
    """Scan an MVTec AD tree (``{cls}/{split}/{defect}/*.png``, masks ``ground_truth/{defect}/{name}_mask.png``)."""
    return _scan_tree(root, split, classes, source=source, layout=TREE_LAYOUTS["mvtec"])


def scan_folder(root: str | os.PathLike, split: str = "test",
                classes: str | Sequence[str] | None = None, *, source: str = "--root",
                folders: FolderSpec | None = None, allow_empty: bool = False,
                ) -> dict[str, list[Sample]]:
    """Scan a generic folder tree (design.md section 9.1). ``root`` is either one class
    (``train/good``, ``test/good``, ``test/{defect}``, optional ``ground_truth/{defect}`` masks;
    the class is named after the folder) or a folder of such classes (``{cls}/train/good`` ...).
    Masks are ``{name}_mask.<ext>`` or ``{name}.<ext>``; a defect folder without a mask folder
    counts at image level only; any of png/jpg/jpeg/bmp/tif; classes with only normal images are
    allowed. ``folders`` (anomalib's Folder names: ``--normal_dir`` ...) reads named folders
    instead."""
    if folders is not None and folders.given():
        return scan_named_folders(root, split, classes, folders, source=source,
                                  allow_empty=allow_empty)
    root_path = _check_root(root, source)
    _check_split(split)
    if is_single_class(root_path):
        name = class_name_of(root_path)
        out = {name: _scan_class_dir(root_path, root_path, split, TREE_LAYOUTS["folder"])}
        out = _select(out, classes, f"{root_path} (one class, folder layout)")
        if not any(out.values()) and not allow_empty:
            raise FiloError(f"no {split} images found under {root_path / split}: expected "
                            f"train/good/<images>, test/good/<images> and test/<defect>/<images> "
                            f"with extensions "
                            f"{', '.join(IMAGE_EXTENSIONS)}")
        return out
    return _scan_tree(root, split, classes, source=source, layout=TREE_LAYOUTS["folder"],
                      allow_empty=allow_empty)


def is_single_class(root: Path) -> bool:
    """``root`` is one class of the folder layout: it holds ``train/`` or ``test/`` with image
    folders, and none of its folders is a class itself."""
    has_split = any(any(_is_image(p) for d in _subdirs(root / sd) for p in d.iterdir())
                    for sd in SPLITS)
    return has_split and not _class_dirs(root)


def class_name_of(root: Path) -> str:
    """The class name of a one-class folder: the folder's own name."""
    return root.resolve().name or "part"


@dataclass(frozen=True)
class FolderSpec:
    """Named folders of a tree that follows no layout (anomalib's Folder dataset): paths
    relative to the dataset root (or absolute inside it). ``normal_dir``: normal images for
    training (and the last fifth, at least one, for testing when there is no
    ``normal_test_dir``); ``abnormal_dirs``: anomalous test images, one defect type per folder
    (named after it); ``mask_dir``: their masks, ``{mask_dir}/{defect}/`` when it has
    subfolders (a defect without one: image level only), else ``{mask_dir}/`` itself, matched by ``{name}_mask.<ext>`` or ``{name}.<ext>``."""

    normal_dir: str | None = None
    abnormal_dirs: tuple[str, ...] = ()
    mask_dir: str | None = None
    normal_test_dir: str | None = None
    class_name: str | None = None

    def given(self) -> bool:
        return bool(self.normal_dir or self.abnormal_dirs or self.mask_dir or
                    self.normal_test_dir)


def _named_dir(root: Path, rel: str, flag: str) -> Path:
    path = Path(rel) if Path(rel).is_absolute() else root / rel
    if not path.is_dir():
        raise FiloError(f"{flag} {rel}: folder {path} does not exist (paths are relative to the "
                        f"dataset root {root})")
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        raise FiloError(f"{flag} {rel}: {path} is outside the dataset root {root}; pass a root "
                        f"that holds every folder") from None
    return path


def _images_in(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if _is_image(p)), key=lambda p: p.name)


def scan_named_folders(root: str | os.PathLike, split: str, classes: str | Sequence[str] | None,
                       spec: FolderSpec, *, source: str = "--root", allow_empty: bool = False,
                       ) -> dict[str, list[Sample]]:
    """One class from the named folders of :class:`FolderSpec` (see there)."""
    root_path = _check_root(root, source)
    _check_split(split)
    if not spec.normal_dir:
        raise FiloError("--normal_dir is required with --abnormal_dir / --mask_dir / "
                        "--normal_test_dir: the folder of normal images")
    name = spec.class_name or class_name_of(root_path)
    normal = _images_in(_named_dir(root_path, spec.normal_dir, "--normal_dir"))
    if spec.normal_test_dir:
        train_normal = normal
        test_normal = _images_in(_named_dir(root_path, spec.normal_test_dir, "--normal_test_dir"))
    else:
        n_test = max(1, len(normal) // 5) if len(normal) > 1 else 0
        train_normal, test_normal = normal[:len(normal) - n_test], normal[len(normal) - n_test:]
    def sample(img: Path, specie: str, anomaly: int, mask: str = "") -> Sample:
        return Sample(img_path=_rel(img, root_path), mask_path=mask, cls_name=name,
                      specie_name=specie, anomaly=anomaly)
    if split == "train":
        out = [sample(p, GOOD, 0) for p in train_normal]
    else:
        out = [sample(p, GOOD, 0) for p in test_normal]
        mask_root = _named_dir(root_path, spec.mask_dir, "--mask_dir") if spec.mask_dir else None
        for rel in spec.abnormal_dirs:
            folder = _named_dir(root_path, rel, "--abnormal_dir")
            specie = folder.name
            gt = None
            if mask_root is not None:  # per-defect mask folders, or all masks in one
                gt = mask_root / specie if _subdirs(mask_root) else mask_root
                if not gt.is_dir():
                    logger.warning("--abnormal_dir %s has no mask folder %s: its images count at "
                                   "image level only", folder, gt)
                    gt = None
            for img in _images_in(folder):
                mask = _find_mask(gt, img.stem, False) if gt is not None else None
                if gt is not None and mask is None:
                    raise FiloError(f"anomalous image {img} has no mask in {gt}: expected "
                                    f"{img.stem}_mask.png or {img.stem}.png (or drop --mask_dir)")
                out.append(sample(img, specie, 1, _rel(mask, root_path) if mask else ""))
    found = _select({name: out}, classes, f"{root_path} (named folders)")
    if split == "test" and not any(found.values()) and not allow_empty:
        raise FiloError(f"no test images in the named folders under {root_path}: pass "
                        f"--abnormal_dir and --normal_test_dir (or more --normal_dir images)")
    return found


def scan_tree(root: str | os.PathLike, dataset: str, split: str = "test",
              classes: str | Sequence[str] | None = None, *, source: str = "--root",
              ) -> dict[str, list[Sample]]:
    """Scan a class-per-folder tree of one of :data:`TREE_LAYOUTS` (mpdd, btad, mvtec_ad2, ...)."""
    return _scan_tree(root, split, classes, source=source, layout=TREE_LAYOUTS[dataset])


def _scan_tree(root: str | os.PathLike, split: str, classes: str | Sequence[str] | None,
               *, source: str, layout: TreeLayout, allow_empty: bool = False
               ) -> dict[str, list[Sample]]:
    root_path = _check_root(root, source)
    _check_split(split)
    split_dir = layout.split_dir(split)
    dirs = _class_dirs(root_path, layout)
    if not dirs:
        if is_single_class(root_path):
            raise FiloError(f"{root_path} is one class (it holds {split_dir}/ itself), not a "
                            f"{layout.name} tree of classes: pass --dataset folder (or auto)")
        raise FiloError(f"no classes found under {root_path}: expected {layout.name} layout "
                        f"{{class}}/{split_dir}/{{defect}}/<images> (and {{class}}/train/"
                        f"{layout.normal[0]})")
    by_name = {d.name: d for d in dirs}
    ordered = [by_name[c] for c in layout.classes if c in by_name]
    ordered += [d for d in dirs if d.name not in layout.classes]
    wanted = _normalize_classes(classes)
    if wanted is not None:
        names = [d.name for d in ordered]
        unknown = [c for c in wanted if c not in names]
        if unknown:
            raise FiloError(f"unknown class {', '.join(repr(c) for c in unknown)} in {root_path} "
                            f"({layout.name} layout); available: {', '.join(names)}")
        ordered = [d for d in ordered if d.name in set(wanted)]
    out = {d.name: _scan_class_dir(root_path, d, split, layout) for d in ordered}
    if not any(out.values()) and not allow_empty:
        raise FiloError(f"no {split} images found under {root_path} ({layout.name} layout): "
                        f"expected {{class}}/{split_dir}/{{defect}}/<images> with extensions "
                        f"{', '.join(IMAGE_EXTENSIONS)}")
    return out


# --------------------------------------------------------------------------------------------
# VisA
# --------------------------------------------------------------------------------------------

def _read_visa_rows(csv_path: Path) -> list[dict[str, str]]:
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in VISA_COLUMNS if c not in header]
            if missing:
                raise FiloError(f"{csv_path} is missing column(s) {', '.join(missing)}: needs "
                                f"{','.join(VISA_COLUMNS)}, found {','.join(header) or '(empty file)'}")
            rows = []
            for raw in reader:
                rows.append({(k or "").strip(): (v or "").strip() for k, v in raw.items()})
            return rows
    except UnicodeDecodeError as err:
        raise FiloError(f"{csv_path} is not a UTF-8 text csv ({err}); re-export it as csv") from None
    except csv.Error as err:
        raise FiloError(f"{csv_path} is not a valid csv ({err})") from None


def listed_path_problem(rel: str) -> str | None:
    """Why a path listed in a split file leaves the dataset root (absolute, or ``..`` climbing
    out of it), or None. Lexical: symbolic links inside the root are the user's own choice."""
    text = rel.replace("\\", "/")
    if text.startswith("/") or (len(text) > 1 and text[1] == ":"):
        return "is an absolute path"
    depth = 0
    for part in text.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                return "climbs out of the dataset root with '..'"
        elif part not in ("", "."):
            depth += 1
    return None


def _check_listed(root: Path, sample: Sample, where: str, allow_outside_root: bool) -> None:
    if allow_outside_root:
        return
    for rel in (sample.img_path, sample.mask_path):
        problem = listed_path_problem(rel) if rel else None
        if problem:
            raise FiloError(f"{where}: {rel!r} {problem}, outside the dataset root {root}; list "
                            f"paths relative to the root, or pass --allow_outside_root to accept "
                            f"it (its outputs then go to _outside/ in the output folders)")


def scan_visa(root: str | os.PathLike, split: str = "test",
              classes: str | Sequence[str] | None = None, *, source: str = "--root",
              check_files: bool = True, allow_outside_root: bool = False
              ) -> dict[str, list[Sample]]:
    """Read a VisA tree through ``{root}/split_csv/1cls.csv`` (columns object,split,label,image,mask)."""
    root_path = _check_root(root, source)
    _check_split(split)
    csv_path = root_path / VISA_CSV
    if not csv_path.is_file():
        raise FiloError(f"VisA split file {csv_path} not found; VisA needs split_csv/1cls.csv "
                        f"under the dataset root (set with {source})")
    rows = _read_visa_rows(csv_path)
    order: list[str] = []
    per_class: dict[str, list[Sample]] = {}
    listed: list[Sample] = []
    wheres: list[str] = []
    for line, row in enumerate(rows, start=2):
        cls_name = row["object"]
        if not cls_name:
            raise FiloError(f"{csv_path} line {line}: empty object column")
        check_name(cls_name, f"{csv_path} line {line}")
        if cls_name not in per_class:
            order.append(cls_name)
            per_class[cls_name] = []
        label = row["label"].lower()
        if label not in ("normal", "anomaly"):
            raise FiloError(f"{csv_path} line {line}: label must be normal or anomaly, "
                            f"got {row['label']!r}")
        if row["split"] not in SPLITS:
            raise FiloError(f"{csv_path} line {line}: split must be train or test, "
                            f"got {row['split']!r}")
        if row["split"] != split:
            continue
        abnormal = label == "anomaly"
        if not row["image"]:
            raise FiloError(f"{csv_path} line {line}: empty image column")
        if abnormal and not row["mask"]:
            raise FiloError(f"anomalous image {root_path / row['image']} has no mask: "
                            f"{csv_path} line {line} has an empty mask column")
        sample = Sample(img_path=row["image"], mask_path=row["mask"] if abnormal else "",
                        cls_name=cls_name, specie_name="", anomaly=int(abnormal))
        _check_listed(root_path, sample, f"{csv_path} line {line}", allow_outside_root)
        per_class[cls_name].append(sample)
        listed.append(sample)
        wheres.append(f"{csv_path} line {line}")
    refuse_duplicates(listed, wheres, str(csv_path))
    if not order:
        raise FiloError(f"no classes found in {csv_path}: the csv has no rows")
    known = [c for c in VISA_CLASSES if c in per_class]
    ordered = {c: per_class[c] for c in known + [c for c in order if c not in VISA_CLASSES]}
    out = _select(ordered, classes, str(csv_path))
    if check_files:
        check_files_exist(root_path, out)
    return out


# --------------------------------------------------------------------------------------------
# Real-IAD
# --------------------------------------------------------------------------------------------

REALIAD_IMAGES = "realiad_1024"
REALIAD_JSONS = "realiad_jsons"
REALIAD_NORMAL = "OK"
REALIAD_SINGLE_VIEW_SUFFIX = "_sv"


def realiad_dirs(root: Path, split_path: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """(the split folder or file to read, the folder the JSON image paths start from).

    Without ``split_path``: ``{root}/realiad_jsons/realiad_jsons/`` (the archive unpacked inside
    ``realiad_jsons/``), else ``{root}/realiad_jsons/`` when it holds ``*.json`` files. A
    relative ``split_path`` (a folder of split files or one ``.json`` file) is looked up under
    ``{root}``, then under ``{root}/realiad_jsons/``. Images live in ``{root}/realiad_1024/``
    (or directly in ``{root}`` when there is no such folder)."""
    image_root = root / REALIAD_IMAGES if (root / REALIAD_IMAGES).is_dir() else root
    base = root / REALIAD_JSONS
    if split_path is not None:
        given = Path(split_path)
        tries = [given] if given.is_absolute() else [root / given, base / given]
        found = next((p for p in tries if p.is_dir() or p.is_file()), None)
        if found is None:
            raise FiloError(f"Real-IAD split {str(split_path)!r} not found: looked for "
                            f"{' and '.join(str(p) for p in tries)}")
        return found, image_root
    for candidate in (base / REALIAD_JSONS, base):
        if candidate.is_dir() and any(candidate.glob("*.json")):
            return candidate, image_root
    variants = (sorted(p.name for p in base.iterdir() if p.is_dir() and any(p.glob("*.json")))
                if base.is_dir() else [])
    hint = (f"; {base} only holds the variant folder(s) {', '.join(variants)}: point the dataset "
            f"root at a folder whose realiad_jsons/ is the variant you want" if variants else "")
    raise FiloError(f"Real-IAD split files not found under {root}: expected "
                    f"{base}/<class>.json or {base / REALIAD_JSONS}/<class>.json (the official "
                    f"realiad_jsons archive) beside {REALIAD_IMAGES}/{hint}")


def realiad_sample_key(sample: Sample) -> str:
    """The physical sample an image shows (its folder): Real-IAD has 5 views per sample."""
    return str(Path(sample.img_path).parent)


def realiad_view(sample: Sample) -> str:
    """Camera view of an image, ``C1`` .. ``C5`` (from ``..._C<n>_...`` in its name)."""
    for part in Path(sample.img_path).stem.split("_"):
        if len(part) == 2 and part[0] == "C" and part[1].isdigit():
            return part
    return ""


def _realiad_read(path: Path, split: str) -> tuple[dict, list | dict]:
    """(meta, entries of ``split``) of one split file; one FiloError line when it is malformed."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise FiloError(f"{path} is not a valid Real-IAD split file (JSONDecodeError: {err})"
                        ) from None
    except (UnicodeDecodeError, OSError) as err:
        raise FiloError(f"{path} is not a valid Real-IAD split file ({type(err).__name__})"
                        ) from None
    if not isinstance(data, dict) or split not in data:
        raise FiloError(f"{path}: no {split!r} list; expected the official Real-IAD JSON "
                        f"{{\"meta\": {{...}}, \"train\": [...], \"test\": [...]}}")
    meta = data.get("meta") or {}
    if not isinstance(meta, dict):
        raise FiloError(f"{path}: 'meta' must be an object, got {type(meta).__name__}")
    entries = data[split]
    if not isinstance(entries, (list, dict)):
        raise FiloError(f"{path}: {split!r} must be a list of items (or an object mapping "
                        f"class names to lists), got {type(entries).__name__}")
    return meta, entries


def _realiad_groups(path: Path, split: str, entries: list | dict
                    ) -> tuple[dict[str, list[tuple[str, dict]]], bool]:
    """Items of one split file grouped by class, in first-seen order: ``{cls: [(where, item)]}``
    and whether the file lists several classes (a multi-class file)."""
    groups: dict[str, list[tuple[str, dict]]] = {}

    def checked(item: object, where: str) -> dict:
        if not isinstance(item, dict):
            raise FiloError(f"{where}: expected an object with category, anomaly_class, "
                            f"image_path, mask_path; got {type(item).__name__}")
        if not isinstance(item.get("image_path"), str) or not item["image_path"] \
                or not isinstance(item.get("anomaly_class"), str):
            raise FiloError(f"{where}: needs image_path and anomaly_class")
        if item.get("mask_path") not in (None, "") and not isinstance(item["mask_path"], str):
            raise FiloError(f"{where}: mask_path must be a string or null")
        return item

    if isinstance(entries, dict):  # {cls: [items]}
        for cls_name, items in entries.items():
            if not isinstance(items, list):
                raise FiloError(f"{path}: {split}/{cls_name} must be a list of items")
            for i, item in enumerate(items):
                where = f"{path} {split}/{cls_name}[{i}]"
                category = checked(item, where).get("category")
                if category not in (None, "") and str(category) != cls_name:
                    raise FiloError(f"{where}: category {category!r} differs from its class "
                                    f"key {cls_name!r}")
                groups.setdefault(str(cls_name), []).append((where, item))
        return groups, len(groups) > 1
    items = [checked(item, f"{path} {split}[{i}]") for i, item in enumerate(entries)]
    named = [str(it["category"]) for it in items if it.get("category") not in (None, "")]
    if set(named) - {path.stem}:
        # the file names classes of its own: every item must say which one it belongs to
        for i, item in enumerate(items):
            if item.get("category") in (None, ""):
                raise FiloError(f"{path} {split}[{i}]: item has no category, but this file "
                                f"lists class(es) {', '.join(dict.fromkeys(named))}; give "
                                f"every item its category")
    for i, item in enumerate(items):
        cls_name = str(item.get("category") or path.stem)
        groups.setdefault(cls_name, []).append((f"{path} {split}[{i}]", item))
    return groups, len(groups) > 1


def scan_realiad(root: str | os.PathLike, split: str = "test",
                 classes: str | Sequence[str] | None = None, *, source: str = "--root",
                 check_files: bool = True, split_path: str | os.PathLike | None = None,
                 check_views: bool | None = None, allow_outside_root: bool = False
                 ) -> dict[str, list[Sample]]:
    """Real-IAD through its JSON split files.

    Every split file is an object ``{"meta": {"prefix": ..., "normal_class": "OK", ...},
    "train": [items], "test": [items]}``; an item is ``{category, anomaly_class, image_path,
    mask_path}``. The accepted variants:

    - **per-class files** (``realiad_jsons/<class>.json``, and the same shape in the single-view
      ``realiad_jsons_sv/`` and the noisy-training ``realiad_jsons_fuiad_<ratio>/`` folders):
      the class is the items' ``category`` (the file name when they have none);
    - **multi-class files**: one file whose lists hold items of several categories (or whose
      ``train`` / ``test`` are objects ``{class: [items]}``); items are grouped by
      ``category`` into classes in order of first appearance, and each must name its category.

    Which files: ``split_path`` (a folder, read in full, or one ``.json`` file; relative to
    ``root``, then to ``root/realiad_jsons``); without it ``realiad_jsons/realiad_jsons/`` if
    present, else ``realiad_jsons/``. Files are read in name order; a class listed by two files
    is an error. To use a variant from the command line, point the dataset root at a folder
    whose ``realiad_jsons/`` is that variant (a symbolic link is enough) beside ``realiad_1024/``.

    Image and mask paths are relative to ``realiad_1024/<prefix>`` where ``prefix`` is the
    file's ``meta.prefix`` (the class folder, ``<class>/``, in the official files) or, when the
    meta has none and always in a multi-class file, the item's class folder ``<category>/``.

    Labels follow the official protocol: in ``test`` an image is anomalous when its
    ``anomaly_class`` is not ``meta.normal_class`` (default ``OK``) and it has a mask; every
    ``train`` image counts as normal (the FUIAD variants hide defective images there on purpose;
    their defect name stays in ``specie_name``).

    Views: in a multi-view variant every test sample (an image folder) must have all 5 views
    ``C1`` .. ``C5`` (one error line names a sample that lacks one). The check is skipped for a
    single-view variant: the split folder (or the file, or the folder holding the file) is named
    ``*_sv``, or every test sample of the class lists exactly one image. ``check_views`` forces
    the check on (True) or off (False)."""
    root_path = _check_root(root, source)
    _check_split(split)
    split_src, image_root = realiad_dirs(root_path, split_path)
    files = sorted(split_src.glob("*.json")) if split_src.is_dir() else [split_src]
    if not files:
        raise FiloError(f"no Real-IAD split files (*.json) in {split_src}")
    resolved = split_src.resolve()
    named = [resolved.name] if resolved.is_dir() else [resolved.stem, resolved.parent.name]
    single_view_name = any(n.endswith(REALIAD_SINGLE_VIEW_SUFFIX) for n in named)
    prefix = image_root.relative_to(root_path).as_posix() if image_root != root_path else ""
    out: dict[str, list[Sample]] = {}
    origin: dict[str, list[str]] = {}  # cls -> where each sample is listed
    source_file: dict[str, Path] = {}
    for path in files:
        meta, entries = _realiad_read(path, split)
        normal = str(meta.get("normal_class", REALIAD_NORMAL))
        groups, several = _realiad_groups(path, split, entries)
        meta_prefix = meta.get("prefix")
        for cls_name, listed in groups.items():
            check_name(cls_name, str(path))
            if cls_name in source_file:
                raise FiloError(f"class {cls_name} is listed by both {source_file[cls_name]} and "
                                f"{path}; keep one split file per class (or pass one file)")
            source_file[cls_name] = path
            base = meta_prefix if isinstance(meta_prefix, str) and not several else f"{cls_name}/"
            samples, wheres = [], []
            for where, item in listed:
                img = posixpath.join(prefix, base, item["image_path"])
                mask_rel = item.get("mask_path") or ""
                mask = posixpath.join(prefix, base, mask_rel) if mask_rel else ""
                anomalous = split == "test" and item["anomaly_class"] != normal and bool(mask)
                sample = Sample(img_path=img, mask_path=mask if anomalous else "",
                                cls_name=cls_name, specie_name=item["anomaly_class"],
                                anomaly=int(anomalous))
                _check_listed(root_path, sample, where, allow_outside_root)
                samples.append(sample)
                wheres.append(where)
            out[cls_name], origin[cls_name] = samples, wheres
    refuse_duplicates([s for c in out for s in out[c]], [w for c in out for w in origin[c]],
                      str(split_src))
    out = _select(out, classes, str(split_src))
    if split == "test":
        for cls_name, samples in out.items():
            _check_realiad_views(source_file[cls_name], samples,
                                 check_views if check_views is not None
                                 else (False if single_view_name else None))
    if check_files:
        missing = [(where, rel) for cls_name, samples in out.items()
                   for sample, where in zip(samples, origin[cls_name], strict=True)
                   for rel in (sample.img_path, sample.mask_path)
                   if rel and not (root_path / rel).is_file()]
        if missing:
            where, rel = missing[0]
            more = f" ({len(missing) - 1} more missing)" if len(missing) > 1 else ""
            raise FiloError(f"{where} names a missing file {root_path / rel}{more}; check the "
                            f"dataset root ({source}) and that {REALIAD_IMAGES}/ holds the images")
    return out


def _check_realiad_views(path: Path, samples: Sequence[Sample], check: bool | None) -> None:
    """One error line for a test sample without all its views (``check`` None: automatic)."""
    if check is False:
        return
    views: dict[str, set[str]] = {}
    counts: dict[str, int] = {}
    for smp in samples:
        key = realiad_sample_key(smp)
        views.setdefault(key, set()).add(realiad_view(smp))
        counts[key] = counts.get(key, 0) + 1
    if check is None and all(n == 1 for n in counts.values()):
        return  # single-view: one image per sample
    expected = {f"C{v}" for v in range(1, REALIAD_VIEWS + 1)}
    for key, have in views.items():
        if have != expected:
            raise FiloError(f"{path}: sample {key} lacks view(s) "
                            f"{', '.join(sorted(expected - have))} (Real-IAD has "
                            f"{REALIAD_VIEWS} views per sample); restore the images or "
                            f"their entries")


# --------------------------------------------------------------------------------------------
# meta.json
# --------------------------------------------------------------------------------------------

def read_meta(path: str | os.PathLike) -> dict[str, dict[str, list[Sample]]]:
    """Read a research-style ``meta.json``: ``{split: {cls: [Sample, ...]}}`` in file order."""
    path = Path(path)
    if not path.is_file():
        raise FiloError(f"meta file {path} not found; create it with "
                        f"`python -m filo.data build-meta --dataset mvtec|visa|folder --root DIR`")
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise FiloError(f"{path} is not valid JSON ({err}); rebuild it with "
                        f"`python -m filo.data build-meta`") from None
    if not isinstance(data, dict) or not any(s in data for s in SPLITS):
        raise FiloError(f"{path} must be an object {{\"train\": {{cls: [items]}}, "
                        f"\"test\": {{cls: [items]}}}}; rebuild it with `python -m filo.data build-meta`")
    out: dict[str, dict[str, list[Sample]]] = {}
    for split, by_class in data.items():
        if not isinstance(by_class, dict):
            raise FiloError(f"{path}: {split!r} must map class names to lists of items")
        out[split] = {}
        listed: list[Sample] = []
        wheres: list[str] = []
        for cls_name, items in by_class.items():
            check_name(cls_name, f"{path} {split}")
            if not isinstance(items, list):
                raise FiloError(f"{path}: {split}/{cls_name} must be a list of items")
            out[split][cls_name] = [
                Sample.from_meta(item, where=f"{path} {split}/{cls_name}[{i}]")
                for i, item in enumerate(items)
            ]
            listed += out[split][cls_name]
            wheres += [f"{path} {split}/{cls_name}[{i}]" for i in range(len(items))]
        refuse_duplicates(listed, wheres, str(path))
    return out


def meta_to_json(meta: dict[str, dict[str, list[Sample]]]) -> dict:
    """The JSON-ready form of ``{split: {cls: [Sample]}}``."""
    return {split: {c: [s.to_meta() for s in samples] for c, samples in by_class.items()}
            for split, by_class in meta.items()}


def build_meta(root: str | os.PathLike, dataset: str, *, source: str = "--root",
               folders: FolderSpec | None = None) -> dict[str, dict[str, list[Sample]]]:
    """Both splits of a scanned dataset: ``{"train": {...}, "test": {...}}``.

    Classes follow the test split's order; a class without train images gets an empty list.
    """
    if dataset != "visa" and dataset != "realiad" and dataset not in TREE_LAYOUTS:
        raise FiloError(f"cannot build meta.json for dataset {dataset!r}; use visa or one of "
                        f"{', '.join(TREE_LAYOUTS)}")
    root_path = _check_root(root, source)
    if dataset == "visa":
        test = scan_visa(root_path, "test", source=source)
        train = scan_visa(root_path, "train", source=source)
    elif dataset == "realiad":
        test = scan_realiad(root_path, "test", source=source)
        train = scan_realiad(root_path, "train", source=source)
    elif dataset == "folder":
        test = scan_folder(root_path, "test", source=source, folders=folders)
        train = scan_folder(root_path, "train", source=source, folders=folders, allow_empty=True)
    else:
        layout = TREE_LAYOUTS[dataset]
        test = _scan_tree(root_path, "test", None, source=source, layout=layout)
        # a test-only dataset (no train folders at all) is fine
        train = _scan_tree(root_path, "train", None, source=source, layout=layout,
                           allow_empty=True)
    train = {c: train.get(c, []) for c in list(test) + [c for c in train if c not in test]}
    return {"train": train, "test": test}


def write_meta(root: str | os.PathLike, dataset: str, out: str | os.PathLike | None = None,
               *, source: str = "--root", folders: FolderSpec | None = None) -> Path:
    """Scan ``root`` and write the research-code ``meta.json`` (default ``{root}/meta.json``)."""
    meta = build_meta(root, dataset, source=source, folders=folders)
    out_path = Path(out) if out is not None else Path(root) / META_NAME
    atomic_write_text(out_path, json.dumps(meta_to_json(meta), indent=4) + "\n")
    n = sum(len(v) for split in meta.values() for v in split.values())
    logger.info("wrote %s (%d classes, %d images)", out_path, len(meta["test"]), n)
    return out_path


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------

def detect_dataset(root: str | os.PathLike) -> str:
    """Guess the layout of ``root``: meta, visa, mvtec or folder (a tree of classes, or a
    folder that is one class: ``train/good``, ``test/...``)."""
    root_path = Path(root)
    if (root_path / META_NAME).is_file():
        return "meta"
    if (root_path / VISA_CSV).is_file():
        return "visa"
    if any((root_path / c / "test").is_dir() for c in MVTEC_CLASSES):
        return "mvtec"
    return "folder"


def check_files_exist(root: Path, split: dict[str, list[Sample]], limit: int = 3) -> None:
    """Raise one FiloError naming the first missing image/mask files listed in ``split``."""
    missing: list[str] = []
    total = 0
    for samples in split.values():
        for s in samples:
            for rel in (s.img_path, s.mask_path):
                if rel and not (root / rel).is_file():
                    total += 1
                    if len(missing) < limit:
                        missing.append(str(root / rel))
    if total:
        more = f" and {total - len(missing)} more" if total > len(missing) else ""
        raise FiloError(f"{total} listed file(s) missing under {root}: {', '.join(missing)}{more}; "
                        f"check the dataset root or rebuild meta.json")


def load_split(root: str | os.PathLike, dataset: str = "auto", split: str = "test",
               classes: str | Sequence[str] | None = None, *, source: str = "--root",
               check_files: bool = True, allow_outside_root: bool = False,
               realiad_split: str | os.PathLike | None = None,
               folders: FolderSpec | None = None, allow_empty: bool = False,
               ) -> dict[str, list[Sample]]:
    """The samples of one split, ``{cls_name: [Sample, ...]}`` in dataset order.

    ``dataset`` is ``mvtec``, ``visa``, ``folder``, ``meta`` (read ``{root}/meta.json``) or
    ``auto`` (meta.json if present, else split_csv/1cls.csv -> visa, else a folder named like an
    MVTec class -> mvtec, else folder). ``classes`` (list or comma-separated string) keeps those
    classes, in dataset order. ``source`` names the flag or variable that set ``root``, for error
    messages. ``realiad_split``: Real-IAD's split variant (:func:`scan_realiad`'s
    ``split_path``); an error with any other layout. ``folders``: the named folders of
    :class:`FolderSpec` (the folder layout; ``auto`` then means folder). ``allow_empty``: the
    folder layout may have no image in this split (a train split of a test-only tree).
    """
    root_path = _check_root(root, source)
    _check_split(split)
    if folders is not None and folders.given():
        if dataset not in ("auto", "folder"):
            raise FiloError(f"--normal_dir / --abnormal_dir / --mask_dir / --normal_test_dir "
                            f"name the folders of --dataset folder (this run reads {dataset}); "
                            f"pass --dataset folder")
        dataset = "folder"
    if dataset == "auto":
        dataset = detect_dataset(root_path)
        logger.info("dataset layout of %s: %s", root_path, dataset)
    if realiad_split is not None and dataset != "realiad":
        raise FiloError(f"--realiad_split applies to --dataset realiad only (this run reads "
                        f"{dataset}); drop it")
    if dataset == "mvtec":
        return scan_mvtec(root_path, split, classes, source=source)
    if dataset in ("mpdd", "btad", "mvtec_ad2"):
        return scan_tree(root_path, dataset, split, classes, source=source)
    if dataset == "realiad":
        return scan_realiad(root_path, split, classes, source=source, check_files=check_files,
                            allow_outside_root=allow_outside_root, split_path=realiad_split)
    if dataset == "folder":
        return scan_folder(root_path, split, classes, source=source, folders=folders,
                           allow_empty=allow_empty)
    if dataset == "visa":
        return scan_visa(root_path, split, classes, source=source, check_files=check_files,
                         allow_outside_root=allow_outside_root)
    if dataset == "meta":
        meta_path = root_path / META_NAME
        meta = read_meta(meta_path)
        if split not in meta:
            raise FiloError(f"{meta_path} has no {split!r} split (has {', '.join(meta)})")
        if not meta[split]:
            raise FiloError(f"no classes found in {meta_path} under {split!r}")
        out = _select(meta[split], classes, str(meta_path))
        for cls_name, samples in out.items():
            for i, sample in enumerate(samples):
                _check_listed(root_path, sample, f"{meta_path} {split}/{cls_name}[{i}]",
                              allow_outside_root)
        if check_files:
            check_files_exist(root_path, out)
        return out
    raise FiloError(f"unknown dataset {dataset!r}; use one of {', '.join(DATASETS)} or auto")


def iter_samples(split: dict[str, list[Sample]]) -> Iterable[Sample]:
    """All samples of a split, class by class, in dataset order."""
    for samples in split.values():
        yield from samples


def flatten(split: dict[str, list[Sample]]) -> list[Sample]:
    """All samples of a split as one list, class by class, in dataset order."""
    return list(iter_samples(split))
