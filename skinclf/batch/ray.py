"""`skinclf predict --ray ADDRESS`: the same CSV, classified by a pool of actors on a Ray cluster.

Imports `engines`, `model`, `batch.results` and the ground floor; Ray only inside functions (it
is the optional extra `skinclf[ray]`). The driver lists the folder as `predict` always does, and
writes every row through the same output code (`.partial`, sorted rows, atomic rename, resume
record); this module only replaces the loop that classifies the files still to do:

- the model's ONNX form goes to the cluster once (`ray.put`), each actor opens it with ONNX
  Runtime (telemetry off, as in every skinclf process) and keeps it for the whole run;
- image paths (relative, as JSON text) stream through Ray Data `map_batches` to a fixed pool of
  actors that decode them with `engines.runner.predict_files` and make the rows with
  `batch.results.batch_rows`, exactly as on one machine; a file a worker cannot read is an
  error row, never a failed job;
- rows come back in path order (Ray Data's `preserve_order`), one batch at a time, so the
  driver's memory does not grow with the results. A retried task (a worker killed mid-run) may
  send a batch again: the driver checks every row against the list it sent, drops a row it
  already has, and fails, naming the `.partial` to resume, if a row is missing or out of place.

This module is the driver; the address is parsed in `ray_address`, the network namespace made in
`ray_netns`, the actor lives in `ray_actor` and the test hooks in `ray_hooks`.

Privacy and security: Ray's usage statistics stay off unless `SKINCLF_RAY_USAGE_STATS=1`; no
dashboard; `local` starts Ray in a network namespace of its own (loopback only), since Ray
otherwise listens on every interface of the machine (`SKINCLF_RAY_LISTEN=all` opts out).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import sys
import tempfile
from bisect import bisect_left
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from skinclf.batch.ray_actor import Classifier
from skinclf.batch.ray_address import INSTALL, Address, parse_address, ray_installed, require_ray
from skinclf.batch.ray_hooks import driver_hang
from skinclf.batch.ray_netns import LISTEN_ENV, loopback_only, loopback_up, may_listen
from skinclf.checks import at_least
from skinclf.errors import SkinclfError

USAGE_ENV = "SKINCLF_RAY_USAGE_STATS"  # "1": let Ray send its usage statistics (off by default)
ACTOR_CPUS = 0.5  # two actors and Ray Data's own tasks fit on 2 CPUs (1 CPU each deadlocks there)
OBJECT_STORE_BYTES = 512 * 2**20  # a local Ray holds paths, rows and the model: little


def check(text: str, *, engine: str, workers: int) -> Address:
    """Every --ray option checked before any work; returns the address."""
    address = parse_address(text)
    at_least("--ray-workers", workers, 0, example=4)  # 0: one per CPU of the cluster
    if engine == "keras":
        raise SkinclfError("--ray runs the model's ONNX form with ONNX Runtime on the workers: drop --engine keras")
    if not ray_installed():
        raise SkinclfError(f"--ray needs Ray (with Ray Data), which is not installed: {INSTALL}")
    if address.kind == "local" and not may_listen():
        raise SkinclfError(f"--ray local would let Ray listen on this machine's network addresses: run it with the "
                           f"skinclf command (which starts Ray in a network namespace of its own, loopback only), or "
                           f"set {LISTEN_ENV}=all to allow it (trusted networks only)")
    return address


# --- The driver ----------------------------------------------------------------------------------
class Pool:
    """A connected cluster with the model in its object store; `rows` classifies, `close` lets go."""

    def __init__(self, address: Address, *, workers: int, model_ref, constructor: dict[str, Any], batch_size: int,
                 temp_dir: str | None) -> None:
        self.address, self.workers, self.model_ref = address, workers, model_ref
        self.constructor, self.batch_size, self.temp_dir = constructor, batch_size, temp_dir

    def describe(self) -> dict[str, Any]:
        """What the sidecar records (`cluster`)."""
        return {"address": self.address.kind, "workers": self.workers, "cpus_per_worker": ACTOR_CPUS}

    def rows(self, todo: list[str], metas: dict[str, Any] | None = None) -> Iterator[list[list[str]]]:
        """The rows of `todo` (sorted relative paths), batch by batch in path order; each path's row
        exactly once, or SkinclfError."""
        if not todo:
            return
        import ray
        from ray.data import ActorPoolStrategy, DataContext

        context = DataContext.get_current()
        context.execution_options.preserve_order = True  # rows come back in the order of `todo`
        context.enable_progress_bars = False
        data = _paths(todo, block_rows(len(todo), self.batch_size, self.workers), metas).map_batches(
            Classifier, fn_constructor_kwargs=self.constructor, batch_size=self.batch_size, batch_format="numpy",
            compute=ActorPoolStrategy(size=self.workers), num_cpus=ACTOR_CPUS,
        )  # Ray Data's defaults restart a dead actor and retry its tasks without limit, spread over the nodes
        expected = 0
        try:
            for batch in data.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
                fresh = []
                for text in batch["row"]:
                    cells = json.loads(text)
                    expected = _place(cells[0], todo, expected, fresh, cells)
                if fresh:
                    yield fresh
                    driver_hang()
        except SkinclfError:
            raise
        except Exception as exc:  # noqa: BLE001 - a failed job, a lost cluster: one line, rows kept
            raise SkinclfError(f"the Ray job failed ({_reason(exc)}); the rows finished so far are kept: run again "
                               "with --resume to complete them") from None
        if expected != len(todo):
            raise SkinclfError(f"the Ray job returned {expected} of {len(todo)} rows; the rows finished so far are "
                               "kept: run again with --resume to complete them")

    def close(self) -> None:
        import ray

        try:
            ray.shutdown()
        finally:
            if self.temp_dir:
                shutil.rmtree(self.temp_dir, ignore_errors=True)


def block_rows(files: int, batch_size: int, workers: int) -> int:
    """Paths per Ray Data block: whole batches, at least 4 blocks per worker for balance, at most
    64 batches (a retried block redoes little)."""
    batches = -(-files // (batch_size * workers * 4))
    return batch_size * max(1, min(batches, 64))


def _paths(todo: list[str], rows: int, metas: dict[str, Any] | None = None):
    """A dataset of `todo` (JSON text: a name that is not UTF-8 survives Arrow), one Arrow table per
    block, so the driver never holds more than one block's table beside its list of paths. With
    `metas` (--metadata: relative path -> PatientMeta), a `meta` column carries each image's."""
    import pyarrow as pa
    import ray

    def table(part: list[str]):
        columns = {"path": pa.array([json.dumps(p) for p in part], type=pa.string())}
        if metas is not None:
            columns["meta"] = pa.array([json.dumps(metas[p].as_dict()) if p in metas else "null" for p in part],
                                       type=pa.string())
        return pa.table(columns)

    refs = [ray.put(table(todo[i : i + rows])) for i in range(0, len(todo), rows)]
    return ray.data.from_arrow_refs(refs)


