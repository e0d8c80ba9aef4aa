"""Cheap checks of a checkpoint file without loading its tensors (for ``python -m filo doctor``).

A PyTorch checkpoint (torch >= 1.6, and OpenAI's TorchScript CLIP archive) is a zip archive:
``<name>/data.pkl`` holds the object structure (keys, nesting) as a pickle and the tensors are
separate members. :func:`checkpoint_problem` reads only the archive's directory and that small
pickle, and *walks its opcodes without executing them* (``pickletools.genops``), so it can say

* whether the file is a complete archive (a truncated download loses the central directory, and
  every member must lie inside the file);
* whether the pickle references anything but the tensor-rebuilding functions of a plain state
  dict (a crafted file that would run code is reported, never unpickled);
* whether the keys look like the expected kind of checkpoint (a FiLo file swapped for a
  GroundingDINO one, a CLIP file given as FiLo, ...).
"""

from __future__ import annotations

import pickletools
import zipfile
from pathlib import Path

# modules whose globals a plain checkpoint's pickle may name (tensor/storage rebuilding, dicts)
_SAFE_GLOBAL_PREFIXES = ("torch", "collections.OrderedDict", "builtins.set", "builtins.tuple",
                         "builtins.list", "builtins.dict", "builtins.int", "builtins.float",
                         "builtins.bool", "builtins.str", "builtins.slice", "numpy.core.multiarray.scalar",
                         "numpy.dtype", "numpy._core.multiarray.scalar", "_codecs.encode",
                         "__torch__")

# role -> (what it should be, key fragments of which at least one must appear)
EXPECTED_KEYS: dict[str, tuple[str, tuple[str, ...]]] = {
    "filo": ("a FiLo checkpoint (filo_train_on_*.pth)",
             ("filo", "decoder_linear.", "decoder_cov.", "normal_prompt_learner.")),
    "grounding": ("a GroundingDINO checkpoint (grounding_train_on_*.pth, groundingdino_swint_ogc.pth)",
                  ("backbone.0.", "transformer.", "bert.", "model.backbone.", "feat_map.")),
    "clip": ("OpenAI CLIP weights (ViT-L-14-336px.pt)", ("visual.", "constants.pkl")),
    "wideresnet": ("torchvision WideResNet weights (wide_resnet50_2-*.pth)",
                   ("layer1.0.conv1.",)),
}
KIND_NAMES = {"filo": "a FiLo checkpoint", "grounding": "a GroundingDINO checkpoint",
              "clip": "OpenAI CLIP weights", "wideresnet": "torchvision WideResNet weights"}


def checkpoint_kind(strings: list[str], names: list[str]) -> str | None:
    """Which kind of checkpoint the structure pickle's strings and the archive's member names
    show ('filo', 'grounding', 'clip', 'wideresnet'), or None. Markers are keys only that kind
    has (a FiLo checkpoint holds a CLIP tower too, so FiLo's decoders are looked for first)."""
    def sub(*frags):
        return any(any(f in s for f in frags) for s in strings)

    def pre(*frags):
        return any(s.startswith(frags) for s in strings)

    if sub("decoder_linear.", "decoder_cov.", "normal_prompt_learner.",
           "abnormal_prompt_learner."):
        return "filo"
    if sub("backbone.0.", "bbox_embed.", "model.backbone.", "feat_map.", "text_backbone.",
           "bert.embeddings.", "filo-gdino-hf"):
        return "grounding"
    if pre("visual.", "token_embedding.", "transformer.resblocks.") or "constants.pkl" in names:
        return "clip"
    if pre("layer1.0.conv1.") and pre("fc.weight", "conv1.weight"):
        return "wideresnet"
    return None
_MAX_PICKLE = 256 << 20  # the structure pickle of any real checkpoint is far below this


