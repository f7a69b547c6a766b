"""`skinclf serve`: the model behind a local web page and a JSON API, for the clinic desk.

    GET  /               the page (one static file, `skinclf/static/index.html`; works offline)
    POST /api/predict    multipart upload of one or many images -> one result per file, the
                         same fields and cells as a `skinclf predict` CSV row (?format=csv: the CSV)
    GET  /api/model      classes, identity and the validation metrics the model was accepted with
    GET  /healthz        liveness
    GET  /docs           the API, rendered from /openapi.json without any external script

Patient images stay in memory: the multipart body is parsed here, into bytes (never a spooled
temporary file), decoded by `images.decode_image` (the code path `predict` uses for files) and
dropped with the request. Nothing logs file names; uvicorn's access log is off. One engine is
loaded once and owned by one worker thread (`Classifier`): concurrent requests queue their
decoded images and are run together, so there is never a second copy of the model.

FastAPI, uvicorn and python-multipart are the optional extra `skinclf[serve]`; they are imported
only when the app is built, so a missing extra is one clear `SkinclfError`.
"""

# No `from __future__ import annotations`: FastAPI reads the route functions' annotations at run time.
import contextlib
import csv
import html
import io
import ipaddress
import json
import queue
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from skinclf import __version__
from skinclf.config import SERVE
from skinclf.engines import softmax
from skinclf.errors import SkinclfError
from skinclf.images import ImageError, decode_image
from skinclf.ood import WARNING as UNLIKE_TRAINING
from skinclf.ood import flag
from skinclf.results import DISCLAIMER, columns, row

