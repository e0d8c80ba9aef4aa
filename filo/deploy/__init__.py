"""Torch-free inference of exported bundles (``python -m filo export``; docs/design.md §18).

Imports numpy, Pillow, OpenCV (overlays), scipy (PatchCore smoothing) and one runtime
(onnxruntime or OpenVINO, :mod:`filo.deploy.runtimes`); never torch.
"""
