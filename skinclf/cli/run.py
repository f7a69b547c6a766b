"""Commands that run a model on images: `predict`, `evaluate`, `explain`, `serve`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from skinclf.cli import options
from skinclf.cli.app import Command, app, examples, out, say, user_errors
from skinclf.cli.render import predict_summary, render_report
from skinclf.config import EVALUATE, EXPLAIN, PREDICT, SERVE

# True when this process is the `skinclf` command itself (set by `skinclf.cli.main`), not a
# caller of the app (tests' CliRunner): only then may `predict --ray local` re-run the process.
AS_COMMAND = False


@app.command(
    cls=Command,
    epilog=examples(
        "skinclf evaluate",
        "skinclf evaluate --model models/skinclf-mobilenet.keras --data data/prepared/test --out reports/test",
        "skinclf evaluate --predictions results.csv --truth ISIC2018_Task3_Test_GroundTruth.csv",
        "skinclf evaluate --predictions results.csv --truth HAM10000_metadata.csv --split data/prepared/split.csv",
        "skinclf evaluate --history --model runs/skinclf-mobilenet.keras --out reports/curves   # a model you trained",
        "skinclf evaluate --json > report.json",
        "skinclf evaluate --model models/skinclf-mobilenet.onnx --data data/prepared/val   # no TensorFlow needed",
        "skinclf evaluate --data data/prepared/val --metadata HAM10000_metadata.csv   # with and without metadata",
    )
)
def evaluate(
    model: options.Model = None,
    data: Path = typer.Option(EVALUATE.data, "--data", metavar="PATH", help="Labelled folder: one sub-folder per class."),
    out_dir: Path = typer.Option(EVALUATE.out, "--out", metavar="PATH", help="Folder for report.json and the PNGs."),
    predictions: Optional[Path] = typer.Option(
        None, "--predictions", metavar="PATH", help="Score this predict CSV instead of running a model (needs --truth)."
    ),
    truth: Optional[Path] = typer.Option(
        None, "--truth", metavar="PATH", help="Ground truth: HAM10000 metadata (image_id,dx) or ISIC one-hot (image,MEL,NV,...)."
    ),
    mel_sensitivity: float = typer.Option(
        EVALUATE.mel_sensitivity, "--mel-sensitivity", metavar="X", help="Melanoma sensitivity for which to report the threshold."
    ),
    history: bool = typer.Option(False, "--history", metavar="", help="Only plot the model's training curves (history.png)."),
    tta: options.Tta = 1,
    batch_size: options.BatchSize = EVALUATE.batch_size,
    split: Optional[Path] = typer.Option(
        None, "--split", metavar="PATH",
        help="split.csv (or its folder) of the `skinclf prepare` run the model was trained on, for models that do not "
        "record their training images [default: where the model was trained, if found].",
    ),
    engine: options.Engine = EVALUATE.engine,
    threads: options.Threads = EVALUATE.threads,
    as_json: bool = typer.Option(False, "--json", metavar="", help="Print the report as JSON on stdout (no tables)."),
    overwrite: options.Overwrite = False,
    metadata: Optional[Path] = typer.Option(
        None, "--metadata", metavar="CSV",
        help="Patient metadata (as predict --metadata): also report the figures with the model's metadata head.",
    ),
) -> None:
    """Confusion matrix, per-class precision/recall/F1, balanced accuracy, top-k accuracy, ROC-AUC,
    melanoma sensitivity/specificity, and training curves.

    Writes report.json, confusion_matrix.png, roc.png and history.png into --out. The report says
    whether the data is held out from the model's training split.
    """
    with user_errors():
        from skinclf.evaluation.evaluate import run_evaluation

        result = run_evaluation(model=model, data=data, out=out_dir, predictions=predictions, truth=truth,
                                history=history, mel_sensitivity=mel_sensitivity, batch_size=batch_size, tta=tta,
                                split=split, engine=engine, threads=threads, overwrite=overwrite,
                                metadata=metadata)
    if not result.report:  # --history: only the curves
        say("Wrote " + ", ".join(str(p) for p in result.files), err=False)
        return
    if as_json:
        typer.echo(json.dumps(result.report, indent=2))
        return
    render_report(result.report)
    say("Wrote " + ", ".join(str(p) for p in result.files), err=False)


@app.command(
    cls=Command,
    epilog=examples(
        "skinclf predict ./images --out results.csv",
        "skinclf predict ./images --out results.csv --top-k 2 --all-probs",
        "skinclf predict /mnt/clinic/2026-11 --out nov.csv --resume     # finish an interrupted run",
        "skinclf predict /mnt/clinic/2026-11 --out nov.csv --resume --verify   # and re-hash every kept file",
        "skinclf predict ./images --out - --no-recursive | head",
        "skinclf predict ./images --out results.csv --model my-model.keras --strict",
        "skinclf predict ./images --out results.csv --engine keras          # TensorFlow instead of ONNX Runtime",
        "skinclf predict ./images --out results.csv --model my-model.onnx      # any exported model",
        "skinclf predict ./images --out results.csv --metadata HAM10000_metadata.csv   # age, sex, body site",
        "skinclf predict ./images --out results.csv --ray local              # a Ray on this machine (loopback only)",
        "skinclf predict /mnt/archive --out archive.csv --ray ray://head.internal:10001   # a Ray cluster",
    )
)
def predict(
    directory: Path = typer.Argument(..., metavar="DIR", help="Folder of images (JPEG, PNG, BMP, TIFF) to classify."),
    out_csv: str = typer.Option("results.csv", "--out", metavar="CSV", help="CSV to write, or - for stdout."),
    model: options.Model = None,
    top_k: Optional[int] = typer.Option(
        None, "--top-k", metavar="N",
        help=f"How many most-probable classes per image [default: {PREDICT.top_k}, or all the model's classes if fewer].",
    ),
    batch_size: options.BatchSize = PREDICT.batch_size,
    recursive: bool = typer.Option(True, "--recursive/--no-recursive", metavar="", help="Include sub-folders."),
    all_probs: bool = typer.Option(False, "--all-probs", metavar="", help="Add a `prob_<class>` column for every class."),
    resume: bool = typer.Option(
        False, "--resume", metavar="", help="Continue an interrupted run (same options): skip files already in the CSV."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", metavar="",
        help="Start over, discarding the rows of an interrupted run (`CSV.partial`); also needed to replace a file "
        "that is not an earlier predict CSV.",
    ),
    verify: bool = typer.Option(
        False, "--verify", metavar="",
        help="With --resume: keep a row only if its file's SHA-256 is the one recorded with it (catches an edit "
        "in place that kept size and modification time, e.g. cp -p or rsync -t).",
    ),
    strict: options.Strict = False,
    tta: options.Tta = 1,
    workers: options.Workers = PREDICT.workers,
    engine: options.Engine = PREDICT.engine,
    threads: options.Threads = PREDICT.threads,
    metadata: Optional[Path] = typer.Option(
        None, "--metadata", metavar="CSV",
        help="Patient metadata per image (image_id or path; age, sex, body site; HAM10000 and ISIC column names "
        "work as they are), added by the model's metadata head. Images without a row: image only.",
    ),
    ray: Optional[str] = typer.Option(
        None, "--ray", metavar="ADDRESS",
        help="Classify on a Ray cluster: local (a Ray on this machine, loopback only), auto (the cluster in "
        "$RAY_ADDRESS or running here) or ray://HOST:PORT. The folder must be readable by every worker at the same "
        'path. Needs pip install "skinclf[ray]".',
    ),
    ray_workers: int = typer.Option(
        0, "--ray-workers", metavar="N", help="With --ray: model actors on the cluster (0: one per CPU of the cluster)."
    ),
) -> None:
    """Classify every image in a folder into a CSV of the top-k classes and their probabilities.

    One row per file, sorted by path; a file that cannot be read, or a folder that cannot be
    listed, gets a row with an error and the batch goes on; an image the model cannot judge well
    (far too small) gets a warning. The output informs a clinician; it is not a diagnosis. The
    model's identity is recorded in a JSON sidecar (results.csv.json).
    """
    with user_errors():
        if ray is not None and AS_COMMAND:
            from skinclf.batch.ray_netns import isolate

            isolate(ray)  # --ray local: re-runs this command in a network namespace of its own (loopback only)
        from skinclf.batch.predict import predict_directory

        summary = predict_directory(
            directory=directory, out=out_csv, model=model, top_k=top_k, batch_size=batch_size, recursive=recursive,
            all_probs=all_probs, resume=resume, overwrite=overwrite, strict=strict, tta=tta, workers=workers,
            engine=engine, threads=threads, metadata=metadata, ray=ray, ray_workers=ray_workers, verify=verify,
        )
    for note in summary.notes:
        say(f"Note: {note}")
    say(predict_summary(summary))


@app.command(
    cls=Command,
    epilog=examples(
        "skinclf serve                      # then open http://127.0.0.1:8000/",
        "skinclf serve --port 8080 --model my-model.keras",
        "skinclf serve --max-files 16 --max-file-mb 10",
        "skinclf serve --host 0.0.0.0       # no authentication: trusted networks only",
        "curl -F files=@a.jpg 'http://127.0.0.1:8000/api/predict?format=csv'",
    )
)
def serve(
    host: str = typer.Option(SERVE.host, "--host", metavar="HOST", help="Address to listen on; anything but loopback is reachable by others."),
    port: int = typer.Option(SERVE.port, "--port", help="Port to listen on (0: any free port)."),
    model: options.Model = None,
    engine: options.Engine = SERVE.engine,
    batch_size: options.BatchSize = SERVE.batch_size,
    top_k: int = typer.Option(SERVE.top_k, "--top-k", help="Default number of most-probable classes per image."),
    max_file_mb: float = typer.Option(SERVE.max_file_mb, "--max-file-mb", help="Largest accepted file, in MB (413 above)."),
    max_files: int = typer.Option(SERVE.max_files, "--max-files", help="Most files in one request (413 above)."),
    max_request_mb: float = typer.Option(
        SERVE.max_request_mb, "--max-request-mb", help="Largest accepted request, in MB (413 above)."
    ),
) -> None:
    """Serve a local web page and JSON API that classify images with the same model as predict.

    For the clinic desk: drop one image or a whole folder on the page, see the most probable
    classes per image, sort by melanoma probability, download the CSV `skinclf predict` would
    write. Images are decoded in memory, never stored or logged, and never leave this machine.
    API: POST /api/predict, GET /api/model, GET /healthz; documented at /docs. Needs the extra
    `pip install "skinclf[serve]"`.
    """

    def ready(info) -> None:
        for warning in info.warnings:
            say(f"Warning: {warning}")
        say(f"Model {info.model['name']} ({info.model['sha256'][:12]}, {info.model['engine']} engine) loaded.", err=False)
        say(f"Open {info.url} in a browser (Ctrl-C to stop). Decision support, not a diagnosis.", err=False)

    with user_errors():
        from skinclf.web.server import serve as run_server

        run_server(host=host, port=port, model=model, engine=engine, batch_size=batch_size, top_k=top_k,
                   max_file_mb=max_file_mb, max_files=max_files, max_request_mb=max_request_mb, on_ready=ready)


@app.command(
    cls=Command,
    epilog=examples(
        "skinclf explain lesion.jpg --out reports/explain",
        "skinclf explain ./images --out reports/explain --top-k 2",
        "skinclf explain ./images --out maps --patch 48 --stride 24 --fill grey --model my.keras",
        "skinclf explain ./images --out maps --strict     # exit 1 if any file could not be read",
    )
)
def explain(
    source: Path = typer.Argument(..., help="An image file, or a folder of images (searched recursively)."),
    out_dir: Path = typer.Option(EXPLAIN.out, "--out", help="Folder for one PNG per image and explain.json."),
    model: options.Model = None,
    top_k: int = typer.Option(EXPLAIN.top_k, "--top-k", help="How many most-probable classes to show."),
    patch: int = typer.Option(EXPLAIN.patch, "--patch", help="Side of the occluding patch, in model-input pixels."),
    stride: int = typer.Option(EXPLAIN.stride, "--stride", help="Step of the sliding patch (smaller: finer, slower)."),
    fill: str = typer.Option(EXPLAIN.fill, "--fill", metavar="FILL", help="What covers the patch: blur, grey or mean (colour)."),
    max_side: int = typer.Option(EXPLAIN.max_side, "--max-side", help="Longest side of the picture's panels."),
    batch_size: options.BatchSize = EXPLAIN.batch_size,
    strict: options.Strict = False,
    overwrite: options.Overwrite = False,
) -> None:
    """Heat maps of what drove each image's top class (occlusion sensitivity), beside the top-k bars.

    A patch slides over the image and the drop of the top class's probability is mapped; it
    needs forward passes only, so it works with any engine. Bad files get one line each and
    the batch goes on. A map shows where the model looked, not why; it is not a diagnosis.
    """
    with user_errors():
        from skinclf.trust.explain import explain_images

        summary = explain_images(source=source, out=out_dir, model=model, top_k=top_k, patch=patch, stride=stride,
                                 fill=fill, max_side=max_side, batch_size=batch_size, strict=strict,
                                 overwrite=overwrite)
    for item in summary.explained:
        top = ", ".join(f"{c} {p:.2f}" for c, p in item.top)
        odd = "  [unlike the training images]" if item.unlike_training else ""
        say(f"{item.png}  ({item.path}: {top}){odd}", err=False)
    say(f"{len(summary.explained)} explained, {len(summary.errors)} could not be read; wrote "
        f"{summary.out / 'explain.json'}")
