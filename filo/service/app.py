"""The HTTP API and the page (FastAPI).

``create_app(engine, config, token=None)`` returns the application; :mod:`filo.cli.serve` runs it
with uvicorn. Endpoints:

- ``GET /`` the page (``static/index.html``; its script and style under ``/static/``);
- ``GET /healthz`` liveness, queue length and batch counters (no token needed);
- ``GET /v1/classes`` classes with their defect phrases, default thresholds, limits;
- ``POST /v1/predict`` multipart form: ``image`` (file), ``class_name``, optional ``phrases``
  (one per line), ``box_threshold``, ``text_threshold``, ``area_threshold``,
  ``outside_box_factor``, ``mask_threshold``;
- ``GET /v1/results/{id}/{overlay.png|mask.png|result.json}`` a request's output files.

Security defaults: the body size is bounded before the form is parsed (413); images are decoded
only in the accepted formats and up to a pixel count; clients never name server paths; outputs
are written only under the output folder; with a token every ``/v1`` call needs
``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from filo import __version__
from filo.errors import WriteError
from filo.service.batcher import MicroBatcher, QueueFull
from filo.service.config import ServiceConfig
from filo.service.engine import Engine, RequestError

logger = logging.getLogger(__name__)
STATIC_DIR = Path(__file__).parent / "static"
STATIC_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
                ".html": "text/html; charset=utf-8", ".svg": "image/svg+xml"}
PAGE_CSP = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; "
            "script-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; "
            "frame-ancestors 'none'")


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is answered 413 before it is parsed
    (by its Content-Length, or while it streams in without one)."""

    def __init__(self, app, limit: int) -> None:
        self.app = app
        self.limit = int(limit)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.limit
            except ValueError:
                too_big = True
            if too_big:
                return await _send_json(send, 413, self._message())
        seen = 0
        exceeded = False
        more = True  # body messages still to come

        async def limited_receive():
            nonlocal seen, exceeded, more
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                more = bool(message.get("more_body", False))
                if seen > self.limit:
                    exceeded = True
                    raise _TooLarge()
            elif message["type"] == "http.disconnect":
                more = False
            return message

        started = False

        async def drain() -> None:
            # an error answered before the whole body arrived (a malformed form): read the rest,
            # up to the limit, so that a body over the limit is a 413 whatever else is wrong
            nonlocal exceeded
            try:
                while more and not exceeded:
                    await limited_receive()
            except _TooLarge:
                pass

        async def tracking_send(message):
            # a body that crossed the limit while streaming (chunked, no Content-Length): the
            # form parser turns the interruption into its own 400; the client gets the 413
            nonlocal started
            if (not started and not exceeded and message["type"] == "http.response.start"
                    and message.get("status", 200) >= 400 and more):
                await drain()
            if exceeded:
                if not started and message["type"] == "http.response.start":
                    started = True
                    await _send_json(send, 413, self._message())
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                started = True
                await _send_json(send, 413, self._message())

    def _message(self) -> str:
        return (f"the request body is larger than {self.limit / 1024 / 1024:.4g} MiB "
                "(--max_upload_mb); send a smaller image")


class _TooLarge(Exception):
    pass


async def _send_json(send, status: int, detail: str) -> None:
    import json

    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _busy(batcher: MicroBatcher, retry_after: int | None = None) -> JSONResponse:
    wait = batcher.retry_after() if retry_after is None else retry_after
    if retry_after is None:
        batcher.stats.rejected += 1
    return JSONResponse({"detail": f"the service is busy ({batcher.queue_size} requests "
                                   f"waiting); retry after {wait} s"},
                        status_code=503, headers={"Retry-After": str(wait)})


def validation_line(err: RequestValidationError) -> str:
    """FastAPI's list of form problems as the one ``detail`` line the API promises: the first
    problem's field and what it needs (and how many more there are)."""
    problems = list(err.errors())
    if not problems:
        return "the request is malformed"
    first = problems[0]
    field = next((str(part) for part in reversed(first.get("loc") or ()) if part != "body"),
                 "body")
    kind = str(first.get("type", ""))
    if kind == "missing":
        text = f"{field}: required form field is missing"
    elif kind.startswith("float") or kind.startswith("int"):
        text = f"{field}: must be a number, got {str(first.get('input'))[:40]!r}"
    else:
        text = f"{field}: {first.get('msg', 'invalid value')}"
    more = f" ({len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
    return " ".join(f"{text}{more}".split())


