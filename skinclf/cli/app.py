"""The Typer app every command registers on, and the one place errors become output.

Each command ends in one call to a typed library function with keyword-only options whose
defaults come from `skinclf.config`. Library code raises `SkinclfError` for bad input; this
module alone catches it, prints `Error: <message>` on stderr and exits 1. Keras is imported
only by the commands that need it, so `--help`, `fetch` and `prepare` start instantly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable, Iterator
from typing import Any
from typing import Optional

import typer
from rich.console import Console

from skinclf import __version__
from skinclf.errors import Interrupted, SkinclfError

# What an option's value looks like in help when it names none itself: never `<int>`, `<path>`.
_METAVARS = {"int": "N", "float": "X", "Path": "PATH", "str": "TEXT", "bool": ""}


def _plain_help(params: list) -> list:
    """Give every parameter a plain metavar (`N`, `PATH`, none for a flag) and drop the type
    column typer adds after an argument's name (`DIR <path>`, `MODEL <list[Path]>`)."""
    for param in params:
        if param.param_type_name == "argument":
            if param.metavar is None:
                param.metavar = param.name.upper()
            param.display_type_rich = lambda ctx: None
        elif param.metavar is None:
            flag = getattr(param, "is_flag", False) or getattr(param, "count", False)
            kind = param.bare_type() if hasattr(param, "bare_type") else ""
            param.metavar = "" if flag else _METAVARS.get(kind.removeprefix("Optional[").rstrip("]"), "VALUE")
    return params


class Command(typer.core.TyperCommand):
    """Help without type noise: no `<bool>`, `<int>`, `<path>`; `DIR` rather than `{DIR}` in usage."""

    def get_params(self, ctx) -> list:
        return _plain_help(super().get_params(ctx))

    def collect_usage_pieces(self, ctx) -> list[str]:
        return [piece.replace("{", "").replace("}", "") for piece in super().collect_usage_pieces(ctx)]


def _one_line(exc: Exception) -> str:
    """A click usage error as one line, with where to read more."""
    ctx = getattr(exc, "ctx", None)
    message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
    message = " ".join(message.split())
    where = f"; see {ctx.command_path} --help" if ctx is not None else ""
    return f"Error: {message.rstrip('.')}{where}"


class Group(typer.core.TyperGroup):
    """The root: the same plain help, and argument errors (missing argument, bad value, unknown
    option or command) as one line `Error: ...` on stderr with exit status 1, as every other error."""

    def get_params(self, ctx) -> list:
        return _plain_help(super().get_params(ctx))

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        import sys

        from typer import _click as click

        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.NoArgsIsHelpError:  # `skinclf` alone: the help (already shown), not an error
            code = 0
        except click.exceptions.ClickException as exc:
            if not standalone_mode:
                raise
            say(_one_line(exc))
            code = 1
        except typer.Abort:
            if not standalone_mode:
                raise
            typer.echo("Interrupted.", err=True)
            code = 130
        if not standalone_mode:
            return code
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    name="skinclf",
    help=(
        "Classify dermoscopic skin-lesion images in batches (MobileNet trained on HAM10000).\n\n"
        "Decision support for clinicians: the output is not a diagnosis."
    ),
    no_args_is_help=True,
    add_completion=False,
    cls=Group,
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
    "ray": ("Ray (with Ray Data)", "ray"),
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


def say(text: str, *, err: bool = True) -> None:
    """Print a line about the user's files and inputs (stderr unless `err` is False), every
    character a terminal would act on shown escaped (`ui.printable`)."""
    from skinclf.ui import printable

    typer.echo(printable(text, lines=True), err=err)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn SkinclfError (and environmental failures: disk full, out of memory) into one line on
    stderr and exit status 1 (130 on Ctrl-C)."""
    try:
        yield
    except SkinclfError as exc:
        say(f"Error: {exc}")
        raise typer.Exit(1) from None
    except ModuleNotFoundError as exc:
        message = _missing_extra(exc)
        if message is None:
            raise
        typer.echo(f"Error: {message}", err=True)
        raise typer.Exit(1) from None
    except Interrupted as exc:  # the library says what to do next
        say(f"Interrupted: {exc.hint}")
        raise typer.Exit(130) from None
    except KeyboardInterrupt:
        typer.echo("Interrupted.", err=True)
        raise typer.Exit(130) from None
    except BrokenPipeError:  # `skinclf predict DIR --out - | head`: the reader has all it wanted
        _quiet_stdout()
        raise typer.Exit(141) from None
    except MemoryError:
        typer.echo("Error: out of memory; try a smaller --batch-size", err=True)
        raise typer.Exit(1) from None
    except OSError as exc:  # the machine, not the input: a full disk, a vanished mount, ...
        where = f": {exc.filename}" if exc.filename else ""
        say(f"Error: {exc.strerror or exc}{where}")
        raise typer.Exit(1) from None


def _quiet_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail again (and print a
    traceback) on the closed pipe; 141 is the status a shell gives a process ended by SIGPIPE."""
    import os
    import sys

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # not a real file (a test runner's buffer)
        pass


def with_settings(settings_class: type, **shared: Any) -> Callable[[Callable], Callable]:
    """Decorator: the command takes every field of the frozen dataclass `settings_class` as a
    parameter, in field order: an option (or the argument) from the field's `config.option`
    (flags, metavar, help, default), or for a field in `shared` that `cli.options` type with the
    field's default. The decorated function receives one `settings_class` instance."""
    hints = typing.get_type_hints(settings_class)
    params = [_parameter(f, shared.get(f.name) or hints[f.name], f.name in shared)
              for f in dataclasses.fields(settings_class)]

    def decorate(command: Callable) -> Callable:
        @functools.wraps(command)
        def run(**given: Any) -> Any:
            return command(settings_class(**given))

        run.__signature__ = inspect.Signature(params)  # what typer reads
        run.__annotations__ = {p.name: p.annotation for p in params}
        del run.__wrapped__
        return run

    return decorate


def _parameter(f: dataclasses.Field, annotation: Any, shared: bool) -> inspect.Parameter:
    if shared:  # an Annotated type of cli.options carries the option; the field gives the default
        return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=f.default)
    meta, default = f.metadata, (... if f.default is dataclasses.MISSING else f.default)
    declare = (typer.Argument(default, metavar=meta["metavar"], help=meta["help"]) if meta["argument"] else
               typer.Option(default, *meta["flags"], metavar=meta["metavar"], help=meta["help"]))
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=declare)


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