def _place(path: str, todo: list[str], expected: int, fresh: list[list[str]], cells: list[str]) -> int:
    """Take the row of `path` if it is the next one expected; drop it if already taken (a retried
    task's batch); anything else is an error. Returns the next index expected."""
    if expected < len(todo) and path == todo[expected]:
        fresh.append(cells)
        return expected + 1
    seen = bisect_left(todo, path, 0, expected)
    if seen < expected and todo[seen] == path:
        return expected  # a duplicate: its row is in the CSV already
    want = todo[expected] if expected < len(todo) else "no more rows"
    raise SkinclfError(f"the Ray job returned a row for {path!r} where {want!r} was expected; the rows finished "
                       "so far are kept: run again with --resume to complete them")


def _reason(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (f"{type(exc).__name__}: {lines[-1]}" if lines else type(exc).__name__)[:300]


@contextlib.contextmanager
def _stderr_muted() -> Iterator[None]:
    """Ray's C++ core prints notices straight to file descriptor 2 while it starts (before its log
    level applies: "Failed to determine local IP", "Set ray log level"); they are not for users.
    Failures still reach the user: as the exception `start` turns into one line."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _quiet() -> None:
    for name in ("ray", "ray.data", "ray.util"):
        logging.getLogger(name).setLevel(logging.ERROR)


# What keeps a Ray that skinclf starts from reaching out: no dashboard (and so none of its modules
# that ask cloud metadata servers, 169.254.169.254, who they run on), no usage statistics, no
# metrics export, no event export. Ray reads these from the environment of every process it starts.
QUIET_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_enable_metrics_collection": "0", "RAY_enable_export_api_write": "0"}
LOCAL_SYSTEM_CONFIG = {"enable_metrics_collection": False}


def local_init_args(temp_dir: str) -> dict[str, Any]:
    """`ray.init`'s arguments for `--ray local`: this machine, no dashboard, no metrics export."""
    from skinclf.parallel import usable_cpus

    return {"address": "local", "num_cpus": usable_cpus(), "include_dashboard": False, "_temp_dir": temp_dir,
            "_node_ip_address": "127.0.0.1" if loopback_only() else None, "object_store_memory": OBJECT_STORE_BYTES,
            "_system_config": dict(LOCAL_SYSTEM_CONFIG), "log_to_driver": False, "logging_level": logging.ERROR}


def quiet_environment(address: Address) -> None:
    """Ray's switches set before it is imported. A cluster skinclf joins (auto, ray://) was started
    with its own settings: see the README for what it must switch off."""
    os.environ.update(QUIET_ENV)
    if os.environ.get(USAGE_ENV) == "1":
        os.environ["RAY_USAGE_STATS_ENABLED"] = "1"


def _terminated(signum, frame) -> None:
    raise KeyboardInterrupt  # predict's Ctrl-C path: rows kept in .partial, one line, exit 130


def stop_on_sigterm() -> None:
    """SIGTERM ends the driver as Ctrl-C does (one line naming the .partial to resume), instead of
    Ray's handler, which prints a native stack dump. Called once Ray is up (it installs its own)."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)


def start(address: Address, *, workers: int, engine, directory: Path, top_k: int, all_probs: bool, batch_size: int,
          threads: int, tta: int, metadata: bool = False) -> Pool:
    """Start (local) or join the cluster, put the model's ONNX form in its object store; a Pool."""
    quiet_environment(address)
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")  # Ray's C++ notices (failures still raise)
    if address.kind == "local":
        # Ray 2.59+ protects a local cluster with a token it saves in ~/.ray/auth_token: this
        # process's Ray gets a token of its own instead, in memory (and its children's
        # environment) only. Set before Ray is imported, which reads the mode once.
        os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
        os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": _LOCAL_TOKEN})
    require_ray()
    import ray

    quiet = {"log_to_driver": False, "logging_level": logging.ERROR}
    temp_dir = None
    try:
        if address.kind == "local":
            if loopback_only():
                loopback_up()
            os.environ.pop("RAY_ADDRESS", None)
            temp_dir = _temp_dir()
            with _stderr_muted():
                ray.init(**local_init_args(temp_dir))
        else:
            with _stderr_muted():
                ray.init(address=address.value, **quiet)
        _quiet()
        stop_on_sigterm()
        cpus = int(ray.cluster_resources().get("CPU", 1))
        ref = ray.put(Path(engine.onnx_path).read_bytes())
    except SkinclfError:
        _stop(temp_dir)
        raise
    except Exception as exc:  # noqa: BLE001 - cannot start or reach the cluster: one line
        _stop(temp_dir)
        where = "start Ray on this machine" if address.kind == "local" else f"connect to the Ray cluster at {address.value}"
        raise SkinclfError(f"cannot {where}: {_reason(exc)}") from None
    constructor = {"model": [ref], "name": Path(engine.onnx_path).name, "directory": str(Path(directory).resolve()),
                   "top_k": top_k, "all_probs": all_probs, "batch_size": batch_size, "threads": threads or 1,
                   "tta": tta, "metadata": metadata}
    return Pool(address, workers=workers or max(1, cpus), model_ref=ref, constructor=constructor,
                batch_size=batch_size, temp_dir=temp_dir)


TEMP_PREFIX = "skinclf-ray-"
_LOCAL_TOKEN = secrets.token_hex(32)  # one per process: Ray caches the token it first reads


def _temp_dir() -> str:
    """A private folder for a local Ray's sessions and logs (which name image files), removed when
    the run ends; those of runs that were killed are removed by the next run (`_sweep`)."""
    _sweep()
    path = tempfile.mkdtemp(prefix=TEMP_PREFIX)
    Path(path, "owner").write_text(str(os.getpid()), encoding="ascii")
    return path


def _sweep() -> None:
    """Remove the Ray folders of local runs whose process is gone (killed before they could)."""
    for folder in Path(tempfile.gettempdir()).glob(TEMP_PREFIX + "*"):
        try:
            if folder.stat().st_uid != os.getuid():
                continue
            pid = int(Path(folder, "owner").read_text(encoding="ascii"))
        except (OSError, ValueError):
            continue
        if not Path(f"/proc/{pid}").exists():
            shutil.rmtree(folder, ignore_errors=True)


def _stop(temp_dir: str | None) -> None:
    try:
        import ray

        ray.shutdown()
    finally:
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)
