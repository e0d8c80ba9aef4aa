"""Export of a pipeline to a deploy bundle (ONNX / OpenVINO graphs + arrays + manifest) that
:mod:`filo.deploy` runs without torch (docs/design.md §18)."""
