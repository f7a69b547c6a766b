"""Run the app: bind loopback by default, uvicorn in the foreground or a background thread for tests."""

# No `from __future__ import annotations`: FastAPI reads the route functions' annotations at run time.
import contextlib
import ipaddress
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from skinclf.checks import positive
from skinclf.config import SERVE
from skinclf.errors import SkinclfError
from skinclf.web.classifier import MB, MISSING_EXTRA, Limits, ServeInfo, probe_engine
from skinclf.web.guards import allowed_host_names
from skinclf.web.routes import create_app


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


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
    server = uvicorn.Server(_config(app))
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

    uvicorn.Server(_config(app)).run(sockets=[sock])


def _config(app):
    """uvicorn's settings: no access log (no request paths or names logged), no server banner, and a
    bounded graceful shutdown, so Ctrl-C/SIGTERM stops the server even while a request still runs."""
    import uvicorn

    return uvicorn.Config(app, log_level="warning", access_log=False, server_header=False, date_header=False,
                          timeout_graceful_shutdown=SERVE.shutdown_s)


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
    allowed_hosts: str | Iterable[str] = (),
    on_ready: Callable[[ServeInfo], None] | None = None,
) -> None:
    """Load the model once, open `host:port`, call `on_ready`, and serve until interrupted.

    Requests are answered only under the localhost names, the address bound and `allowed_hosts`
    (see `guards.allowed_host_names`; `*`: any), on loopback and elsewhere alike."""
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
        positive(option, value)
    allowed = allowed_host_names(host, allowed_hosts)  # a bad name is refused before the model loads
    limits = Limits(max_file_bytes=int(max_file_mb * MB), max_files=max_files,
                    max_request_bytes=int(max_request_mb * MB))
    from skinclf.engines.load import load_engine

    engine = load_engine(model, engine=engine, batch_size=batch_size)
    probe_engine(engine)  # a model whose outputs do not match its classes is refused before the port opens
    sock = _listen(host, port)
    app = create_app(engine, limits=limits, top_k=top_k, allowed_hosts=allowed)
    bound = sock.getsockname()[1]
    shown = f"[{host.strip('[]')}]" if ":" in host else host
    answered = "any host name (--allowed-hosts '*')" if allowed is None else ", ".join(allowed)
    warnings = [] if is_loopback(host) else [
        f"listening on {host}: anyone who can reach this machine on port {bound} can use the page and the API. "
        "They have no authentication and no encryption (HTTPS); use only on a trusted network. "
        f"Requests are answered under: {answered}."
    ]
    if allowed is None and not warnings:
        warnings.append("--allowed-hosts '*': requests are answered under any host name, so another site's page "
                        "whose DNS name is rebound to this machine can use the server")
    info = ServeInfo(url=f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else shown}:{bound}/", host=host,
                     port=bound, model=engine.identity(), limits=limits, warnings=warnings)
    if on_ready is not None:
        on_ready(info)
    serve_until_stopped(app, sock)


def serve_until_stopped(app, sock: socket.socket) -> None:
    """Serve until Ctrl-C/SIGTERM, then stop the model thread without waiting on it for ever."""
    try:
        _run_server(app, sock)
    finally:
        app.state.classifier.close(SERVE.shutdown_s)
        sock.close()