MB = 1024 * 1024
MISSING_EXTRA = 'skinclf serve needs FastAPI: pip install "skinclf[serve]"'
# Validation metrics shown on the page and by /api/model (the confusion matrices stay in the model).
METRIC_KEYS = ("n", "accuracy", "balanced_accuracy", "top_k_accuracy", "macro_auc", "melanoma", "per_class")
# A page served from this machine may load only itself: no CDN, no fonts, no requests elsewhere.
CSP = ("default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
       "img-src 'self' blob: data:; connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


@dataclass(frozen=True)
class Limits:
    """What one POST /api/predict may carry; more is answered 413."""

    max_file_bytes: int = int(SERVE.max_file_mb * MB)
    max_files: int = SERVE.max_files
    max_request_bytes: int = int(SERVE.max_request_mb * MB)

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value < 1:
                raise SkinclfError(f"{name.replace('_', '-')} {value}: must be positive")


@dataclass(frozen=True)
class ServeInfo:
    """What `serve` tells its caller once the model is loaded and the port is open."""

    url: str
    host: str
    port: int
    model: dict[str, Any]
    limits: Limits
    warnings: list[str] = field(default_factory=list)


class _Job:
    """One caller's images, filled in as the model gets to them (possibly over several calls)."""

    def __init__(self, images: np.ndarray, n_classes: int) -> None:
        self.images = images
        self.probs = np.zeros((len(images), n_classes), dtype="float32")
        self.taken = 0  # images handed to the model so far
        self.done: Future = Future()


class Classifier:
    """One engine, run by one worker thread; callers from any thread get its logits back
    (`engine.logits`; a bare callable engine's output as it is).

    Callers' images wait in a queue; the worker runs them in full batches of the engine's
    `batch_size`, filled from as many requests as are waiting (a request may span two calls),
    so concurrent uploads share batches instead of each padding its own. It never waits for
    more work: a lone request runs at once. Only the worker thread ever touches the engine.
    """

    def __init__(self, engine) -> None:
        self.engine = engine
        self._run = getattr(engine, "logits", engine)
        self.batch_size = int(getattr(engine, "batch_size", 16))
        self.calls = 0  # engine calls made (tests check that requests were run together)
        self.busy_seconds = 0.0  # time spent in the engine (the load bench reports it)
        self._jobs: queue.Queue = queue.Queue()
        self._worker = threading.Thread(target=self._work, name="skinclf-model", daemon=True)
        self._worker.start()

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Logits (n, classes) for `images` (n, size, size, 3); blocks until done."""
        if len(images) == 0:
            return np.zeros((0, len(self.engine.classes)), dtype="float32")
        job = _Job(np.asarray(images, dtype="float32"), len(self.engine.classes))
        self._jobs.put(job)
        return job.done.result()

    def close(self) -> None:
        """Finish what is queued, then stop the worker."""
        self._jobs.put(None)
        self._worker.join()

    def _work(self) -> None:
        pending: deque[_Job] = deque()
        stopping = False
        while pending or not stopping:
            if not pending:
                job = self._jobs.get()  # idle: wait for work
                if job is None:
                    return
                pending.append(job)
            while not stopping:  # take whatever else is already waiting, never wait for more
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stopping = True
                else:
                    pending.append(job)
            # The next batch: images in arrival order, up to batch_size, across requests.
            parts, count = [], 0
            for job in pending:
                k = min(self.batch_size - count, len(job.images) - job.taken)
                parts.append((job, job.taken, job.taken + k))
                count += k
                if count == self.batch_size:
                    break
            try:
                started = time.perf_counter()
                probs = self._run(np.concatenate([job.images[a:b] for job, a, b in parts]))
                self.busy_seconds += time.perf_counter() - started
                self.calls += 1
            except BaseException as exc:  # noqa: BLE001 - handed to the requests in this batch
                for job, _, _ in parts:
                    pending.remove(job)
                    job.done.set_exception(exc)
                continue
            offset = 0
            for job, a, b in parts:
                job.probs[a:b] = probs[offset : offset + b - a]
                offset += b - a
                job.taken = b
                if b == len(job.images):
                    pending.remove(job)
                    job.done.set_result(job.probs)


@dataclass
class Upload:
    """One file of a request, held in memory."""

    name: str
    data: bytearray = field(default_factory=bytearray)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def page_html() -> str:
    """The page, shipped in the package (`skinclf/static/index.html`)."""
    return resources.files("skinclf").joinpath("static/index.html").read_text(encoding="utf-8")


def model_info(engine, limits: Limits, top_k: int) -> dict[str, Any]:
    """GET /api/model: what the page shows about the model, and the limits it must respect."""
    validation = engine.meta.get("metrics", {}).get("validation", {}) or {}
    return {
        "identity": engine.identity(),
        "classes": engine.classes,
        "metrics": {"validation": {k: validation[k] for k in METRIC_KEYS if k in validation}},
        "intended_use": engine.meta.get("intended_use"),
        "disclaimer": DISCLAIMER,
        "skinclf": __version__,
        "top_k": top_k,
        "columns": columns(engine.classes, top_k, False),
        "limits": asdict(limits),
    }


def classify_uploads(classifier: Classifier, uploads: Sequence[Upload], *, classes: Sequence[str], image_size: int,
                     top_k: int, all_probs: bool) -> list[list[str]]:
    """CSV rows (`results.row`) for uploaded files, in upload order; a bad file is a row with an error."""
    x = np.zeros((len(uploads), image_size, image_size, 3), dtype="float32")
    errors: list[str | None] = [None] * len(uploads)
    notes: list[list[str]] = [[] for _ in uploads]
    for j, upload in enumerate(uploads):
        try:
            x[j] = decode_image(bytes(upload.data), image_size, notes=notes[j])
        except ImageError as exc:
            errors[j] = str(exc)
        upload.data = bytearray()  # the bytes are not needed past decoding
    ok = [j for j, e in enumerate(errors) if e is None]
    logits = np.full((len(uploads), len(classes)), np.nan, dtype="float32")
    if ok:
        logits[ok] = classifier(x[ok])
    # The same arithmetic as predict's, so every cell matches its CSV to the last digit.
    probs = softmax(logits)
    scores, flagged = flag(logits, getattr(classifier.engine, "meta", {}).get("ood"))
    for j in np.nonzero(flagged)[0]:
        if errors[j] is None:
            notes[j].append(UNLIKE_TRAINING)
    return [row(u.name, p, e, classes, top_k, all_probs, n, ood_score=s)
            for u, p, e, n, s in zip(uploads, probs, errors, notes, scores)]


def csv_text(header: list[str], rows: list[list[str]]) -> str:
    """The CSV `skinclf predict` writes for these rows: header, rows sorted by path, '\\n' lines."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(sorted(rows, key=lambda r: r[0]))
    return buf.getvalue()


def _upload_name(raw: str, index: int) -> str:
    """The row's path: the name the browser sent (with its folder path, if any), '/'-separated."""
    name = "".join(ch for ch in raw.replace("\\", "/") if ch.isprintable()).strip().lstrip("/")
    return name or f"upload-{index}"


def create_app(engine, *, limits: Limits = Limits(), top_k: int = SERVE.top_k,
               allowed_hosts: Sequence[str] | None = None, classifier: Classifier | None = None):
    """The FastAPI application around a loaded `engine` (see `skinclf.engines.load_engine`)."""
    try:
        from fastapi import FastAPI, Query, Request
        from fastapi.responses import HTMLResponse, JSONResponse, Response
        from python_multipart.multipart import MultipartParser, parse_options_header
        from starlette.concurrency import run_in_threadpool
    except ImportError:
        raise SkinclfError(MISSING_EXTRA) from None

    classes = engine.classes
    if not 1 <= top_k <= len(classes):
        raise SkinclfError(f"--top-k {top_k}: must be 1..{len(classes)} (the model's classes: {', '.join(classes)})")
    classifier = classifier or Classifier(engine)
    info = model_info(engine, limits, top_k)
    page = page_html()

    app = FastAPI(
        title="skinclf",
        version=__version__,
        description=("Classify dermoscopic skin-lesion images with the model `skinclf predict` uses. "
                     + DISCLAIMER + " Images are decoded in memory and never stored."),
        docs_url=None, redoc_url=None,
    )
    app.state.classifier = classifier
    app.state.limits = limits

    class Rejected(Exception):
        def __init__(self, status: int, detail: str) -> None:
            self.status, self.detail = status, detail

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if allowed_hosts is not None:
            host = request.headers.get("host") or ""
            host = host[1:].split("]")[0] if host.startswith("[") else host.split(":")[0]
            if host not in allowed_hosts:
                return JSONResponse({"detail": "unknown host"}, status_code=400)
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Cache-Control"] = "no-store"
        return response

    @app.exception_handler(SkinclfError)
    async def skinclf_error(request: Request, exc: SkinclfError):
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(Rejected)
    async def rejected(request: Request, exc: Rejected):
        # Close the connection: the client may still be sending a body we will not read.
        return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers={"Connection": "close"})

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/healthz", summary="Liveness: the model is loaded and the server answers")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/api/model", summary="The model: classes, identity, validation metrics, disclaimer and upload limits")
    def api_model() -> dict[str, Any]:
        return info

    async def read_uploads(request: Request) -> list[Upload]:
        """Parse the multipart body into in-memory uploads, enforcing the limits as it streams."""
        ctype, params = parse_options_header(request.headers.get("content-type", ""))
        if ctype != b"multipart/form-data" or b"boundary" not in params:
            raise Rejected(422, "expected a multipart/form-data body with one or more image files (field 'files')")
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limits.max_request_bytes:
            raise Rejected(413, f"request of {int(declared):,} bytes is over the limit of "
                                f"{limits.max_request_bytes:,} bytes (--max-request-mb)")
        uploads: list[Upload] = []
        state: dict[str, Any] = {"header": b"", "value": b"", "disposition": b"", "part": None, "field": 0}

        def on_part_begin() -> None:
            state.update(disposition=b"", part=None, field=0)

        def on_header_field(data: bytes, start: int, end: int) -> None:
            state["header"] += data[start:end]

        def on_header_value(data: bytes, start: int, end: int) -> None:
            state["value"] += data[start:end]

        def on_header_end() -> None:
            if state["header"].lower() == b"content-disposition":
                state["disposition"] = state["value"]
            state["header"], state["value"] = b"", b""

        def on_headers_finished() -> None:
            _, options = parse_options_header(state["disposition"])
            if b"filename" in options:
                if len(uploads) >= limits.max_files:
                    raise Rejected(413, f"more than {limits.max_files} files in one request (--max-files); "
                                        "send them in several requests")
                raw = options[b"filename"]
                uploads.append(Upload(_upload_name(raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw,
                                                   len(uploads) + 1)))
                state["part"] = uploads[-1]

        def on_part_data(data: bytes, start: int, end: int) -> None:
            part = state["part"]
            if part is None:  # a plain form field: ignored, but bounded
                state["field"] += end - start
                if state["field"] > 64 * 1024:
                    raise Rejected(413, "a form field over 64 KB; send images as files")
                return
            if len(part.data) + end - start > limits.max_file_bytes:
                raise Rejected(413, f"{part.name}: over the limit of {limits.max_file_bytes:,} bytes per file "
                                    "(--max-file-mb)")
            part.data += data[start:end]

        parser = MultipartParser(params[b"boundary"], {
            "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
            "on_header_end": on_header_end, "on_headers_finished": on_headers_finished, "on_part_data": on_part_data,
        })
        received = 0
        try:
            async for chunk in request.stream():
                received += len(chunk)
                if received > limits.max_request_bytes:
                    raise Rejected(413, f"request over the limit of {limits.max_request_bytes:,} bytes (--max-request-mb)")
                parser.write(chunk)
            parser.finalize()
        except Rejected:
            raise
        except Exception as exc:  # noqa: BLE001 - a malformed body is the client's problem, not a 500
            raise Rejected(422, f"malformed multipart body: {' '.join(str(exc).split())[:200]}") from None
        if not uploads:
            raise Rejected(422, "no files in the request: send one or more images as multipart field 'files'")
        return uploads

    upload_schema = {
        "requestBody": {
            "required": True,
            "content": {"multipart/form-data": {"schema": {
                "type": "object", "required": ["files"],
                "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"},
                                         "description": "One or more images; the file name (with its folder "
                                                        "path, if sent) becomes the row's path."}},
            }}},
        },
        "responses": {
            "413": {"description": "Too many files, a file too large, or the request too large (see GET /api/model "
                                   "for the limits)."},
            "422": {"description": "Not a multipart upload, no files, a malformed body or a bad option."},
        },
    }

    @app.post("/api/predict", summary="Classify uploaded images: one result per file, as in a predict CSV row",
              openapi_extra=upload_schema,
              description="Each result has the fields of a `skinclf predict` CSV row (`path`, `topN_class`, "
                          "`topN_prob`, optionally `prob_<class>`, `error`, ...), the cells formatted exactly as "
                          "predict writes them; a file that cannot be read is a result with an `error`. "
                          "`format=csv` answers with the CSV `skinclf predict` would write for these files.")
    async def api_predict(
        request: Request,
        format: str = Query("json", pattern="^(json|csv)$", description="json, or csv for the predict CSV"),
        top_k: int = Query(top_k, ge=1, le=len(classes), description="How many most-probable classes per image"),
        all_probs: bool = Query(False, description="Add a prob_<class> field for every class (--all-probs)"),
    ):
        uploads = await read_uploads(request)
        rows = await run_in_threadpool(classify_uploads, classifier, uploads, classes=classes,
                                       image_size=engine.image_size, top_k=top_k, all_probs=all_probs)
        header = columns(classes, top_k, all_probs)
        if format == "csv":
            return Response(csv_text(header, rows), media_type="text/csv; charset=utf-8",
                            headers={"Content-Disposition": 'attachment; filename="results.csv"'})
        results = [dict(zip(header, cells)) for cells in rows]
        return {"model": {k: info["identity"][k] for k in ("name", "sha256", "engine")}, "disclaimer": DISCLAIMER,
                "columns": header, "errors": sum(1 for r in results if r["error"]), "results": results}

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    def docs() -> HTMLResponse:
        return HTMLResponse(docs_html(app.openapi()))

    return app


