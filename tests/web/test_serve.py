"""`skinclf serve`: the JSON API, its limits, the page in a real browser, and the CLI command.

A tiny MobileNet (alpha 0.25, 64 px, random weights made well-conditioned) stands in for the
bundled model in unit tests; one integration test uses the bundled model itself. The CSV the
API writes must equal `skinclf predict`'s for the same files, to the last digit.
"""

from __future__ import annotations

import csv
import io
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from utils.paths import require, BUNDLED_MODEL, SHARED_FULLRES
from utils.synthetic import lesion_image, CLASS_COLOURS
from utils.browser import headless_chromium
from PIL import Image

from skinclf.batch.results import DISCLAIMER, columns
from skinclf.cli import app as cli_app

pytest.importorskip("fastapi", reason="skinclf[serve] (FastAPI) is not installed")
from fastapi.testclient import TestClient  # noqa: E402

from skinclf.web import server as serve_module  # noqa: E402
from skinclf.web.routes import create_app  # noqa: E402
from skinclf.web.classifier import Classifier, Limits

TINY_CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


def build_tiny_mobilenet(path: Path) -> Path:
    """MobileNet alpha 0.25 at 64 px without pretrained weights, saved as a bundle with the
    metadata `skinclf train` writes. Random weights make every output the same 1/7, so the
    batch norms get statistics from a probe batch and the classifier is scaled: the outputs
    then differ per image, as a trained model's do."""
    from skinclf.backend import load_keras
    from skinclf.model.bundle import save_bundle
    from skinclf.model.network import PREPROCESSING, build_model

    keras = load_keras()
    keras.utils.set_random_seed(0)
    model = build_model(num_classes=7, image_size=64, alpha=0.25, weights=None)
    h = np.random.default_rng(0).uniform(0, 255, (8, 64, 64, 3)).astype("float32")
    for layer in model.layers[1:]:
        if isinstance(layer, keras.layers.BatchNormalization):
            a = np.asarray(h)
            gamma, beta, _, _ = layer.get_weights()
            layer.set_weights([gamma, beta, a.mean((0, 1, 2)), a.var((0, 1, 2)) + 1e-3])
        if layer.name == "predictions":
            f = np.asarray(h)
            kernel, bias = layer.get_weights()
            scale = 2.0 / ((f - f.mean(0)) @ kernel).std()
            layer.set_weights([kernel * scale, bias - (f.mean(0) @ kernel) * scale])
        h = layer(h, training=False)
    meta = {
        "name": "tiny-mobilenet", "classes": TINY_CLASSES, "input_size": [64, 64], "preprocessing": PREPROCESSING,
        "metrics": {"validation": {"n": 70, "accuracy": 0.5, "balanced_accuracy": 0.4321, "macro_auc": 0.7,
                                   "top_k_accuracy": {"1": 0.5, "2": 0.7, "3": 0.8},
                                   "melanoma": {"at_decision": {"sensitivity": 0.6, "specificity": 0.9}},
                                   "confusion_matrix": [[1]]}},
    }
    return save_bundle(model, path, meta)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_mobilenet(tmp_path_factory.mktemp("serve") / "tiny-mobilenet.keras")


@pytest.fixture(scope="session")
def engine(tiny_model: Path):
    from skinclf.engines.load import load_engine

    return load_engine(tiny_model, batch_size=16)


@pytest.fixture(scope="session")
def client(engine) -> TestClient:
    return TestClient(create_app(engine))


def jpeg(seed: int, colour=CLASS_COLOURS["mel"], size=(160, 120)) -> bytes:
    buf = io.BytesIO()
    lesion_image(colour, seed, size).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    lesion_image(CLASS_COLOURS["bcc"], seed, (90, 70)).convert("RGBA").save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def visit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A visit's folder as predict sees it: JPEGs, a PNG in a sub-folder, a corrupt and an empty file."""
    root = tmp_path_factory.mktemp("visit") / "visit"
    (root / "back").mkdir(parents=True)
    for i, colour in enumerate(("mel", "nv", "bkl", "vasc")):
        (root / f"lesion_{i}.jpg").write_bytes(jpeg(i, CLASS_COLOURS[colour]))
    (root / "back" / "mole.png").write_bytes(png(7))
    (root / "scan_0001.jpg").write_bytes(jpeg(9)[:300])  # truncated
    (root / "empty.jpg").write_bytes(b"")
    (root / "notes.jpg").write_bytes(b"not an image at all")
    return root


