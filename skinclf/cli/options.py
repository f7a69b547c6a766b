"""Options several commands share, defined once (typer `Annotated` types); defaults stay in `config`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from skinclf.engines.load import engine_help  # the registered engines (the one stage import at startup)

Model = Annotated[Optional[Path], typer.Option(
    "--model", metavar="PATH",
    help="Model bundle (.keras, or its .onnx form) [default: $SKINCLF_MODEL, else the bundled model].")]
Engine = Annotated[str, typer.Option("--engine", metavar="NAME", help=engine_help())]
Threads = Annotated[int, typer.Option("--threads", metavar="N", help="ONNX Runtime threads (0: one per usable CPU).")]
Workers = Annotated[int, typer.Option("--workers", metavar="N", help="Threads decoding images beside the model (0: automatic: none on 2 CPUs or fewer, where decoding between batches is faster, else one per usable CPU).")]
BatchSize = Annotated[int, typer.Option("--batch-size", metavar="N", help="Images per model call.")]
Tta = Annotated[int, typer.Option("--tta", metavar="N", help="Average the logits over 4 flips/rotations of each image (--tta 4, 4x slower; the unlike-training flag uses the image as it is). 1: off.")]
Strict = Annotated[bool, typer.Option(
    "--strict", metavar="", help="Exit with status 1 if any file or folder could not be read or classified.")]
Overwrite = Annotated[bool, typer.Option(
    "--overwrite", metavar="", help="Replace an existing output file this command wrote before (never anything else).")]
