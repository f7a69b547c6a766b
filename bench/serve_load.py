"""Bounded load on `skinclf serve`'s API over loopback, against `skinclf predict` in the same run.

    python bench/serve_load.py [--requests 200] [--per-request 8] [--concurrency 4] [--max-seconds 600]

Serves the bundled model (one engine, as `skinclf serve` does) on a free port of 127.0.0.1 in
this process; a client in a second process (as a browser would be) sends `--requests` POST /api/predict requests of `--per-request` full-size
HAM10000 JPEGs each, `--concurrency` at a time, then stops by itself (after all requests, or
after `--max-seconds`, whichever comes first: no new request is sent past it). Nothing but
127.0.0.1 is contacted.

Prints images/s through the API (wall time of the load, HTTP, multipart and JSON included)
against `skinclf predict` (predict_directory, the same files, same model, same batch size, after
its start-up), in alternating rounds so a drifting, shared machine hits both alike; the ratio
(floor 0.7x), p50/p95 request latency, and how many requests or files failed (must be 0).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from skinclf.batch.predict import predict_directory  # noqa: E402
from skinclf.config import SERVE  # noqa: E402
from skinclf.data.layout import default_model_path  # noqa: E402
from skinclf.engines.load import load_engine  # noqa: E402
from skinclf.web.routes import create_app  # noqa: E402
from skinclf.web.server import background_server

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "ham10000-fullres"


def predict_time(files: list[Path], model: Path, batch_size: int) -> tuple[int, float]:
    """`skinclf predict` on exactly these files (hard links in a temp folder): images classified
    and seconds taken after start-up."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        for i, path in enumerate(files):
            target = folder / f"{i:05d}_{path.name}"
            try:
                os.link(path, target)
            except OSError:
                target.symlink_to(path.resolve())
        summary = predict_directory(directory=folder, out=Path(tmp) / "r.csv", model=model, batch_size=batch_size,
                                    show_progress=False)
    return summary.classified, summary.seconds


def run_load(url: str, requests: list[list[tuple[str, str]]], concurrency: int, max_seconds: float):
    """The client side, run in its own process (as a browser would be): `requests` lists each
    request's (upload name, file path); files are read into memory before the clock starts."""
    import httpx

    cache: dict[str, bytes] = {}
    payloads = [[(name, cache.setdefault(path, Path(path).read_bytes())) for name, path in req] for req in requests]

    latencies: list[float] = []
    failures: list[str] = []
    images = 0
    lock = threading.Lock()
    next_index = iter(range(len(payloads)))
    deadline = time.perf_counter() + max_seconds

    def worker() -> None:
        nonlocal images
        with httpx.Client(base_url=url, timeout=120) as client:
            while time.perf_counter() < deadline:
                with lock:
                    k = next(next_index, None)
                if k is None:
                    return
                files = [("files", (name, data, "image/jpeg")) for name, data in payloads[k]]
                t0 = time.perf_counter()
                try:
                    r = client.post("/api/predict", files=files)
                    ok = r.status_code == 200
                    bad = [res["path"] for res in r.json()["results"] if res["error"]] if ok else []
                except Exception as exc:  # noqa: BLE001 - counted, reported
                    ok, bad = False, [repr(exc)]
                    r = None
                dt = time.perf_counter() - t0
                with lock:
                    latencies.append(dt)
                    if not ok:
                        failures.append(f"request {k}: HTTP {r.status_code if r is not None else '-'} {bad}")
                    elif bad:
                        failures.append(f"request {k}: {len(bad)} files with errors")
                    else:
                        images += len(files)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return images, time.perf_counter() - t0, latencies, failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=SAMPLES, help="folder of JPEGs to send")
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--per-request", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-seconds", type=float, default=600.0, help="stop sending new requests after this")
    parser.add_argument("--batch-size", type=int, default=SERVE.batch_size)
    parser.add_argument("--rounds", type=int, default=4, help="alternating predict/API rounds")
    args = parser.parse_args()
    if not 1 <= args.requests <= 10_000 or not 1 <= args.concurrency <= 64 or not 1 <= args.per_request <= 64:
        sys.exit("bounded load only: --requests 1..10000, --concurrency 1..64, --per-request 1..64")

    sources = sorted(args.images.glob("*.jpg"))
    if not sources:
        sys.exit(f"no JPEGs in {args.images}")
    model = args.model or default_model_path()
    n = args.requests * args.per_request
    files = [sources[i % len(sources)] for i in range(n)]
    requests = [[(f"{k:04d}/{p.name}", str(p)) for p in files[k * args.per_request:(k + 1) * args.per_request]]
                for k in range(args.requests)]

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}; "
          f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"load: {args.requests} requests x {args.per_request} images ({n} images), {args.concurrency} at a time, "
          f"127.0.0.1 only; model {model.name}, batch {args.batch_size}")

    engine = load_engine(model, batch_size=args.batch_size)
    size = engine.image_size
    engine(np.zeros((1, size, size, 3), dtype="float32"))  # compile, as `skinclf serve` does before serving
    app = create_app(engine)
    # Rounds alternate predict and API on the same files, so a drifting, shared machine (other
    # jobs come and go) slows both alike; totals over all rounds give the rates.
    per_round = -(-args.requests // args.rounds)
    predict_images = predict_seconds = api_seconds = 0.0
    images, latencies, failures, sent = 0, [], [], 0
    deadline = time.perf_counter() + args.max_seconds
    with background_server(app) as url, ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        for r in range(args.rounds):
            chunk = requests[r * per_round:(r + 1) * per_round]
            left = deadline - time.perf_counter()
            if not chunk or left <= 0:
                break
            done, seconds = predict_time([Path(f) for req in chunk for _, f in req], model, args.batch_size)
            predict_images += done
            predict_seconds += seconds
            got, seconds, lat, fails = pool.submit(run_load, url, chunk, args.concurrency, left).result()
            images, api_seconds, sent = images + got, api_seconds + seconds, sent + len(chunk)
            latencies += lat
            failures += fails
            print(f"round {r + 1}/{args.rounds}: predict {predict_images / predict_seconds:.1f} img/s, "
                  f"API {images / api_seconds:.1f} img/s so far", flush=True)
    app.state.classifier.close()

    predict = predict_images / predict_seconds if predict_seconds else 0.0
    api = images / api_seconds if api_seconds else 0.0
    lat = np.array(latencies) if latencies else np.zeros(1)
    print(f"skinclf predict: {predict_images:.0f} images in {predict_seconds:.1f} s: {predict:.1f} img/s")
    print(f"API: {images} images in {len(latencies)} requests, {api_seconds:.1f} s: {api:.1f} img/s "
          f"(model calls: {app.state.classifier.calls}, {images / max(app.state.classifier.calls, 1):.1f} images per call, "
          f"model busy {app.state.classifier.busy_seconds / max(api_seconds, 1e-9):.0%} of the time)")
    print(f"latency per request: p50 {np.percentile(lat, 50) * 1000:.0f} ms, p95 {np.percentile(lat, 95) * 1000:.0f} ms, "
          f"max {lat.max() * 1000:.0f} ms")
    print(f"failed requests: {len(failures)}" + ("" if not failures else "\n  " + "\n  ".join(failures[:10])))
    ratio = api / predict if predict else 0.0
    print(f"API / predict: {ratio:.2f}x (floor 0.70x) -> {'OK' if ratio >= 0.7 and not failures else 'BELOW FLOOR or FAILURES'}")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if failures or len(latencies) < args.requests:
        sys.exit(1)

if __name__ == "__main__":
    main()
