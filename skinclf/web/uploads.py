"""Read a multipart upload into memory, enforcing the limits while it streams (never a temporary file)."""

from typing import Any

from skinclf.web.classifier import Limits, Upload
from skinclf.web.guards import Rejected

__all__ = ["Rejected", "drain", "read_uploads", "upload_name"]


def upload_name(raw: str, index: int) -> str:
    """The row's path for an uploaded file name: printable, no leading slash. A backslash stays a
    backslash: on the machines predict runs on it is part of a file's name, so the page's CSV
    names such a file as predict's does."""
    name = "".join(ch for ch in raw if ch.isprintable()).strip().lstrip("/")
    return name or f"upload-{index}"


async def read_uploads(request, limits: Limits, fields: dict[str, str] | None = None) -> list[Upload]:
    """Parse the multipart body into in-memory uploads, enforcing the limits as it streams. Plain
    form fields whose names are keys of `fields` are read into it (text, 64 KB at most each);
    other plain fields are ignored."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or b"boundary" not in params:
        raise Rejected(422, "expected a multipart/form-data body with one or more image files (field 'files')")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limits.max_request_bytes:
        raise Rejected(413, f"request of {int(declared):,} bytes is over the limit of "
                            f"{limits.max_request_bytes:,} bytes ({limits.max_request_bytes / 1048576:.4g} MiB, --max-request-mb)")
    parts = _Parts(limits, wanted=fields if fields is not None else {})
    await _feed(request.stream(), MultipartParser(params[b"boundary"], parts.callbacks()), limits)
    for name, value in parts.fields.items():
        parts.wanted[name] = bytes(value).decode("utf-8", "replace")
    if not parts.uploads:
        raise Rejected(422, "no files in the request: send one or more images as multipart field 'files'")
    return parts.uploads


class _Parts:
    """The multipart parser's callbacks: each file part becomes an Upload, wanted plain fields
    are collected, and every limit is checked as the bytes arrive."""

    FIELD_LIMIT = 64 * 1024

    def __init__(self, limits: Limits, *, wanted: dict[str, str]) -> None:
        self.limits, self.wanted = limits, wanted
        self.uploads: list[Upload] = []
        self.fields: dict[str, bytearray] = {}
        self.header = self.value = self.disposition = b""
        self.part: Upload | None = None
        self.field_bytes, self.name = 0, None

    def callbacks(self) -> dict[str, Any]:
        return {"on_part_begin": self.on_part_begin, "on_header_field": self.on_header_field,
                "on_header_value": self.on_header_value, "on_header_end": self.on_header_end,
                "on_headers_finished": self.on_headers_finished, "on_part_data": self.on_part_data}

    def on_part_begin(self) -> None:
        self.disposition, self.part, self.field_bytes, self.name = b"", None, 0, None

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.value += data[start:end]

    def on_header_end(self) -> None:
        if self.header.lower() == b"content-disposition":
            self.disposition = self.value
        self.header, self.value = b"", b""

    def on_headers_finished(self) -> None:
        from python_multipart.multipart import parse_options_header

        _, options = parse_options_header(self.disposition)
        if b"filename" in options:
            if len(self.uploads) >= self.limits.max_files:
                raise Rejected(413, f"more than {self.limits.max_files} files in one request (--max-files); "
                                    "send them in several requests")
            self.uploads.append(Upload(upload_name(_text(options[b"filename"]), len(self.uploads) + 1)))
            self.part = self.uploads[-1]
        else:
            name = _text(options.get(b"name", b""))
            self.name = name if name in self.wanted else None

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self.part
        if part is None:  # a plain form field: ignored, but bounded
            self.field_bytes += end - start
            if self.field_bytes > self.FIELD_LIMIT:
                raise Rejected(413, "a form field over 64 KB; send images as files")
            if self.name is not None:
                self.fields.setdefault(self.name, bytearray()).extend(data[start:end])
            return
        if len(part.data) + end - start > self.limits.max_file_bytes:
            raise Rejected(413, f"{part.name}: over the limit of {self.limits.max_file_bytes:,} bytes per file "
                                f"({self.limits.max_file_bytes / 1048576:.4g} MiB, --max-file-mb)")
        part.data += data[start:end]


def _text(raw: bytes | str) -> str:
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)


async def _feed(stream, parser, limits: Limits) -> None:
    """Write the body into `parser` within the request limit; a refused body is drained first (see `drain`)."""
    received = 0
    try:
        async for chunk in stream:
            received += len(chunk)
            if received > limits.max_request_bytes:
                raise Rejected(413, f"request over the limit of {limits.max_request_bytes:,} bytes (--max-request-mb)")
            parser.write(chunk)
        parser.finalize()
    except Rejected:
        await drain(stream, limits.max_request_bytes - received)
        raise
    except Exception as exc:  # noqa: BLE001 - a malformed body is the client's problem, not a 500
        await drain(stream, limits.max_request_bytes - received)
        raise Rejected(422, f"malformed multipart body: {' '.join(str(exc).split())[:200]}") from None


async def drain(stream, budget: int) -> None:
    """Read and drop the rest of a refused body, up to `budget` bytes, before the answer is sent.

    A client still sending when the server closes gets a reset connection and never reads the
    answer (curl shows nothing); once its body is read, it gets the status and the JSON detail.
    A body beyond `budget` (the most a request may carry) is cut off: the reset is then the answer."""
    try:
        async for chunk in stream:
            budget -= len(chunk)
            if budget < 0:
                return
    except Exception:  # noqa: BLE001 - the client went away: nobody is left to answer
        return
