"""`skinclf serve --static DIR`: host a site `skinclf export --format web` wrote, on loopback.

A plain file server (the standard library's), for clinics without a web server: it answers GET
and HEAD for the site's files and nothing else (any POST, PUT, ... is 405), so it never receives
an image; the page classifies in the browser. Every answer carries the same Content-Security-
Policy as the page's meta tag, nosniff, no-referrer and no caching of stale models.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from skinclf.errors import SkinclfError

CSP = ("default-src 'none'; script-src 'self' 'wasm-unsafe-eval'; style-src 'self'; img-src 'self' blob: data:; "
       "connect-src 'self'; worker-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class SiteHandler(SimpleHTTPRequestHandler):
    """Files of one folder, GET and HEAD only, with the site's security headers; quiet."""

    extensions_map = {**SimpleHTTPRequestHandler.extensions_map, ".wasm": "application/wasm",
                      ".mjs": "text/javascript", ".js": "text/javascript", ".json": "application/json",
                      ".onnx": "application/octet-stream", ".css": "text/css"}

    def end_headers(self) -> None:
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Cache-Control", "no-cache")
        super().end_headers()

    def list_directory(self, path):  # no folder listings
        self.send_error(404, "Not found")
        return None

    def _refuse(self) -> None:
        self.send_error(405, "This server only serves the site's files; images are classified in the browser")

    do_POST = do_PUT = do_DELETE = do_PATCH = _refuse  # noqa: N815 - http.server's method names

    def log_message(self, format, *args) -> None:  # noqa: A002 - quiet: no request log
        return


def check_site(folder: Path) -> Path:
    from skinclf.web.static_site import CONFIG, PAGE_FILES

    folder = Path(folder)
    if not folder.is_dir():
        raise SkinclfError(f"--static {folder}: not a folder (make the site with: skinclf export --format web --out "
                           f"{folder})")
    missing = [n for n in (*PAGE_FILES, CONFIG) if not (folder / n).is_file()]
    if missing:
        raise SkinclfError(f"--static {folder}: not a site skinclf export wrote (no {', '.join(missing)}); make one "
                           f"with: skinclf export --format web --out {folder}")
    return folder


def make_server(folder: Path, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    if host not in LOOPBACK:
        raise SkinclfError(f"--static serves on loopback only (127.0.0.1), not {host}: to share the site on a "
                           "network, copy the folder to a web server")
    handler = partial(SiteHandler, directory=str(check_site(folder)))
    try:
        return ThreadingHTTPServer((host, port), handler)
    except OSError as exc:
        raise SkinclfError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


@contextlib.contextmanager
def background_site(folder: Path, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve `folder` in a thread; yields its URL (for tests and scripts)."""
    server = make_server(folder, host, port)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def serve_static(folder: Path, *, host: str = "127.0.0.1", port: int = 8000,
                 on_ready: Callable[[str], None] | None = None) -> None:
    """Serve the site until interrupted."""
    server = make_server(folder, host, port)
    url = f"http://{host}:{server.server_address[1]}/"
    if on_ready:
        on_ready(url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
