"""What `skinclf serve` refuses before or while it works: other sites' pages, and decodes beyond a memory budget.

A page the user happens to have open in the same browser can post to the loopback server (a
plain HTML form or `fetch(..., {mode: "no-cors"})` needs no CORS permission to *send*), so every
request that changes anything or runs the model must come from the server's own page or from
no page at all (curl, scripts send no `Origin`). Decoding is the one step whose memory grows with
what the client sends (a 175 KB PNG can claim 8900x8900 16-bit pixels), so it goes through a gate
that bounds how many images decode at once and how many pixels they hold between them.
"""

import contextlib
import ctypes
import io
import ipaddress
import re
import threading
from collections.abc import Iterable, Iterator, Mapping

from PIL import Image

from skinclf.errors import SkinclfError

# Methods a browser lets any page send without asking; none of these routes changes or runs anything.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# `Sec-Fetch-Site` values of the server's own page (`same-origin`) and of a typed URL or bookmark
# (`none`). `same-site` is refused too: on loopback it means another port of this machine, i.e.
# another program's page (a dev server, a local tool), which has no business driving this one.
OWN_FETCH_SITES = frozenset({"same-origin", "none"})
RETRY_AFTER_S = 5  # what a busy answer tells the client to wait before trying again
# A decode this big hands its freed memory back to the system when it ends (see `_give_back_memory`).
TRIM_PIXELS = 4_000_000
try:  # glibc only; elsewhere the allocator's own policy stands
    _MALLOC_TRIM = ctypes.CDLL(None).malloc_trim
except (OSError, AttributeError):
    _MALLOC_TRIM = None


