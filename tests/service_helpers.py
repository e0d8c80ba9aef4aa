"""Helpers of the service tests: a tiny pipeline and a live uvicorn server on 127.0.0.1."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image


def png_bytes(seed: int = 0, size: tuple[int, int] = (56, 40), fmt: str = "PNG") -> bytes:
    """A random RGB image (w, h) encoded as ``fmt``."""
    w, h = size
    rgb = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt)
    return buf.getvalue()


def tiny_pipeline_config(tiny_filo_ckpt, tiny_grounding_ckpt, bert_vocab_dir, synthetic_prompts,
                         **overrides):
    """PipelineConfig of the tiny FiLo (32 px) and the tiny detector of the test fixtures; the
    detector thresholds are 0 so that random weights give boxes."""
    from filo.pipeline import PipelineConfig

    values = dict(ckpt_path=Path(tiny_filo_ckpt[0]), grounded_checkpoint=tiny_grounding_ckpt,
                  bert_dir=bert_vocab_dir, prompts=synthetic_prompts, image_size=32,
                  device="cpu", box_threshold=0.0, text_threshold=0.0)
    values.update(overrides)
    return PipelineConfig(**values)


class LiveServer:
    """``with LiveServer(app) as url:`` uvicorn serving ``app`` on 127.0.0.1 (a free port) in a
    thread; stopped and joined on exit."""

    def __init__(self, app, timeout: float = 20.0) -> None:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0,
                                                    log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.timeout = timeout

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + self.timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        sock = self.server.servers[0].sockets[0]
        host, port = sock.getsockname()[:2]
        return f"http://{host}:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(self.timeout)
