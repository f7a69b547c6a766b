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

Privacy and security: Ray's usage statistics stay off unless `SKINCLF_RAY_USAGE_STATS=1`; no
dashboard; `local` starts Ray in a network namespace of its own (loopback only), since Ray
otherwise listens on every interface of the machine (`SKINCLF_RAY_LISTEN=all` opts out).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from skinclf.checks import at_least
from skinclf.errors import SkinclfError

INSTALL = 'pip install "skinclf[ray]"'
LISTEN_ENV = "SKINCLF_RAY_LISTEN"  # "all": a local Ray may listen on this machine's network addresses
USAGE_ENV = "SKINCLF_RAY_USAGE_STATS"  # "1": let Ray send its usage statistics (off by default)
NETNS_ENV = "SKINCLF_RAY_NETNS"  # set by `isolate` before it re-runs the command in a namespace
# Test hooks (tests/test_ray.py): the first actor call that creates this marker file exits at
# once, as a killed worker would; the driver stops for good after writing its first batch.
TEST_ACTOR_EXIT_ENV = "SKINCLF_RAY_TEST_ACTOR_EXIT"
TEST_DRIVER_HANG_ENV = "SKINCLF_RAY_TEST_DRIVER_HANG"
ACTOR_CPUS = 0.5  # two actors and Ray Data's own tasks fit on 2 CPUs (1 CPU each deadlocks there)
OBJECT_STORE_BYTES = 512 * 2**20  # a local Ray holds paths, rows and the model: little
ADDRESS_HELP = "use local (a Ray on this machine), auto (the cluster in RAY_ADDRESS or running here) or ray://HOST:PORT"
_CLIENT = re.compile(r"ray://(?P<host>\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.\-]+):(?P<port>[0-9]{1,5})")


@dataclass(frozen=True)
class Address:
    """A checked `--ray` value: `kind` is local, auto or ray:// (what the sidecar records)."""

    kind: str
    value: str


def parse_address(text: str) -> Address:
    """`--ray TEXT` checked, before any work."""
    value = (text or "").strip()
    if value in ("local", "auto"):
        return Address(value, value)
    match = _CLIENT.fullmatch(value)
    if match and 1 <= int(match["port"]) <= 65535:
        return Address("ray://", value)
    if value.startswith("ray://"):
        return _bad(text, "a Ray Client address is ray://HOST:PORT with a port 1..65535, e.g. ray://10.0.0.5:10001")
    return _bad(text, ADDRESS_HELP)


def _bad(text: str, why: str):
    raise SkinclfError(f"--ray {text!r}: {why}")


def ray_installed() -> bool:
    try:
        return importlib.util.find_spec("ray") is not None
    except (ImportError, ValueError):
        return False


def require_ray() -> None:
    """Ray and Ray Data importable, or one line saying how to install them."""
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError:
        raise SkinclfError(f"--ray needs Ray (with Ray Data), which is not installed: {INSTALL}") from None


def check(text: str, *, engine: str, workers: int) -> Address:
    """Every --ray option checked before any work; returns the address."""
    address = parse_address(text)
    at_least("--ray-workers", workers, 0, example=4)  # 0: one per CPU of the cluster
    if engine == "keras":
        raise SkinclfError("--ray runs the model's ONNX form with ONNX Runtime on the workers: drop --engine keras")
    if not ray_installed():
        raise SkinclfError(f"--ray needs Ray (with Ray Data), which is not installed: {INSTALL}")
    if address.kind == "local" and not _may_listen():
        raise SkinclfError(f"--ray local would let Ray listen on this machine's network addresses: run it with the "
                           f"skinclf command (which starts Ray in a network namespace of its own, loopback only), or "
                           f"set {LISTEN_ENV}=all to allow it (trusted networks only)")
    return address


# --- Loopback only: a network namespace of our own -------------------------------------------------
def loopback_only() -> bool:
    """True when this process's network namespace has no interface but loopback."""
    try:
        lines = Path("/proc/self/net/dev").read_text().splitlines()[2:]
    except OSError:
        return False
    names = {line.split(":", 1)[0].strip() for line in lines if ":" in line}
    return names <= {"lo"}


def _may_listen() -> bool:
    return loopback_only() or os.environ.get(LISTEN_ENV) == "all"


def _loopback_up() -> None:
    """Bring `lo` up in a fresh namespace (it starts down; Linux then gives it 127.0.0.1)."""
    import fcntl
    import socket
    import struct

    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            request = struct.pack("16sH", b"lo", 0)
            flags = struct.unpack("16sH", fcntl.ioctl(sock, siocgifflags, request)[:18])[1]
            if not flags & iff_up:
                fcntl.ioctl(sock, siocsifflags, struct.pack("16sH", b"lo", flags | iff_up))
    except OSError as exc:
        raise SkinclfError(f"cannot bring up the loopback interface of Ray's network namespace: {exc.strerror}") from None


