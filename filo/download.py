"""``python -m filo download``: fetch an asset's missing files, verify them, put them in place.

* Files hosted on the Hugging Face Hub (the released FiLo / grounding checkpoints, the
  bert-base-uncased tokenizer) go through ``huggingface_hub`` at a pinned revision
  (:mod:`filo.hub`): ``HF_ENDPOINT``, ``HF_HUB_CACHE`` / ``HF_HOME``, ``HF_TOKEN`` and
  ``FILO_HF_REVISION_*`` apply, the file is kept in the Hub cache and hard-linked (or copied)
  to the path the doctor checks.
* The other files (OpenAI CLIP, GroundingDINO's GitHub release, torchvision WideResNets) come
  over plain HTTP(S), from ``FILO_ASSET_MIRROR/{asset name}/{file name}`` when that variable is
  set. The bytes go to ``<target>.part``; a cut connection keeps it and the next run asks for the
  rest (``Range: bytes=N-``), appending on ``206`` and starting over on ``200``.

Every file is verified (size and sha256 where known, else that a ``.pth`` looks like a torch
file) before it is renamed into place, so the final path never holds a half-written or wrong
file. Every failure is one :class:`~filo.errors.FiloError` line naming the asset and the fix.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import sys
import urllib.error
import urllib.request
from pathlib import Path

from filo.assets import Asset, AssetFile, ChecksumCache, looks_like_torch_file, sha256_file
from filo.errors import FiloError
from filo.fileio import atomic_path

PROGRESS_MIN_BYTES = 8 << 20  # no progress bar for files known to be smaller
_CHUNK = 1 << 20


def download_asset(asset: Asset, *, timeout: float = 10.0, cache: ChecksumCache | None = None,
                   log=print) -> None:
    """Fetch every missing file of ``asset``, verify it and move it to its final path."""
    mirror = os.environ.get("FILO_ASSET_MIRROR", "").strip().rstrip("/")
    hub = None
    for spec, target in asset.file_paths():
        if target.exists():
            log(f"[filo] {target} exists; skipped")
            continue
        made_dir = not target.parent.exists()
        try:
            if spec.on_hub:
                from filo.hub import HubSettings

                hub = hub or HubSettings.from_env(timeout)
                digest = _fetch_from_hub(asset, spec, target, hub, log)
            else:
                digest = _fetch_http(asset, spec, target, mirror, timeout, log)
        except FiloError as err:
            if made_dir and target.parent.is_dir() and not any(target.parent.iterdir()):
                target.parent.rmdir()
            if not spec.required:
                log(f"[filo] optional {spec.relpath} of {asset.name} not fetched ({err}); "
                    "continuing")
                continue
            raise
        if cache is not None and digest is not None:
            cache.remember(target, digest)
        log(f"[filo] {target} ready")


# --------------------------------------------------------------------------- verification

def verify_file(spec: AssetFile, file: Path) -> tuple[str | None, str | None]:
    """(what is wrong with ``file`` as ``spec``, or None; its sha256 when it was computed)."""
    size = file.stat().st_size
    if spec.size is not None and size != spec.size:
        return f"has {size:,} bytes, expected {spec.size:,}", None
    if spec.sha256 or spec.sha256_prefix:
        got = sha256_file(file)
        if spec.sha256 and got != spec.sha256:
            return f"has sha256 {got}, expected {spec.sha256}", got
        if spec.sha256_prefix and not got.startswith(spec.sha256_prefix):
            return f"has sha256 {got}, expected {spec.sha256_prefix}...", got
        return None, got
    if Path(spec.relpath).suffix in (".pth", ".pt") and not looks_like_torch_file(file):
        return "is not a PyTorch checkpoint (an error page or a truncated file?)", None
    return None, None


def place_file(src: Path, target: Path) -> None:
    """Put ``src`` at ``target`` atomically as a hard link (a copy across file systems): a temp
    name in the target's folder, then a rename. Never a symlink that could dangle."""
    with atomic_path(target) as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


# --------------------------------------------------------------------------- Hugging Face Hub

