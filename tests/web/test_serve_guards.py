"""`skinclf serve` against hostile pages, huge images, broken models and impatient clients.

Another site's page must not be able to drive the server; decoding stays within a pixel budget;
a model thread that dies fails requests and health instead of leaving them hanging; a refused
upload's answer reaches a real client; the page shows every warning and keeps names exactly.
A numpy engine stands in for a model (no TensorFlow), except where a real model file is the point.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from utils.paths import REPO
from utils.synthetic import lesion_image, CLASS_COLOURS
from PIL import Image

pytest.importorskip("fastapi", reason="skinclf[serve] (FastAPI) is not installed")
from fastapi.testclient import TestClient
from test_serve import TINY_CLASSES, headless_chromium

from skinclf.errors import SkinclfError
from skinclf.web.routes import create_app
from skinclf.web.classifier import Classifier, Limits, ModelUnavailable, probe_engine
from skinclf.web.server import background_server

WEIGHTS = np.random.default_rng(0).normal(size=(3, 7)).astype("float32") / 40


class FakeEngine:
    """Just enough of an Engine for the server: logits from each image's mean colour."""

    classes = TINY_CLASSES
    image_size = 32
    batch_size = 16
    meta: dict = {}  # noqa: RUF012 - read-only, like an engine's
    path = Path("fake.keras")

    def __init__(self, outputs: int = 7) -> None:
        self.outputs = outputs

    def identity(self) -> dict:
        return {"name": "fake-model", "sha256": "0" * 64, "engine": "numpy", "classes": self.classes}

    def logits(self, x: np.ndarray) -> np.ndarray:
        out = (np.asarray(x).mean(axis=(1, 2)) - 128) @ WEIGHTS
        return np.pad(out, ((0, 0), (0, self.outputs - 7))) if self.outputs > 7 else out[:, : self.outputs]


def image(size: tuple[int, int], fmt: str = "PNG", seed: int = 1) -> bytes:
    buf = io.BytesIO()
    lesion_image(CLASS_COLOURS["nv"], seed, size).save(buf, fmt)
    return buf.getvalue()


def files(*named: tuple[str, bytes]) -> list:
    return [("files", (name, data, "application/octet-stream")) for name, data in named]


# --- 1. another site's page cannot drive the server ------------------------------------------

@pytest.mark.parametrize(("headers", "status"), [
    ({}, 200),  # curl, scripts: no Origin, no Sec-Fetch-Site
    ({"Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"}, 200),  # the server's own page
    ({"Sec-Fetch-Site": "none"}, 200),  # typed or bookmarked, not sent by a page
    ({"Origin": "http://evil.example"}, 403),
    ({"Origin": "null"}, 403),  # sandboxed frames, file:// pages
    ({"Origin": "http://testserver:9999"}, 403),  # another port: another program's page
    ({"Sec-Fetch-Site": "cross-site"}, 403),
    ({"Sec-Fetch-Site": "same-site"}, 403),
])
def test_posts_from_other_origins_are_refused_before_any_work(headers: dict, status: int) -> None:
    app = create_app(FakeEngine())
    client = TestClient(app)
    r = client.post("/api/predict", headers=headers, files=files(("a.png", image((40, 30)))))
    assert r.status_code == status, r.text
    classified = app.state.classifier.calls
    if status == 403:
        detail = r.json()["detail"]
        assert detail.startswith("cross-origin request refused") and "\n" not in detail
        assert classified == 0 and app.state.refused == 1
    else:
        assert classified == 1 and app.state.refused == 0
    # Reading is not refused: a browser keeps another origin from reading the answer anyway.
    assert client.get("/api/model", headers=headers).status_code == 200


EVIL_PAGE = """<!doctype html><html><head><title>evil</title></head><body>
<form id="form" method="POST" enctype="multipart/form-data" action="{target}/api/predict">
  <input type="file" name="files" id="file"></form>
<script>
async function viaFetch() {{
  const bytes = Uint8Array.from(atob("{png}"), (c) => c.charCodeAt(0));
  const form = new FormData();
  form.append("files", new Blob([bytes], {{ type: "image/png" }}), "stolen.png");
  try {{ await fetch("{target}/api/predict", {{ method: "POST", mode: "no-cors", body: form }}); }}
  finally {{ document.title = "fetch sent"; }}
}}
</script></body></html>"""


