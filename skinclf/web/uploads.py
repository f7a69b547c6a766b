"""Read a multipart upload into memory, enforcing the limits while it streams (never a temporary file)."""

from typing import Any

from skinclf.web.classifier import Limits, Upload
from skinclf.web.guards import Rejected

__all__ = ["Rejected", "drain", "read_uploads", "upload_name"]


def upload_name(raw: str, index: int) -> str:
    """The row's path for an uploaded file name: printable, forward slashes, no leading slash."""
    name = "".join(ch for ch in raw.replace("\\", "/") if ch.isprintable()).strip().lstrip("/")
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
                            f"{limits.max_request_bytes:,} bytes (--max-request-mb)")
    uploads: list[Upload] = []
    state: dict[str, Any] = {"header": b"", "value": b"", "disposition": b"", "part": None, "field": 0, "name": None}
    wanted = fields if fields is not None else {}
    raw: dict[str, bytearray] = {}

    def on_part_begin() -> None:
        state.update(disposition=b"", part=None, field=0, name=None)

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
            uploads.append(Upload(upload_name(raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw,
                                               len(uploads) + 1)))
            state["part"] = uploads[-1]
        else:
            name = options.get(b"name", b"")
            name = name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
            state["name"] = name if name in wanted else None
    def on_part_data(data: bytes, start: int, end: int) -> None:
        part = state["part"]
        if part is None:  # a plain form field: ignored, but bounded
            state["field"] += end - start
            if state["field"] > 64 * 1024:
                raise Rejected(413, "a form field over 64 KB; send images as files")
            if state["name"] is not None:
                raw.setdefault(state["name"], bytearray()).extend(data[start:end])
            return
        if len(part.data) + end - start > limits.max_file_bytes:
            raise Rejected(413, f"{part.name}: over the limit of {limits.max_file_bytes:,} bytes per file "
                                "(--max-file-mb)")
        part.data += data[start:end]

    parser = MultipartParser(params[b"boundary"], {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_headers_finished": on_headers_finished, "on_part_data": on_part_data,
    })
    await _feed(request.stream(), parser, limits)
    for name, value in raw.items():
        wanted[name] = bytes(value).decode("utf-8", "replace")
    if not uploads:
        raise Rejected(422, "no files in the request: send one or more images as multipart field 'files'")
    return uploads


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
