"""`skinclf predict --ray`: the same CSV as on one machine, through kills of the driver and of a worker.

Each Ray run is the `skinclf` command in a subprocess (with a timeout): `--ray local` re-runs
itself in a network namespace of its own, so all Ray traffic stays on loopback, with no
dashboard and usage statistics off. Runs use 2 CPUs and fractional-CPU actors. The kill tests
are driven by test hooks (an actor that exits once, a driver that stops after its first batch),
so nothing depends on timing. The option checks run in-process (CliRunner) and start no Ray.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from skinclf.model.outlier import WARNINGS
from PIL import Image

from utils.models import make_tiny_onnx, random_spec
from utils.paths import REPO
from utils.synthetic import lesion_image, CLASSES, CLASS_COLOURS

RAY_TIMEOUT = 150  # seconds for one Ray run; a hang fails the test instead of the suite


def _namespace_flags() -> list[str] | None:
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    flags = ["--net"] if os.geteuid() == 0 else ["--map-root-user", "--net"]
    probe = subprocess.run([unshare, *flags, "true"], capture_output=True, check=False)
    return flags if probe.returncode == 0 else None


def _can_run_ray() -> str | None:
    try:
        import ray.data  # noqa: F401
    except ImportError:
        return 'Ray is not installed (pip install "skinclf[ray]")'
    if sys.platform != "linux" or _namespace_flags() is None:
        return "no network namespace can be made here (unshare), so Ray cannot be kept on loopback"
    return None


needs_ray = pytest.mark.skipif(bool(_can_run_ray()), reason=_can_run_ray() or "")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 images in two folders, a corrupt file, an empty one, a broken link and a far-too-small image."""
    root = tmp_path_factory.mktemp("ray") / "images"
    colours = list(CLASS_COLOURS.values())
    for i in range(24):
        where = root / ("b" if i % 3 == 0 else "a")
        where.mkdir(parents=True, exist_ok=True)
        lesion_image(colours[i % len(colours)], i).save(where / f"lesion_{i:02d}.jpg")
    (root / "a" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    (root / "b" / "empty.png").write_bytes(b"")
    (root / "b" / "gone.jpg").symlink_to(root / "nowhere.jpg")
    Image.new("RGB", (4, 4), (120, 80, 60)).save(root / "tiny.png")
    return root


@pytest.fixture(scope="module")
def model(folder: Path) -> Path:
    """The conftest's tiny ONNX model, with an energy threshold that flags about half the images."""
    from skinclf.data.images import load_image
    from skinclf.engines.onnx import OnnxEngine
    from skinclf.model.outlier import ood_scores

    plain = make_tiny_onnx(folder.parent / "plain.onnx")
    images = np.stack([load_image(p, 32) for p in sorted(folder.rglob("lesion_*.jpg"))]).astype("float32")
    energy = ood_scores(OnnxEngine(plain, batch_size=8).logits(images), "energy")
    meta = {"format": "skinclf-bundle/1", "name": "tiny-onnx", "classes": list(CLASSES), "input_size": [32, 32],
            "export": {"format": "onnx", "source_sha256": ""},
            "ood": {"score": "energy", "threshold": float(np.median(energy)), "pass_rate": 0.5}}
    return make_tiny_onnx(folder.parent / "tiny.onnx", meta=meta)


@pytest.fixture(scope="module")
def reference(folder: Path, model: Path) -> list[list[str]]:
    """The embedded pipeline's CSV rows for the folder."""
    from skinclf.batch.predict import predict_directory

    out = folder.parent / "embedded.csv"
    predict_directory(directory=folder, out=out, model=model, batch_size=4, workers=1, show_progress=False)
    return _rows(out)


def _rows(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))


