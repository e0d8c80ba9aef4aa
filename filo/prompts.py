"""Prompt tables: per-class defect phrases, state templates, positions, grounding words.

A prompt table is a YAML file (format in ``prompts/README.md``). The bundled tables
``prompts/filo_mvtec.yaml`` and ``prompts/filo_visa.yaml`` hold the strings the released FiLo
checkpoints were trained on, verbatim. Users pass their own file with ``--prompts my.yaml``;
fields other than ``classes`` default to the bundled FiLo values.

Class names are given as in the datasets (``metal_nut``, ``pcb1``, ``macaroni2``): underscores
match spaces in the table (``metal nut``), and ``class_name_map`` gives the word used inside the
sentences (``pcb1`` -> ``pcb``).
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from filo.errors import FiloError

PROMPTS_DIR = Path(__file__).resolve().parent.parent / "prompts"
DATASET_FILES = {"mvtec": "filo_mvtec.yaml", "visa": "filo_visa.yaml",
                 # untuned tables for datasets the released checkpoints never saw
                 "mpdd": "filo_mpdd.yaml", "btad": "filo_btad.yaml",
                 "mvtec_ad2": "filo_mvtec_ad2.yaml", "realiad": "filo_realiad.yaml"}
DEFAULTS_FILE = "filo_mvtec.yaml"  # source of the template/position defaults for user files
# defect phrases of a class that has no entry in the table (a user's own part, see
# PromptTable.covering): common surface defects of manufactured parts
GENERIC_DEFECT_PHRASES = ("scratch", "crack", "dent", "hole", "stain", "contamination",
                          "missing part", "deformation")

_LIST_FIELDS = (
    "normal_templates",
    "abnormal_generic_templates",
    "positions",
    "grounding_general_words",
)
_KNOWN_FIELDS = {
    *_LIST_FIELDS,
    "abnormal_detail_template",
    "class_name_map",
    "classes",
    "name",
    "description",
    "provenance",
}


def _placeholders(template: str, where: str) -> list[str]:
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        raise FiloError(f"{where}: template {template!r} has unbalanced braces ({err}); "
                        "use '{}' for the class name and '{{'/'}}' for literal braces") from err
    fields = []
    for _, name, spec, conv in parsed:
        if name is None:
            continue
        if spec or conv:
            raise FiloError(f"{where}: template {template!r} uses a format spec; write plain "
                            "placeholders only")
        fields.append(name)
    return fields


@dataclass(frozen=True)
class PromptTable:
    """A validated prompt table. Look-ups take dataset class names (``metal_nut``, ``pcb1``)."""

    source: str
    classes: dict[str, list[str]]
    normal_templates: list[str]
    abnormal_generic_templates: list[str]
    abnormal_detail_template: str
    positions: list[str]
    grounding_general_words: list[str]
    class_name_map: dict[str, str] = field(default_factory=dict)
    legacy_macaroni: bool = False

    # ---- names -------------------------------------------------------------------------------
    def _key(self, cls_name: str) -> str | None:
        if cls_name in self.classes:
            return cls_name
        spaced = cls_name.replace("_", " ")
        if spaced in self.classes:
            return spaced
        return None

    def has_class(self, cls_name: str) -> bool:
        return self._key(cls_name) is not None

    def table_key(self, cls_name: str) -> str:
        """The table's entry name for a dataset class name (``metal_nut`` -> ``metal nut``)."""
        key = self._key(cls_name)
        if key is None:
            raise FiloError(
                f"class {cls_name!r} is not in prompt file {self.source}; add it under 'classes:' "
                f"as `{cls_name.replace('_', ' ')}: [defect phrase, ...]` (see prompts/README.md) "
                "or pass --prompts with a file that has it"
            )
        return key

    def prompt_name(self, cls_name: str) -> str:
        """The object word used in the sentences (``pcb1`` -> ``pcb``, ``metal_nut`` -> ``metal nut``)."""
        key = self.table_key(cls_name)
        for candidate in (cls_name, key):
            if candidate in self.class_name_map:
                return self.class_name_map[candidate]
        return key

    @property
    def class_names(self) -> list[str]:
        return list(self.classes)

    # ---- phrases -----------------------------------------------------------------------------
    def detail_phrases(self, cls_name: str) -> list[str]:
        """The class's own defect phrases (also used for the GroundingDINO caption)."""
        return list(self.classes[self.table_key(cls_name)])

    @property
    def grounding_words(self) -> list[str]:
        return list(self.grounding_general_words)

    def prompt_detail_phrases(self, cls_name: str) -> list[str]:
        """Phrases used to build the abnormal prompts.

        With ``legacy_macaroni`` the research code's behaviour is reproduced: prompts were keyed
        by the mapped name, so among classes sharing a mapped name the last one in the table wins
        (macaroni1 gets macaroni2's phrases).
        """
        if not self.legacy_macaroni:
            return self.detail_phrases(cls_name)
        mapped = self.prompt_name(cls_name)
        winner = self.table_key(cls_name)
        for key in self.classes:
            if self.prompt_name(key) == mapped:
                winner = key
        return list(self.classes[winner])

    def normal_prompts(self, cls_name: str) -> list[str]:
        """Normal state sentences, e.g. ``flawless bottle`` (no final period)."""
        name = self.prompt_name(cls_name)
        return [t.format(name) for t in self.normal_templates]

    def abnormal_states(self, cls_name: str) -> list[str]:
        """Abnormal states without position: one per detail phrase, then the generic templates."""
        name = self.prompt_name(cls_name)
        detail = [
            self.abnormal_detail_template.format(cls=name, detail=d)
            for d in self.prompt_detail_phrases(cls_name)
        ]
        return detail + [t.format(name) for t in self.abnormal_generic_templates]

    def abnormal_prompts(self, cls_name: str, position: str | None = None) -> list[str]:
        """Abnormal sentences ``<state> at <position>``, status-major, position-minor.

        ``position=None`` gives every position (states x positions prompts).
        """
        positions = self.positions if position is None else [self.check_position(position)]
        return [f"{s} at {p}" for s in self.abnormal_states(cls_name) for p in positions]

    def check_position(self, position: str) -> str:
        if position not in self.positions:
            raise FiloError(
                f"position {position!r} is not one of the positions of {self.source}: "
                f"{', '.join(self.positions)}"
            )
        return position

    def covering(self, class_names) -> tuple[PromptTable, list[str]]:
        """This table plus an entry of :data:`GENERIC_DEFECT_PHRASES` for every class of
        ``class_names`` it has no entry for (object word: the class name with spaces); returns
        (table, the dataset names of the classes added). The table itself is unchanged."""
        added = [c for c in dict.fromkeys(class_names) if not self.has_class(c)]
        if not added:
            return self, []
        classes = dict(self.classes)
        for c in added:
            classes[c.replace("_", " ")] = list(GENERIC_DEFECT_PHRASES)
        return replace(self, classes=classes), added

    def with_legacy_macaroni(self, enabled: bool) -> PromptTable:
        return self if enabled == self.legacy_macaroni else replace(self, legacy_macaroni=enabled)


