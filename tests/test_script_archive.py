"""OpenAI-style TorchScript CLIP archives: tensors read, code never run (docs/design.md §2.1)."""

from __future__ import annotations

import builtins
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from filo.backbone import ClipConfig, build_clip, load_clip_weights, read_clip_state_dict
from filo.errors import FiloError
from filo.script_archive import read_script_state_dict
from filo.weights import read_weights

MARKER = "FILO-PAYLOAD-RAN"


class _Extras(nn.Module):
    """Scripted: a buffer, a plain tensor attribute (not in state_dict), a transposed
    parameter and a buffer that is an offset view of another tensor's storage."""

    def __init__(self) -> None:
        super().__init__()
        base = torch.arange(10.0)
        self.register_buffer("counts", torch.tensor([3, 1, 4]))
        self.register_buffer("tail", base[4:])
        self.plain = torch.ones(2)
        self.wt = nn.Parameter(torch.randn(3, 4).t())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.plain.sum()


class _Holder(nn.Module):
    """OpenAI's archive layout: the CLIP's submodules as attributes of one traced module."""

    def __init__(self, clip: nn.Module, extras: nn.Module | None = None) -> None:
        super().__init__()
        for name, child in clip.named_children():
            setattr(self, name, child)
        for name, param in clip.named_parameters(recurse=False):
            setattr(self, name, param)
        if extras is not None:
            self.extras = extras

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.logit_scale


def _save_traced(module: nn.Module, path: Path) -> Path:
    torch.jit.trace(module, torch.ones(1), check_trace=False).save(str(path))
    return path


class _SetStatePayload(nn.Module):
    """A module whose TorchScript __setstate__ (run by torch.jit.load) prints MARKER."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(2))

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, bool]:
        return (self.w, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, bool]) -> None:
        print("FILO-PAYLOAD-RAN")
        self.w = state[0]
        self.training = state[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w


class _ExecOnUnpickle:
    """Unpickling this runs ``exec`` that writes a marker file (a plain-pickle payload)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def _rewrite_zip(src: Path, dst: Path, replace: dict[str, bytes] | None = None,
                 compression: int = zipfile.ZIP_STORED) -> Path:
    """A copy of the zip ``src``; a member whose name ends in a key of ``replace`` gets its value."""
    replace = replace or {}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression) as zout:
        for info in zin.infolist():
            body = next((data for suffix, data in replace.items() if info.filename.endswith(suffix)),
                        None)
            zout.writestr(info.filename, zin.read(info) if body is None else body,
                          compress_type=compression)
    return dst


def test_archive_tensors_are_read_and_its_code_never_runs(tmp_path, capfd):
    torch.manual_seed(32)
    safe = _save_traced(_Holder(build_clip(ClipConfig.tiny())).half(), tmp_path / "ViT-tiny.pt")

    # 1. a TorchScript __setstate__ payload: torch.jit.load would print MARKER (its code is in
    # the archive); filo refuses the file in one line and prints nothing
    class Top(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.visual = _SetStatePayload()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.visual(x)

    payload = tmp_path / "setstate.pt"
    torch.jit.script(Top()).save(str(payload))
    with zipfile.ZipFile(payload) as zf:
        code = "".join(zf.read(n).decode() for n in zf.namelist() if n.endswith(".py"))
    assert "def __setstate__" in code and MARKER in code
    capfd.readouterr()
    with pytest.raises(FiloError, match=r"refusing CLIP weights .*setstate\.pt: .*__setstate__"
                       ) as err:
        load_clip_weights(build_clip(ClipConfig.tiny()), payload)
    assert "\n" not in str(err.value)
    assert MARKER not in "".join(capfd.readouterr())

    # 2. a data.pkl that runs exec when unpickled: refused, the marker file is never written
    marker = tmp_path / "marker.txt"
    evil = pickle.dumps({"visual": _ExecOnUnpickle(marker)}, protocol=2)
    live = tmp_path / "live.txt"  # the payload is real: plain pickle runs it
    pickle.loads(pickle.dumps({"visual": _ExecOnUnpickle(live)}, protocol=2))
    assert live.read_text() == "ran"
    exec_archive = _rewrite_zip(safe, tmp_path / "exec.pt", {"/data.pkl": evil})
    for torchscript in (True, False):  # as CLIP weights and as any other weight file
        with pytest.raises(FiloError, match=r"refusing weights .*exec\.pt: "):
            read_weights(exec_archive, what="weights", hint="fix", torchscript=torchscript)
    with pytest.raises(FiloError, match=r"refers to [_a-z]+\.exec, "):
        read_clip_state_dict(exec_archive)
    assert not marker.exists()

    # 3. the seeded-weight archive reads as torch.jit.load(...).state_dict() (the safe file only)
    expected = torch.jit.load(str(safe), map_location="cpu").state_dict()
    got = read_clip_state_dict(safe)
    assert list(got) == list(expected)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype == torch.float16, key
        assert torch.equal(got[key], value), key
    clip = build_clip(ClipConfig.tiny())
    load_clip_weights(clip, safe)
    torch.testing.assert_close(clip.visual.conv1.weight, expected["visual.conv1.weight"].float())


def test_state_dict_members_strides_offsets_and_compressed_archives(tmp_path):
    torch.manual_seed(3)
    extras = torch.jit.script(_Extras())
    path = _save_traced(_Holder(build_clip(ClipConfig.tiny()), extras), tmp_path / "x.pt")
    expected = torch.jit.load(str(path), map_location="cpu").state_dict()
    assert "extras.plain" not in expected and "extras.tail" in expected
    deflated = _rewrite_zip(path, tmp_path / "deflated.pt", compression=zipfile.ZIP_DEFLATED)
    for archive in (path, deflated):
        got = read_script_state_dict(archive)
        assert list(got) == list(expected)
        for key, value in expected.items():
            assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
            assert got[key].stride() == value.stride(), key
            assert torch.equal(got[key], value), key
    assert torch.equal(got["extras.tail"], torch.arange(4.0, 10.0))
    assert torch.equal(got["extras.counts"], torch.tensor([3, 1, 4]))