def _same(rows: list[list[str]], reference: list[list[str]]) -> None:
    """Same header, rows, classes, errors and warnings; probabilities and scores to 1e-6."""
    assert rows[0] == reference[0]
    assert [r[0] for r in rows] == [r[0] for r in reference]
    header = reference[0]
    numbers = [i for i, c in enumerate(header) if c.endswith("_prob") or c.startswith("prob_") or c in ("ood_percentile", "mel_prob")]
    for got, want in zip(rows[1:], reference[1:]):
        for i, (a, b) in enumerate(zip(got, want)):
            if i in numbers and a and b:
                assert abs(float(a) - float(b)) <= 1e-6, (header[i], got, want)
            else:
                assert a == b, (header[i], got, want)


def _command(folder: Path, model: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "skinclf", "predict", str(folder), "--out", str(out), "--model", str(model),
            "--batch-size", "4", "--ray", "local", *extra]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "SKINCLF_RAY"))}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {**env, **extra}


def _skinclf(*command: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=_env(**env), capture_output=True, text=True, timeout=RAY_TIMEOUT,
                          check=False, stdin=subprocess.DEVNULL)


@needs_ray
def test_ray_local_writes_the_embedded_pipelines_csv_and_strict_fails_after_writing(
        folder: Path, model: Path, reference: list[list[str]], tmp_path: Path) -> None:
    out, home = tmp_path / "ray.csv", tmp_path / "home"
    home.mkdir()
    done = _skinclf(*_command(folder, model, out, "--ray-workers", "2", "--strict"), HOME=str(home))
    assert list(home.iterdir()) == []  # no ~/.ray/auth_token (Ray's own token file) or anything else
    _same(_rows(out), reference)
    errors = [r for r in reference[1:] if r[-2]]
    assert {r[0] for r in errors} == {"a/corrupt.jpg", "b/empty.png", "b/gone.jpg"}
    assert any(r[-1] for r in reference[1:] if r[0] == "tiny.png")  # the far-too-small warning
    assert any(any(w in r[-1] for w in WARNINGS) for r in reference[1:])  # OOD flags (either tier)
    # --strict: the CSV is complete, then one line and exit 1 for the rows with an error.
    assert done.returncode == 1, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and "see the error column" in lines[0], done.stderr
    assert "Traceback" not in done.stderr
    sidecar = json.loads(out.with_name("ray.csv.json").read_text())
    assert sidecar["cluster"] == {"address": "local", "workers": 2, "cpus_per_worker": 0.5}
    assert not out.with_name("ray.csv.partial").exists()


@needs_ray
def test_ray_local_applies_the_metadata_head_as_the_embedded_pipeline_does(folder: Path, tmp_path: Path) -> None:
    from skinclf.batch.predict import predict_directory
    from skinclf.model.patient_head import HEAD_KEY

    meta = {"format": "skinclf-bundle/1", "name": "tiny-head", "classes": list(CLASSES), "input_size": [32, 32],
            "export": {"format": "onnx", "source_sha256": ""}}
    model = make_tiny_onnx(tmp_path / "head.onnx", meta={**meta, HEAD_KEY: random_spec(meta)})
    table = tmp_path / "meta.csv"  # by id and by path; lesion_01 and the corrupt file have no row
    table.write_text("image_id,age,sex,localization\nlesion_00,70,male,face\nlesion_02,25,female,trunk\n"
                     "lesion_03,,,back\n", encoding="utf-8")
    embedded = tmp_path / "embedded.csv"
    predict_directory(directory=folder, out=embedded, model=model, batch_size=4, workers=1, show_progress=False,
                      metadata=table)
    out = tmp_path / "ray.csv"
    done = _skinclf(*_command(folder, model, out, "--ray-workers", "2", "--metadata", str(table)))
    assert done.returncode == 0, done.stderr
    reference = _rows(embedded)
    _same(_rows(out), reference)
    status = {r[0]: r[-1] for r in reference[1:]}
    assert status["b/lesion_00.jpg"] == "used" and status["a/lesion_01.jpg"] == "missing"
    assert status["a/corrupt.jpg"] == ""
    assert sorted(status.values()).count("used") == 3  # lesion_03 has a site only: used as far as it goes
    # (test_metadata checks that the head changes answers; here, that the workers apply it alike)


