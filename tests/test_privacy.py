"""Nothing phones home and nothing lingers: every entry point, run with HOME and TMPDIR pointed at
empty folders, leaves both empty, switches telemetry off before ONNX Runtime is imported, and
opens no connection beyond loopback.

Each run is a subprocess started through `GUARD` (below), which records the environment at the
moment `onnxruntime` is imported and refuses (and records) every non-loopback connection made
through Python's socket module; where strace is installed, one run is also traced for
connections made by native code (ONNX Runtime's uploader is C++).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from utils.models import make_tiny_onnx
from utils.paths import REPO
from utils.synthetic import lesion_image, CLASS_COLOURS

pytest.importorskip("onnxruntime")

GUARD = r'''
import importlib.abc, json, os, runpy, socket, sys

report_path, mode, args = sys.argv[1], sys.argv[2], sys.argv[3:]
report = {"env_at_onnxruntime_import": None, "connections": []}


class Spy(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "onnxruntime" and report["env_at_onnxruntime_import"] is None:
            report["env_at_onnxruntime_import"] = {k: os.environ.get(k) for k in ("ORT_DISABLE_TELEMETRY",)}
        return None


sys.meta_path.insert(0, Spy())


def loopback(address):
    host = address[0] if isinstance(address, tuple) else address
    return isinstance(host, (str, bytes)) and str(host).split("%")[0] in ("localhost", "::1") or str(host).startswith("127.")


def refuse(original):
    def guarded(self, address, *rest):
        if self.family != getattr(socket, "AF_UNIX", None) and not loopback(address):
            report["connections"].append(repr(address))
            raise OSError("network refused by the privacy test")
        return original(self, address, *rest)
    return guarded


socket.socket.connect = refuse(socket.socket.connect)
socket.socket.connect_ex = refuse(socket.socket.connect_ex)
_getaddrinfo = socket.getaddrinfo


def getaddrinfo(host, *rest, **kw):
    if host is not None and not loopback((host,)):
        report["connections"].append(f"lookup {host!r}")
        raise OSError("name lookup refused by the privacy test")
    return _getaddrinfo(host, *rest, **kw)


socket.getaddrinfo = getaddrinfo
try:
    if mode == "cli":  # exactly `python -m skinclf ARGS` (the `skinclf` script runs the same main)
        sys.argv = ["skinclf", *args]
        runpy.run_module("skinclf", run_name="__main__", alter_sys=True)
    else:
        exec(compile(args[0], "<library use>", "exec"), {"__name__": "__main__"})
finally:
    with open(report_path, "w") as fh:
        json.dump(report, fh)
'''

# What the test process itself set (it imported skinclf) or a developer's shell may hold: the
# subprocess must show what skinclf does on its own.
_SCRUB = ("ORT_DISABLE_TELEMETRY", "RAY_USAGE_STATS_ENABLED", "HF_HUB_DISABLE_TELEMETRY", "DO_NOT_TRACK",
          "SE_AVOID_STATS", "KERAS_HOME", "MPLCONFIGDIR", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME")


@pytest.fixture
def sandbox(tmp_path: Path) -> dict[str, Path]:
    """Empty HOME and TMPDIR, a folder of two images, a tiny ONNX model, and a place for outputs."""
    places = {name: tmp_path / name for name in ("home", "tmp", "work", "out")}
    for path in places.values():
        path.mkdir()
    images = places["work"] / "visit"
    images.mkdir()
    for i, colour in enumerate(("mel", "nv")):
        lesion_image(CLASS_COLOURS[colour], i).save(images / f"lesion_{i}.jpg")
    places["images"] = images
    places["onnx"] = make_tiny_onnx(places["work"] / "tiny.onnx")
    (places["work"] / "guard.py").write_text(GUARD)
    return places


def run_guarded(sandbox: dict[str, Path], mode: str, *args: str, tracer: list[str] | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    env.update(HOME=str(sandbox["home"]), TMPDIR=str(sandbox["tmp"]), PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3")
    report = sandbox["out"] / "report.json"
    command = [sys.executable, str(sandbox["work"] / "guard.py"), str(report), mode, *args]
    done = subprocess.run([*(tracer or []), *command], env=env, cwd=sandbox["work"], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(report.read_text())


def left_behind(sandbox: dict[str, Path]) -> list[str]:
    """Every file and folder under the fresh HOME and TMPDIR."""
    return sorted(str(p) for root in (sandbox["home"], sandbox["tmp"]) for p in root.rglob("*"))


def assert_private(sandbox: dict[str, Path], report: dict, *, imports_onnxruntime: bool = True) -> None:
    assert left_behind(sandbox) == []
    assert report["connections"] == []
    if imports_onnxruntime:
        assert report["env_at_onnxruntime_import"] == {"ORT_DISABLE_TELEMETRY": "1"}


def test_predict_with_the_onnx_engine_leaves_nothing_and_switches_telemetry_off_first(sandbox) -> None:
    out = sandbox["out"] / "results.csv"
    report = run_guarded(sandbox, "cli", "predict", str(sandbox["images"]), "--model", str(sandbox["onnx"]),
                         "--engine", "onnx", "--out", str(out))
    assert_private(sandbox, report)
    assert out.is_file() and len(out.read_text().splitlines()) == 3  # it did classify


def test_predict_with_the_keras_engine_leaves_nothing(sandbox, tiny_bundle: Path) -> None:
    pytest.importorskip("keras")
    out = sandbox["out"] / "results.csv"
    report = run_guarded(sandbox, "cli", "predict", str(sandbox["images"]), "--model", str(tiny_bundle),
                         "--engine", "keras", "--out", str(out))
    assert_private(sandbox, report, imports_onnxruntime=False)  # no keras.json, no matplotlib cache
    assert len(out.read_text().splitlines()) == 3


def test_serve_in_process_leaves_nothing(sandbox) -> None:
    pytest.importorskip("fastapi")
    code = f"""