class Rejected(Exception):
    """A request refused: an HTTP status, one line saying why, and any headers the answer needs."""

    def __init__(self, status: int, detail: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, dict(headers or {})


def cross_origin_refusal(method: str, scheme: str, headers: Mapping[str, str]) -> str | None:
    """Why a request must be refused as coming from another site's page, or None to let it through.

    Refused: any unsafe method whose `Origin` is present and not this server's own origin (the
    scheme and the `Host` the client used, which the host check has already vetted on loopback;
    `Origin: null` from sandboxed frames and files included), or whose `Sec-Fetch-Site` is not
    `same-origin`/`none`. A request with neither header (curl, scripts) is let through."""
    if method.upper() in SAFE_METHODS:
        return None
    own = f"{scheme}://{headers.get('host', '')}".lower()
    origin = headers.get("origin")
    if origin is not None and origin.strip().lower() != own:
        return (f"cross-origin request refused: Origin {_shown(origin)} is not this server ({own}); "
                f"use the page at {own}/, or send no Origin header (curl, scripts)")
    site = headers.get("sec-fetch-site")
    if site is not None and site.strip().lower() not in OWN_FETCH_SITES:
        return (f"cross-origin request refused: Sec-Fetch-Site {_shown(site)} (only this server's own page "
                f"at {own}/ may send it; curl and scripts send no such header)")
    return None


# The `Host` names a server answers to whatever it listens on: what a browser on this machine (or
# a port published on the host's loopback by a container) sends. Anything else is refused (400),
# so a DNS name rebound to this machine cannot make another site's page "same-origin" with it.
LOCAL_HOST_NAMES = ("127.0.0.1", "localhost", "::1")
WILDCARD_BINDS = frozenset({"0.0.0.0", "::"})  # every interface: names no host, so adds none
ANY_HOST = "*"
_HOST_NAME = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*$")


def host_of(header: str) -> str:
    """The host part of a `Host` header (`[::1]:8000` -> `::1`, `Example.org.:80` -> `example.org`)."""
    header = header.strip().lower()
    host = header[1:].split("]")[0] if header.startswith("[") else header.split(":")[0]
    return host.rstrip(".")


def allowed_host_names(bind: str, extra: str | Iterable[str] = ()) -> list[str] | None:
    """The host names `Host` may carry for a server listening on `bind`: the localhost names, the
    address bound unless it is a wildcard (0.0.0.0, ::), and `extra` (names or addresses, a
    comma-separated string or a list, as `--allowed-hosts`/SKINCLF_ALLOWED_HOSTS give them).
    `*` among them: any host (None, no check). SkinclfError for a name that is not a host name."""
    if isinstance(extra, str):
        extra = extra.split(",")
    names = set(LOCAL_HOST_NAMES)
    bound = bind.strip().strip("[]").lower()
    if bound and bound not in WILDCARD_BINDS:
        names.add(bound)
    for raw in extra:
        name = raw.strip()
        if not name:
            continue
        if name == ANY_HOST:
            return None
        plain = name.lower().strip("[]").rstrip(".")
        try:
            plain = str(ipaddress.ip_address(plain))
        except ValueError:
            if not _HOST_NAME.match(plain):
                raise SkinclfError(f"--allowed-hosts: {_shown(name)} is not a host name or address (no scheme, "
                                   f"port or path; comma-separated, e.g. skinclf.clinic.local,10.0.0.5; "
                                   f"'*' for any)") from None
        names.add(plain)
    return sorted(names)


def _shown(value: str) -> str:
    """A header value as it may appear in a one-line message: printable, bounded."""
    return repr("".join(ch for ch in value if ch.isprintable())[:100])


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from an image's header, without decoding a pixel (Pillow's `open` is lazy);
    None when Pillow cannot even read the header (decoding then reports why, at no cost)."""
    from skinclf.dicom.read import has_magic, image_size  # issue 32: a DICOM upload's Rows x Columns

    if has_magic(data[:132]):
        return image_size(data)
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except Exception:  # noqa: BLE001 - the decode that follows gives the file its error row
        return None


class DecodeGate:
    """At most `max_decodes` images decoding at once, holding at most `max_pixels` pixels between them.

    A decode that does not fit waits up to `wait_s` seconds for others to finish, then the
    request is answered 503 with Retry-After (busy), never decoded beyond the budget. One image
    above the budget on its own can never fit: callers refuse it first (see `Limits.max_image_pixels`,
    which is at most the budget)."""

    def __init__(self, *, max_decodes: int, max_pixels: int, wait_s: float) -> None:
        self.max_decodes, self.max_pixels, self.wait_s = max_decodes, max_pixels, wait_s
        self.decoding = 0  # images being decoded now
        self.pixels = 0  # their pixels, as their headers claim
        self._changed = threading.Condition()

    def _fits(self, pixels: int) -> bool:
        return self.decoding < self.max_decodes and self.pixels + pixels <= self.max_pixels

    @contextlib.contextmanager
    def admit(self, pixels: int) -> Iterator[None]:
        """Hold a decode slot and `pixels` of the budget for the `with` block; Rejected(503) if busy."""
        with self._changed:
            if not self._changed.wait_for(lambda: self._fits(pixels), timeout=self.wait_s):
                raise Rejected(503, f"busy: {self.decoding} image(s) of {self.pixels:,} pixels are being decoded "
                                    f"(at most {self.max_decodes} at once, {self.max_pixels:,} pixels in all); "
                                    f"try again in {RETRY_AFTER_S} s", {"Retry-After": str(RETRY_AFTER_S)})
            self.decoding += 1
            self.pixels += pixels
        try:
            yield
        finally:
            if pixels >= TRIM_PIXELS:
                _give_back_memory()
            with self._changed:
                self.decoding -= 1
                self.pixels -= pixels
                self._changed.notify_all()


def _give_back_memory() -> None:
    """Return the memory a big decode freed to the system. glibc keeps freed blocks in the arena of
    the thread that used them, and requests run on many threads: without this, four sequential
    decodes of one 80-megapixel 16-bit PNG left the server 1.8 GB high instead of 1 GB (measured)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
