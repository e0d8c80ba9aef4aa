"""Per-class PatchCore settings from an editable YAML file (``--preset``).

A preset has a ``default`` mapping and a ``classes`` mapping of class name -> settings; a class
takes ``default`` updated with its own entry. Allowed settings: the :class:`MemoryConfig` fields
below. Two presets ship in ``filo/memory/presets/``: ``patchcore_paper`` (the paper's run for
every class) and ``patchcore_mvtec_study`` (per-class input size, layer and coreset fraction on
MVTec AD); ``--preset NAME`` picks a bundled one, ``--preset FILE`` your own.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from filo.errors import FiloError
from filo.memory.config import MemoryConfig

PRESET_DIR = Path(__file__).resolve().parent / "presets"
PRESET_FIELDS = ("resize", "imagesize", "layers", "coreset", "score_rule", "topk", "patchsize",
                 "num_nn", "no_crop")


@dataclass
class Preset:
    source: str
    name: str
    default: dict[str, Any] = field(default_factory=dict)
    classes: dict[str, dict[str, Any]] = field(default_factory=dict)

    def config_for(self, cfg: MemoryConfig, cls_name: str) -> MemoryConfig:
        """``cfg`` with the preset's default, then the class's own settings, applied."""
        from filo.settings import validate

        values = {**self.default, **self.classes.get(cls_name, {})}
        out = dataclasses.replace(cfg, **values)
        try:
            validate(out)
        except FiloError as err:
            raise FiloError(f"preset {self.source}, class {cls_name}: {err}") from None
        return out


def resolve_preset_path(preset: str) -> Path:
    p = Path(preset)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise FiloError(f"--preset {p} does not exist; give a YAML file or one of "
                            f"{', '.join(sorted(x.stem for x in PRESET_DIR.glob('*.yaml')))}")
        return p
    bundled = PRESET_DIR / f"{preset}.yaml"
    if not bundled.is_file():
        raise FiloError(f"--preset {preset}: no such bundled preset; choose one of "
                        f"{', '.join(sorted(x.stem for x in PRESET_DIR.glob('*.yaml')))} or give "
                        f"a YAML file")
    return bundled


def _settings(raw: Any, where: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise FiloError(f"{where} must be a mapping of settings")
    unknown = sorted(set(raw) - set(PRESET_FIELDS))
    if unknown:
        raise FiloError(f"{where}: unknown setting(s) {', '.join(unknown)}; allowed: "
                        f"{', '.join(PRESET_FIELDS)}")
    out = dict(raw)
    if "layers" in out:
        out["layers"] = str(out["layers"])
    return out


def load_preset(preset: str | Path) -> Preset:
    """Read and check a preset (a bundled name or a YAML file); one-line errors name the file."""
    path = resolve_preset_path(str(preset))
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise FiloError(f"preset {path} is not valid YAML ({type(err).__name__}); fix the file"
                        ) from None
    if not isinstance(data, dict):
        raise FiloError(f"preset {path} must be a mapping with 'default' and 'classes'")
    unknown = sorted(set(data) - {"name", "default", "classes"})
    if unknown:
        raise FiloError(f"preset {path}: unknown key(s) {', '.join(unknown)}")
    classes = data.get("classes") or {}
    if not isinstance(classes, dict):
        raise FiloError(f"preset {path}: 'classes' must map class names to settings")
    return Preset(source=str(path), name=str(data.get("name", path.stem)),
                  default=_settings(data.get("default"), f"preset {path}: default"),
                  classes={str(c): _settings(v, f"preset {path}: class {c}")
                           for c, v in classes.items()})