# --------------------------------------------------------------------------------------------
# loading and validation


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise FiloError(f"prompt file {path} does not exist; pass an existing YAML file "
                        f"(examples in {PROMPTS_DIR})")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        where = getattr(err, "problem_mark", None)
        line = f" line {where.line + 1}" if where is not None else ""
        raise FiloError(f"prompt file {path}{line}: not valid YAML ({type(err).__name__}); "
                        "fix the syntax (see prompts/README.md)") from err
    if not isinstance(data, dict):
        raise FiloError(f"prompt file {path}: expected a mapping with a 'classes:' section")
    return data


def _check_list(path: Path, label: str, items, what: str) -> list[str]:
    if not isinstance(items, list):
        raise FiloError(f"prompt file {path}: {label} must be a list of strings, "
                        f"got {type(items).__name__}")
    if not items:
        raise FiloError(f"prompt file {path}: {label} is empty; give at least one {what}")
    seen: set[str] = set()
    for i, entry in enumerate(items):
        if not isinstance(entry, str):
            raise FiloError(f"prompt file {path}: {label} entry {i + 1} ({entry!r}) is a "
                            f"{type(entry).__name__}, not a string; quote it")
        if not entry.strip():
            raise FiloError(f"prompt file {path}: {label} entry {i + 1} is blank; remove it")
        if entry in seen:
            raise FiloError(f"prompt file {path}: {label} entry {i + 1} ({entry!r}) is a "
                            "duplicate; remove it")
        seen.add(entry)
    return list(items)


def _check_template(path: Path, label: str, template, expected: list[str]) -> str:
    if not isinstance(template, str):
        raise FiloError(f"prompt file {path}: {label} must be a string")
    where = f"prompt file {path}: {label}"
    fields = _placeholders(template, where)
    if sorted(fields) != sorted(expected):
        want = " and ".join("{" + e + "}" for e in expected)
        raise FiloError(f"{where}: template {template!r} must contain exactly {want}, "
                        f"found {['{' + f + '}' for f in fields]}")
    return template


