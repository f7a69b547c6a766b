"""`skinclf serve`: the model behind a local web page and a JSON API, for the clinic desk.

    GET  /               the page (`skinclf/web/page.py`: what it shares with the exported site, and
                         serve's own parts; works offline)
    GET  /static/...     its script and stylesheet: page.js and page.css (shared with the exported
                         site) and serve.js (the upload to the API)
    POST /api/predict    multipart upload of one or many images -> one result per file, the
                         same fields and cells as a `skinclf predict` CSV row (?format=csv: the CSV)
    GET  /api/model      classes, identity, the held-out test figures the model was accepted with
                         (validation's when the bundle has none) and the OOD flag's measured rates
    GET  /healthz        liveness: 503 with the reason once the model thread has stopped
    GET  /docs           the API, rendered from /openapi.json without any external script

Patient images stay in memory: the multipart body is parsed here, into bytes (never a spooled
temporary file), decoded by `images.decode_image` (the code path `predict` uses for files) and
dropped with the request. Nothing logs file names; uvicorn's access log is off. One engine is
loaded once and owned by one worker thread (`Classifier`): concurrent requests queue their
decoded images and are run together, so there is never a second copy of the model.

Every POST must come from the server's own page or from no page at all (curl, scripts): another
site's `Origin` or `Sec-Fetch-Site` is a 403 (see `guards.cross_origin_refusal`). Decoding goes
through `guards.DecodeGate`, which bounds the decodes and the pixels in flight.

FastAPI, uvicorn and python-multipart are the optional extra `skinclf[serve]`; they are imported
only when the app is built, so a missing extra is one clear `SkinclfError`.
"""

# No `from __future__ import annotations`: FastAPI reads the route functions' annotations at run time.
import html
import io
import json
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from skinclf import __version__
from skinclf.batch.results import DISCLAIMER, class_names, columns, write_csv
from skinclf.config import SERVE
from skinclf.errors import SkinclfError
from skinclf.web.classifier import (
    MISSING_EXTRA,
    Classifier,
    Limits,
    ModelUnavailable,
    classify_uploads,
)
from skinclf.batch.patient import metas_from_json
from skinclf.web.guards import Rejected, cross_origin_refusal, host_of
from skinclf.web.page import render_page, shared_file
from skinclf.web.uploads import drain, read_uploads

# Validation metrics shown on the page and by /api/model (the confusion matrices stay in the model).
METRIC_KEYS = ("n", "accuracy", "balanced_accuracy", "top_k_accuracy", "macro_auc", "melanoma", "per_class")
# A page served from this machine may load only itself: no CDN, no fonts, no requests elsewhere.
# No inline script (the page's are files under /static/); inline style only for /docs.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
       "img-src 'self' blob: data:; connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


# The upload's OpenAPI description (FastAPI cannot infer it from a raw multipart stream).
UPLOAD_SCHEMA = {
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
        "403": {"description": "Sent by another site's page (an Origin other than this server's, or "
                               "Sec-Fetch-Site cross-site/same-site)."},
        "422": {"description": "Not a multipart upload, no files, a malformed body or a bad option."},
        "503": {"description": "Busy decoding (with Retry-After: try again), or the model thread has stopped."},
    },
}


def page_html() -> str:
    """The page: `static/page.html` with serve's parts (`static/serve-parts.html`), see `skinclf.web.page`."""
    return render_page("static/serve-parts.html", "/static/")


# What the page loads from /static/: the files it shares with the exported site, and its own script.
STATIC_FILES = {"page.js": "text/javascript; charset=utf-8", "page.css": "text/css; charset=utf-8",
                "serve.js": "text/javascript; charset=utf-8"}


