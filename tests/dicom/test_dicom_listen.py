"""Issue 32: `skinclf listen`, a DICOM Storage SCP on loopback, against a pynetdicom client.

No test depends on timing: each waits on a condition (the listener ready, a row written, the
thread ended) with a bounded timeout, and fails with a message if it is not met.
"""

from __future__ import annotations

import csv
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, lesion_image, require

pytest.importorskip("pynetdicom")
pydicom = pytest.importorskip("pydicom")

from utils import dicom_files as D  # noqa: E402

ONNX = REPO / "models" / "skinclf-mobilenet.onnx"
VL_PHOTO = D.VL_PHOTO
TIMEOUT = 60.0


def wait_for(condition, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def rows(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def client(calling: str = "DERMCAM", *, max_pdu: int = 16384):
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    ae.add_requested_context(VL_PHOTO, ["1.2.840.10008.1.2.1"])
    ae.maximum_pdu_size = max_pdu
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    return ae


@pytest.fixture
def image(tmp_path: Path) -> Path:
    pixels = np.asarray(lesion_image((150, 100, 70), 3, (320, 240)))
    return D.uncompressed(pixels, tmp_path / "sent.dcm", tags={"PatientAge": "060Y", "PatientSex": "M"})


@pytest.fixture
def listening(tmp_path: Path):
    """A listener (bundled ONNX model) on 127.0.0.1, an ephemeral port, allowing DERMCAM."""
    from skinclf.batch.received import run_listener
    from skinclf.config import ListenSettings

    require(ONNX)
    stop, ready, result = threading.Event(), [], {}
    out, sr = tmp_path / "received.csv", tmp_path / "sr"

    def target():
        try:
            settings = ListenSettings(out=out, model=ONNX, host="127.0.0.1", port=0, ae_title="SKINCLF",
                                      allow=("DERMCAM",), max_associations=2, max_mb=4, sr=sr)
            result["counts"] = run_listener(settings, stop=stop, on_ready=ready.append)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            result["error"] = exc
            ready.append(None)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    wait_for(lambda: ready, "the listener to start")
    assert ready[0] is not None, result.get("error")
    yield {"port": ready[0], "out": out, "sr": sr, "stop": stop, "thread": thread, "result": result}
    stop.set()
    thread.join(TIMEOUT)
    assert not thread.is_alive(), "the listener did not stop"


@pytest.mark.integration
def test_a_c_store_becomes_a_row_and_an_sr(listening, image: Path) -> None:
    ds = pydicom.dcmread(image)
    assoc = client().associate("127.0.0.1", listening["port"], ae_title="SKINCLF")
    assert assoc.is_established
    status = assoc.send_c_store(ds)
    assoc.release()
    assert status.Status == 0x0000
    wait_for(lambda: len(rows(listening["out"])) == 1, "the row")
    row = rows(listening["out"])[0]
    assert row["path"] == f"DERMCAM/{ds.SOPInstanceUID}.dcm" and row["sop_instance_uid"] == ds.SOPInstanceUID
    assert row["error"] == "" and row["top1_class"] and row["metadata"] == "dicom"
    assert [p.name for p in listening["sr"].iterdir()] == [f"SR_{ds.SOPInstanceUID}.dcm"]
    text = listening["out"].read_text() + listening["out"].with_name("received.csv.json").read_text()
    assert not [v for v in D.PHI.values() if v in text]


@pytest.mark.integration
def test_an_unknown_calling_ae_is_refused(listening, image: Path) -> None:
    assoc = client("INTRUDER").associate("127.0.0.1", listening["port"], ae_title="SKINCLF")
    assert not assoc.is_established  # normally is_rejected; a client may also see the close first
    listening["stop"].set()
    listening["thread"].join(TIMEOUT)
    assert listening["result"]["counts"]["refused"] == 1  # the listener's own account: refused, nothing stored
    assert listening["result"]["counts"]["stored"] == 0 and rows(listening["out"]) == []


@pytest.mark.integration
def test_it_survives_a_client_that_aborts_mid_transfer(listening, image: Path) -> None:
    from pynetdicom import evt

    sent = []

    def pdata_sent(event):  # after the third data PDU, the client's connection drops (TCP shut down)
        if event.pdu.__class__.__name__ == "P_DATA_TF":
            sent.append(1)
            if len(sent) == 3:
                event.assoc.dul.socket.socket.shutdown(socket.SHUT_RDWR)

    ds = pydicom.dcmread(image)
    assoc = client(max_pdu=4096).associate("127.0.0.1", listening["port"], ae_title="SKINCLF",
                                           evt_handlers=[(evt.EVT_PDU_SENT, pdata_sent)])
    assert assoc.is_established
    try:
        assoc.send_c_store(ds)  # cut short: the connection is gone
    except Exception:  # noqa: BLE001 - how the client notices does not matter here
        pass
    wait_for(lambda: not assoc.is_alive(), "the client's association to end")
    assert len(sent) >= 3
    # The listener still works: a whole image arrives and is classified, and the torn one left no row.
    again = client().associate("127.0.0.1", listening["port"], ae_title="SKINCLF")
    assert again.is_established
    status = again.send_c_store(ds)
    again.release()
    assert status.Status == 0x0000
    wait_for(lambda: len(rows(listening["out"])) == 1, "the row of the whole image")


@pytest.mark.integration
def test_an_object_over_the_size_limit_is_aborted(listening, tmp_path: Path) -> None:
    big = D.uncompressed(np.zeros((1600, 1200, 3), np.uint8), tmp_path / "big.dcm")  # 5.8 MB > --max-mb 4
    assoc = client().associate("127.0.0.1", listening["port"], ae_title="SKINCLF")
    assert assoc.is_established
    status = assoc.send_c_store(pydicom.dcmread(big))
    assert not status or status.get("Status", 0) != 0
    wait_for(lambda: not assoc.is_alive(), "the association to end")
    assert rows(listening["out"]) == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.integration
def test_listen_command_receives_and_stops(tmp_path: Path, image: Path, runner) -> None:
    from skinclf.cli import app

    require(ONNX)
    port, out, result = _free_port(), tmp_path / "got.csv", {}
    args = ["listen", "--port", str(port), "--allow", "DERMCAM", "--out", str(out), "--model", str(ONNX),
            "--max-objects", "1"]
    thread = threading.Thread(target=lambda: result.setdefault("done", runner.invoke(app, args)), daemon=True)
    thread.start()

    def send() -> bool:
        assoc = client().associate("127.0.0.1", port, ae_title="SKINCLF")
        if not assoc.is_established:
            return False
        status = assoc.send_c_store(pydicom.dcmread(image))
        assoc.release()
        return bool(status) and status.Status == 0

    wait_for(send, "the listen command to accept an image")
    thread.join(TIMEOUT)
    assert not thread.is_alive(), "listen did not stop after --max-objects 1"
    done = result["done"]
    assert done.exit_code == 0, done.output
    assert "1 images classified" in done.output and len(rows(out)) == 1


@pytest.mark.parametrize(("args", "says"), [
    ([], "--allow AE"),
    (["--allow", "DERMCAM", "--ae-title", "WAY-TOO-LONG-AE-TITLE"], "--ae-title"),
    (["--allow", "DERMCAM", "--max-associations", "0"], "--max-associations 0"),
    (["--allow", "DERMCAM", "--max-mb", "0"], "--max-mb 0"),
])
def test_listen_refuses_bad_options_before_listening(tmp_path: Path, runner, args: list[str], says: str) -> None:
    from skinclf.cli import app

    done = runner.invoke(app, ["listen", "--port", "0", "--out", str(tmp_path / "r.csv"), *args])
    assert done.exit_code == 1 and says in done.output, done.output
    assert not (tmp_path / "r.csv").exists()