def docs_html(spec: dict[str, Any]) -> str:
    """A plain, self-contained rendering of the OpenAPI document (Swagger UI would need a CDN)."""
    e = html.escape
    parts = [f"<!doctype html><html lang='en'><meta charset='utf-8'><title>{e(spec['info']['title'])} API</title>",
             "<style>body{font:16px/1.5 system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}"
             "code,pre{background:#f3f3f3;padding:.1rem .3rem}pre{padding:.5rem;overflow:auto}</style>",
             f"<h1>{e(spec['info']['title'])} {e(spec['info']['version'])} API</h1>",
             f"<p>{e(spec['info'].get('description', ''))}</p>",
             "<p>The machine-readable description: <a href='/openapi.json'>/openapi.json</a>.</p>"]
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            parts.append(f"<h2><code>{e(method.upper())} {e(path)}</code></h2><p>{e(op.get('summary', ''))}</p>")
            if op.get("description"):
                parts.append(f"<p>{e(op['description'])}</p>")
            params = op.get("parameters", [])
            if params:
                parts.append("<ul>" + "".join(
                    f"<li><code>{e(p['name'])}</code> ({e(p['in'])}, default "
                    f"<code>{e(json.dumps(p.get('schema', {}).get('default')))}</code>): {e(p.get('description', ''))}</li>"
                    for p in params) + "</ul>")
            if "requestBody" in op:
                parts.append(f"<p>Body:</p><pre>{e(json.dumps(op['requestBody']['content'], indent=2))}</pre>")
            parts.append("<p>Responses: " + ", ".join(
                f"<b>{e(code)}</b> {e(r.get('description', ''))}" for code, r in op.get("responses", {}).items()) + "</p>")
    example = "curl -F files=@lesion1.jpg -F files=@lesion2.jpg 'http://127.0.0.1:8000/api/predict?format=csv'"
    parts.append(f"<h2>Example</h2><pre>{e(example)}</pre>")
    return "".join(parts) + "</html>"