from fastapi.testclient import TestClient
from skinclf.engines.load import load_engine
from skinclf.web.routes import create_app

with TestClient(create_app(load_engine({str(sandbox["onnx"])!r}))) as client:
    data = open({str(sandbox["images"] / "lesion_0.jpg")!r}, "rb").read()
    answer = client.post("/api/predict", params={{"format": "csv"}}, files=[("files", ("lesion_0.jpg", data, "image/jpeg"))])
    assert answer.status_code == 200 and "lesion_0.jpg" in answer.text, answer.text
"""
    assert_private(sandbox, run_guarded(sandbox, "library", code))


def test_library_use_then_onnxruntime_directly_leaves_nothing(sandbox) -> None:
    """A program that imports skinclf and then uses ONNX Runtime itself inherits the switch."""
    code = f"""
import skinclf
import onnxruntime
onnxruntime.InferenceSession({str(sandbox["onnx"])!r}, providers=["CPUExecutionProvider"])
"""
    assert_private(sandbox, run_guarded(sandbox, "library", code))


def test_onnxruntime_alone_would_write_its_telemetry_files(sandbox) -> None:
    """The control: without skinclf's switch the same session writes ONNX Runtime's device id and
    event queue (so the tests above can fail). Skipped for a build without telemetry."""
    code = f"""
import onnxruntime
onnxruntime.InferenceSession({str(sandbox["onnx"])!r}, providers=["CPUExecutionProvider"])
"""
    run_guarded(sandbox, "library", code)
    if not left_behind(sandbox):
        pytest.skip("this ONNX Runtime build keeps no telemetry files")
    assert any(".onnxruntime" in p or p.endswith(".ses") for p in left_behind(sandbox))


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_predict_makes_no_network_connection_from_native_code_either(sandbox) -> None:
    log = sandbox["out"] / "strace.log"
    tracer = ["strace", "-f", "-qq", "-e", "trace=connect,sendto,sendmsg", "-o", str(log)]
    probe = subprocess.run([*tracer[:-2], "-o", os.devnull, "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"strace cannot trace here: {probe.stderr.strip()[:100]}")
    out = sandbox["out"] / "results.csv"
    report = run_guarded(sandbox, "cli", "predict", str(sandbox["images"]), "--model", str(sandbox["onnx"]),
                         "--out", str(out), tracer=tracer)
    assert_private(sandbox, report)
    calls = [line for line in log.read_text().splitlines() if re.search(r"sin6?_(addr|port)", line)]
    remote = [line for line in calls if not re.search(r'inet_addr\("127\.|inet_pton\(AF_INET6, "::1"', line)]
    assert remote == []


def test_importing_onnxruntime_before_skinclf_is_warned_about(sandbox) -> None:
    """The one order skinclf cannot fix: ONNX Runtime read its switch before skinclf set it."""
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    env.update(HOME=str(sandbox["home"]), TMPDIR=str(sandbox["tmp"]), PYTHONPATH=str(REPO))
    late = subprocess.run([sys.executable, "-c", "import onnxruntime, skinclf"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert "onnxruntime was imported before skinclf" in late.stderr and "ORT_DISABLE_TELEMETRY=1" in late.stderr
    first = subprocess.run([sys.executable, "-c", "import skinclf, onnxruntime"], env=env, capture_output=True,
                           text=True, timeout=120)
    assert first.stderr == ""