def _pickle_strings_and_globals(data: bytes) -> tuple[list[str], list[str]]:
    """String constants and global references of a pickle, read without executing it."""
    strings: list[str] = []
    globals_: list[str] = []
    recent: list[str] = []
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE",
                       "SHORT_BINSTRING", "BINSTRING", "STRING"):
            text = arg.decode("latin-1") if isinstance(arg, bytes) else str(arg)
            strings.append(text)
            recent = (recent + [text])[-2:]
        elif op.name == "GLOBAL":
            globals_.append(str(arg).replace(" ", "."))
        elif op.name == "STACK_GLOBAL" and len(recent) == 2:
            globals_.append(f"{recent[0]}.{recent[1]}")
    return strings, globals_


def checkpoint_kind_of(path: str | Path) -> str | None:
    """``KIND_NAMES`` wording of what the checkpoint file ``path`` holds, or None (not a zip
    checkpoint, unreadable, or no known keys); read without unpickling."""
    try:
        with zipfile.ZipFile(path) as zf:
            pickles = [i for i in zf.infolist() if i.filename.endswith("/data.pkl")]
            if not pickles or pickles[0].file_size > _MAX_PICKLE:
                return None
            strings, _ = _pickle_strings_and_globals(zf.read(pickles[0]))
            names = [i.filename.rsplit("/", 1)[-1] for i in zf.infolist()]
    except Exception:  # noqa: BLE001 - anything unreadable: unknown
        return None
    kind = checkpoint_kind(strings, names)
    return KIND_NAMES[kind] if kind else None


def checkpoint_problem(path: str | Path, role: str) -> str | None:
    """What is wrong with ``path`` as a ``role`` checkpoint ('filo', 'grounding', 'clip',
    'wideresnet'), in a few words for the doctor's table, or None when it looks right; a
    memory-bank file or folder in a checkpoint slot is named as such."""
    p = Path(path)
    what, _ = EXPECTED_KEYS[role]
    if p.is_dir() or p.suffix == ".npy" or p.name == "meta.json":
        if p.is_dir() and not (p / "meta.json").is_file() and not any(p.glob("*/meta.json")):
            return f"is a folder, not a file; expected {what}"
        return f"is a memory bank (python -m filo.memory build), not {what}"
    try:
        size = p.stat().st_size
        with open(p, "rb") as fh:
            head = fh.read(4)
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    if not head.startswith(b"PK\x03\x04"):
        if head[:1] == b"\x80":
            return None  # torch's pre-1.6 pickle format: only loading can check it
        return f"is not a PyTorch checkpoint (neither a zip archive nor a pickle); expected {what}"
    try:
        with zipfile.ZipFile(p) as zf:
            infos = zf.infolist()
            for info in infos:
                if info.header_offset + info.compress_size > size:
                    return f"is truncated (member {info.filename} ends past the file's end)"
            pickles = [i for i in infos if i.filename.endswith("/data.pkl")]
            names = [i.filename for i in infos]
            if not pickles:
                return f"is a zip archive without a torch data.pkl; expected {what}"
            if pickles[0].file_size > _MAX_PICKLE:
                return f"has an implausibly large structure pickle; expected {what}"
            data = zf.read(pickles[0])
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        return f"is truncated or corrupt ({type(err).__name__}: {err})"
    try:
        strings, globals_ = _pickle_strings_and_globals(data)
    except Exception as err:  # noqa: BLE001 - any malformed pickle is a bad file
        return f"has a malformed structure pickle ({type(err).__name__})"
    unsafe = [g for g in globals_ if not g.startswith(_SAFE_GLOBAL_PREFIXES)]
    if unsafe:
        return (f"references code ({unsafe[0]}), not only tensors: not a plain checkpoint; "
                f"never load it, replace it with {what}")
    kind = checkpoint_kind(strings, [n.rsplit("/", 1)[-1] for n in names])
    if kind == role:
        return None
    if kind is not None:
        return f"is {KIND_NAMES[kind]}, not {what}: it is in the wrong slot"
    return f"holds none of the keys of {what}"