@pytest.mark.integration
def test_another_local_page_cannot_classify_through_the_browser_while_the_own_page_can(tmp_path: Path) -> None:
    """A page served from another loopback port posts a form and a no-cors fetch: both refused."""
    import base64
    import functools
    import http.server

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    lesion = tmp_path / "lesion.png"
    lesion.write_bytes(image((60, 45)))
    app = create_app(FakeEngine())
    driver = headless_chromium(tmp_path)
    evil_root = tmp_path / "evil"
    evil_root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(evil_root))
    evil = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=evil.serve_forever, daemon=True).start()
    try:
        with background_server(app) as url:
            png = base64.b64encode(lesion.read_bytes()).decode()
            (evil_root / "index.html").write_text(EVIL_PAGE.format(target=url, png=png), encoding="utf-8")
            wait = WebDriverWait(driver, 120)
            driver.get(f"http://127.0.0.1:{evil.server_address[1]}/index.html")
            driver.execute_script("viaFetch()")
            wait.until(lambda d: d.title == "fetch sent")
            driver.find_element(By.ID, "file").send_keys(str(lesion))
            driver.execute_script("document.getElementById('form').submit()")
            wait.until(lambda d: d.current_url.startswith(url) and "refused" in d.find_element(By.TAG_NAME, "body").text)
            assert "cross-origin request refused" in driver.find_element(By.TAG_NAME, "body").text
            assert app.state.refused == 2 and app.state.classifier.calls == 0  # nothing was classified

            driver.get(url + "/")  # the server's own page still works
            wait.until(lambda d: d.find_element(By.ID, "model-name").text.startswith("fake-model"))
            driver.find_element(By.ID, "files").send_keys(str(lesion))
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "li.result[data-state='done']"))
            assert app.state.classifier.calls == 1 and app.state.refused == 2
    finally:
        driver.quit()
        evil.shutdown()
        evil.server_close()


# --- 2. decoding stays within its budget -----------------------------------------------------

def sixteen_bit_png(width: int, height: int) -> bytes:
    """A flat 16-bit greyscale PNG: a few KB on the wire, width x height pixels once decoded."""
    buf = io.BytesIO()
    Image.new("I;16", (width, height), 40000).save(buf, "PNG")
    return buf.getvalue()


def test_a_decode_that_does_not_fit_the_budget_is_503_with_retry_after() -> None:
    limits = Limits(max_decodes=2, max_image_pixels=10_000, max_decode_pixels=20_000, decode_wait_s=0)
    app = create_app(FakeEngine(), limits=limits)
    client = TestClient(app)
    gate = app.state.decode_gate
    with gate.admit(15_000):  # another request's decode holds most of the pixels
        busy = client.post("/api/predict", files=files(("a.png", image((100, 60)))))  # 6,000 more do not fit
        fits = client.post("/api/predict", files=files(("b.png", image((50, 40)))))  # 2,000 do
    assert busy.status_code == 503 and busy.headers["retry-after"] == "5"
    assert busy.json()["detail"].startswith("busy: 1 image(s) of 15,000 pixels are being decoded")
    assert fits.status_code == 200
    with gate.admit(0), gate.admit(0):  # both decode slots taken
        assert client.post("/api/predict", files=files(("b.png", image((50, 40))))).status_code == 503
    assert client.post("/api/predict", files=files(("a.png", image((100, 60))))).status_code == 200
    assert (gate.decoding, gate.pixels) == (0, 0)