def isolate(text: str) -> None:
    """For the `skinclf` command: with `--ray local`, re-run this very command inside a network
    namespace of its own (loopback only), unless it is in one already or `SKINCLF_RAY_LISTEN=all`.
    Returns only when nothing needs doing; refuses in one line when no namespace can be made."""
    address = parse_address(text)
    if address.kind != "local" or _may_listen():
        return
    if not ray_installed():
        raise SkinclfError(f"--ray needs Ray (with Ray Data), which is not installed: {INSTALL}")
    unshare = shutil.which("unshare")
    flags = ["--net"] if os.geteuid() == 0 else ["--map-root-user", "--net"]
    why = "the unshare command (util-linux) is not installed"
    if unshare is not None and os.environ.get(NETNS_ENV) != "1":
        probe = subprocess.run([unshare, *flags, "true"], capture_output=True, text=True, check=False)
        if probe.returncode == 0:
            os.environ[NETNS_ENV] = "1"
            sys.stdout.flush()
            sys.stderr.flush()
            os.execv(unshare, [unshare, *flags, "--", sys.executable, *sys.orig_argv[1:]])
        why = " ".join((probe.stderr or "unshare failed").split())[:160]
    elif unshare is not None:
        why = "the namespace it made still has other interfaces"
    raise SkinclfError(f"--ray local starts Ray in a network namespace of its own so that it listens on loopback only, "
                       f"and none can be made here ({why}); set {LISTEN_ENV}=all to let Ray listen on this machine's "
                       "network addresses instead (trusted networks only)")


# --- The actors ----------------------------------------------------------------------------------
class Classifier:
    """One Ray actor: the model's ONNX form on ONNX Runtime, loaded once; a batch of relative
    paths (JSON text) in, their CSV rows (JSON text, in the same order) out."""

    def __init__(self, *, model: list, name: str, directory: str, top_k: int, all_probs: bool, batch_size: int,
                 threads: int, tta: int, metadata: bool = False) -> None:
        from skinclf import keep_private

        keep_private()  # telemetry off before ONNX Runtime loads, whatever the worker's environment
        if not Path(directory).is_dir():  # else every file would come back as a "file not found" row
            import socket

            raise SkinclfError(f"the folder {directory} is not readable on the Ray node {socket.gethostname()}: "
                               "mount it at the same path on every node")
        import ray

        from skinclf.engines.onnx import OnnxEngine
        from skinclf.engines.onnx import session
        from skinclf.model.outlier import active_record

        data = ray.get(model[0])  # the one copy in the object store, shared by the actors of a node
        self.engine = OnnxEngine(Path(name), batch_size=batch_size, threads=threads, sess=session(data, threads=threads))
        self.ood = active_record(self.engine.meta.get("ood"), self.engine.features_dim > 0)
        self.root, self.top_k, self.all_probs, self.tta = Path(directory), top_k, all_probs, tta
        self.head = None
        if metadata:  # --metadata: the head the driver checked, from the same ONNX file
            from skinclf.model.patient_head import load_head

            self.head = load_head(self.engine.meta, path=name)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from skinclf.batch.results import batch_rows
        from skinclf.engines.runner import predict_files

        _test_exit_once()
        paths = [self.root / json.loads(p) for p in batch["path"]]
        metas = [_meta(text) for text in batch["meta"]] if "meta" in batch else None
        rows: list[list[str]] = []
        for result in predict_files(self.engine, paths, image_size=self.engine.image_size,
                                    batch_size=max(1, len(paths)), workers=1, tta=self.tta):
            names = [Path(p).relative_to(self.root).as_posix() for p in result.paths]
            rows += batch_rows(result, names=names, classes=self.engine.classes, top_k=self.top_k,
                               all_probs=self.all_probs, ood=self.ood, metas=metas, head=self.head)
        return {"row": np.array([json.dumps(r) for r in rows], dtype=object)}


def _test_exit_once() -> None:
    marker = os.environ.get(TEST_ACTOR_EXIT_ENV)
    if not marker:
        return
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os._exit(1)  # as a killed worker: no cleanup, no reply


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
                    _test_hang()
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


def _meta(text: str):
    """An image's PatientMeta from its `meta` cell (JSON; null: no row in the metadata file)."""
    from skinclf.model.patient_head import NO_METADATA, PatientMeta

    value = json.loads(text)
    return PatientMeta(**value) if value else NO_METADATA


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


def _test_hang() -> None:
    if os.environ.get(TEST_DRIVER_HANG_ENV) == "1":
        while True:  # until the test kills this process
            time.sleep(3600)


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


def start(address: Address, *, workers: int, engine, directory: Path, top_k: int, all_probs: bool, batch_size: int,
          threads: int, tta: int, metadata: bool = False) -> Pool:
    """Start (local) or join the cluster, put the model's ONNX form in its object store; a Pool."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "1" if os.environ.get(USAGE_ENV) == "1" else "0"
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")  # Ray's C++ notices (failures still raise)
    if address.kind == "local":
        # Ray 2.59+ protects a local cluster with a token it saves in ~/.ray/auth_token: this
        # process's Ray gets a token of its own instead, in memory (and its children's
        # environment) only. Set before Ray is imported, which reads the mode once.
        os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
        os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": _LOCAL_TOKEN})
    require_ray()
    import ray

    from skinclf.parallel import usable_cpus
    quiet = {"log_to_driver": False, "logging_level": logging.ERROR}
    temp_dir = None
    try:
        if address.kind == "local":
            if loopback_only():
                _loopback_up()
            os.environ.pop("RAY_ADDRESS", None)
            temp_dir = _temp_dir()
            with _stderr_muted():
                ray.init(address="local", num_cpus=usable_cpus(), include_dashboard=False, _temp_dir=temp_dir,
                         _node_ip_address="127.0.0.1" if loopback_only() else None,
                         object_store_memory=OBJECT_STORE_BYTES, **quiet)
        else:
            with _stderr_muted():
                ray.init(address=address.value, **quiet)
        _quiet()
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