def _netns(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/net")


def _end_namespace(namespace: str) -> None:
    """Kill the processes the killed run left in its own network namespace (Ray's agents)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.readlink(entry / "ns" / "net") == namespace:
                    os.kill(int(entry.name), signal.SIGKILL)
            except OSError:
                continue


@needs_ray
def test_resume_after_the_driver_is_killed_gives_the_uninterrupted_csv(
        folder: Path, model: Path, reference: list[list[str]], tmp_path: Path) -> None:
    out = tmp_path / "killed.csv"
    partial = out.with_name("killed.csv.partial")
    # The hook stops the driver for good once its first batch of rows is in the .partial file.
    driver = subprocess.Popen(_command(folder, model, out, "--ray-workers", "2"), env=_env(SKINCLF_RAY_TEST_DRIVER_HANG="1"),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    namespace = None
    try:
        deadline = time.monotonic() + RAY_TIMEOUT
        while not (partial.exists() and len(_rows(partial)) > 1):
            assert driver.poll() is None, driver.stderr.read().decode()
            assert time.monotonic() < deadline, "no rows reached the .partial file"
            time.sleep(0.2)
        namespace = _netns(driver.pid)
        assert namespace != _netns(os.getpid())  # the driver re-ran itself in a namespace of its own
    finally:
        driver.kill()
        driver.wait(timeout=30)
        driver.stderr.close()
        if namespace is not None:
            _end_namespace(namespace)
    written = len(_rows(partial)) - 1
    assert 0 < written < len(reference) - 1
    assert not out.exists()

    done = _skinclf(*_command(folder, model, out, "--ray-workers", "2", "--resume"))
    assert done.returncode == 0, done.stderr
    assert f"{written} rows kept from the earlier run" in done.stderr
    _same(_rows(out), reference)
    assert not partial.exists() and not out.with_name("killed.csv.partial.json").exists()


@needs_ray
def test_an_actor_killed_mid_run_loses_and_duplicates_nothing(
        folder: Path, model: Path, reference: list[list[str]], tmp_path: Path) -> None:
    out, marker = tmp_path / "actor.csv", tmp_path / "actor-exited"
    done = _skinclf(*_command(folder, model, out, "--ray-workers", "2"), SKINCLF_RAY_TEST_ACTOR_EXIT=str(marker))
    assert marker.exists()  # an actor did exit mid-run
    assert done.returncode == 0, done.stderr
    _same(_rows(out), reference)
    assert "Decision support, not a diagnosis." in done.stderr


# --- Checks before any work (no Ray started) ------------------------------------------------------
@pytest.mark.parametrize("value, says", [
    ("lokal", "use local (a Ray on this machine), auto"),
    ("", "use local"),
    ("10.0.0.5:6379", "ray://HOST:PORT"),
    ("ray://head", "ray://HOST:PORT with a port 1..65535"),
    ("ray://head:99999", "a port 1..65535"),
    ("ray://he ad:10001", "ray://HOST:PORT"),
])
def test_a_bad_ray_address_is_one_line_before_any_work(runner, tmp_path: Path, folder: Path, model: Path,
                                                       value: str, says: str) -> None:
    from skinclf.cli import app

    out = tmp_path / "r.csv"
    result = runner.invoke(app, ["predict", str(folder), "--out", str(out), "--model", str(model), "--ray", value])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: --ray") and says in lines[0], result.output
    assert not out.exists() and not out.with_name("r.csv.partial").exists()


def test_ray_options_that_cannot_work_are_refused_in_one_line(runner, tmp_path: Path, folder: Path,
                                                              model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from skinclf.cli import app

    base = ["predict", str(folder), "--out", str(tmp_path / "r.csv"), "--model", str(model), "--ray", "auto"]
    for extra, says in ((["--ray-workers", "-1"], "--ray-workers"), (["--engine", "keras"], "drop --engine keras")):
        result = runner.invoke(app, [*base, *extra])
        assert result.exit_code == 1 and says in result.output and len(result.output.strip().splitlines()) == 1
    result = runner.invoke(app, [*base[:-2], "--ray-workers", "2"])  # without --ray
    assert result.exit_code == 1 and "--ray-workers sets the number of workers on a Ray cluster" in result.output
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    result = runner.invoke(app, base)
    assert result.exit_code == 1
    assert result.output.strip() == ('Error: --ray needs Ray (with Ray Data), which is not installed: '
                                     'pip install "skinclf[ray]"')
    assert not (tmp_path / "r.csv.partial").exists()


def test_ray_local_outside_a_namespace_is_refused_unless_the_user_opts_in(
        runner, tmp_path: Path, folder: Path, model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process (not the `skinclf` command) nothing re-runs it in a namespace: refuse in one line."""
    from skinclf.batch import ray_netns as cluster
    from skinclf.cli import app

    pytest.importorskip("ray")
    monkeypatch.setattr(cluster, "loopback_only", lambda: False)
    monkeypatch.delenv(cluster.LISTEN_ENV, raising=False)
    result = runner.invoke(app, ["predict", str(folder), "--out", str(tmp_path / "r.csv"), "--model", str(model),
                                 "--ray", "local"])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert "network namespace" in result.output and "SKINCLF_RAY_LISTEN=all" in result.output
    # The command itself refuses the same way where no namespace can be made.
    monkeypatch.setattr(cluster.shutil, "which", lambda name: None)
    with pytest.raises(cluster.SkinclfError, match=r"none can be made here .*SKINCLF_RAY_LISTEN=all"):
        cluster.isolate("local")
    cluster.isolate("ray://head:10001")  # a remote cluster needs no namespace here: nothing to do


def test_parse_address_accepts_the_three_forms() -> None:
    from skinclf.batch.ray_address import Address, parse_address

    assert parse_address("local") == Address("local", "local")
    assert parse_address("auto") == Address("auto", "auto")
    assert parse_address("ray://10.0.0.5:10001") == Address("ray://", "ray://10.0.0.5:10001")
    assert parse_address("ray://head.internal:10001").kind == "ray://"


def test_the_driver_drops_a_retried_batchs_rows_and_refuses_a_row_out_of_place() -> None:
    from skinclf.batch.ray import _place
    from skinclf.errors import SkinclfError

    todo = ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]
    fresh: list[list[str]] = []
    at = 0
    for path in ("a.jpg", "b.jpg", "a.jpg", "b.jpg", "c.jpg"):  # a retried task sends a and b again
        at = _place(path, todo, at, fresh, [path])
    assert [r[0] for r in fresh] == ["a.jpg", "b.jpg", "c.jpg"] and at == 3
    with pytest.raises(SkinclfError, match="where 'd.jpg' was expected"):
        _place("x.jpg", todo, at, fresh, ["x.jpg"])


def test_an_object_store_uri_is_refused_in_one_line_saying_to_mount_it(runner, tmp_path: Path) -> None:
    from skinclf.cli import app

    out = tmp_path / "r.csv"
    result = runner.invoke(app, ["predict", "s3://archive/2026", "--out", str(out), "--ray", "auto"])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert "s3:// and other object-store URIs are not read directly: mount the bucket" in result.output
    assert not out.with_name("r.csv.partial").exists()


def test_a_worker_that_cannot_see_the_folder_fails_instead_of_writing_error_rows(tmp_path: Path) -> None:
    from skinclf.batch.ray_actor import Classifier
    from skinclf.errors import SkinclfError

    with pytest.raises(SkinclfError, match="is not readable on the Ray node .*mount it at the same path"):
        Classifier(model=[None], name="m.onnx", directory=str(tmp_path / "not-mounted"), top_k=3, all_probs=False,
                   batch_size=4, threads=1, tta=1)