def create_app(engine: Engine, config: ServiceConfig, token: str | None = None) -> FastAPI:
    """The application around a loaded :class:`Engine` (its batcher runs while the app does)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # one batcher (one model worker thread) per start of the application
        from filo.service import heap

        app.state.batcher = MicroBatcher(
            engine.run_batch, max_batch=config.max_batch_size,
            max_wait_s=config.max_wait_ms / 1000.0, queue_size=config.queue_size,
            on_idle=heap.trim).start()
        try:
            yield
        finally:
            await run_in_threadpool(app.state.batcher.stop)

    # no /docs or /redoc: their pages load scripts from a CDN, which an offline line lacks;
    # the schema itself is at /openapi.json
    app = FastAPI(title="filo inspection service", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None,
                  description="Zero-shot and memory-bank anomaly detection: scores, verdicts, "
                              "boxes, maps. See the README's 'Serving' section.")
    app.state.engine = engine
    app.add_middleware(BodyLimit, limit=config.max_upload_bytes)

    def authorized(request: Request) -> None:
        if token is None:
            return
        got = request.headers.get("authorization", "")
        scheme, _, value = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(),
                                                                 token.encode()):
            raise RequestError("missing or wrong bearer token (send 'Authorization: Bearer "
                               "<token>')", status=401)

    auth = [Depends(authorized)]

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, err: RequestError):
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
        return JSONResponse({"detail": str(err)}, status_code=err.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid_form(request: Request, err: RequestValidationError):
        return JSONResponse({"detail": validation_line(err)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        detail = err.detail if isinstance(err.detail, str) else str(err.detail)
        return JSONResponse({"detail": " ".join(detail.split())}, status_code=err.status_code,
                            headers=getattr(err, "headers", None))

    @app.exception_handler(WriteError)
    async def _write_error(request: Request, err: WriteError):  # a full disk: not the client's
        logger.error("%s %s: %s", request.method, request.url.path, err)
        return JSONResponse({"detail": str(err)}, status_code=507)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, err: Exception):
        from filo.errors import one_line

        logger.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse({"detail": f"internal error: {type(err).__name__}: "
                                       f"{one_line(err)[:300]}"}, status_code=500)

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        html = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
        return HTMLResponse(html, headers={"Content-Security-Policy": PAGE_CSP,
                                           "X-Content-Type-Options": "nosniff"})

    static_files = {p.name: p for p in STATIC_DIR.iterdir() if p.suffix in STATIC_TYPES}

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        path = static_files.get(name)
        if path is None:
            return JSONResponse({"detail": "not found"}, status_code=404)
        return Response(path.read_bytes(), media_type=STATIC_TYPES[path.suffix],
                        headers={"X-Content-Type-Options": "nosniff",
                                 "Cache-Control": "no-cache"})

    @app.get("/healthz")
    async def healthz(request: Request) -> dict[str, Any]:
        """Liveness: ``ok`` while the model worker runs; queue length and batch counters."""
        batcher = request.app.state.batcher
        ok = batcher.alive
        body = {"status": "ok" if ok else "stopped", "version": __version__,
                "queue": {"waiting": batcher.waiting, "size": batcher.queue_size},
                "batches": batcher.stats.as_dict()}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/v1/classes", dependencies=auth)
    async def classes() -> dict[str, Any]:
        """Classes with their defect phrases, calibrated thresholds, defaults and limits."""
        return engine.classes_info()

    @app.post("/v1/predict", dependencies=auth)
    async def predict(
        request: Request,
        image: Annotated[UploadFile, File(description="the image (PNG, JPEG, BMP, TIFF, WEBP)")],
        class_name: Annotated[str, Form(description="class as listed by /v1/classes")],
        phrases: Annotated[str | None, Form(description="defect phrases of the class, one "
                                                        "per line (replaces the prompt file's)")
                           ] = None,
        box_threshold: Annotated[float | None, Form()] = None,
        text_threshold: Annotated[float | None, Form()] = None,
        area_threshold: Annotated[float | None, Form()] = None,
        outside_box_factor: Annotated[float | None, Form()] = None,
        mask_threshold: Annotated[float | None, Form()] = None,
    ) -> dict[str, Any]:
        """Score one image: image score, verdict (with a calibrated memory bank), boxes with
        phrases and scores, position word, links to the overlay and the binary mask."""
        settings = engine.settings(class_name, phrases, box_threshold=box_threshold,
                                   text_threshold=text_threshold, area_threshold=area_threshold,
                                   outside_box_factor=outside_box_factor,
                                   mask_threshold=mask_threshold)
        batcher = request.app.state.batcher
        if batcher.waiting >= batcher.queue_size:  # refused before any decoding
            return _busy(batcher)
        data = await image.read()
        await image.close()
        if not data:
            raise RequestError("image: the uploaded file is empty")
        prepared = await run_in_threadpool(engine.prepare, data, image.filename or "", settings)
        del data
        try:
            future = batcher.submit(prepared)
        except QueueFull as full:
            return _busy(batcher, full.retry_after)
        except RuntimeError as err:
            return JSONResponse({"detail": str(err)}, status_code=503)
        try:
            outcome = await asyncio.wait_for(asyncio.wrap_future(future),
                                             timeout=config.request_timeout_s)
        except asyncio.TimeoutError:
            future.cancel()
            return JSONResponse({"detail": f"no result within {config.request_timeout_s} s "
                                           "(--request_timeout_s)"}, status_code=504)
        except RequestError:
            raise
        except Exception as err:  # noqa: BLE001 - the model failed on this request
            from filo.errors import one_line

            return JSONResponse({"detail": f"prediction failed: {one_line(err)}"},
                                status_code=500)
        return await run_in_threadpool(engine.finish, prepared, outcome)

    @app.get("/v1/results/{request_id}/{name}", dependencies=auth)
    async def result_file(request_id: str, name: str) -> FileResponse:
        """One output file of a request (``overlay.png``, ``mask.png`` or ``result.json``)."""
        path = engine.result_file(request_id, name)
        return FileResponse(path, headers={"X-Content-Type-Options": "nosniff",
                                           "Cache-Control": "private, max-age=3600"})

    return app
