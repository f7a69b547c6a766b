"""A DICOM Storage SCP (pynetdicom) that hands each received image to a callback: `skinclf listen`.

Secure by default: it binds to loopback unless told otherwise, accepts associations only from
calling AE titles on an allow-list (an empty list is refused: there is no accept-all), caps the
number of simultaneous associations, and aborts an association that sends more than
`max_bytes` for one object (counted as the data arrive, so an oversized object never fills
memory). A client that disconnects mid-transfer only ends its own association. Only the image
storage SOP classes a dermoscopic photograph comes as are offered, uncompressed or JPEG baseline.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from skinclf.dicom import missing_extra

# Dermoscopic Photography, VL Photographic, VL Microscopic and Secondary Capture Image Storage.
IMAGE_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.77.1.7", "1.2.840.10008.5.1.4.1.1.77.1.4",
                     "1.2.840.10008.5.1.4.1.1.77.1.2", "1.2.840.10008.5.1.4.1.1.7")
TRANSFER_SYNTAXES = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.4.50")
SUCCESS, OUT_OF_RESOURCES, CANNOT_UNDERSTAND, PROCESSING_FAILURE = 0x0000, 0xA700, 0xC000, 0x0110


class ListenError(Exception):
    """The listener cannot start as configured; one line."""


@dataclass
class ListenConfig:
    host: str = "127.0.0.1"
    port: int = 11112
    ae_title: str = "SKINCLF"
    allow: Sequence[str] = ()
    max_associations: int = 4
    max_bytes: int = 64 * 1024 * 1024


@dataclass
class Counters:
    """What the listener has seen (read by the CLI's summary and by tests)."""

    stored: int = 0
    failed: int = 0
    aborted: int = 0
    refused: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + 1)


def _check_title(title: str, what: str) -> str:
    title = title.strip()
    if not title or len(title) > 16 or not title.isascii() or "\\" in title or not title.isprintable():
        raise ListenError(f"{what} {title!r}: an AE title is 1-16 printable ASCII characters without backslashes")
    return title


class Listener:
    """`on_object(data, calling_ae)` gets each received object in DICOM file format (bytes) and
    returns a C-STORE status (0 success); it runs in the association's thread."""

    def __init__(self, config: ListenConfig, on_object: Callable[[bytes, str], int]) -> None:
        try:
            from pynetdicom import AE, evt
        except ImportError:
            raise ListenError(missing_extra("skinclf listen")) from None
        if not config.allow:
            raise ListenError("no calling AE title is allowed: give --allow AE (one per sending system)")
        if config.max_associations < 1:
            raise ListenError(f"--max-associations {config.max_associations}: must be at least 1")
        if config.max_bytes < 1024:
            raise ListenError("--max-mb: must allow at least 1 KB per object")
        self.config, self.on_object, self.counters = config, on_object, Counters()
        self.allow = [_check_title(a, "--allow") for a in config.allow]
        self.ae = AE(ae_title=_check_title(config.ae_title, "--ae-title"))
        self.ae.require_calling_aet = self.allow  # pynetdicom rejects every other calling AE title
        self.ae.maximum_associations = config.max_associations
        self.ae.maximum_pdu_size = 64 * 1024
        for uid in IMAGE_SOP_CLASSES:
            self.ae.add_supported_context(uid, list(TRANSFER_SYNTAXES))
        self._received: dict[int, int] = {}
        self._lock = threading.Lock()
        self._handlers = [(evt.EVT_C_STORE, self._store), (evt.EVT_DATA_RECV, self._data),
                          (evt.EVT_ABORTED, self._aborted), (evt.EVT_REJECTED, self._rejected),
                          (evt.EVT_RELEASED, self._forget)]
        self.server = None

    @property
    def port(self) -> int:
        return self.server.server_address[1] if self.server is not None else self.config.port

    def start(self) -> int:
        """Start serving in the background; returns the port (useful with port 0)."""
        try:
            self.server = self.ae.start_server((self.config.host, self.config.port), block=False,
                                               evt_handlers=self._handlers)
        except OSError as exc:
            raise ListenError(f"cannot listen on {self.config.host}:{self.config.port} ({exc.strerror or exc})") from None
        return self.port

    def stop(self) -> None:
        """Abort the open associations and close the socket (bounded: no waiting on clients)."""
        self.ae.shutdown()

    # --- handlers (association threads) ---
    def _data(self, event) -> None:
        key = id(event.assoc)
        with self._lock:
            self._received[key] = self._received.get(key, 0) + len(event.data)
            over = self._received[key] > self.config.max_bytes + 64 * 1024
        if over:
            event.assoc.abort()

    def _forget(self, event) -> None:
        with self._lock:
            self._received.pop(id(event.assoc), None)

    def _aborted(self, event) -> None:
        self.counters.add("aborted")
        self._forget(event)

    def _rejected(self, event) -> None:
        self.counters.add("refused")

    def _store(self, event) -> int:
        with self._lock:
            self._received[id(event.assoc)] = 0  # the next object starts counting afresh
        try:
            data = event.encoded_dataset(include_meta=True)
        except Exception:  # noqa: BLE001 - a dataset pynetdicom cannot re-encode
            self.counters.add("failed")
            return CANNOT_UNDERSTAND
        if len(data) > self.config.max_bytes:
            self.counters.add("failed")
            return OUT_OF_RESOURCES
        try:
            status = self.on_object(data, str(event.assoc.requestor.ae_title).strip())
        except Exception:  # noqa: BLE001 - never let one object end the listener
            status = PROCESSING_FAILURE
        self.counters.add("stored" if status == SUCCESS else "failed")
        return status