def _build_table(path: Path, data: dict, defaults: dict | None) -> PromptTable:
    unknown = sorted(set(data) - _KNOWN_FIELDS)
    if unknown:
        raise FiloError(f"prompt file {path}: unknown key(s) {', '.join(unknown)}; allowed: "
                        f"{', '.join(sorted(_KNOWN_FIELDS))}")
    merged = dict(defaults or {})
    merged.pop("classes", None)
    merged.pop("class_name_map", None)
    merged.update(data)
    for key in (*_LIST_FIELDS, "abnormal_detail_template", "classes"):
        if key not in merged:
            raise FiloError(f"prompt file {path}: missing '{key}:' section (see prompts/README.md)")

    lists = {key: _check_list(path, key, merged[key], "entry") for key in _LIST_FIELDS}
    for t in lists["normal_templates"]:
        _check_template(path, "normal_templates", t, [""])
    for t in lists["abnormal_generic_templates"]:
        _check_template(path, "abnormal_generic_templates", t, [""])
    detail_template = _check_template(
        path, "abnormal_detail_template", merged["abnormal_detail_template"], ["cls", "detail"]
    )

    classes_raw = merged["classes"]
    if not isinstance(classes_raw, dict) or not classes_raw:
        raise FiloError(f"prompt file {path}: 'classes:' must map class names to lists of "
                        "defect phrases (see prompts/README.md)")
    classes: dict[str, list[str]] = {}
    for name, phrases in classes_raw.items():
        if not isinstance(name, str) or not name.strip():
            raise FiloError(f"prompt file {path}: class name {name!r} must be a non-empty string")
        if "_" in name:
            raise FiloError(f"prompt file {path}: class {name!r}: write class names with spaces "
                            f"({name.replace('_', ' ')!r}); dataset names with '_' find them")
        classes[name] = _check_list(path, f"class {name!r}", phrases, "defect phrase")

    name_map = merged.get("class_name_map") or {}
    if not isinstance(name_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v.strip() for k, v in name_map.items()
    ):
        raise FiloError(f"prompt file {path}: class_name_map must map class names to words")
    for k in name_map:
        if k not in classes and k.replace("_", " ") not in classes:
            raise FiloError(f"prompt file {path}: class_name_map names class {k!r}, which is not "
                            "under 'classes:'; add it or remove the mapping")
    return PromptTable(
        source=str(path),
        classes=classes,
        normal_templates=lists["normal_templates"],
        abnormal_generic_templates=lists["abnormal_generic_templates"],
        abnormal_detail_template=detail_template,
        positions=lists["positions"],
        grounding_general_words=lists["grounding_general_words"],
        class_name_map=dict(name_map),
    )


def _bundled(name: str) -> Path:
    path = PROMPTS_DIR / name
    if not path.is_file():
        raise FiloError(f"bundled prompt file {path} is missing; restore the prompts/ folder of "
                        "the repository (git checkout prompts/)")
    return path


def load_prompt_table(
    path: str | Path | None = None,
    dataset: str | None = None,
    *,
    legacy_macaroni: bool = False,
) -> PromptTable:
    """Load and validate a prompt table.

    ``path`` wins when given. Otherwise ``dataset`` ("mvtec" / "visa") picks the bundled table;
    with neither, the bundled MVTec and VisA tables are merged.
    """
    defaults = _read_yaml(_bundled(DEFAULTS_FILE))
    if path is not None:
        p = Path(path)
        table = _build_table(p, _read_yaml(p), defaults)
    elif dataset is not None:
        key = dataset.lower()
        if key not in DATASET_FILES:
            raise FiloError(f"no bundled prompt table for dataset {dataset!r} (have "
                            f"{', '.join(DATASET_FILES)}); pass --prompts my.yaml")
        p = _bundled(DATASET_FILES[key])
        table = _build_table(p, _read_yaml(p), defaults)
    else:
        tables = [_build_table(_bundled(f), _read_yaml(_bundled(f)), defaults)
                  for f in DATASET_FILES.values()]
        classes: dict[str, list[str]] = {}
        name_map: dict[str, str] = {}
        # a class two tables name keeps the first table's prompts (MVTec AD / VisA, the ones the
        # released checkpoints were trained with, before the untuned tables)
        for t in reversed(tables):
            classes.update(t.classes)
            name_map.update(t.class_name_map)
        table = replace(tables[0], source=" + ".join(t.source for t in tables),
                        classes=classes, class_name_map=name_map)
    return table.with_legacy_macaroni(legacy_macaroni)
