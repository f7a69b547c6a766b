"""The Typer app every command registers on, and the one place errors become output.

Each command ends in one call to a typed library function with keyword-only options whose
defaults come from `skinclf.config`. Library code raises `SkinclfError` for bad input; this
module alone catches it, prints `Error: <message>` on stderr and exits 1. Keras is imported
only by the commands that need it, so `--help`, `fetch` and `prepare` start instantly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Optional

import typer
from rich.console import Console

from skinclf import __version__
from skinclf.errors import SkinclfError


class Command(typer.core.TyperCommand):
    """Help without type noise: no `<bool>` beside --help, `DIR` rather than `{DIR}` in usage."""

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option

    def collect_usage_pieces(self, ctx) -> list[str]:
        return [piece.replace("{", "").replace("}", "") for piece in super().collect_usage_pieces(ctx)]


app = typer.Typer(
    name="skinclf",
    help=(
        "Classify dermoscopic skin-lesion images in batches (MobileNet trained on HAM10000).\n\n"
        "Decision support for clinicians: the output is not a diagnosis."
    ),
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)
out = Console(highlight=False, soft_wrap=True)


# Packages the light install (`pip install skinclf`) leaves out, and the extra that brings each.
_EXTRAS = {
    "tensorflow": ("TensorFlow", "train"),
    "keras": ("TensorFlow and Keras", "train"),
    "matplotlib": ("matplotlib", "train"),
    "kaggle": ("the kaggle client", "train"),
    "onnx": ("onnx", "train"),
    "torch": ("PyTorch (KERAS_BACKEND=torch)", "train"),
    "jax": ("JAX (KERAS_BACKEND=jax)", "train"),
    "fastapi": ("FastAPI", "serve"),
    "uvicorn": ("uvicorn", "serve"),
}


def _missing_extra(exc: ModuleNotFoundError) -> str | None:
    """`skinclf <command> needs <package>: pip install "skinclf[<extra>]"`, for a known optional package."""
    import importlib

    top = (exc.name or "").split(".")[0]
    if top not in _EXTRAS:
        return None
    what, extra = _EXTRAS[top]
    command = "this command"
    for module in ("typer._click.globals", "click"):  # newer typer releases vendor click
        try:
            ctx = importlib.import_module(module).get_current_context(silent=True)
        except (ImportError, AttributeError):
            continue
        if ctx is not None and ctx.info_name:
            command = f"skinclf {ctx.info_name}"
            break
    return f'{command} needs {what}, which this install leaves out: pip install "skinclf[{extra}]"'


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn SkinclfError (and environmental failures: disk full, out of memory) into one line on
    stderr and exit status 1 (130 on Ctrl-C)."""
    try:
        yield
    except SkinclfError as exc:
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(1) from None
    except ModuleNotFoundError as exc:
        message = _missing_extra(exc)
        if message is None:
            raise
        typer.echo(f"Error: {message}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        typer.echo("Interrupted.", err=True)
        raise typer.Exit(130) from None
    except MemoryError:
        typer.echo("Error: out of memory; try a smaller --batch-size", err=True)
        raise typer.Exit(1) from None
    except OSError as exc:  # the machine, not the input: a full disk, a vanished mount, ...
        where = f": {exc.filename}" if exc.filename else ""
        typer.echo(f"Error: {exc.strerror or exc}{where}", err=True)
        raise typer.Exit(1) from None


def examples(*lines: str) -> str:
    """Help epilog listing example invocations, one per line."""
    return "**Examples**\n\n```\n" + "\n".join(lines) + "\n```"


def _version(value: bool) -> None:
    if value:
        typer.echo(f"skinclf {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Optional[bool] = typer.Option(
        None, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Classify dermoscopic skin-lesion images in batches."""






























