"""The tensors of a TorchScript archive (OpenAI's CLIP ``.pt`` files), read without running it.

A TorchScript archive is a zip of ``<prefix>/data.pkl`` (the pickled module object graph),
``<prefix>/data/<key>`` (raw tensor storages), ``<prefix>/code/`` (the modules' TorchScript
source) and ``<prefix>/constants.pkl``. ``torch.jit.load`` compiles and runs that code
(``__setstate__`` included); this module never does. It unpickles ``data.pkl`` with an
allow-list: the tensor-rebuild function, storage types and ``OrderedDict``; every
``__torch__.*`` class becomes an inert attribute holder; anything else is refused. The code
files are only scanned as text for each class's ``__parameters__`` / ``__buffers__`` lists, so
the result has the keys and tensors of ``torch.jit.load(path).state_dict()``
(docs/design.md §2.1).

Errors are :class:`ArchiveRefused` (a refused payload or an unknown structure) or whatever
``zipfile`` / ``pickle`` raise; :func:`filo.weights.read_weights` turns them into one line.
"""

from __future__ import annotations

import ast
import collections
import mmap
import pickle
import re
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

# storage type names (torch.<Name>) that a TorchScript / torch.save pickle refers to
STORAGE_DTYPES: dict[str, torch.dtype] = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}

_CLASS = re.compile(r"^class (\w+)\b")
_MEMBER_LIST = re.compile(r"^  (__parameters__|__buffers__) = (\[.*\])\s*$")
_SETSTATE = re.compile(r"^  def __setstate__\(")
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., file name length, extra length


class ArchiveRefused(ValueError):
    """The archive holds something other than modules and tensors; ``str()`` says what."""


