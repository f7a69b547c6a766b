"""The command line itself: version, help with examples for every command, `python -m`."""

from __future__ import annotations

import subprocess
import sys

import pytest

from skinclf import __version__
from skinclf.cli import app

COMMANDS = sorted(c.name or c.callback.__name__ for c in app.registered_commands)


def test_version(runner) -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"skinclf {__version__}"


def test_no_arguments_shows_help(runner) -> None:
    result = runner.invoke(app, [])
    assert result.exit_code == 0 and result.output.count("Usage:") == 1  # once, not twice
    for command in COMMANDS:
        assert command in result.output


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_examples(runner, command: str) -> None:
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0
    assert "Examples" in result.output
    assert f"skinclf {command}" in result.output


def test_python_dash_m() -> None:
    done = subprocess.run([sys.executable, "-m", "skinclf", "--version"], capture_output=True, text=True, check=False)
    assert done.returncode == 0 and done.stdout.strip() == f"skinclf {__version__}"


def test_unknown_option_is_one_line_and_exit_1(runner) -> None:
    result = runner.invoke(app, ["prepare", "--no-such-option"])
    assert result.exit_code == 1
    assert result.output.startswith("Error: No such option: --no-such-option") and result.output.count("\n") == 1


def test_environmental_failure_is_one_line(runner, monkeypatch, tmp_path) -> None:
    import skinclf.data.prepare as prepare_mod

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "out" / "split.csv"))

    monkeypatch.setattr(prepare_mod, "prepare_dataset", disk_full)
    result = runner.invoke(app, ["prepare", "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: No space left on device: {tmp_path / 'out' / 'split.csv'}"


def test_atomic_outputs_replace_whole_files_with_normal_permissions(tmp_path) -> None:
    import os

    from skinclf.files import atomic_path, atomic_write

    target = tmp_path / "results.csv"
    atomic_write(target, "old\n")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half a ro")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["results.csv"]
    mask = os.umask(0o022)
    try:
        atomic_write(target, "new\n")
    finally:
        os.umask(mask)
    assert target.read_text() == "new\n" and target.stat().st_mode & 0o777 == 0o644
