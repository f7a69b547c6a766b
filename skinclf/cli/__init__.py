"""The `skinclf` command line: parse, call one typed library function, render.

Sits above every stage and imports them only inside commands, so `--help` starts instantly (the one
exception: `engines.load`, whose engine registry writes `--engine`'s help).
Commands register on `app.app` in pipeline order; shared options live in `options`.
"""

from __future__ import annotations

import sys

# The import order is the order of the commands in `skinclf --help`: the pipeline's.
from skinclf.cli import data, build, run, listen  # noqa: F401, I001 - registers the commands on `app` (listen: issue 32)
from skinclf.cli.app import app

__all__ = ["app", "main"]


def main() -> None:
    """Console-script entry point."""
    run.AS_COMMAND = True
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
