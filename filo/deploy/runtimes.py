"""The inference runtimes a bundle runs on: onnxruntime and OpenVINO (the only module that
imports either; docs/design.md §18).

:func:`open_graph` returns a callable ``feeds -> outputs`` (dicts of numpy arrays by name) for a
bundle's graph file: an ``.onnx`` file runs on onnxruntime's CPU provider, an OpenVINO IR
(``.xml`` + ``.bin``) on OpenVINO's CPU device. :func:`convert_to_openvino` turns an exported
ONNX graph into IR with ``openvino.convert_model``; :func:`quantize_int8` applies
onnxruntime's dynamic int8 weight quantization. Without the runtime installed, one
:class:`~filo.errors.FiloError` line says what to install.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from filo.errors import FiloError

FORMATS = ("onnx", "openvino")
_EXTRAS = {"onnx": "onnxruntime (pip install 'filo[onnx]')",
           "openvino": "openvino (pip install 'filo[openvino]')"}

Graph = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def _need(fmt: str):
    try:
        if fmt == "onnx":
            import onnxruntime

            return onnxruntime
        import openvino

        return openvino
    except ImportError:
        raise FiloError(f"the {fmt} runtime is not installed: install {_EXTRAS[fmt]}") from None


def runtime_versions() -> dict[str, str]:
    """Versions of the installed runtimes (for the manifest)."""
    out = {}
    for fmt, mod in (("onnx", "onnxruntime"), ("openvino", "openvino")):
        try:
            out[mod] = str(_need(fmt).__version__)
        except FiloError:
            pass
    return out


def open_graph(path: str | Path, threads: int = 0) -> Graph:
    """A graph file as ``feeds -> outputs``; ``threads`` 0: the runtime's default."""
    path = Path(path)
    if path.suffix == ".onnx":
        ort = _need("onnx")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]

        def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return dict(zip(names, sess.run(names, feeds), strict=True))

        return run
    if path.suffix == ".xml":
        ov = _need("openvino")
        core = ov.Core()
        config = {"INFERENCE_PRECISION_HINT": "f32"}  # no silent bf16 on CPUs that have it
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        compiled = core.compile_model(str(path), "CPU", config)
        outputs = [(o.get_any_name(), o) for o in compiled.outputs]
        request = compiled.create_infer_request()

        def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            res = request.infer(feeds)
            return {name: np.asarray(res[o]).copy() for name, o in outputs}

        return run
    raise FiloError(f"{path}: not a graph file (.onnx or OpenVINO .xml); re-export the bundle")


def convert_to_openvino(onnx_path: Path, xml_path: Path, *, compress_to_fp16: bool = False
                        ) -> list[Path]:
    """ONNX graph -> OpenVINO IR (``.xml`` + ``.bin``) with ``openvino.convert_model``."""
    ov = _need("openvino")
    model = ov.convert_model(str(onnx_path))
    ov.save_model(model, str(xml_path), compress_to_fp16=compress_to_fp16)
    return [xml_path, xml_path.with_suffix(".bin")]


def quantize_int8(onnx_path: Path, out_path: Path, *, external_data: bool = False) -> Path:
    """onnxruntime dynamic quantization: MatMul/Gemm weights int8, activations quantized per
    call; convolutions stay float32. ``external_data``: the weights go to one
    ``<out>.data`` file (graphs over 2 GB)."""
    _need("onnx")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(onnx_path), str(out_path), weight_type=QuantType.QInt8,
                     op_types_to_quantize=["MatMul", "Gemm"],
                     use_external_data_format=external_data)
    return out_path
