"""A deploy bundle on disk: ``manifest.json`` + graphs + ``.npy`` arrays (docs/design.md §18).

Reading a bundle never unpickles: the manifest is JSON, arrays load with
``allow_pickle=False``, graphs are ONNX / OpenVINO IR files opened by their runtime. Every
file the manifest lists is checked against its sha256 before use; a missing or changed file is
one :class:`~filo.errors.FiloError` line naming it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from filo.assets import sha256_file
from filo.errors import FiloError

MANIFEST = "manifest.json"
BUNDLE_KIND = "filo-deploy-bundle"
FORMAT_VERSION = 1


@dataclass
class Bundle:
    root: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, root: str | Path, *, verify: bool = True) -> Bundle:
        root = Path(root)
        path = root / MANIFEST
        fix = "export it again with `python -m filo export`"
        if not path.is_file():
            raise FiloError(f"--bundle {root}: no {MANIFEST}, not a filo bundle; {fix}")
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise FiloError(f"{path} cannot be read ({type(err).__name__}); {fix}") from None
        if not isinstance(manifest, dict) or manifest.get("kind") != BUNDLE_KIND:
            raise FiloError(f"{path} is not a filo bundle manifest; {fix}")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise FiloError(f"{path}: bundle format {manifest.get('format_version')} is not "
                            f"this filo's ({FORMAT_VERSION}); {fix}")
        bundle = cls(root, manifest)
        if verify:
            bundle.verify()
        return bundle

    def verify(self) -> None:
        for rel, digest in self.manifest.get("files", {}).items():
            p = self.root / rel
            if not p.is_file():
                raise FiloError(f"bundle file {p} is missing; copy the whole bundle folder or "
                                f"export it again")
            if sha256_file(p) != digest:
                raise FiloError(f"bundle file {p} does not match its sha256 in the manifest "
                                f"(changed or truncated); copy it again or re-export")

    def path(self, rel: str) -> Path:
        if rel not in self.manifest.get("files", {}):
            raise FiloError(f"{self.root / MANIFEST} names {rel} but does not list it; "
                            f"re-export the bundle")
        return self.root / rel

    def array(self, rel: str) -> np.ndarray:
        p = self.path(rel)
        try:
            return np.load(p, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise FiloError(f"bundle array {p} cannot be read ({type(err).__name__}); "
                            f"re-export the bundle") from None

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])
