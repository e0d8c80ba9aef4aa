"""``python -m filo doctor``: is every file a job needs present and intact?

Prints one table row per asset and dataset root (found, missing, wrong size, wrong checksum)
followed by the exact step that fixes each problem, and exits 0 only when everything the named
job needs is present.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from tabulate import tabulate

from filo.assets import (
    Asset,
    AssetPaths,
    ChecksumCache,
    DatasetRoot,
    build_datasets,
    build_registry,
    looks_like_torch_file,
)

OK = "ok"
MISSING = "missing"
OPTIONAL_MISSING = "missing (optional)"
WRONG_SIZE = "wrong size"
WRONG_SHA = "wrong checksum"
NOT_TORCH = "not a torch file"
WRONG_CONTENT = "wrong content"
SKIPPED = "not needed"


@dataclass(frozen=True)
class JobSpec:
    """What a job needs: a dataset, checkpoints in given roles, the BERT tokenizer, CLIP."""

    name: str
    description: str
    dataset: str | None = None
    filo_ckpt: str | None = None  # asset name used as --ckpt_path by default
    grounding_ckpt: str | None = None  # asset name used as --grounded_checkpoint by default
    bert: bool = False
    clip: bool = False  # required (training) or only optional (testing)
    optional: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()  # further assets the job needs (memory-bank backbones)


def _extra_dataset_jobs() -> list[JobSpec]:
    """test, detector-only and memory-build jobs for every further dataset layout: zero-shot
    with the MVTec-trained checkpoints (the cross-dataset protocol for datasets other than
    VisA), the detector fine-tuned on MVTec AD, and WideResNet-50-2 banks."""
    jobs = []
    for ds, label in (("mpdd", "MPDD"), ("btad", "BTAD"), ("mvtec_ad2", "MVTec AD 2"),
                      ("realiad", "Real-IAD")):
        slug = ds.replace("_", "-")
        jobs += [
            JobSpec(f"test-{slug}", f"test on {label} with the MVTec-trained checkpoints",
                    ds, "filo-train-on-mvtec", "grounding-train-on-mvtec", bert=True,
                    optional=("clip-vit-l-14-336",)),
            JobSpec(f"gdino-only-{slug}", f"GroundingDINO alone on {label} (MVTec fine-tuned "
                    "detector)", ds, None, "grounding-train-on-mvtec", bert=True),
            JobSpec(f"memory-{slug}", f"build PatchCore memory banks on {label} "
                    "(WideResNet-50-2)", ds, needs=("wide-resnet50-2",)),
        ]
    return jobs


JOBS: dict[str, JobSpec] = {
    j.name: j for j in [
        JobSpec("test-mvtec", "test on MVTec AD with the VisA-trained checkpoints (paper protocol)",
                "mvtec", "filo-train-on-visa", "grounding-train-on-visa", bert=True,
                optional=("clip-vit-l-14-336",)),
        JobSpec("test-visa", "test on VisA with the MVTec-trained checkpoints (paper protocol)",
                "visa", "filo-train-on-mvtec", "grounding-train-on-mvtec", bert=True,
                optional=("clip-vit-l-14-336",)),
        JobSpec("test-mvtec-indomain", "test on MVTec AD with the MVTec-trained checkpoints",
                "mvtec", "filo-train-on-mvtec", "grounding-train-on-mvtec", bert=True,
                optional=("clip-vit-l-14-336",)),
        JobSpec("test-visa-indomain", "test on VisA with the VisA-trained checkpoints",
                "visa", "filo-train-on-visa", "grounding-train-on-visa", bert=True,
                optional=("clip-vit-l-14-336",)),
        JobSpec("gdino-only", "GroundingDINO alone on MVTec AD (VisA fine-tuned detector)",
                "mvtec", None, "grounding-train-on-visa", bert=True),
        JobSpec("gdino-only-visa", "GroundingDINO alone on VisA (MVTec fine-tuned detector)",
                "visa", None, "grounding-train-on-mvtec", bert=True),
        JobSpec("train-mvtec", "train FiLo heads on MVTec AD", "mvtec", clip=True),
        JobSpec("train-visa", "train FiLo heads on VisA", "visa", clip=True),
        JobSpec("memory-mvtec", "build PatchCore memory banks on MVTec AD (WideResNet-50-2)",
                "mvtec", needs=("wide-resnet50-2",)),
        JobSpec("memory-visa", "build PatchCore memory banks on VisA (WideResNet-50-2)",
                "visa", needs=("wide-resnet50-2",)),
        *_extra_dataset_jobs(),
        JobSpec("all", "every asset and dataset", None, bert=True, clip=True),
    ]
}


@dataclass
class Row:
    item: str
    status: str
    path: Path
    fix: str = ""
    needed: bool = True

    @property
    def ok(self) -> bool:
        return self.status in (OK, OPTIONAL_MISSING, SKIPPED)


@dataclass
class Report:
    job: JobSpec | None
    rows: list[Row] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        return all(r.ok for r in self.rows if r.needed)

    def problems(self) -> list[Row]:
        return [r for r in self.rows if r.needed and not r.ok]

    def render(self) -> str:
        table = tabulate(
            [(r.item, r.status if r.needed or r.status != OK else OK, str(r.path)) for r in self.rows],
            headers=("item", "status", "path"), tablefmt="simple",
        )
        lines = [table]
        fixes = [r for r in self.rows if r.fix and not r.ok]
        optional = [r for r in self.rows if r.status == OPTIONAL_MISSING and r.fix]
        if fixes:
            lines.append("")
            lines.append("To fix:")
            lines += [f"  {i}. {r.item}: {r.fix}" for i, r in enumerate(fixes, 1)]
        if optional:
            lines.append("")
            lines.append("Optional:")
            lines += [f"  - {r.item}: {r.fix}" for r in optional]
        lines.append("")
        if self.job is None:
            lines.append("no job named: every item listed; `--job NAME` checks what one job needs")
        elif self.ready:
            lines.append(f"job {self.job.name}: ready")
        else:
            n = len(self.problems())
            lines.append(f"job {self.job.name}: NOT ready, {n} item(s) to fix (see above)")
        return "\n".join(lines)


def checkpoint_role(asset_name: str) -> str | None:
    """Which kind of checkpoint an asset is ('filo', 'grounding', 'clip', 'wideresnet'), for
    content checks."""
    if asset_name.startswith("filo-"):
        return "filo"
    if asset_name.startswith("grounding"):
        return "grounding"
    if asset_name.startswith("clip-"):
        return "clip"
    if asset_name.startswith("wide-resnet"):
        return "wideresnet"
    return None


def check_asset(asset: Asset, cache: ChecksumCache, *, needed: bool = True,
                optional: bool = False, path: Path | None = None) -> Row:
    """Check one asset; ``path`` replaces its location (a user-given checkpoint path)."""
    custom = path is not None and Path(path).resolve() != asset.path.resolve()
    location = Path(path) if path is not None else asset.path
    fetch = f"python -m filo download {asset.name}"
    if asset.kind == "dir":
        return _check_dir(asset, location, cache, needed, optional, fetch)
    spec = asset.files[0]
    role = checkpoint_role(asset.name)
    if role is not None and (location.is_dir() or location.suffix == ".npy"):
        from filo.ckpt_check import checkpoint_problem

        return Row(asset.name, WRONG_CONTENT, location,
                   f"{location} {checkpoint_problem(location, role)}; put the checkpoint file "
                   f"there (from {spec.url})", needed)
    if not location.is_file():
        how = (f"place the file at {location} (from {spec.url}; on a machine with internet: "
               f"{fetch})") if not custom else f"the file {location} does not exist; fix the path"
        if asset.env_var and not custom:
            how += f"; or set {asset.env_var} to point at it"
        return Row(asset.name, OPTIONAL_MISSING if optional else MISSING, location, how, needed)
    size = location.stat().st_size
    if not custom and spec.size is not None and size != spec.size:
        return Row(asset.name, WRONG_SIZE, location,
                   f"{size:,} bytes, expected {spec.size:,}: delete it and download again "
                   f"from {spec.url}", needed)
    if not looks_like_torch_file(location):
        return Row(asset.name, NOT_TORCH, location,
                   f"{location} is not a PyTorch checkpoint (truncated or wrong file): download "
                   f"it again from {spec.url}", needed)
    if role is not None:
        from filo.ckpt_check import checkpoint_problem

        problem = checkpoint_problem(location, role)
        if problem:
            return Row(asset.name, WRONG_CONTENT, location,
                       f"{location} {problem}; download it again from {spec.url}", needed)
    if not custom and spec.sha256_prefix is not None:
        got = cache.sha256(location)
        if not got.startswith(spec.sha256_prefix):
            return Row(asset.name, WRONG_SHA, location,
                       f"sha256 {got[:12]}..., expected {spec.sha256_prefix}...: delete it and "
                       f"download again from {spec.url}", needed)
    if not custom and spec.sha256 is not None:
        got = cache.sha256(location)
        if got != spec.sha256:
            return Row(asset.name, WRONG_SHA, location,
                       f"sha256 {got[:12]}..., expected {spec.sha256[:12]}...: delete it and "
                       f"download again from {spec.url}", needed)
    return Row(asset.name, OK, location, "", needed)


def _check_dir(asset: Asset, location: Path, cache: ChecksumCache, needed: bool,
               optional: bool, fetch: str) -> Row:
    if not location.is_dir():
        names = ", ".join(f.relpath for f in asset.files if f.required)
        return Row(asset.name, OPTIONAL_MISSING if optional else MISSING, location,
                   f"create {location}/ holding {names} (from {asset.source_page}; with internet: "
                   f"{fetch}); or set {asset.env_var} to such a directory", needed)
    for spec in asset.files:
        file = location / spec.relpath
        if not file.is_file():
            if spec.required:
                return Row(asset.name, MISSING, location,
                           f"{file} is missing: put {spec.relpath} from {spec.url} there", needed)
            continue
        if spec.size is not None and file.stat().st_size != spec.size:
            return Row(asset.name, WRONG_SIZE, file,
                       f"{file.stat().st_size:,} bytes, expected {spec.size:,}: replace it with "
                       f"{spec.url}", needed)
        if spec.sha256 is not None and cache.sha256(file) != spec.sha256:
            return Row(asset.name, WRONG_SHA, file,
                       f"{file} is not bert-base-uncased's {spec.relpath}: replace it with "
                       f"{spec.url}", needed)
    return Row(asset.name, OK, location, "", needed)


def check_dataset(ds: DatasetRoot, *, needed: bool = True, path: Path | None = None) -> Row:
    location = Path(path) if path is not None else ds.path
    item = f"dataset {ds.name}"
    how = (f"download {ds.description} from {ds.source_page} and extract it so that "
           f"{location / ds.marker} exists; or set {ds.env_var} (or --data_path) to its root")
    if not location.is_dir():
        return Row(item, MISSING, location, how, needed)
    if not (location / ds.marker).exists() and not (location / "meta.json").is_file():
        return Row(item, "incomplete", location, f"{location / ds.marker} not found: {how}", needed)
    return Row(item, OK, location, "", needed)


def check_banks(folder: Path) -> list[Row]:
    """One row per class bank of ``folder`` (``--memory_bank``): its rows and meta read and
    checked against its checksum; a checkpoint file or an empty folder in that slot is named."""
    from filo.errors import FiloError
    from filo.memory.bank import list_bank_classes, load_bank

    folder = Path(folder)
    if folder.is_file():
        from filo.ckpt_check import checkpoint_kind_of

        kind = checkpoint_kind_of(folder)
        what = f"is {kind}" if kind else "is a file"
        return [Row("memory bank", WRONG_CONTENT, folder,
                    f"{folder} {what}, not a memory-bank folder: it is in the wrong slot; pass "
                    f"the folder python -m filo.memory build --out wrote")]
    classes = list_bank_classes(folder)
    if not classes:
        return [Row("memory bank", MISSING, folder,
                    f"{folder} holds no banks (no <class>/bank.npy + meta.json); build them with "
                    f"python -m filo.memory build --out {folder}")]
    rows = []
    for cls_name in classes:
        try:
            load_bank(folder, cls_name, mmap_mode="r")
            rows.append(Row(f"memory bank {cls_name}", OK, folder / cls_name))
        except FiloError as err:
            rows.append(Row(f"memory bank {cls_name}", WRONG_CONTENT, folder / cls_name, str(err)))
    return rows


def run_doctor(job_name: str | None = None, *, paths: AssetPaths | None = None,
               ckpt_path: Path | None = None, grounded_checkpoint: Path | None = None,
               data_path: Path | None = None, cache: ChecksumCache | None = None,
               memory_bank: Path | None = None) -> Report:
    paths = paths or AssetPaths.from_env()
    cache = cache or ChecksumCache()
    registry = build_registry(paths)
    datasets = build_datasets(paths)
    job = JOBS.get(job_name) if job_name else None
    report = Report(job)
    everything = job is None or job.name == "all"

    for name, asset in registry.items():
        override = None
        needed = everything
        optional = False
        if job is not None and not everything:
            if name == job.filo_ckpt:
                needed, override = True, ckpt_path
            elif name == job.grounding_ckpt:
                needed, override = True, grounded_checkpoint
            elif name == "bert-base-uncased":
                needed = job.bert
            elif name in job.needs:
                needed = True
            elif name == "clip-vit-l-14-336":
                needed = job.clip or name in job.optional
                optional = name in job.optional and not job.clip
        if job is None:
            optional = True  # a plain overview demands nothing
        row = check_asset(asset, cache, needed=needed, optional=optional, path=override)
        if not needed and job is not None:
            row.status = SKIPPED if row.status != OK else OK
            row.fix = ""
        report.rows.append(row)
    for ds_name, ds in datasets.items():
        needed = everything or (job is not None and job.dataset == ds_name)
        override = data_path if job is not None and job.dataset == ds_name else None
        row = check_dataset(ds, needed=needed, path=override)
        if job is None and row.status != OK:
            row.status = OPTIONAL_MISSING
        if not needed and job is not None:
            row.status, row.fix = (OK if row.status == OK else SKIPPED), ""
        report.rows.append(row)
    if data_path is not None and (job is None or job.dataset is None or everything):
        report.rows.append(check_own_dataset(data_path))
    if memory_bank is not None:
        report.rows += check_banks(memory_bank)
    return report


def check_own_dataset(root: Path) -> Row:
    """A dataset of one's own (``--data_path`` without a job that names a dataset): which
    layout ``--dataset auto`` reads there and its image counts, or the one line saying what is
    wrong."""
    from filo.data.layouts import detect_dataset, load_split
    from filo.errors import FiloError

    item = "dataset at --data_path"
    try:
        layout = detect_dataset(root)
        test = load_split(root, layout, "test", source="--data_path")
        train = load_split(root, layout, "train", source="--data_path", allow_empty=True)
    except FiloError as err:
        return Row(item, MISSING if not Path(root).is_dir() else "incomplete", Path(root),
                   str(err), True)
    except (FileNotFoundError, KeyError) as err:  # a layout without a train split listing
        return Row(item, "incomplete", Path(root), f"{type(err).__name__}: {err}", True)
    n_test = sum(len(v) for v in test.values())
    n_anom = sum(s.anomaly for v in test.values() for s in v)
    n_train = sum(len(v) for v in train.values())
    return Row(f"{item} ({layout} layout: {len(test)} class(es), {n_train} train, {n_test} test "
               f"images, {n_anom} anomalous)", OK, Path(root), "", True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--job", choices=sorted(JOBS), default=None,
                        help="check only what this job needs; exit 0 only if it is ready")
    parser.add_argument("--ckpt_path", type=Path, default=None,
                        help="FiLo checkpoint the job will use instead of the default")
    parser.add_argument("--grounded_checkpoint", type=Path, default=None,
                        help="GroundingDINO checkpoint the job will use instead of the default")
    parser.add_argument("--data_path", type=Path, default=None,
                        help="dataset root the job will use instead of MVTEC_ROOT / VISA_ROOT")
    parser.add_argument("--memory_bank", type=Path, default=None,
                        help="also check this memory-bank folder: each class's bank against its "
                             "checksum")
    parser.add_argument("--list-jobs", action="store_true", help="list the job names and exit")


def main_doctor(args: argparse.Namespace) -> int:
    if args.list_jobs:
        for job in JOBS.values():
            print(f"{job.name:22s} {job.description}")
        return 0
    report = run_doctor(args.job, ckpt_path=args.ckpt_path,
                        grounded_checkpoint=args.grounded_checkpoint, data_path=args.data_path,
                        memory_bank=args.memory_bank)
    print(report.render())
    if args.job is None:
        return 0 if not any(r.status in (WRONG_SIZE, WRONG_SHA, NOT_TORCH, WRONG_CONTENT) for r in report.rows) else 1
    return 0 if report.ready else 1
