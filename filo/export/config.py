"""Settings of ``python -m filo export`` (docs/design.md §18); the model flags are the
pipeline's (:class:`filo.pipeline.PipelineConfig`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from filo.settings import setting

FORMATS = ("onnx", "openvino")
PRECISIONS = ("fp32", "int8")


@dataclass
class ExportConfig:
    out: Path = setting(Path("outputs/bundle"), "bundle folder to write (created; must be empty "
                        "or an earlier bundle)")
    format: str = setting("onnx", "graph format: onnx (onnxruntime) or openvino (IR, converted "
                          "with openvino.convert_model)", choices=FORMATS)
    classes: str | None = setting(None, "comma-separated classes the bundle serves (their "
                                  "prompts and memory banks go into it)",
                                  default_help="every class of --memory_bank; required without")
    precision: str = setting("fp32", "fp32, or int8: weights of the FiLo towers' matrix "
                             "products quantized to int8 (onnxruntime dynamic quantization, "
                             "onnx format only; not exact, see README)", choices=PRECISIONS)
    opset: int = setting(17, "ONNX opset of the exported graphs")

    def class_list(self) -> list[str] | None:
        if not self.classes:
            return None
        return [c.strip() for c in self.classes.split(",") if c.strip()] or None
