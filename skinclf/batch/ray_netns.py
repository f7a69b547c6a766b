"""`--ray local` listens on loopback only: a network namespace of its own (Linux `unshare`).

Ray otherwise listens on every interface of the machine; `SKINCLF_RAY_LISTEN=all` opts out.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from skinclf.batch.ray_address import INSTALL, parse_address, ray_installed
from skinclf.errors import SkinclfError

LISTEN_ENV = "SKINCLF_RAY_LISTEN"  # "all": a local Ray may listen on this machine's network addresses
NETNS_ENV = "SKINCLF_RAY_NETNS"  # set by `isolate` before it re-runs the command in a namespace


def loopback_only() -> bool:
    """True when this process's network namespace has no interface but loopback."""
    try:
        lines = Path("/proc/self/net/dev").read_text().splitlines()[2:]
    except OSError:
        return False
    names = {line.split(":", 1)[0].strip() for line in lines if ":" in line}
    return names <= {"lo"}


def may_listen() -> bool:
    return loopback_only() or os.environ.get(LISTEN_ENV) == "all"


def loopback_up() -> None:
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
    if address.kind != "local" or may_listen():
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