def is_torchscript_archive(path: str | Path) -> bool:
    """True for a TorchScript zip archive (OpenAI's CLIP ``.pt`` files), False otherwise."""
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as zf:
            return any(name.endswith("constants.pkl") for name in zf.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


class ScriptObject:
    """Stand-in for one ``__torch__.*`` object of the archive: its attributes, nothing run.

    The unpickler creates it with ``__new__`` alone; the class-level defaults hold until BUILD.
    """

    qualname = "__torch__"
    attrs: Mapping[str, Any] = MappingProxyType({})
    custom_state = False

    def __setstate__(self, state: Any) -> None:  # BUILD: only records the attributes
        if isinstance(state, dict):
            self.attrs = dict(state)
        else:  # a class with its own __getstate__/__setstate__ pair
            self.custom_state = True


class _StorageType:
    def __init__(self, name: str) -> None:
        self.name, self.dtype = name, STORAGE_DTYPES[name]


def _rebuild_tensor(storage: torch.Tensor, offset: int, size: tuple, stride: tuple,
                    requires_grad: bool = False, hooks: Any = None, metadata: Any = None
                    ) -> torch.Tensor:
    """``torch._utils._rebuild_tensor_v2`` for a flat storage tensor: a strided view of it."""
    return storage.as_strided(tuple(size), tuple(stride), offset)


def _restore_type_tag(value: Any, type_str: str) -> Any:
    return value


class _Unpickler(pickle.Unpickler):
    """Unpickles ``data.pkl``: tensors from the archive's storages, modules as ScriptObject."""

    def __init__(self, file: Any, storage: Any) -> None:
        super().__init__(file)
        self._storage = storage
        self._classes: dict[str, type[ScriptObject]] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            qualname = f"{module}.{name}"
            if qualname not in self._classes:
                self._classes[qualname] = type(name, (ScriptObject,), {"qualname": qualname})
            return self._classes[qualname]
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch.jit._pickle" and name == "restore_type_tag":
            return _restore_type_tag
        raise ArchiveRefused(f"it refers to {module}.{name}, which is neither a tensor nor a "
                             "module (a code payload)")

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if (not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage"
                or not isinstance(pid[1], _StorageType)):
            raise ArchiveRefused(f"unknown persistent record {str(pid)[:60]}")
        return self._storage(str(pid[2]), pid[1].dtype, int(pid[4]))


def _declarations(zf: zipfile.ZipFile, prefix: str) -> tuple[dict[str, list[str]], set[str]]:
    """Per class qualname, its declared parameter + buffer names; and the classes that define
    ``__setstate__``. The code is read as text only."""
    members: dict[str, list[str]] = {}
    setstate: set[str] = set()
    code = prefix + "code/"
    for name in zf.namelist():
        if not (name.startswith(code) and name.endswith(".py")):
            continue
        module = name[len(code):-len(".py")].replace("/", ".")
        current = None
        for line in zf.read(name).decode("utf-8", "replace").splitlines():
            if m := _CLASS.match(line):
                current = f"{module}.{m.group(1)}"
                members.setdefault(current, [])
            elif current and (m := _MEMBER_LIST.match(line)):
                members[current] += [str(n) for n in ast.literal_eval(m.group(2))]
            elif current and _SETSTATE.match(line):
                setstate.add(current)
    return members, setstate


def _collect(obj: ScriptObject, prefix: str, members: dict[str, list[str]], setstate: set[str],
             out: dict[str, torch.Tensor], depth: int = 0) -> None:
    """``state_dict()`` order: own parameters and buffers, then each submodule's."""
    if obj.custom_state or obj.qualname in setstate:
        raise ArchiveRefused(f"its class {obj.qualname} defines __setstate__ (code run on load)")
    if depth > 64:
        raise ArchiveRefused("its modules nest more than 64 deep")
    names = members.get(obj.qualname)
    if names is None:  # no declaration found: every tensor attribute (traced modules keep no others)
        names = [k for k, v in obj.attrs.items() if isinstance(v, torch.Tensor)]
    for key in names:
        value = obj.attrs.get(key)
        if isinstance(value, torch.Tensor):
            out[prefix + key] = value
    for key, value in obj.attrs.items():
        if isinstance(value, ScriptObject):
            _collect(value, f"{prefix}{key}.", members, setstate, out, depth + 1)


def read_script_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The parameters and buffers of the TorchScript archive ``path``, keyed as its
    ``state_dict()``; CPU tensors memory-mapped from the file (copy-on-write)."""
    path = Path(path)
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
        prefixes = sorted(n[: -len("constants.pkl")] for n in names if n.endswith("constants.pkl"))
        if not prefixes or prefixes[0] + "data.pkl" not in names:
            raise ArchiveRefused("it is a TorchScript archive without data.pkl")
        prefix = prefixes[0]
        members, setstate = _declarations(zf, prefix)
        with path.open("rb") as fh:
            mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)

        def storage(key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
            info = zf.getinfo(f"{prefix}data/{key}")
            itemsize = torch.empty(0, dtype=dtype).element_size()
            if info.file_size < numel * itemsize:
                raise ArchiveRefused(f"storage data/{key} is shorter than its tensor")
            if numel == 0:
                return torch.empty(0, dtype=dtype)
            if info.compress_type == zipfile.ZIP_STORED:
                sig, n_name, n_extra = _LOCAL_HEADER.unpack_from(mapped, info.header_offset)
                if sig != b"PK\x03\x04":
                    raise ArchiveRefused(f"storage data/{key} has a broken zip header")
                start = info.header_offset + _LOCAL_HEADER.size + n_name + n_extra
                return torch.frombuffer(mapped, dtype=dtype, count=numel, offset=start)
            return torch.frombuffer(bytearray(zf.read(info)), dtype=dtype, count=numel)

        with zf.open(prefix + "data.pkl") as fh:
            root = _Unpickler(fh, storage).load()
    if not isinstance(root, ScriptObject):
        raise ArchiveRefused("its data.pkl holds no module")
    out: dict[str, torch.Tensor] = {}
    _collect(root, "", members, setstate, out)
    return out
