"""Commands that run a model on images: `predict`, `evaluate`, `explain`, `serve`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from skinclf.cli import options
from skinclf.cli.app import Command, app, examples, out, say, user_errors, with_settings
from skinclf.cli.render import predict_summary, render_report
from skinclf.config import SERVE, EvaluateConfig, ExplainConfig, PredictConfig

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
@with_settings(EvaluateConfig, model=options.Model, tta=options.Tta, batch_size=options.BatchSize,
               engine=options.Engine, threads=options.Threads, overwrite=options.Overwrite)
def evaluate(config: EvaluateConfig) -> None:
    """Confusion matrix, per-class precision/recall/F1, balanced accuracy, top-k accuracy, ROC-AUC,
    melanoma sensitivity/specificity, and training curves.

    Writes report.json, confusion_matrix.png, roc.png and history.png into --out. The report says
    whether the data is held out from the model's training split.
    """
    with user_errors():
        from skinclf.evaluation.evaluate import run_evaluation

        result = run_evaluation(config)
    if not result.report:  # --history: only the curves
        say("Wrote " + ", ".join(str(p) for p in result.files), err=False)
        return
    if config.as_json:
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
@with_settings(PredictConfig, model=options.Model, batch_size=options.BatchSize, strict=options.Strict,
               tta=options.Tta, workers=options.Workers, engine=options.Engine, threads=options.Threads)
def predict(config: PredictConfig) -> None:
    """Classify every image in a folder into a CSV of the top-k classes and their probabilities.

    One row per file, sorted by path; a file that cannot be read, or a folder that cannot be
    listed, gets a row with an error and the batch goes on; an image the model cannot judge well
    (far too small) gets a warning. The output informs a clinician; it is not a diagnosis. The
    model's identity is recorded in a JSON sidecar (results.csv.json).
    """
    with user_errors():
        if config.ray is not None and AS_COMMAND:
            from skinclf.batch.ray_netns import isolate

            isolate(config.ray)  # --ray local: re-runs this command in a network namespace of its own (loopback only)
        from skinclf.batch.predict import predict as run_predict

        summary = run_predict(config)
    for note in summary.notes:
        say(f"Note: {note}")
    say(predict_summary(summary))


@app.command(
    cls=Command,
    epilog=examples(
        "skinclf serve                      # then open http://127.0.0.1:8000/",
        "skinclf serve --port 8080 --model my-model.keras",
        "skinclf serve --max-files 16 --max-file-mb 10",
        "skinclf serve --static site/       # a site from skinclf export --format web",
        "skinclf serve --host 0.0.0.0       # no authentication: trusted networks only",
        "skinclf serve --host 0.0.0.0 --allowed-hosts skinclf.lan  # answered under that name too",
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
    allowed_hosts: str = typer.Option(
        "", "--allowed-hosts", metavar="NAMES", envvar="SKINCLF_ALLOWED_HOSTS",
        help="Host names or addresses (comma-separated) the server answers to, besides localhost, 127.0.0.1, ::1 "
             "and the --host address; other Host headers get 400. '*': any (no DNS-rebinding protection).",
    ),
    static: Optional[Path] = typer.Option(
        None, "--static", metavar="DIR", help="Host a site made by `skinclf export --format web` instead (loopback "
        "only; the browser classifies, the server never receives an image)."
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

    if static is not None:  # skinclf/web/static_host.py
        with user_errors():
            from skinclf.web.static_host import serve_static

            serve_static(static, host=host, port=port, on_ready=lambda url: typer.echo(
                f"Open {url} in a browser (Ctrl-C to stop): images are classified in the browser and never sent "
                "here. Decision support, not a diagnosis."))
        return
    with user_errors():
        from skinclf.web.server import serve as run_server

        run_server(host=host, port=port, model=model, engine=engine, batch_size=batch_size, top_k=top_k,
                   max_file_mb=max_file_mb, max_files=max_files, max_request_mb=max_request_mb,
                   allowed_hosts=allowed_hosts, on_ready=ready)


@app.command(
    cls=Command,
    epilog=examples(
        "skinclf explain lesion.jpg --out reports/explain",
        "skinclf explain ./images --out reports/explain --top-k 2",
        "skinclf explain ./images --out maps --patch 48 --stride 24 --fill grey --model my.keras",
        "skinclf explain ./images --out maps --strict     # exit 1 if any file could not be read",
    )
)
@with_settings(ExplainConfig, model=options.Model, batch_size=options.BatchSize, strict=options.Strict,
               overwrite=options.Overwrite)
def explain(config: ExplainConfig) -> None:
    """Heat maps of what drove each image's top class (occlusion sensitivity), beside the top-k bars.

    A patch slides over the image and the drop of the top class's probability is mapped; it
    needs forward passes only, so it works with any engine. Bad files get one line each and
    the batch goes on. A map shows where the model looked, not why; it is not a diagnosis.
    """
    with user_errors():
        from skinclf.trust.explain import explain_images

        summary = explain_images(config)
    for item in summary.explained:
        top = ", ".join(f"{c} {p:.2f}" for c, p in item.top)
        odd = "".join(f"  [{w}]" for w in item.warnings)
        say(f"{item.png}  ({item.path}: {top}){odd}", err=False)
    say(f"{len(summary.explained)} explained, {len(summary.errors)} could not be read; wrote "
        f"{summary.out / 'explain.json'}")
