"""`--ray ADDRESS`: parsing and checking the address, and whether Ray is installed (no Ray import)."""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass

from skinclf.errors import SkinclfError

INSTALL = 'pip install "skinclf[ray]"'
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