def _listen(host: str, port: int) -> socket.socket:
    """Open the listening socket up front, so a busy port is a clear error before anything runs."""
    try:
        family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
        sock = socket.create_server((host.strip("[]"), port), family=family, reuse_port=False)
    except (OSError, OverflowError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise SkinclfError(f"cannot listen on {host}:{port}: {reason} (pick another --port or --host)") from None
    sock.set_inheritable(True)
    return sock


@contextlib.contextmanager
def background_server(app, host: str = "127.0.0.1") -> Iterator[str]:
    """Serve `app` on a free port of `host` in a thread (for tests, benches and screenshots);
    yields the base URL. The socket listens before the URL is handed out, so requests made
    right away wait in its backlog instead of failing."""
    import uvicorn

    sock = _listen(host, 0)
    config = uvicorn.Config(app, log_level="warning", access_log=False, server_header=False, date_header=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="skinclf-serve", daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def _run_server(app, sock: socket.socket) -> None:
    """Serve `app` on `sock` until Ctrl-C; no access log, so no request paths or names are logged."""
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", access_log=False, server_header=False, date_header=False)
    uvicorn.Server(config).run(sockets=[sock])


def serve(
    *,
    host: str = SERVE.host,
    port: int = SERVE.port,
    model: Path | None = None,
    engine: str = SERVE.engine,
    batch_size: int = SERVE.batch_size,
    top_k: int = SERVE.top_k,
    max_file_mb: float = SERVE.max_file_mb,
    max_files: int = SERVE.max_files,
    max_request_mb: float = SERVE.max_request_mb,
    on_ready: Callable[[ServeInfo], None] | None = None,
) -> None:
    """Load the model once, open `host:port`, call `on_ready`, and serve until interrupted."""
    try:
        import fastapi  # noqa: F401
        import python_multipart  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise SkinclfError(MISSING_EXTRA) from None
    if not 0 <= port <= 65535:
        raise SkinclfError(f"--port {port}: must be 0..65535")
    for option, value in (("--max-file-mb", max_file_mb), ("--max-files", max_files),
                          ("--max-request-mb", max_request_mb)):
        if not value > 0:
            raise SkinclfError(f"{option} {value}: must be positive")
    limits = Limits(max_file_bytes=int(max_file_mb * MB), max_files=max_files,
                    max_request_bytes=int(max_request_mb * MB))
    from skinclf.engines import load_engine
    from skinclf.layout import default_model_path

    loaded = load_engine(model or default_model_path(), engine=engine, batch_size=batch_size)
    size = loaded.image_size
    loaded(np.zeros((1, size, size, 3), dtype="float32"))  # compile before the first visitor waits for it
    sock = _listen(host, port)
    loopback = is_loopback(host)
    allowed = sorted({"127.0.0.1", "localhost", "::1", host.strip("[]")}) if loopback else None
    app = create_app(loaded, limits=limits, top_k=top_k, allowed_hosts=allowed)
    bound = sock.getsockname()[1]
    shown = f"[{host.strip('[]')}]" if ":" in host else host
    warnings = [] if loopback else [
        f"listening on {host}: anyone who can reach this machine on port {bound} can use the page and the API. "
        "They have no authentication and no encryption (HTTPS); use only on a trusted network."
    ]
    info = ServeInfo(url=f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else shown}:{bound}/", host=host,
                     port=bound, model=loaded.identity(), limits=limits, warnings=warnings)
    if on_ready is not None:
        on_ready(info)
    try:
        _run_server(app, sock)
    finally:
        app.state.classifier.close()
        sock.close()
