"""The inspection service: ``python -m filo serve``.

A FastAPI application around one loaded :class:`~filo.pipeline.Pipeline`:

- :mod:`filo.service.config`: :class:`ServiceConfig` (address, limits, batching, output folder);
- :mod:`filo.service.batcher`: the bounded queue that groups concurrent requests into batches;
- :mod:`filo.service.engine`: one request's settings, decoding, inference and output files;
- :mod:`filo.service.app`: the HTTP API (``/v1/predict``, ``/v1/classes``, ``/healthz``) and
  the page at ``/`` (``static/index.html``).

FastAPI and uvicorn are imported only here, so the batch CLIs never need them.
"""
