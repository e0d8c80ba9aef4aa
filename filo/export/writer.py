"""``python -m filo export``: a pipeline's FiLo model and memory banks as a deploy bundle
(docs/design.md §18).

The bundle holds the graphs (:mod:`filo.export.graphs`, traced by ``torch.onnx.export``; for
``--format openvino`` converted to IR), the classes' frozen prompt-token embeddings and token
ids, each class's memory bank (``.npy``) with its feature settings and calibration, the input
size and normalisation, and ``manifest.json`` with versions and the sha256 of every file. It
runs with :mod:`filo.deploy` (numpy + a runtime, no torch).
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from filo import __version__
from filo.assets import sha256_file
from filo.deploy.bundle import BUNDLE_KIND, FORMAT_VERSION, MANIFEST
from filo.errors import FiloError
from filo.export.config import ExportConfig

logger = logging.getLogger(__name__)

GROUNDING_NOT_EXPORTED = (
    "GroundingDINO is not part of a bundle (docs/design.md §18.3): drop --grounded_checkpoint; "
    "the bundle runs FiLo and the memory banks")


def _trace(module: torch.nn.Module, args: tuple, path: Path, inputs: list[str],
           outputs: list[str], dynamic: dict[str, dict[int, str]], opset: int) -> Path:
    """``torch.onnx.export`` into ``path``; a graph over protobuf's 2 GB (ViT-L FiLo) keeps its
    weights in one ``<name>.data`` file beside it."""
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".trace-") as tmp:
        traced = Path(tmp) / path.name
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer / legacy-exporter notices
            torch.onnx.export(module, args, str(traced), dynamo=False, input_names=inputs,
                              output_names=outputs, dynamic_axes=dynamic, opset_version=opset,
                              do_constant_folding=True)
        return consolidate_onnx(traced, path)


def consolidate_onnx(src: Path, dst: Path) -> Path:
    """Move the ONNX graph ``src`` to ``dst``; weights the exporter wrote as one file per tensor
    beside ``src`` (graphs over 2 GB) go into the single file ``dst.name + ".data"``."""
    if not [p for p in src.parent.iterdir() if p != src]:
        src.replace(dst)
        return dst
    import onnx

    model = onnx.load(str(src))  # reads the external tensors
    onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=dst.name + ".data", size_threshold=1024)
    return dst


def _prepare_out(out: Path) -> Path:
    if out.exists():
        if not out.is_dir():
            raise FiloError(f"--out {out} is a file; name a folder for the bundle")
        if any(out.iterdir()) and not (out / MANIFEST).is_file():
            raise FiloError(f"--out {out} is a non-empty folder that is not a bundle; name a new "
                            f"or empty folder")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    return out


def _class_text(model, cls_name: str) -> dict[str, np.ndarray]:
    """A class's prompt rows, cut after their longest end-of-text token (exact under the
    causal mask), as token ids and frozen token embeddings."""
    ct = model.prompt_tokens.get(cls_name)
    emb = model.clip_model.token_embedding
    out = {}
    with torch.no_grad():
        length = int(torch.cat([ct.normal, ct.abnormal]).argmax(dim=-1).max()) + 1
        for name, ids in (("normal", ct.normal), ("abnormal", ct.abnormal)):
            ids = ids[:, :length].to(torch.int64)
            out[f"{name}_ids"] = ids.numpy()
            out[f"{name}_embeddings"] = emb(ids).float().numpy()
    return out


def _export_filo(model, out: Path, classes: list[str], opset: int) -> tuple[dict, dict]:
    from filo.export.graphs import FiLoImageGraph, FiLoTextGraph

    model.set_options(replace(model.options, onednn_linear=False, autocast="none"))
    model.eval()
    size = int(model.config.image_size)
    image = torch.zeros(1, 3, size, size)
    img_graph = FiLoImageGraph(model)
    with torch.no_grad():  # builds the fused MMCI weights first: the trace keeps them as
        feat, _ = img_graph(image)  # constants (not the six kernels and the fusing ops)
    _trace(img_graph, (image,), out / "filo_image.onnx", ["image"], ["image_feature", "patch"],
           {"image": {0: "batch"}, "image_feature": {0: "batch"}, "patch": {0: "batch"}}, opset)
    texts = {c: _class_text(model, c) for c in classes}
    first = texts[classes[0]]
    args = (feat[:1], *(torch.from_numpy(first[k]) for k in (
        "normal_embeddings", "normal_ids", "abnormal_embeddings", "abnormal_ids")))
    _trace(FiLoTextGraph(model), args, out / "filo_text.onnx",
           ["image_feature", "normal_embeddings", "normal_ids", "abnormal_embeddings",
            "abnormal_ids"], ["text"],
           {"normal_embeddings": {0: "n_normal", 1: "length"}, "normal_ids": {0: "n_normal",
                                                                              1: "length"},
            "abnormal_embeddings": {0: "n_abnormal", 1: "length"},
            "abnormal_ids": {0: "n_abnormal", 1: "length"}}, opset)
    (out / "text").mkdir()
    per_class = {}
    for i, c in enumerate(classes):
        files = {}
        for key, arr in texts[c].items():
            rel = f"text/{i}_{key}.npy"
            np.save(out / rel, arr, allow_pickle=False)
            files[key] = rel
        per_class[c] = files
    from filo.data.transforms import CLIP_MEAN, CLIP_STD

    cfg = model.config
    section = {"image_graph": "filo_image.onnx", "text_graph": "filo_text.onnx",
               "image_size": size, "mean": list(CLIP_MEAN), "std": list(CLIP_STD),
               "logit_scale": float(cfg.logit_scale), "blur_kernel": int(cfg.blur_kernel),
               "blur_sigma": float(cfg.blur_sigma), "score_mode": model.options.score_mode,
               "positions": list(model.prompts.positions),
               "n_positions": len(model.prompts.positions)}
    return section, per_class


def _export_memory(memory, out: Path, classes: list[str], opset: int) -> tuple[dict, dict]:
    from filo.export.graphs import FeatureGraph

    (out / "memory").mkdir()
    graphs: dict[int, str] = {}
    per_class = {}
    for i, c in enumerate(classes):
        cfg = memory.config(c)
        embedder = memory._embedders.get(cfg)
        key = id(embedder.net)
        if key not in graphs:
            rel = f"memory_features_{len(graphs)}.onnx"
            x = torch.zeros(1, 3, cfg.imagesize, cfg.imagesize)
            with torch.no_grad():
                n_out = len(FeatureGraph(embedder.net)(x))
            names = [f"feature_{j}" for j in range(n_out)]
            _trace(FeatureGraph(embedder.net.cpu()), (x,), out / rel, ["image"], names,
                   {"image": {0: "batch"}, **{n: {0: "batch"} for n in names}}, opset)
            graphs[key] = rel
        meta = memory.meta(c)
        bank_rel = f"memory/{i}_bank.npy"
        np.save(out / bank_rel, np.ascontiguousarray(memory._scorer(c).bank, dtype=np.float32),
                allow_pickle=False)
        per_class[c] = {
            "graph": graphs[key], "bank": bank_rel, "num_nn": int(meta.num_nn),
            "patchsize": int(cfg.patchsize), "pretrain_dim": int(cfg.pretrain_dim),
            "target_dim": int(cfg.target_dim), "resize": int(cfg.resize),
            "imagesize": int(cfg.imagesize), "crop": bool(cfg.crop),
            "mean": [float(v) for v in embedder.mean], "std": [float(v) for v in embedder.std],
            "score_rule": cfg.score_rule, "topk": int(cfg.topk),
            "calibration": meta.calibration}
    return {"graphs": sorted(graphs.values())}, per_class


def _to_openvino(out: Path, manifest: dict) -> None:
    from filo.deploy.runtimes import convert_to_openvino

    renames = {}
    for onnx_file in sorted(out.glob("*.onnx")):
        xml = onnx_file.with_suffix(".xml")
        convert_to_openvino(onnx_file, xml)
        onnx_file.unlink()
        for extra in out.glob(onnx_file.name + ".data"):
            extra.unlink()
        renames[onnx_file.name] = xml.name
    _rename_graphs(manifest, renames)


def _quantize(out: Path, manifest: dict) -> None:
    from filo.deploy.runtimes import quantize_int8

    renames = {}
    for name in ("filo_image.onnx", "filo_text.onnx"):
        src = out / name
        if src.is_file():
            dst = src.with_name(src.stem + "_int8.onnx")
            data = src.with_name(src.name + ".data")
            quantize_int8(src, dst, external_data=data.is_file())
            src.unlink()
            data.unlink(missing_ok=True)
            renames[name] = dst.name
    _rename_graphs(manifest, renames)


def _rename_graphs(manifest: dict, renames: dict[str, str]) -> None:
    f = manifest.get("filo")
    if f:
        for k in ("image_graph", "text_graph"):
            f[k] = renames.get(f[k], f[k])
    mem = manifest.get("memory")
    if mem:
        mem["graphs"] = [renames.get(g, g) for g in mem["graphs"]]
    for c in manifest["classes"].values():
        if "memory" in c:
            c["memory"]["graph"] = renames.get(c["memory"]["graph"], c["memory"]["graph"])


def export_bundle(export: ExportConfig, config, pipeline=None) -> Path:
    """Write the bundle of ``config`` (a :class:`filo.pipeline.PipelineConfig`) to
    ``export.out``; returns the folder."""
    from filo.deploy.runtimes import runtime_versions
    from filo.pipeline import build_pipeline

    if config.grounded_checkpoint is not None and not config.no_grounding:
        raise FiloError(GROUNDING_NOT_EXPORTED)
    if export.precision == "int8" and export.format != "onnx":
        raise FiloError("--precision int8 is for --format onnx (onnxruntime's dynamic "
                        "quantization); export OpenVINO bundles in fp32")
    config = replace(config, kernels="reference", autocast="none", device="cpu")
    pipeline = pipeline or build_pipeline(config)
    classes = export.class_list()
    if classes is None:
        if pipeline.memory is None:
            raise FiloError("--classes: name the classes the bundle serves (comma-separated)")
        classes = list(pipeline.memory.classes)
    pipeline.check_classes(classes, "--classes")
    runtime_versions()  # the chosen runtime must be importable before anything is written
    out = _prepare_out(Path(export.out))
    manifest: dict[str, Any] = {
        "kind": BUNDLE_KIND, "format_version": FORMAT_VERSION, "format": export.format,
        "precision": export.precision,
        "versions": {"filo": __version__, "torch": torch.__version__,
                     "python": platform.python_version(), **_onnx_version(),
                     **runtime_versions()},
        "fusion": config.fusion_mode, "fusion_weight": float(config.fusion_weight),
        "position": config.position, "map_size": int(pipeline.image_size),
        "filo": None, "memory": None, "classes": {c: {} for c in classes},
        "source": {"ckpt_path": str(config.ckpt_path) if config.ckpt_path else None,
                   "memory_bank": str(config.memory_bank) if config.memory_bank else None},
    }
    if pipeline.model is not None:
        section, per_class = _export_filo(pipeline.model, out, classes, export.opset)
        manifest["filo"] = section
        for c in classes:
            manifest["classes"][c]["text"] = per_class[c]
    if pipeline.memory is not None:
        section, per_class = _export_memory(pipeline.memory, out, classes, export.opset)
        manifest["memory"] = section
        for c in classes:
            manifest["classes"][c]["memory"] = per_class[c]
    return finish_bundle(out, manifest, export.format, export.precision)


def finish_bundle(out: Path, manifest: dict, fmt: str = "onnx", precision: str = "fp32"
                  ) -> Path:
    """Quantize / convert the ONNX graphs in ``out`` as asked, then hash every file and write
    the manifest."""
    manifest.update(format=fmt, precision=precision)
    if precision == "int8":
        _quantize(out, manifest)
    if fmt == "openvino":
        _to_openvino(out, manifest)
    manifest["files"] = {str(p.relative_to(out)): sha256_file(p)
                         for p in sorted(out.rglob("*")) if p.is_file() and p.name != MANIFEST}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return out


def convert_bundle(src: Path, dst: Path, fmt: str = "onnx", precision: str = "fp32") -> Path:
    """A copy of the fp32 ONNX bundle ``src`` in another format / precision (no re-tracing)."""
    src, dst = Path(src), Path(dst)
    manifest = json.loads((src / MANIFEST).read_text(encoding="utf-8"))
    if manifest.get("format") != "onnx" or manifest.get("precision") != "fp32":
        raise FiloError(f"{src}: only an fp32 ONNX bundle can be converted; export one")
    _prepare_out(dst).rmdir()
    shutil.copytree(src, dst)
    manifest.pop("files", None)
    return finish_bundle(dst, manifest, fmt, precision)


def _onnx_version() -> dict[str, str]:
    try:
        import onnx
    except ImportError:
        return {}
    return {"onnx": onnx.__version__}