def test_each_decode_holds_its_pixels_and_an_image_over_the_limit_is_never_decoded(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import skinclf.web.classifier as classifier_module

    limits = Limits(max_image_pixels=1_000_000, max_decode_pixels=1_000_000, decode_wait_s=0)
    app = create_app(FakeEngine(), limits=limits)
    gate = app.state.decode_gate
    held: list[tuple[int, int]] = []
    real_decode = classifier_module.decode_image

    def watched(data, size, **kwargs):
        held.append((gate.decoding, gate.pixels))
        return real_decode(data, size, **kwargs)

    monkeypatch.setattr(classifier_module, "decode_image", watched)
    bomb = sixteen_bit_png(2000, 1500)  # 3 megapixels behind a few KB
    assert len(bomb) < 50_000
    r = TestClient(app).post("/api/predict", files=files(("bomb.png", bomb), ("ok.png", image((80, 60)))))
    assert r.status_code == 200
    bad, good = r.json()["results"]
    assert bad["error"] == "image too large (2000x1500 pixels; the limit is 1,000,000)"
    assert good["error"] == "" and good["top1_class"]
    assert held == [(1, 80 * 60)]  # only the small one was decoded, holding its pixels
    assert (gate.decoding, gate.pixels) == (0, 0)


def test_decode_limits_are_checked_and_shown() -> None:
    with pytest.raises(SkinclfError, match="max-image-pixels 200 is over max-decode-pixels 100"):
        Limits(max_image_pixels=200, max_decode_pixels=100)
    with pytest.raises(SkinclfError, match="max-decodes 0: must be positive"):
        Limits(max_decodes=0)
    limits = TestClient(create_app(FakeEngine())).get("/api/model").json()["limits"]
    assert limits["max_decodes"] >= 1 and limits["max_image_pixels"] <= limits["max_decode_pixels"]

    from skinclf.data.images import MAX_PIXELS

    assert limits["max_image_pixels"] == MAX_PIXELS  # the serve and predict refuse the same images


# --- 3. a model thread that dies --------------------------------------------------------------

class Crash(BaseException):
    """Something the model thread cannot go on from."""


class DiesOnSecondCall(FakeEngine):
    """The first call answers; the second waits for `gate`, then fails in a way that ends the worker."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how, self.calls = how, 0
        self.gate, self.entered = threading.Event(), threading.Event()

    def logits(self, x: np.ndarray) -> np.ndarray:
        self.calls += 1
        if self.calls == 1:
            return super().logits(x)
        self.entered.set()
        self.gate.wait(timeout=60)
        if self.how == "raises":
            raise Crash("the runtime aborted")
        return np.zeros((len(x), 5), dtype="float32")  # outputs that no longer match the 7 classes


def wait_for(condition, what: str) -> None:
    """Wait for a condition (not for a duration); fail after a generous bound."""
    for _ in range(60_000):
        if condition():
            return
        time.sleep(0.001)
    pytest.fail(f"never happened: {what}")


@pytest.mark.parametrize("how", ["wrong shape", "raises"])
def test_a_dead_model_thread_fails_waiting_and_new_requests_and_health(how: str) -> None:
    engine = DiesOnSecondCall(how)
    classifier = Classifier(engine)
    client = TestClient(create_app(FakeEngine(), classifier=classifier))
    post = lambda name: client.post("/api/predict", files=files((name, image((40, 30)))))
    assert post("first.png").status_code == 200
    answers: dict[str, object] = {}
    threads = {name: threading.Thread(target=lambda n=name: answers.__setitem__(n, post(n))) for name in ("a", "b")}
    threads["a"].start()
    wait_for(engine.entered.is_set, "the second engine call started")
    threads["b"].start()
    wait_for(lambda: classifier._jobs.qsize() == 1, "request b is queued behind it")
    engine.gate.set()
    for t in threads.values():
        t.join(timeout=60)
        assert not t.is_alive(), "a request waiting on the dead model thread never got an answer"
    for name in ("a", "b"):
        assert answers[name].status_code == 503
        assert answers[name].json()["detail"].startswith("the model is not running (the model thread stopped: ")
    health = client.get("/healthz")
    assert health.status_code == 503 and health.json()["status"] == "error"
    assert ("shape (1, 5)" if how == "wrong shape" else "the runtime aborted") in health.json()["detail"]
    again = post("c.png")
    assert again.status_code == 503 and "restart skinclf serve" in again.json()["detail"]
    with pytest.raises(ModelUnavailable):
        classifier(np.zeros((1, 32, 32, 3), dtype="float32"))


def test_close_does_not_wait_for_ever_on_an_engine_that_hangs() -> None:
    release = threading.Event()

    class Hangs(FakeEngine):
        entered = threading.Event()

        def logits(self, x):
            self.entered.set()
            release.wait(timeout=120)
            return super().logits(x)

    engine = Hangs()
    classifier = Classifier(engine)
    answer: dict[str, BaseException] = {}

    def ask() -> None:
        try:
            classifier(np.zeros((1, 32, 32, 3), dtype="float32"))
        except BaseException as exc:  # noqa: BLE001 - what the waiting caller was told
            answer["error"] = exc

    caller = threading.Thread(target=ask)
    caller.start()
    wait_for(engine.entered.is_set, "the engine call started")
    try:
        classifier.close(timeout=0.1)
        caller.join(timeout=60)
        assert not caller.is_alive() and isinstance(answer["error"], ModelUnavailable)
        assert "stopped while the model was still running" in str(answer["error"])
    finally:
        release.set()


def test_a_model_whose_outputs_do_not_match_its_classes_is_refused_by_the_probe() -> None:
    probe_engine(FakeEngine())
    with pytest.raises(SkinclfError, match=r"gives 5 outputs per image but its metadata names 7 classes \(akiec, "):
        probe_engine(FakeEngine(outputs=5))


def mismatched_onnx(path: Path, *, classes: int = 5, outputs: int = 7) -> Path:
    """An ONNX model in skinclf's export format whose metadata names `classes` classes for `outputs` outputs."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("ReduceMean", ["image"], ["mean"], axes=[1, 2], keepdims=0),
             helper.make_node("MatMul", ["mean", "w"], ["logits"])]
    weights = numpy_helper.from_array(np.ones((3, outputs), dtype="float32") / 255, "w")
    graph = helper.make_graph(nodes, "mismatched",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 32, 32, 3])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", outputs])],
                              initializer=[weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    meta = {"name": "mismatched", "classes": TINY_CLASSES[:classes], "input_size": [32, 32]}
    helper.set_model_props(model, {"skinclf.json": json.dumps(meta)})
    onnx.save(model, path)
    return path


def test_cli_serve_refuses_a_mismatched_onnx_before_listening(runner, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("onnxruntime")
    from skinclf.cli import app as cli_app
    from skinclf.web import server as serve_module

    def no_listen(host, port):
        raise AssertionError("the port was opened for a model that cannot work")

    monkeypatch.setattr(serve_module, "_listen", no_listen)
    model = mismatched_onnx(tmp_path / "bad.onnx")
    result = runner.invoke(cli_app, ["serve", "--model", str(model), "--port", "0"])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in result.output
    assert "7" in lines[0] and "5 classes" in lines[0]


SERVER_SCRIPT = """
import dataclasses, sys, threading
import numpy as np
from skinclf.web import server
from skinclf.web.routes import create_app
from skinclf.web.classifier import Classifier

hang = threading.Event()
class Engine:
    classes = {classes!r}
    image_size, batch_size, meta, path = 32, 4, {{}}, "model.onnx"
    def identity(self):
        return {{"name": "broken", "sha256": "0" * 64, "engine": "test"}}
    def logits(self, x):
        if {mode!r} == "hangs":
            print("in the engine", flush=True)
            hang.wait()
        return np.zeros((len(x), 5), dtype="float32")  # 5 outputs for 7 classes: the worker dies

server.SERVE = dataclasses.replace(server.SERVE, shutdown_s=1)
sock = server._listen("127.0.0.1", 0)
print(sock.getsockname()[1], flush=True)
app = create_app(Engine(), classifier=Classifier(Engine()))
server.serve_until_stopped(app, sock)
"""


def http_request(port: int, method: str, path: str, body: bytes = b"", headers: dict | None = None,
                 timeout: float = 60) -> tuple[int, bytes]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def multipart(name: str, data: bytes, boundary: str = "skinclf-test-boundary") -> tuple[bytes, dict]:
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}", "Content-Length": str(len(body))}


@pytest.mark.parametrize("mode", ["dies", "hangs"])
def test_sigterm_stops_a_server_whose_model_thread_died_or_hangs(mode: str, tmp_path: Path) -> None:
    script = tmp_path / "server.py"
    script.write_text(SERVER_SCRIPT.format(classes=TINY_CLASSES, mode=mode), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=tmp_path)
    try:
        port = int(proc.stdout.readline())
        body, headers = multipart("a.png", image((40, 30)))
        if mode == "dies":
            status, answer = http_request(port, "POST", "/api/predict", body, headers)
            assert status == 503 and b"the model is not running" in answer
            status, answer = http_request(port, "GET", "/healthz")
            assert status == 503 and b"shape (1, 5)" in answer
        else:  # a request stays in the engine while the server is told to stop
            def stuck_request() -> None:
                try:
                    http_request(port, "POST", "/api/predict", body, headers)
                except OSError:  # the server went away under it: what stopping means
                    pass

            stuck = threading.Thread(target=stuck_request, daemon=True)
            stuck.start()
            assert proc.stdout.readline().strip() == "in the engine"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)  # a bound for a hang, not a measured time
        # uvicorn stops, then re-raises the signal it caught: the process ends as SIGTERM says.
        assert proc.returncode in (0, -signal.SIGTERM), err
        assert "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- 4. a refused upload's answer reaches a real client --------------------------------------