def upload(folder: Path) -> list[tuple[str, tuple[str, bytes, str]]]:
    """Every image of `folder` as multipart files named by their path relative to it."""
    from skinclf.batch.predict import list_images

    return [("files", (rel, (folder / rel).read_bytes(), "application/octet-stream"))
            for rel in list_images(folder, recursive=True).files]


def predict_csv(folder: Path, model: Path, out: Path, **options) -> str:
    from skinclf.batch.predict import predict_directory

    predict_directory(directory=folder, out=out, model=model, batch_size=16, show_progress=False, **options)
    return out.read_text(encoding="utf-8")


# --- decoding from memory ------------------------------------------------------------------

def test_decode_image_matches_load_image_for_every_kind_of_file(visit: Path) -> None:
    from skinclf.data.images import ImageError, decode_image, load_image

    for path in sorted(p for p in visit.rglob("*") if p.is_file()):
        try:
            expected = load_image(path, 64)
        except ImageError as exc:
            with pytest.raises(ImageError) as raised:
                decode_image(path.read_bytes(), 64)
            assert str(raised.value) == str(exc)
        else:
            np.testing.assert_array_equal(decode_image(path.read_bytes(), 64), expected)


# --- the API -------------------------------------------------------------------------------

def test_healthz_and_model(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    info = client.get("/api/model").json()
    assert info["classes"] == TINY_CLASSES
    assert info["identity"]["name"] == "tiny-mobilenet" and len(info["identity"]["sha256"]) == 64
    assert info["identity"]["engine"] == "keras"
    assert info["metrics"]["validation"]["balanced_accuracy"] == 0.4321
    assert "confusion_matrix" not in info["metrics"]["validation"]
    assert info["disclaimer"] == DISCLAIMER
    assert info["limits"] == {"max_file_bytes": 25 * 1024 * 1024, "max_files": 64, "max_request_bytes": 256 * 1024 * 1024,
                              "max_decodes": 2, "max_image_pixels": 80_000_000, "max_decode_pixels": 100_000_000,
                              "decode_wait_s": 30.0}
    assert info["columns"] == columns(TINY_CLASSES, 3, False)


def test_page_is_self_contained_and_served_without_cookies(client: TestClient) -> None:
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert "webkitdirectory" in page and "/api/predict" in page and "Download CSV" in page
    for external in ('src="http', "src='http", 'href="http', "url(http", "@import", "@font-face", "//cdn"):
        assert external not in page
    assert "default-src 'none'" in r.headers["content-security-policy"]
    assert "connect-src 'self'" in r.headers["content-security-policy"]
    assert "set-cookie" not in r.headers
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/api/predict" in docs.text and "<script" not in docs.text
    assert "/api/predict" in client.get("/openapi.json").json()["paths"]


def test_good_uploads_get_one_result_per_file_with_the_csv_fields(client: TestClient) -> None:
    files = [("files", ("a.jpg", jpeg(1), "image/jpeg")), ("files", ("sub/b.png", png(2), "image/png"))]
    r = client.post("/api/predict", files=files)
    assert r.status_code == 200
    body = r.json()
    assert body["columns"] == columns(TINY_CLASSES, 3, False)
    assert body["disclaimer"] == DISCLAIMER and body["model"]["name"] == "tiny-mobilenet"
    assert body["errors"] == 0
    assert [res["path"] for res in body["results"]] == ["a.jpg", "sub/b.png"]
    for res in body["results"]:
        assert list(res) == body["columns"]
        assert res["error"] == "" and res["top1_class"] in TINY_CLASSES
        assert float(res["top1_prob"]) >= float(res["top2_prob"]) >= float(res["top3_prob"]) > 0


def test_bad_files_are_rows_with_errors_never_a_500(client: TestClient) -> None:
    files = [("files", ("empty.jpg", b"", "image/jpeg")),
             ("files", ("truncated.jpg", jpeg(3)[:200], "image/jpeg")),
             ("files", ("report.pdf", b"%PDF-1.4 not an image", "application/pdf"))]
    r = client.post("/api/predict", files=files)
    assert r.status_code == 200
    results = r.json()["results"]
    assert r.json()["errors"] == 3
    assert [x["error"] for x in results] == ["empty file (0 bytes)", results[1]["error"],
                                             "not a recognised image file (skinclf reads JPEG, PNG, BMP and TIFF only)"]
    assert results[1]["error"].startswith(("cannot decode image", "not a recognised image file"))
    assert all(x["top1_class"] == "" and x["top1_prob"] == "" for x in results)


def test_mixed_upload_keeps_order_and_the_good_files_results(client: TestClient) -> None:
    alone = client.post("/api/predict", files=[("files", ("good.jpg", jpeg(5), "image/jpeg"))]).json()["results"][0]
    mixed = client.post("/api/predict", params={"top_k": 2, "all_probs": True}, files=[
        ("files", ("bad.jpg", b"\xff\xd8garbage", "image/jpeg")),
        ("files", ("good.jpg", jpeg(5), "image/jpeg")),
    ]).json()
    assert mixed["columns"] == columns(TINY_CLASSES, 2, True)
    bad, good = mixed["results"]
    assert bad["path"] == "bad.jpg" and bad["error"] and bad["prob_mel"] == ""
    assert good["error"] == "" and good["top1_class"] == alone["top1_class"] and good["top1_prob"] == alone["top1_prob"]
    assert abs(sum(float(good[f"prob_{c}"]) for c in TINY_CLASSES) - 1) < 1e-3


def test_csv_download_equals_skinclf_predict_to_the_last_digit(client: TestClient, visit: Path, tiny_model: Path,
                                                              tmp_path: Path) -> None:
    expected = predict_csv(visit, tiny_model, tmp_path / "results.csv")
    got = client.post("/api/predict", params={"format": "csv"}, files=upload(visit))
    assert got.status_code == 200 and got.headers["content-type"].startswith("text/csv")
    assert got.text == expected
    rows = list(csv.DictReader(io.StringIO(expected)))
    assert sum(1 for r in rows if r["error"]) == 3 and len(rows) == 8  # the test can fail: errors are in there

    expected_all = predict_csv(visit, tiny_model, tmp_path / "all.csv", top_k=2, all_probs=True)
    assert client.post("/api/predict", params={"format": "csv", "top_k": 2, "all_probs": True},
                       files=upload(visit)).text == expected_all
    # The JSON results carry the same cells.
    body = client.post("/api/predict", params={"top_k": 2, "all_probs": True}, files=upload(visit)).json()
    assert sorted([list(r.values()) for r in body["results"]]) == [
        row for row in csv.reader(io.StringIO(expected_all))][1:]


@pytest.mark.parametrize(("limits", "files", "status", "message"), [
    (Limits(max_files=2), 3, 413, "more than 2 files"),
    (Limits(max_file_bytes=1000), 1, 413, "over the limit of 1,000 bytes per file"),
    (Limits(max_request_bytes=5000), 2, 413, "over the limit of 5,000 bytes"),
])
def test_limits_are_413_with_a_clear_message(engine, limits: Limits, files: int, status: int, message: str) -> None:
    client = TestClient(create_app(engine, limits=limits))
    r = client.post("/api/predict", files=[("files", (f"{i}.jpg", jpeg(i, size=(300, 200)), "image/jpeg"))
                                           for i in range(files)])
    assert r.status_code == status
    assert message in r.json()["detail"]
    small = io.BytesIO()
    Image.new("RGB", (8, 8), (120, 80, 60)).save(small, "PNG")
    ok = client.post("/api/predict", files=[("files", ("small.png", small.getvalue(), "image/png"))])
    assert ok.status_code == 200  # the limits are per request: the next small one goes through


def test_requests_that_are_not_uploads_are_422(client: TestClient) -> None:
    assert client.post("/api/predict", json={"files": []}).status_code == 422
    only_field = client.post("/api/predict", content=b'--xx\r\nContent-Disposition: form-data; name="note"\r\n\r\nhi\r\n--xx--\r\n',
                             headers={"content-type": "multipart/form-data; boundary=xx"})
    assert only_field.status_code == 422 and "no files" in only_field.json()["detail"]
    broken = client.post("/api/predict", content=b"--xx\r\nthis is not a multipart body",
                         headers={"content-type": "multipart/form-data; boundary=xx"})
    assert broken.status_code == 422
    bad_k = client.post("/api/predict", params={"top_k": 8}, files=[("files", ("a.jpg", jpeg(1), "image/jpeg"))])
    assert bad_k.status_code == 422
    assert client.post("/api/predict", params={"format": "xml"}, files=[("files", ("a.jpg", jpeg(1))) ]).status_code == 422


def test_uploads_never_touch_the_disk_or_the_logs(client: TestClient, monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    import tempfile

    def no_disk(*args, **kwargs):
        raise AssertionError("an upload was about to be written to a temporary file")

    for name in ("SpooledTemporaryFile", "TemporaryFile", "NamedTemporaryFile", "mkstemp"):
        monkeypatch.setattr(tempfile, name, no_disk)
    big = np.random.default_rng(0).integers(0, 255, (1200, 1600, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, "JPEG", quality=95)
    assert len(buf.getvalue()) > 2 * 1024 * 1024  # beyond the 1 MB at which form parsers spool to disk
    caplog.set_level("DEBUG")
    r = client.post("/api/predict", files=[("files", ("patient-jane-doe.jpg", buf.getvalue(), "image/jpeg"))])
    assert r.status_code == 200 and r.json()["results"][0]["error"] == ""
    assert "jane-doe" not in caplog.text


def test_only_loopback_host_names_are_answered_when_bound_to_loopback(engine) -> None:
    client = TestClient(create_app(engine, allowed_hosts=["127.0.0.1", "localhost", "::1"]),
                        base_url="http://127.0.0.1:8000")
    assert client.get("/healthz").status_code == 200
    assert client.get("/healthz", headers={"host": "evil.example:8000"}).status_code == 400


def test_concurrent_requests_share_one_engine_and_get_their_own_results(engine) -> None:
    client = TestClient(create_app(engine))
    payloads = [[("files", (f"r{r}_{i}.jpg", jpeg(10 * r + i), "image/jpeg")) for i in range(3)] for r in range(6)]
    expected = [client.post("/api/predict", files=p).json()["results"] for p in payloads]
    got: list = [None] * len(payloads)

    def post(k: int) -> None:
        got[k] = client.post("/api/predict", files=payloads[k]).json()["results"]

    threads = [threading.Thread(target=post, args=(k,)) for k in range(len(payloads))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == expected


class GatedEngine:
    """An engine whose first call waits for a gate, so later requests queue up behind it."""

    classes = TINY_CLASSES

    def __init__(self, batch_size: int = 16) -> None:
        self.batch_size = batch_size
        self.gate, self.entered = threading.Event(), threading.Event()
        self.batches: list[int] = []

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.batches.append(len(x))
        self.entered.set()
        self.gate.wait(timeout=60)
        out = np.zeros((len(x), len(self.classes)), dtype="float32")
        out[:, 0] = x[:, 0, 0, 0]  # each image's own answer
        return out


@pytest.mark.parametrize(("batch_size", "expected"), [
    (16, [2, 2 + 3 + 4]),  # everything that queued meanwhile in one call
    (4, [2, 4, 4, 1]),  # full batches across requests: 2+2 of request 3, 1 of it + 3 of request 4, ...
])
def test_classifier_runs_queued_requests_together_in_full_batches(batch_size: int, expected: list[int]) -> None:
    engine = GatedEngine(batch_size)
    classifier = Classifier(engine)
    results: dict[int, np.ndarray] = {}

    def ask(k: int, n: int) -> None:
        results[k] = classifier(np.full((n, 2, 2, 3), k, dtype="float32"))

    first = threading.Thread(target=ask, args=(1, 2))
    first.start()
    assert engine.entered.wait(timeout=60)  # the worker is inside the first call
    later = []
    for k in (2, 3, 4):  # queued one after another, so their order in the queue is known
        later.append(threading.Thread(target=ask, args=(k, k)))
        later[-1].start()
        for _ in range(60_000):  # wait for a condition (this request queued), not for a duration
            if classifier._jobs.qsize() == len(later):
                break
            time.sleep(0.001)
        assert classifier._jobs.qsize() == len(later)
    engine.gate.set()
    for t in (first, *later):
        t.join()
    classifier.close()
    assert engine.batches == expected
    for k, n in ((1, 2), (2, 2), (3, 3), (4, 4)):
        assert results[k].shape == (n, 7) and (results[k][:, 0] == k).all()


def test_a_failing_engine_is_a_500_for_that_request_only(engine) -> None:
    class Broken:
        classes = TINY_CLASSES
        batch_size = 16

        def __call__(self, x):
            raise RuntimeError("out of memory")

    client = TestClient(create_app(engine, classifier=Classifier(Broken())), raise_server_exceptions=False)
    assert client.post("/api/predict", files=[("files", ("a.jpg", jpeg(1), "image/jpeg"))]).status_code == 500
    assert client.post("/api/predict", files=[("files", ("bad.jpg", b"x", "image/jpeg"))]).status_code == 200


# --- the bundled model ---------------------------------------------------------------------

@pytest.mark.integration
@pytest.mark.slow
def test_bundled_model_csv_equals_predict(tmp_path: Path) -> None:
    from skinclf.engines.load import load_engine

    model = require(BUNDLED_MODEL)
    samples = sorted(require(SHARED_FULLRES).glob("*.jpg"))[:24]
    folder = tmp_path / "visit"
    folder.mkdir()
    for path in samples:
        shutil.copy(path, folder / path.name)
    (folder / "scan_0001.jpg").write_bytes(samples[0].read_bytes()[:1000])
    expected = predict_csv(folder, model, tmp_path / "results.csv")
    client = TestClient(create_app(load_engine(model, batch_size=16)))
    assert client.get("/api/model").json()["identity"]["name"] == "skinclf-mobilenet"
    got = client.post("/api/predict", params={"format": "csv"}, files=upload(folder))
    assert got.text == expected
    rows = list(csv.DictReader(io.StringIO(expected)))
    assert len(rows) == 25 and [r["path"] for r in rows if r["error"]] == ["scan_0001.jpg"]


# --- the command ---------------------------------------------------------------------------

def test_cli_serve_loads_once_prints_the_url_and_serves(runner, tiny_model: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import skinclf.engines.load

    loads: list[Path] = []
    real_load = skinclf.engines.load.load_engine

    def counting_load(path, **kwargs):
        loads.append(Path(path))
        return real_load(path, **kwargs)

    seen: dict = {}

    def fake_run(app, sock) -> None:  # instead of uvicorn: answer a request, then return
        seen["bound"] = sock.getsockname()
        client = TestClient(app, base_url=f"http://127.0.0.1:{sock.getsockname()[1]}")
        seen["health"] = client.get("/healthz").json()
        seen["predict"] = client.post("/api/predict", files=[("files", ("a.jpg", jpeg(1), "image/jpeg"))]).status_code

    monkeypatch.setattr(skinclf.engines.load, "load_engine", counting_load)
    monkeypatch.setattr(serve_module, "_run_server", fake_run)
    result = runner.invoke(cli_app, ["serve", "--model", str(tiny_model), "--port", "0"])
    assert result.exit_code == 0, result.output
    port = seen["bound"][1]
    assert f"Open http://127.0.0.1:{port}/ in a browser" in result.output
    assert "tiny-mobilenet" in result.output and "Warning" not in result.output
    assert seen["bound"][0] == "127.0.0.1" and seen["health"] == {"status": "ok"} and seen["predict"] == 200
    assert loads == [tiny_model]


def test_cli_serve_warns_when_not_on_loopback(runner, tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serve_module, "_run_server", lambda app, sock: None)
    result = runner.invoke(cli_app, ["serve", "--model", str(tiny_model), "--host", "0.0.0.0", "--port", "0"])
    assert result.exit_code == 0, result.output
    assert "Warning: listening on 0.0.0.0" in result.output and "no authentication" in result.output


def test_cli_serve_without_the_extra_is_one_line(runner, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi -> ImportError
    result = runner.invoke(cli_app, ["serve"])
    assert result.exit_code == 1
    assert result.output.strip() == 'Error: skinclf serve needs FastAPI: pip install "skinclf[serve]"'


def test_cli_serve_failures_are_one_line(runner, tiny_model: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serve_module, "_run_server", lambda app, sock: None)
    missing = runner.invoke(cli_app, ["serve", "--model", str(tmp_path / "nope.keras")])
    assert missing.exit_code == 1 and missing.output.startswith("Error: model file not found")
    import socket

    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        taken = runner.invoke(cli_app, ["serve", "--model", str(tiny_model), "--port", str(port)])
    assert taken.exit_code == 1 and f"Error: cannot listen on 127.0.0.1:{port}" in taken.output
    bad_engine = runner.invoke(cli_app, ["serve", "--model", str(tiny_model), "--engine", "tpu"])
    assert bad_engine.exit_code == 1 and "--engine 'tpu'" in bad_engine.output
    bad_limit = runner.invoke(cli_app, ["serve", "--model", str(tiny_model), "--max-files", "0"])
    assert bad_limit.exit_code == 1 and "Error: --max-files 0: must be positive" in bad_limit.output
    bad_size = runner.invoke(cli_app, ["serve", "--model", str(tiny_model), "--max-file-mb", "0"])
    assert bad_size.exit_code == 1 and "Error: --max-file-mb 0.0: must be positive" in bad_size.output


# --- the page in a real browser ------------------------------------------------------------

@pytest.mark.integration
def test_page_in_headless_chromium_classifies_uploads_and_downloads_the_predict_csv(
        engine, tiny_model: Path, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from skinclf.web.server import background_server

    folder = tmp_path / "visit"
    folder.mkdir()
    samples = sorted(SHARED_FULLRES.glob("*.jpg"))[:2] if SHARED_FULLRES.is_dir() else []
    for i, path in enumerate(samples):
        shutil.copy(path, folder / path.name)
    for i in range(2 - len(samples)):
        (folder / f"lesion_{i}.jpg").write_bytes(jpeg(i, CLASS_COLOURS["nv"], (600, 450)))
    (folder / "scan_0001.jpg").write_bytes(jpeg(3)[:400])  # corrupt: cut off mid-file
    expected = predict_csv(folder, tiny_model, tmp_path / "results.csv")
    expected_rows = {r["path"]: r for r in csv.DictReader(io.StringIO(expected))}
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    driver = headless_chromium(downloads)
    try:
        with background_server(create_app(engine)) as url:
            driver.get(url + "/")
            wait = WebDriverWait(driver, 120)
            wait.until(lambda d: d.find_element(By.ID, "model-name").text.startswith("tiny-mobilenet"))
            assert "not a diagnosis" in driver.find_element(By.CLASS_NAME, "disclaimer").text
            driver.find_element(By.TAG_NAME, "body").send_keys(Keys.TAB)  # keyboard: the first stop picks images
            assert driver.switch_to.active_element.get_attribute("id") == "pick-files"
            driver.find_element(By.ID, "files").send_keys("\n".join(str(p) for p in sorted(folder.iterdir())))
            finished = "li.result[data-state='done'], li.result[data-state='error']"
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, finished)) == 3)
            rows = {li.get_attribute("data-path"): li for li in driver.find_elements(By.CSS_SELECTOR, "li.result")}
            assert set(rows) == set(expected_rows)
            for path, li in rows.items():
                want = expected_rows[path]
                if want["error"]:
                    assert li.get_attribute("data-state") == "error"
                    assert want["error"] in li.find_element(By.CLASS_NAME, "error").text
                else:
                    assert li.get_attribute("data-state") == "done"
                    assert li.get_attribute("data-top1") == want["top1_class"]
                    assert want["top1_prob"] in li.find_element(By.CLASS_NAME, "bars").text
            Select(driver.find_element(By.ID, "sort")).select_by_value("mel")
            order = [li.get_attribute("data-path") for li in driver.find_elements(By.CSS_SELECTOR, "li.result")]
            assert order[-1] == "scan_0001.jpg"  # errors last; the rest by melanoma probability
            driver.find_element(By.ID, "download").click()
            target = downloads / "results.csv"
            wait.until(lambda d: target.exists() and not list(downloads.glob("*.crdownload")))
            assert target.read_text(encoding="utf-8") == expected
    finally:
        driver.quit()