def model_info(engine, limits: Limits, top_k: int) -> dict[str, Any]:
    """GET /api/model: what the page shows about the model, and the limits it must respect.

    `accepted_with` is the honest headline: the held-out test figures the model was accepted
    with when the bundle records them (`metrics.test`), else the validation figures, which
    chose the model and flatter it; `ood` is the "unlike the training images" flag this
    engine applies and its measured flag rates."""
    from skinclf.model.outlier import active_record

    metrics = engine.meta.get("metrics", {}) or {}
    shown = {split: {k: metrics[split][k] for k in METRIC_KEYS if k in metrics[split]}
             for split in ("test", "validation") if metrics.get(split)}
    headline = "test" if "test" in shown else "validation"
    ood = active_record(engine.meta.get("ood"), getattr(engine, "features_dim", 0) > 0)
    return {
        "identity": engine.identity(),
        "classes": engine.classes,
        "class_names": class_names(engine.classes),
        "metrics": {"validation": shown.get("validation", {}), **({"test": shown["test"]} if "test" in shown else {})},
        "accepted_with": {"split": headline, "note": (metrics.get("test") or {}).get("note") if headline == "test"
                          else "validation figures: they chose the model's settings, so they flatter it",
                          **shown.get(headline, {})},
        "ood": None if not ood else {
            "score": ood["score"], "threshold": ood["threshold"], "pass_rate": ood.get("pass_rate"),
            "fitted_on": ood.get("fitted_on"), "flag_rates": ood.get("flag_rates", {}),
            "held_out": (engine.meta.get("ood") or {}).get("held_out")},
        "intended_use": engine.meta.get("intended_use"),
        "disclaimer": DISCLAIMER,
        "skinclf": __version__,
        "top_k": top_k,
        "columns": columns(engine.classes, top_k, False),
        "limits": asdict(limits),
        "metadata": metadata_info(engine),
    }


def csv_text(header: list[str], rows: list[list[str]]) -> str:
    """The CSV `skinclf predict` writes for these rows: header, rows sorted by path, '\\n' lines."""
    buf = io.StringIO()
    write_csv(buf, [header, *sorted(rows, key=lambda r: r[0])])  # cells guarded as predict's are
    return buf.getvalue()




def create_app(engine, *, limits: Limits = Limits(), top_k: int = SERVE.top_k,
               allowed_hosts: Sequence[str] | None = None, classifier: Classifier | None = None):
    """The FastAPI application around a loaded `engine` (see `skinclf.engines.load.load_engine`)."""
    try:
        import python_multipart  # noqa: F401 - read_uploads' parser: a missing extra is one line here
        from fastapi import FastAPI, Request
        from fastapi.responses import HTMLResponse, JSONResponse, Response
    except ImportError:
        raise SkinclfError(MISSING_EXTRA) from None

    classes = engine.classes
    if not 1 <= top_k <= len(classes):
        raise SkinclfError(f"--top-k {top_k}: must be 1..{len(classes)} (the model's classes: {', '.join(classes)})")
    classifier = classifier or Classifier(engine)
    info = model_info(engine, limits, top_k)
    page = page_html()
    static = {name: (shared_file(name), media) for name, media in STATIC_FILES.items()}

    app = FastAPI(
        title="skinclf",
        version=__version__,
        description=("Classify dermoscopic skin-lesion images with the model `skinclf predict` uses. "
                     + DISCLAIMER + " Images are decoded in memory and never stored."),
        docs_url=None, redoc_url=None,
    )
    app.state.classifier = classifier
    app.state.limits = limits
    app.state.decode_gate = limits.gate()
    app.state.refused = 0  # requests refused as coming from another site's page

    _add_guards(app, allowed_hosts, limits)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/static/{name}", include_in_schema=False)
    def static_file(name: str) -> Response:
        if name not in static:
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        body, media = static[name]
        return Response(body, media_type=media)

    @app.get("/healthz", summary="Liveness: the model thread runs and the server answers (503 with the reason if not)")
    def healthz():
        try:
            classifier.check()
        except ModelUnavailable as exc:
            return JSONResponse({"status": "error", "detail": str(exc)}, status_code=503)
        return {"status": "ok"}

    @app.get("/api/model", summary="The model: classes, identity, validation metrics, disclaimer and upload limits")
    def api_model() -> dict[str, Any]:
        return info

    _add_predict(app, engine, info, top_k)

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    def docs(request: Request) -> HTMLResponse:
        return HTMLResponse(docs_html(app.openapi(), base=str(request.base_url)))

    return app


