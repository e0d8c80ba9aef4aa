"""Fetch one file from the Hugging Face Hub for ``python -m filo download``.

This is the only module of filo that imports ``huggingface_hub``, and only inside
:func:`fetch_hub_file`: the run-time pipeline stays offline (``env.sh`` exports
``HF_HUB_OFFLINE=1``). The download lifts that switch for itself only (:func:`hub_online`).

The Hub's own settings apply: ``HF_ENDPOINT`` (a Hub mirror), ``HF_HUB_CACHE`` / ``HF_HOME``
(where the Hub keeps the file), ``HF_TOKEN`` (private or gated repositories), and the Hub's own
retries and resume of a dropped connection. ``FILO_ASSET_MIRROR`` does not apply here. Every
failure becomes one :class:`~filo.errors.FiloError` line naming the asset and the fix.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from filo.assets import HF_DEFAULT_ENDPOINT, Asset, AssetFile
from filo.errors import FiloError


@dataclass(frozen=True)
class HubSettings:
    """Where and how to reach the Hub, read from the environment at download time."""

    endpoint: str
    cache_dir: str | None  # None: huggingface_hub's own default (~/.cache/huggingface/hub)
    token: str | None  # None: huggingface_hub's stored login, if any
    timeout: float

    @classmethod
    def from_env(cls, timeout: float, env: Mapping[str, str] | None = None) -> HubSettings:
        env = os.environ if env is None else env
        endpoint = (env.get("HF_ENDPOINT") or HF_DEFAULT_ENDPOINT).strip().rstrip("/")
        cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
        if not cache and env.get("HF_HOME"):
            cache = os.path.join(env["HF_HOME"], "hub")
        cache = os.path.expandvars(os.path.expanduser(cache)) if cache else None
        return cls(endpoint=endpoint, cache_dir=cache, token=env.get("HF_TOKEN") or None,
                   timeout=timeout)


def _env_offline() -> bool:
    """``HF_HUB_OFFLINE`` as huggingface_hub computes it from the environment."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    return (value or "").upper() in {"1", "ON", "YES", "TRUE"}


@contextmanager
def hub_online(timeout: float | None = None) -> Iterator[None]:
    """Let huggingface_hub reach the network inside this block, whatever ``HF_HUB_OFFLINE`` says.

    huggingface_hub reads ``HF_HUB_OFFLINE`` when it is first imported, so the variable is set to
    ``0`` before the import; when the library was already imported (another caller in the same
    process) its constant is switched too. Both are put back afterwards. ``timeout`` becomes the
    Hub's read timeout unless ``HF_HUB_DOWNLOAD_TIMEOUT`` is set.
    """
    saved_env = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "0"
    from huggingface_hub import constants

    saved_timeout = getattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", None)
    constants.HF_HUB_OFFLINE = False
    user_timeout = os.environ.get("HF_HUB_DOWNLOAD_TIMEOUT")
    if timeout is not None and saved_timeout is not None and not user_timeout:
        constants.HF_HUB_DOWNLOAD_TIMEOUT = max(1, int(round(timeout)))
    try:
        yield
    finally:
        if saved_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved_env
        constants.HF_HUB_OFFLINE = _env_offline()
        if saved_timeout is not None:
            constants.HF_HUB_DOWNLOAD_TIMEOUT = saved_timeout


_REACHABLE: set[str] = set()  # endpoints that answered in this process


