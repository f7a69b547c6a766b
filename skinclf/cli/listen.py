"""`skinclf listen` (issue 32): a DICOM Storage SCP that classifies each received image into a CSV."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Optional

import typer

from skinclf.cli import options
from skinclf.cli.app import Command, app, examples, user_errors


@app.command(
    cls=Command,
    epilog=examples(
        "skinclf listen --allow DERMCAM --out received.csv                 # 127.0.0.1:11112, AE title SKINCLF",
        "skinclf listen --allow PACS1 --allow DERMCAM --sr reports/ --out received.csv",
        "skinclf listen --host 10.0.0.5 --port 104 --ae-title DERMAI --allow PACS1 --out received.csv",
    ),
)
def listen(
    out_csv: Path = typer.Option(Path("received.csv"), "--out", metavar="CSV",
                                 help="CSV the rows are appended to (created, or continued if listen wrote it)."),
    allow: list[str] = typer.Option([], "--allow", metavar="AE",
                                    help="A calling AE title allowed to send (repeat for each); all others are refused."),
    host: str = typer.Option("127.0.0.1", "--host", metavar="HOST",
                             help="Address to listen on; anything but loopback is reachable by others."),
    port: int = typer.Option(11112, "--port", help="TCP port (0: any free port)."),
    ae_title: str = typer.Option("SKINCLF", "--ae-title", metavar="AE", help="This listener's AE title."),
    max_associations: int = typer.Option(4, "--max-associations", metavar="N",
                                         help="Simultaneous associations accepted; more are refused."),
    max_mb: float = typer.Option(64.0, "--max-mb", metavar="MB", help="Largest object accepted; larger ones are aborted."),
    sr: Optional[Path] = typer.Option(None, "--sr", metavar="DIR", help="Write a DICOM SR per classified image here."),
    dicom_metadata: bool = typer.Option(True, "--dicom-metadata/--no-dicom-metadata", metavar="",
                                        help="Use PatientAge, PatientSex and the anatomic region for the metadata head."),
    model: options.Model = None,
    max_objects: int = typer.Option(0, "--max-objects", metavar="N", help="Stop after N images (0: until Ctrl-C)."),
) -> None:
    """Receive dermoscopic DICOM images (C-STORE) and classify each into a predict-style CSV.

    Needs pip install "skinclf[dicom]". Stops on Ctrl-C or SIGTERM. Decision support, not a diagnosis.
    """
    stop = threading.Event()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        with user_errors():
            from skinclf.batch.received import run_listener
            from skinclf.config import ListenSettings

            try:
                settings = ListenSettings(out=out_csv, model=model, host=host, port=port, ae_title=ae_title,
                                          allow=tuple(allow), max_associations=max_associations, max_mb=max_mb, sr=sr,
                                          dicom_metadata=dicom_metadata, max_objects=max_objects)
                counts = run_listener(
                    settings, stop=stop,
                    on_ready=lambda p: typer.echo(f"Listening on {host}:{p} as {ae_title}, accepting "
                                                  f"{', '.join(allow)}; Ctrl-C stops.", err=True))
            except KeyboardInterrupt:
                stop.set()
                counts = None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if counts is not None:
        typer.echo(f"Stopped: {counts['rows']} images classified into {out_csv}, {counts['failed']} failed, "
                   f"{counts['refused']} associations refused, {counts['aborted']} aborted. "
                   "Decision support, not a diagnosis.", err=True)
    else:
        typer.echo(f"Stopped (interrupted); rows so far are in {out_csv}.", err=True)