def _add_predict(app, engine, info: dict[str, Any], top_k: int) -> None:
    """POST /api/predict: read the upload within the limits, decode within the gate, classify."""
    from fastapi import Query, Request
    from fastapi.responses import Response
    from starlette.concurrency import run_in_threadpool

    classes, limits, classifier = engine.classes, app.state.limits, app.state.classifier
    head = serve_head(engine)

    @app.post("/api/predict", summary="Classify uploaded images: one result per file, as in a predict CSV row",
              openapi_extra=UPLOAD_SCHEMA,
              description="Each result has the fields of a `skinclf predict` CSV row (`path`, `topN_class`, "
                          "`topN_prob`, optionally `prob_<class>`, `error`, `warning`, ...), the cells formatted "
                          "exactly as predict writes them; a file that cannot be read is a result with an `error`. "
                          "`format=csv` answers with the CSV `skinclf predict` would write for these files. "
                          "Requests from another site's page (an `Origin` other than this server's) are refused.")
    async def api_predict(
        request: Request,
        format: str = Query("json", pattern="^(json|csv)$", description="json, or csv for the predict CSV"),
        top_k: int = Query(top_k, ge=1, le=len(classes), description="How many most-probable classes per image"),
        all_probs: bool = Query(False, description="Add a prob_<class> field for every class (--all-probs)"),
    ):
        fields = {"metadata": ""}
        uploads = await read_uploads(request, limits, fields)
        metas, notes = None, []
        if fields["metadata"].strip():
            if head is None:
                raise SkinclfError("metadata was sent, but this model has no metadata head: it cannot use age, sex "
                                   "or site (send the images without it)")
            metas, notes = metas_from_json(fields["metadata"], [u.name for u in uploads])
        rows = await run_in_threadpool(classify_uploads, classifier, uploads, classes=classes,
                                       image_size=engine.image_size, top_k=top_k, all_probs=all_probs,
                                       gate=app.state.decode_gate, max_image_pixels=limits.max_image_pixels,
                                       metas=metas, head=head)
        header = columns(classes, top_k, all_probs) + (["metadata"] if metas is not None else [])
        if format == "csv":
            return Response(csv_text(header, rows), media_type="text/csv; charset=utf-8",
                            headers={"Content-Disposition": 'attachment; filename="results.csv"'})
        results = [dict(zip(header, cells)) for cells in rows]
        return {"model": {k: info["identity"][k] for k in ("name", "sha256", "engine")}, "disclaimer": DISCLAIMER,
                "columns": header, "errors": sum(1 for r in results if r["error"]), "results": results,
                **({"notes": notes} if notes else {})}


def serve_head(engine):
    """The model's metadata head if this engine can run it, else None (metadata is then refused)."""
    from skinclf.model.patient_head import load_head

    try:
        head = load_head(engine.meta, path=engine.path)
    except SkinclfError:
        return None
    if head is not None and head.needs_features and not getattr(engine, "features_dim", 0):
        return None
    return head


def metadata_info(engine) -> dict[str, Any]:
    """/api/model's `metadata`: whether age, sex and site can be sent, what is accepted, the figures."""
    from skinclf.model.patient_head import HEAD_KEY, SEXES, SITE_GROUPS, SITES

    head = serve_head(engine)
    spec = engine.meta.get(HEAD_KEY) or {}
    return {"available": head is not None, "sexes": list(SEXES), "sites": list(SITES),
            "site_groups": list(SITE_GROUPS), "age": [0, 120],
            "figures": spec.get("figures") if head is not None else None,
            "how": "multipart form field `metadata`: a JSON list, one {age, sex, site} object (or null) per file "
                   "in upload order, or an object keyed by file name; images without metadata get the image-only answer"}


def _add_guards(app, allowed_hosts: Sequence[str] | None, limits: Limits) -> None:
    """Host and origin checks, security headers on every answer, and errors as one-line JSON."""
    from fastapi import Request
    from fastapi.responses import JSONResponse

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if allowed_hosts is not None:
            if host_of(request.headers.get("host") or "") not in allowed_hosts:
                return JSONResponse({"detail": "unknown host (not in the server's --allowed-hosts)"}, status_code=400)
        refusal = cross_origin_refusal(request.method, request.url.scheme, request.headers)
        if refusal is not None:
            app.state.refused += 1
            await drain(request.stream(), limits.max_request_bytes)  # so that a client still sending reads the 403
            response = JSONResponse({"detail": refusal}, status_code=403, headers={"Connection": "close"})
        else:
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
        return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers={"Connection": "close", **exc.headers})

    @app.exception_handler(ModelUnavailable)
    async def model_unavailable(request: Request, exc: ModelUnavailable):
        return JSONResponse({"detail": str(exc)}, status_code=503)


def docs_html(spec: dict[str, Any], base: str = "http://127.0.0.1:8000/") -> str:
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
    example = f"curl -F files=@lesion1.jpg -F files=@lesion2.jpg '{base.rstrip('/')}/api/predict?format=csv'"
    parts.append(f"<h2>Example</h2><pre>{e(example)}</pre>")
    return "".join(parts) + "</html>"