def check_endpoint(endpoint: str, timeout: float) -> str | None:
    """Why ``endpoint`` cannot be reached (refused, unknown host, timeout), or None if it answers.

    A quick probe, so that an offline machine fails within ``timeout`` seconds instead of
    waiting through huggingface_hub's retries. Any HTTP answer, even an error status, counts as
    reachable. Proxies from the environment (HTTPS_PROXY) are used as huggingface_hub uses them.
    """
    if endpoint in _REACHABLE:
        return None
    request = urllib.request.Request(f"{endpoint}/", method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            pass
    except urllib.error.HTTPError as err:
        err.close()
    except urllib.error.URLError as err:
        return str(err.reason) if err.reason is not None else str(err)
    except (OSError, ValueError) as err:
        return str(err) or type(err).__name__
    _REACHABLE.add(endpoint)
    return None


def _first_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[0] if lines else type(err).__name__


def _hub_error(err: Exception, asset: Asset, spec: AssetFile, revision: str, target: Path,
               hub: HubSettings) -> FiloError:
    """One line naming the asset, what went wrong and the fix."""
    from huggingface_hub import utils as hf_utils

    what = f"{spec.hf_repo}/{spec.hf_filename} for {asset.name}"
    by_hand = f"or on a machine with internet fetch {spec.url} and place it at {target}"
    revision_not_found = getattr(hf_utils, "RevisionNotFoundError", ())
    local_not_found = getattr(hf_utils, "LocalEntryNotFoundError", ())
    entry_not_found = getattr(hf_utils, "EntryNotFoundError", ())
    repo_not_found = getattr(hf_utils, "RepositoryNotFoundError", ())
    http_error = getattr(hf_utils, "HfHubHTTPError", ())
    if isinstance(err, revision_not_found):
        return FiloError(
            f"cannot download {what}: revision {revision!r} does not exist on {hub.endpoint}; "
            f"set {spec.hf_revision_var} to an existing commit, tag or branch of {spec.hf_repo} "
            f"(or unset it for the pinned {spec.hf_revision!r})")
    if isinstance(err, local_not_found):  # no connection (after the Hub's own retries)
        return FiloError(
            f"cannot download {what}: {hub.endpoint} did not answer ({_first_line(err)}); check "
            f"the network or set HF_ENDPOINT to a reachable Hub mirror, {by_hand}")
    if isinstance(err, entry_not_found):
        return FiloError(
            f"cannot download {what}: {hub.endpoint} has no file {spec.hf_filename} in "
            f"{spec.hf_repo} at revision {revision!r}; check HF_ENDPOINT and "
            f"{spec.hf_revision_var}, {by_hand}")
    if isinstance(err, repo_not_found):
        return FiloError(
            f"cannot download {what}: repository {spec.hf_repo} not found or not accessible on "
            f"{hub.endpoint}; check HF_ENDPOINT, and set HF_TOKEN if it needs a login, {by_hand}")
    if isinstance(err, http_error):
        status = getattr(getattr(err, "response", None), "status_code", "error")
        return FiloError(
            f"cannot download {what}: {hub.endpoint} answered HTTP {status}; try again later or "
            f"set HF_ENDPOINT to another Hub mirror, {by_hand}")
    return FiloError(
        f"cannot download {what}: the transfer from {hub.endpoint} failed "
        f"({type(err).__name__}: {_first_line(err)}); run the same command again to retry, "
        f"{by_hand}")


def fetch_hub_file(asset: Asset, spec: AssetFile, target: Path, hub: HubSettings) -> Path:
    """Download ``spec`` into the Hub cache and return its snapshot entry there (usually a
    symlink to the blob). Raises :class:`FiloError` with one line on any failure."""
    revision = spec.hub_revision()
    reason = check_endpoint(hub.endpoint, hub.timeout)
    if reason is not None:
        raise FiloError(
            f"cannot download {spec.hf_repo}/{spec.hf_filename} for {asset.name}: {hub.endpoint} "
            f"is unreachable ({reason}); check the network or set HF_ENDPOINT to a reachable Hub "
            f"mirror, or on a machine with internet fetch {spec.url} and place it at {target}")
    with hub_online(hub.timeout):
        from huggingface_hub import hf_hub_download

        try:
            pointer = hf_hub_download(
                spec.hf_repo, spec.hf_filename, revision=revision, cache_dir=hub.cache_dir,
                token=hub.token, endpoint=hub.endpoint, etag_timeout=hub.timeout)
        except (TypeError, AttributeError, NameError):
            raise  # a programming error, not a download problem
        except Exception as err:  # every other Hub failure becomes one line
            raise _hub_error(err, asset, spec, revision, target, hub) from None
    return Path(pointer)


def forget_hub_file(pointer: Path) -> None:
    """Delete a bad download from the Hub cache: the snapshot entry ``pointer`` and the links and
    blob it leads to, so that the next run fetches the file again instead of reusing it."""
    chain = [pointer]
    while chain[-1].is_symlink() and len(chain) < 8:
        chain.append(Path(os.path.join(chain[-1].parent, os.readlink(chain[-1]))))
    for path in chain:
        path.unlink(missing_ok=True)