def test_a_refused_upload_gets_its_413_status_and_detail_over_a_real_socket() -> None:
    body, headers = multipart("big.jpg", os.urandom(16 * 1024 * 1024))  # far beyond what socket buffers absorb
    with background_server(create_app(FakeEngine(), limits=Limits(max_file_bytes=1000))) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            head = f"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
            sock.sendall(head.encode() + body)  # as curl does: the whole body, then read the answer
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
    status_line, _, rest = received.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 413 ")
    assert json.loads(rest.partition(b"\r\n\r\n")[2]) == {
        "detail": "big.jpg: over the limit of 1,000 bytes per file (0.0009537 MiB, --max-file-mb)"}


# --- 5 and 6. the page: every warning shown and counted, names kept exactly -----------------

@pytest.mark.integration
def test_page_shows_and_counts_warnings_and_keeps_names_with_quotes(tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from skinclf.data.images import MIN_SIDE_SHARE

    folder = tmp_path / "visit"
    folder.mkdir()
    side = int(FakeEngine.image_size * MIN_SIDE_SHARE) - 2  # far below the model's input: a warning
    named = {"normal.png": image((160, 120)), "tiny.png": image((side, side)), 'say "cheese".png': image((90, 70), seed=2)}
    for name, data in named.items():
        (folder / name).write_bytes(data)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    driver = headless_chromium(downloads)
    try:
        with background_server(create_app(FakeEngine())) as url:
            driver.get(url + "/")
            wait = WebDriverWait(driver, 120)
            wait.until(lambda d: d.find_element(By.ID, "model-name").text.startswith("fake-model"))
            driver.find_element(By.ID, "files").send_keys("\n".join(str(folder / n) for n in named))
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "li.result[data-state='done']")) == 3)
            rows = {li.get_attribute("data-path"): li for li in driver.find_elements(By.CSS_SELECTOR, "li.result")}
            assert set(rows) == set(named)
            warning = rows["tiny.png"].find_element(By.CLASS_NAME, "warning")
            assert warning.is_displayed() and rows["tiny.png"].get_attribute("data-warning") == "true"
            assert warning.text == (f"\u26a0 Warning: image is {side}x{side} pixels, far below the model's 32x32 "
                                    "input: the result is unreliable")
            assert not rows["normal.png"].find_elements(By.CLASS_NAME, "warning")
            assert driver.find_element(By.ID, "status").text.startswith(
                "3 images: 3 classified, 0 with errors, 1 with warnings.")
            driver.find_element(By.ID, "download").click()
            target = downloads / "results.csv"
            wait.until(lambda d: target.exists() and not list(downloads.glob("*.crdownload")))
    finally:
        driver.quit()
    got = list(csv.DictReader(io.StringIO(target.read_text(encoding="utf-8"))))
    assert [r["path"] for r in got] == sorted(named)  # 'say "cheese".png', not 'say %22cheese%22.png'
    assert [bool(r["warning"]) for r in got] == [False, False, True]


@pytest.mark.integration
def test_page_waits_and_tries_again_while_the_server_is_busy_decoding(tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    lesion = tmp_path / "lesion.png"
    lesion.write_bytes(image((60, 45)))
    limits = Limits(decode_wait_s=0)
    app = create_app(FakeEngine(), limits=limits)
    driver = headless_chromium(tmp_path)
    try:
        with background_server(app) as url:
            driver.get(url + "/")
            wait = WebDriverWait(driver, 120)
            wait.until(lambda d: d.find_element(By.ID, "model-name").text.startswith("fake-model"))
            with app.state.decode_gate.admit(limits.max_decode_pixels):  # every pixel is taken: 503, Retry-After
                driver.find_element(By.ID, "files").send_keys(str(lesion))
                wait.until(lambda d: "The server is busy" in d.find_element(By.ID, "status").text)
                assert driver.find_element(By.CSS_SELECTOR, "li.result").get_attribute("data-state") == "pending"
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "li.result[data-state='done']"))
            assert app.state.classifier.calls == 1
    finally:
        driver.quit()
