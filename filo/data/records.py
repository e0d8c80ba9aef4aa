"""Dataset records: one :class:`Sample` per image, with the research code's ``meta.json`` fields."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from filo.errors import FiloError

META_FIELDS = ("img_path", "mask_path", "cls_name", "specie_name", "anomaly")


@dataclass(frozen=True)
class Sample:
    """One image of a dataset.

    Paths are relative to the dataset root (as in the research code's ``meta.json``);
    ``mask_path`` is ``""`` when the image has no mask (normal images); ``anomaly`` is 0 or 1;
    ``specie_name`` is the defect type (``"good"`` for normal MVTec images, ``""`` for VisA).
    """

    img_path: str
    mask_path: str
    cls_name: str
    specie_name: str
    anomaly: int

    def to_meta(self) -> dict[str, Any]:
        """The ``meta.json`` item of this sample (same keys and key order as the research code)."""
        return asdict(self)

    @classmethod
    def from_meta(cls, item: Mapping[str, Any], where: str = "meta.json") -> Sample:
        """Build a sample from a ``meta.json`` item; ``where`` names the item in error messages."""
        if not isinstance(item, Mapping):
            raise FiloError(f"{where}: expected an object with keys {', '.join(META_FIELDS)}, "
                            f"got {type(item).__name__}; rebuild it with `python -m filo.data build-meta`")
        missing = [k for k in META_FIELDS if k not in item]
        if missing:
            raise FiloError(f"{where}: item is missing {', '.join(missing)} (needs "
                            f"{', '.join(META_FIELDS)}); rebuild it with `python -m filo.data build-meta`")
        anomaly = item["anomaly"]
        if isinstance(anomaly, bool):
            anomaly = int(anomaly)
        if anomaly not in (0, 1):
            raise FiloError(f"{where}: anomaly must be 0 or 1, got {anomaly!r}")
        for key in ("img_path", "mask_path", "cls_name", "specie_name"):
            value = item[key]
            if value is None and key != "img_path":
                value = ""
            if not isinstance(value, str):
                raise FiloError(f"{where}: {key} must be a string, got {value!r}")
        if not item["img_path"]:
            raise FiloError(f"{where}: img_path is empty")
        return cls(
            img_path=item["img_path"],
            mask_path=item["mask_path"] or "",
            cls_name=item["cls_name"],
            specie_name=item["specie_name"] or "",
            anomaly=int(anomaly),
        )