def _fetch_from_hub(asset: Asset, spec: AssetFile, target: Path, hub, log) -> str | None:
    from filo.hub import fetch_hub_file, forget_hub_file

    revision = spec.hub_revision()
    log(f"[filo] downloading {spec.hf_repo}/{spec.hf_filename} (revision {revision}) from "
        f"{hub.endpoint} -> {target}")
    pointer = fetch_hub_file(asset, spec, target, hub)
    blob = Path(os.path.realpath(pointer))  # the file itself, not a link into the cache
    problem, digest = verify_file(spec, blob)
    if problem:
        forget_hub_file(pointer)
        raise FiloError(
            f"download of {spec.hf_repo}/{spec.hf_filename} for {asset.name} from {hub.endpoint} "
            f"{problem}; deleted it from the Hub cache: try again, and if it fails again check "
            f"that HF_ENDPOINT serves the real file and {spec.hf_revision_var} the right revision")
    place_file(blob, target)
    return digest


# --------------------------------------------------------------------------- plain HTTP(S)

def _fetch_http(asset: Asset, spec: AssetFile, target: Path, mirror: str, timeout: float,
                log, *, fresh: bool = False) -> str | None:
    url = f"{mirror}/{asset.name}/{spec.relpath}" if mirror else spec.url
    source = "FILO_ASSET_MIRROR" if mirror else "the source"
    by_hand = (f"on a machine with internet fetch {spec.url if mirror else 'it'} and place it "
               f"at {target}")
    part = target.with_name(target.name + ".part")
    if fresh:
        part.unlink(missing_ok=True)
    have = part.stat().st_size if part.is_file() else 0
    target.parent.mkdir(parents=True, exist_ok=True)
    log(f"[filo] downloading {url} -> {target}"
        + (f" (resuming at {have:,} bytes)" if have else ""))
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        resp = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        err.close()
        if err.code == 416 and have and not fresh:
            # nothing left to send: the .part is complete (or not this file at all)
            if verify_file(spec, part)[0] is None:
                return _finish(asset, spec, part, target, url, source)
            return _fetch_http(asset, spec, target, mirror, timeout, log, fresh=True)
        raise FiloError(
            f"cannot download {url} for {asset.name}: HTTP {err.code} {err.reason}; check "
            f"{source}, or {by_hand}") from None
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise FiloError(
            f"cannot download {url} for {asset.name} ({_reason(err)}): check the network"
            f"{' and FILO_ASSET_MIRROR' if mirror else ''}, or {by_hand}") from None
    with resp:
        resumed = bool(have) and resp.status == 206
        if resumed:
            start = _range_start(resp.headers.get("Content-Range"))
            if start is not None and start != have and not fresh:
                resp.close()
                return _fetch_http(asset, spec, target, mirror, timeout, log, fresh=True)
        elif have:
            log("[filo] the server does not resume downloads; starting over")
        done = have if resumed else 0
        length = _int_or_none(resp.headers.get("Content-Length"))
        total = done + length if length is not None else None
        copied = 0
        try:
            with open(part, "ab" if resumed else "wb") as out:
                copied = _copy_with_progress(resp, out, total, done, target.name)
            error = None
        except (OSError, http.client.HTTPException) as err:
            copied = part.stat().st_size - done if part.is_file() else 0
            error = _reason(err)
    if error is not None or (length is not None and copied < length):
        got = done + copied
        if got == 0:
            part.unlink(missing_ok=True)
        of = f" of {total:,}" if total is not None else ""
        raise FiloError(
            f"download of {url} for {asset.name} was cut after {got:,}{of} bytes "
            f"({error or 'connection closed early'}); {part} is kept: run the same command again "
            f"to resume")
    return _finish(asset, spec, part, target, url, source)


def _finish(asset: Asset, spec: AssetFile, part: Path, target: Path, url: str,
            source: str) -> str | None:
    problem, digest = verify_file(spec, part)
    if problem:
        part.unlink(missing_ok=True)
        raise FiloError(f"download of {url} for {asset.name} {problem}; deleted it: try again, "
                        f"and if it fails again check {source}")
    os.replace(part, target)
    return digest


def _range_start(content_range: str | None) -> int | None:
    match = re.match(r"\s*bytes\s+(\d+)-", content_range or "")
    return int(match.group(1)) if match else None


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _reason(err: BaseException) -> str:
    if isinstance(err, urllib.error.URLError) and err.reason is not None:
        return str(err.reason)
    return str(err) or type(err).__name__


def _copy_with_progress(src, dst, total: int | None, initial: int, label: str) -> int:
    """Copy ``src`` to ``dst`` with a progress bar on stderr; return the bytes copied."""
    from tqdm import tqdm

    copied = 0
    small = total is not None and total < PROGRESS_MIN_BYTES
    with tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024,
              desc=label, file=sys.stderr, disable=small, leave=False) as bar:
        while block := src.read(_CHUNK):
            dst.write(block)
            copied += len(block)
            bar.update(len(block))
    return copied
