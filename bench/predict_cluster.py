"""`skinclf predict --ray local` against the embedded pipeline, in one run on this machine.

Modes, all on the same model's ONNX form and the same full-size JPEGs (hard-linked copies):

  embedded      `skinclf predict` as without --ray: ONNX Runtime on every usable CPU, threaded decoding
  embedded 1cpu the same on one ONNX Runtime thread and one decoding thread (a Ray worker's budget)
  ray 1 worker  `--ray local --ray-workers 1` (one actor: decode, then ONNX Runtime on one thread)
  ray 2 workers `--ray local --ray-workers 2`

Rates are the slope of two runs from scratch, `--small` files and all of them: images/s without
the fixed cost every run pays (printed apart: starting Ray and the actors, shipping and loading
the model, the first batch's latency). The
overhead Ray adds per image is 1/(ray 1 worker) - 1/(embedded 1cpu): the same CPU budget, with
and without Ray. The process re-runs itself in a network namespace of its own (loopback only),
as `skinclf predict --ray local` does.

    python bench/predict_cluster.py [--images ../shared/data/ham10000-fullres] [--copies 2] [--model PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from skinclf.batch import ray as cluster  # noqa: E402
from skinclf.batch.predict import _embedded, list_images  # noqa: E402
from skinclf.batch.ray import _place  # noqa: E402
from skinclf.batch.results import row, write_csv  # noqa: E402
from skinclf.batch.resume import file_key  # noqa: E402
from skinclf.data.layout import default_model_path  # noqa: E402
from skinclf.engines.load import load_engine  # noqa: E402
from skinclf.parallel import usable_cpus  # noqa: E402


def namespace_cpu() -> dict[int, float]:
    """CPU seconds used so far by each live process of this network namespace (this script, Ray's
    processes, the actors): all of them this benchmark's, since it runs in a namespace of its own."""
    mine, tick, used = os.readlink("/proc/self/ns/net"), os.sysconf("SC_CLK_TCK"), {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.readlink(entry / "ns" / "net") != mine:
                continue
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        used[int(entry.name)] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return used


def own_cpu() -> dict[int, float]:
    return {0: time.process_time()}


def timed(batches, total: int, cpu) -> tuple[int, float, float]:
    """Rows, seconds and CPU seconds, start-up included. `cpu()` maps processes to their CPU time
    so far; it is read before, at every batch and as the last rows arrive (while the actors still
    live), so a process that ends mid-run (an actor of the run before) keeps its last reading
    rather than taking its CPU time out of the sum."""
    t0, start = time.perf_counter(), cpu()
    last, count = dict(start), 0
    for rows in batches:
        if count < total:
            last.update(cpu())
        count += len(rows)
        if count >= total:
            last.update(cpu())
    used = sum(seconds - start.get(pid, 0.0) for pid, seconds in last.items())
    return count, time.perf_counter() - t0, used


def two_point(run, todo: list[str], small: int, cpu) -> tuple[float, float, float]:
    """(images/s, fixed seconds, CPU seconds per image) from timing `small` files and all of
    `todo`, each from scratch: the slope is the cost per image, the intercept what every run pays
    once (actors starting, the model loading, the first batch's latency). CPU time, unlike wall
    time, does not depend on the share of a busy machine the scheduler gives each process."""
    n1, t1, c1 = timed(run(todo[:small]), small, cpu)
    n2, t2, c2 = timed(run(todo), len(todo), cpu)
    assert (n1, n2) == (small, len(todo)), (n1, n2)
    per_image = (t2 - t1) / (n2 - n1)
    return 1 / per_image, t1 - small * per_image, (c2 - c1) / (n2 - n1)


def embedded_rate(model: Path, folder: Path, threads: int, batch_size: int, small: int) -> tuple[float, float, float]:
    """(images/s, fixed seconds, CPU seconds per image) of the embedded pipeline, measured in a child process
    in a session of its own: Linux's autogroup scheduler gives each session a fair share of a busy
    machine, and Ray's worker processes have sessions of their own, so measuring the embedded
    pipeline in this process would hand Ray more of a shared machine's CPU than it."""
    out = subprocess.run([sys.executable, __file__, "--child", str(model), str(folder), str(threads), str(batch_size),
                          str(small)],
                         capture_output=True, text=True, check=True, start_new_session=True)
    rate, fixed, cpu = json.loads(out.stdout.strip().splitlines()[-1])
    return rate, fixed, cpu


def child(model: Path, folder: Path, threads: int, batch_size: int, small: int) -> None:
    todo = list_images(folder, recursive=True).files
    runner = load_engine(model, engine="onnx", batch_size=batch_size, threads=threads or None)
    rate, fixed, cpu = two_point(lambda files: _embedded(runner, directory=folder, todo=files, top_k=3,
                                                         all_probs=False, batch_size=batch_size,
                                                         workers=threads or usable_cpus(), tta=1),
                                 todo, small, own_cpu)
    print(json.dumps([rate, fixed, cpu]))


def listing_rate(folder: Path) -> float:
    """Files/s the driver lists and stats (what predict does before any work; warm cache, local disk)."""
    t0 = time.perf_counter()
    files = list_images(folder, recursive=True).files
    for f in files:
        file_key(folder / f)
    return len(files) / (time.perf_counter() - t0)


def driver_row_cost(classes: list[str], count: int = 50_000) -> float:
    """Seconds of the driver's time per row: JSON text in, checked against the list, CSV line and
    resume-record line out (what the driver does for each row a worker sends)."""
    rng = np.random.default_rng(0)
    todo = [f"{i // 1000:04d}/ISIC_{i:07d}.jpg" for i in range(count)]
    texts = [json.dumps(row(p, rng.dirichlet(np.ones(len(classes))), None, classes, 3, False, ood_score=-3.2))
             for p in todo]
    with tempfile.TemporaryFile("w", newline="", encoding="utf-8") as sink:
        t0 = time.perf_counter()
        expected, fresh = 0, []
        for i, text in enumerate(texts):
            cells = json.loads(text)
            expected = _place(cells[0], todo, expected, fresh, cells)
            if len(fresh) == 256 or i == count - 1:
                write_csv(sink, fresh)
                sink.writelines(json.dumps([r[0], 27_000, 1_700_000_000_000_000_000]) + "\n" for r in fresh)
                sink.flush()  # the rows, then the resume record's lines, as `CsvOutput.write` does
                fresh = []
        return (time.perf_counter() - t0) / count


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        model, folder, threads, batch_size, small = sys.argv[2:7]
        return child(Path(model), Path(folder), int(threads), int(batch_size), int(small))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path,
                        default=Path(__file__).resolve().parents[2] / "shared/data/ham10000-fullres")
    parser.add_argument("--model", type=Path, default=None, help="model with an ONNX form [default: the bundled model]")
    parser.add_argument("--copies", type=int, default=2, help="hard-linked copies of the folder")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--small", type=int, default=64, help="files of the short run (the intercept)")
    args = parser.parse_args()
    cluster.isolate("local")  # re-runs this script in a network namespace of its own, if need be

    model = args.model or default_model_path()
    rate: dict[str, float] = {}
    startup: dict[str, float] = {}
    cpu: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        for copy in range(args.copies):
            (folder / str(copy)).mkdir(parents=True)
            for p in sorted(args.images.glob("*.jpg")):
                os.link(p, folder / str(copy) / p.name)
        todo = list_images(folder, recursive=True).files
        runner = load_engine(model, engine="onnx", batch_size=args.batch_size)
        # Alternating, so that a change in the machine's load hits both kinds alike.
        for name in ("embedded 1cpu", "ray 1 worker", "embedded", "ray 2 workers"):
            if name.startswith("embedded"):
                rate[name], startup[name], cpu[name] = embedded_rate(model, folder, 1 if "1cpu" in name else 0,
                                                                     args.batch_size, args.small)
                continue
            workers = int(name.split()[1])
            t0 = time.perf_counter()
            pool = cluster.start(cluster.Address("local", "local"), workers=workers, runner=runner, directory=folder,
                                 top_k=3, all_probs=False, batch_size=args.batch_size, threads=1, tta=1)
            started = time.perf_counter() - t0
            try:
                rate[name], fixed, cpu[name] = two_point(pool.rows, todo, args.small, namespace_cpu)
            finally:
                pool.close()
            startup[name] = started + fixed
        listed = listing_rate(folder)
    row_cost = driver_row_cost(list(runner.classes))

    print(f"{len(todo)} images ({args.copies} x {args.images.name}), model {model.name} (ONNX), batch "
          f"{args.batch_size}, {usable_cpus()} usable CPUs, Ray actors at {cluster.ACTOR_CPUS} CPU")
    for name in ("embedded", "embedded 1cpu", "ray 1 worker", "ray 2 workers"):
        print(f"  {name:14s} {rate[name]:6.1f} img/s  {cpu[name] * 1000:6.1f} CPU ms/img  "
              f"(fixed cost per run {startup[name]:5.1f} s)")
    print(f"  ray 1 worker / embedded 1cpu  {rate['ray 1 worker'] / rate['embedded 1cpu']:.2f}x img/s, "
          f"{cpu['ray 1 worker'] / cpu['embedded 1cpu']:.2f}x CPU per image")
    print(f"  ray 2 workers / ray 1 worker  {rate['ray 2 workers'] / rate['ray 1 worker']:.2f}x img/s")
    print(f"  ray 2 workers / embedded      {rate['ray 2 workers'] / rate['embedded']:.2f}x img/s")
    print(f"  overhead Ray adds per image   {(cpu['ray 1 worker'] - cpu['embedded 1cpu']) * 1000:+.1f} CPU ms "
          f"(all of the namespace's processes: driver, Ray's own, the actor), "
          f"{(1 / rate['ray 1 worker'] - 1 / rate['embedded 1cpu']) * 1000:+.1f} ms wall")
    print(f"  driver: listing {listed:,.0f} files/s (walk + stat, local disk, warm cache); "
          f"{row_cost * 1e6:.1f} us per row received and written ({1 / row_cost:,.0f} rows/s)")


if __name__ == "__main__":
    main()
