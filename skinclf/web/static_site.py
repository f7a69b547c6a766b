"""`skinclf export MODEL --format web --out DIR`: a static site that classifies in the browser.

The site is plain files any static server can host (or `skinclf serve --static DIR`): the page
(`index.html`, from the page serve shows and the site's parts, `skinclf.web.page`; `page.js` and
`page.css`, shared with serve's page; `app.js` and `style.css`, shipped in `skinclf/web/site/`),
the model's ONNX graph (`model.onnx`), ONNX Runtime Web's single-threaded WebAssembly files (`ort/`), and
`skinclf-web.json`: everything the page needs to give the row `skinclf predict` gives.

What reproduces predict, and where it lives:

- decoding and resizing: in the page's script (JPEG/PNG/BMP decoded by the browser; the same
  reduction by 2, 4 or 8 that Pillow's JPEG draft mode applies, then Pillow's bilinear
  antialiased resize, fixed-point separable triangle filter, reimplemented);
- colour constancy (Shades of Gray) and the MobileNet scaling: inside the ONNX graph;
- prior correction, melanoma weight and temperature: folded into the graph's last layer
  (`model.network.fold_logit_transform`), so `softmax(logits)` is predict's probability row;
- the out-of-distribution score (Mahalanobis on the graph's `features` output, or a logit
  score), its two tiers (`threshold`, `rare_threshold`) and its percentile (the sorted
  validation scores): the bundle's record, computed in the page as `model.outlier` does;
- the row itself (`batch.results.columns` and `row`: `top1_name`, `mel_prob`, `ood_percentile`,
  the warning cell, numbers formatted as Python formats them): in the page's script;
- the metadata head (age, sex, site), when the bundle has one that fits: its JSON, applied in
  the page as `model.patient_head.MetadataHead.apply` does.

ONNX Runtime Web comes from the npm registry, pinned (`ORT_WEB_VERSION`) and checked against its
published integrity (sha512) before any file of it is used; it is cached in the user's cache
folder, or taken from a local tarball (`runtime`). It is never part of the repository.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from skinclf import __version__
from skinclf.errors import SkinclfError

ORT_WEB_VERSION = "1.22.0"
# `npm view onnxruntime-web@1.22.0 dist.integrity dist.tarball`
ORT_WEB_INTEGRITY = "sha512-Ud/+EBo6mhuaQWt/OjaOk0iNWjXqJoeeMFr6xQEERZdIZH2OWpGzuujz7lfuOBjUa6TEE/sc4nb7Da5dNL34fg=="
ORT_WEB_URL = f"https://registry.npmjs.org/onnxruntime-web/-/onnxruntime-web-{ORT_WEB_VERSION}.tgz"
# The smallest set for the single-threaded CPU build: the loader (UMD), the Emscripten glue it
# imports, and the SIMD WebAssembly (the threaded build runs on one thread without cross-origin
# isolation; the JSEP/WebGPU builds and the all-in-one bundles are left out).
RUNTIME_FILES = ("ort.wasm.min.js", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
PAGE_FILES = ("index.html", "app.js", "style.css")  # the site's own; page.js and page.css come from skinclf/web/static
CONFIG = "skinclf-web.json"
MODEL_FILE = "model.onnx"
SITE_FORMAT = "skinclf-web/1"
WEIGHTS = ("auto", "float16", "float32", "int8")  # auto: int8 where the bundle has its int8 form, else float16
BUDGET_BYTES = 30 * 1000 * 1000
SHORT_DISCLAIMER = "decision support, not a diagnosis"


@dataclass
class WebExport:
    """What `export_web` wrote."""

    out: Path
    size_bytes: int
    model_bytes: int
    runtime_bytes: int
    weights: str
    runtime: Path
    seconds: float
    over_budget: bool


# --- the runtime tarball ---------------------------------------------------------------------------


def cache_dir() -> Path:
    """The user's cache folder for skinclf: $XDG_CACHE_HOME/skinclf, else ~/.cache/skinclf."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "skinclf"


def cached_runtime() -> Path:
    return cache_dir() / f"onnxruntime-web-{ORT_WEB_VERSION}.tgz"


def integrity_of(data: bytes) -> str:
    """npm's integrity string (Subresource Integrity, sha512) of `data`."""
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode("ascii")


def check_runtime(path: Path, data: bytes | None = None) -> bytes:
    """The bytes of the tarball at `path` if they are the pinned onnxruntime-web release; raises otherwise."""
    data = Path(path).read_bytes() if data is None else data
    found = integrity_of(data)
    if found != ORT_WEB_INTEGRITY:
        raise SkinclfError(f"{path} is not onnxruntime-web {ORT_WEB_VERSION} as published on the npm registry: its "
                           f"integrity is {found[:30]}..., expected {ORT_WEB_INTEGRITY[:30]}...; delete it, or pass "
                           f"--runtime onnxruntime-web-{ORT_WEB_VERSION}.tgz (npm pack onnxruntime-web@"
                           f"{ORT_WEB_VERSION})")
    return data


def fetch_runtime(runtime: Path | None = None, *, url: str = ORT_WEB_URL, timeout: float = 120.0) -> tuple[Path, bytes]:
    """The verified runtime tarball: `runtime` if given, else the cached copy, else downloaded
    from the npm registry into the cache. Whichever it is, its hash must match the pin."""
    if runtime is not None:
        runtime = Path(runtime)
        if not runtime.is_file():
            raise SkinclfError(f"--runtime {runtime}: file not found (expected onnxruntime-web-{ORT_WEB_VERSION}.tgz, "
                               f"from: npm pack onnxruntime-web@{ORT_WEB_VERSION})")
        return runtime, check_runtime(runtime)
    cached = cached_runtime()
    if cached.is_file():
        return cached, check_runtime(cached)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:  # noqa: S310 - a fixed https URL
            data = answer.read()
    except OSError as exc:
        raise SkinclfError(f"cannot download onnxruntime-web {ORT_WEB_VERSION} from {url} ({exc}); on a machine "
                           f"without network pass --runtime onnxruntime-web-{ORT_WEB_VERSION}.tgz (made elsewhere "
                           f"with: npm pack onnxruntime-web@{ORT_WEB_VERSION})") from None
    check_runtime(Path(url), data)
    cached.parent.mkdir(parents=True, exist_ok=True)
    from skinclf.files import atomic_write

    atomic_write(cached, data)
    return cached, data


def runtime_files(data: bytes) -> dict[str, bytes]:
    """The files of `RUNTIME_FILES` from the package's dist/, and its package.json."""
    found: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for name in (*RUNTIME_FILES, "package.json"):
            member = f"package/{name}" if name == "package.json" else f"package/dist/{name}"
            try:
                fh = tar.extractfile(member)
            except KeyError:
                fh = None
            if fh is None:
                raise SkinclfError(f"the onnxruntime-web tarball has no {member}")
            found[name] = fh.read()
    return found


# --- the model --------------------------------------------------------------------------------------


def _weights_for(model: Path, weights: str) -> str:
    """auto: the int8 form where the bundle has an up-to-date one (it is written only when it holds,
    and it is what `skinclf predict` runs), else float16; an explicit choice as it is."""
    if weights != "auto":
        return weights
    from skinclf.engines.load import int8_form

    if model.suffix.lower() == ".onnx":
        return "int8" if model.name.lower().endswith(".int8.onnx") else "float16"
    candidate = int8_form(model)
    if candidate.is_file():
        from skinclf.engines.onnx import read_model_meta
        from skinclf.files import sha256_file

        if read_model_meta(candidate).get("export", {}).get("source_sha256") == sha256_file(model):
            return "int8"
    return "float16"


def _source_onnx(model: Path, weights: str) -> Path:
    """The ONNX file the site's model is made from: `model` itself (.onnx), or the up-to-date
    ONNX form beside a .keras bundle (`.int8.onnx` for int8)."""
    from skinclf.engines.load import onnx_form
    from skinclf.files import sha256_file
    from skinclf.engines.onnx import read_model_meta

    model = Path(model)
    if not model.is_file():
        raise SkinclfError(f"model file not found: {model}")
    if model.suffix.lower() == ".onnx":
        if weights == "int8" and not model.name.lower().endswith(".int8.onnx"):
            raise SkinclfError(f"--weights int8 takes an int8 export (.int8.onnx), not {model}: make one with skinclf "
                               "export MODEL.keras --format onnx-int8, or choose --weights float16 or float32")
        if weights != "int8" and model.name.lower().endswith(".int8.onnx"):
            raise SkinclfError(f"{model} is an int8 export: pass --weights int8 with it")
        return model
    if model.suffix.lower() != ".keras":
        raise SkinclfError(f"{model}: export --format web takes a .keras bundle or its .onnx export")
    candidate = model.with_name(model.stem + ".int8.onnx") if weights == "int8" else onnx_form(model)
    fmt = "onnx-int8" if weights == "int8" else "onnx"
    make = f"skinclf export {model} --format {fmt} --out {candidate}"
    if not candidate.is_file():
        raise SkinclfError(f"--format web runs the model's ONNX form, and {candidate} does not exist: create it "
                           f"first ({make})")
    meta = read_model_meta(candidate)
    if meta.get("export", {}).get("source_sha256") != sha256_file(model):
        raise SkinclfError(f"{candidate} was exported from another version of {model.name}: re-export it ({make})")
    return candidate


def _float16_weights(proto) -> int:
    """Store the graph's float32 weights as float16, cast back to float32 when the session loads
    (ONNX Runtime folds the casts): half the download, float32 arithmetic. Returns how many."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    casts, kept, done = [], [], 0
    for init in graph.initializer:
        if init.data_type != TensorProto.FLOAT:
            kept.append(init)
            continue
        array = numpy_helper.to_array(init)
        if array.size < 64 or not np.all(np.abs(array) < 60000):
            kept.append(init)
            continue
        half = numpy_helper.from_array(array.astype(np.float16), init.name + "__f16")
        kept.append(half)
        casts.append(helper.make_node("Cast", [half.name], [init.name], to=TensorProto.FLOAT,
                                      name=init.name + "__to_f32"))
        done += 1
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(casts + nodes)
    return done


def site_model(source: Path, weights: str) -> tuple[bytes, dict[str, Any], dict[str, Any] | None]:
    """The ONNX bytes the site loads (metadata stripped: the page reads `skinclf-web.json`), the
    source's metadata, and its numpy head (`model.head`: the page applies it to the features) or
    None for a graph that computes its logits itself."""
    try:
        import onnx
    except ImportError:
        raise SkinclfError("--format web needs the onnx package to write the site's model: pip install onnx") from None
    from skinclf.engines.onnx import read_model_meta

    meta = read_model_meta(source)
    proto = onnx.load(str(source))
    from skinclf.model.head import HEAD_KEY

    outputs = {o.name for o in proto.graph.output}
    head = {p.key: p.value for p in proto.metadata_props}.get(HEAD_KEY)
    if "logits" not in outputs and not (head and "features" in outputs):
        raise SkinclfError(f"{source}: no logits or features output; re-export it with skinclf export")
    if weights == "float16":
        _float16_weights(proto)
    del proto.metadata_props[:]
    proto.doc_string = f"skinclf {meta.get('name', source.stem)}: {SHORT_DISCLAIMER}"
    return proto.SerializeToString(), meta, (json.loads(head) if head else None)


# --- what the page needs ----------------------------------------------------------------------------


def site_config(meta: dict[str, Any], *, weights: str, model_bytes: bytes, top_k: int, has_features: bool,
                source: Path, classifier: dict[str, Any] | None = None) -> dict[str, Any]:
    """`skinclf-web.json`: everything the page needs to reproduce predict's row."""
    from skinclf.batch.results import DISCLAIMER, class_names, columns
    from skinclf.data import images
    from skinclf.model import patient_head as md
    from skinclf.model.outlier import FEATURE_SCORES, WARNING, WARNING_RARE, active_record
    from skinclf.web.routes import METRIC_KEYS

    classes = list(meta["classes"])
    size = int(meta["input_size"][0])
    ood = active_record(meta.get("ood"), has_features)
    ood_out = None
    if ood:
        ood_out = {"score": ood["score"], "threshold": float(ood["threshold"]), "pass_rate": ood.get("pass_rate"),
                   "fitted_on": ood.get("fitted_on"), "flag_rates": ood.get("flag_rates", {}),
                   "formula": ood.get("formula")}
        if ood["score"] in FEATURE_SCORES:
            stats = ood["features"]
            ood_out["features"] = {k: stats[k] for k in ("class", "background") if k in stats}
        # The two tiers and the readable scale (`outlier.levels`, `outlier.percentile`): the
        # validation scores themselves (sorted float32, as the record packs them; 1,504 of them
        # are 8 kB), so the page counts the ones below a score exactly as Python does.
        ood_out["rare_threshold"] = None if ood.get("rare_threshold") is None else float(ood["rare_threshold"])
        ood_out["reference_scores"] = ood.get("reference_scores") or None
    head, head_note = None, None
    try:
        loaded = md.load_head(meta, path=source)
        if loaded is not None and loaded.needs_features and not has_features:
            head_note = "the metadata head needs the features output, which this ONNX file lacks"
        elif loaded is not None:
            head = meta[md.HEAD_KEY]
    except SkinclfError as exc:
        head_note = str(exc)
    metrics = meta.get("metrics", {}) or {}
    shown = {split: {k: metrics[split][k] for k in METRIC_KEYS if k in metrics[split]}
             for split in ("test", "validation") if metrics.get(split)}
    headline = "test" if "test" in shown else "validation"
    post_hoc = meta.get("post_hoc") or {}
    return {
        "format": SITE_FORMAT,
        "skinclf": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": {"file": MODEL_FILE, "name": meta.get("name", source.stem), "created": meta.get("created"),
                  "source_sha256": meta.get("export", {}).get("source_sha256", ""), "source": source.name,
                  "onnx_sha256": hashlib.sha256(model_bytes).hexdigest(), "bytes": len(model_bytes),
                  "weights": weights, "inputs": "image: NHWC float32 RGB 0..255",
                  "outputs": ["features"] if classifier else ["logits"] + (["features"] if has_features else []),
                  "intended_use": meta.get("intended_use")},
        "classes": classes,
        "class_names": class_names(classes),
        "input_size": size,
        "top_k": top_k,
        "columns": columns(classes, top_k, False),
        "columns_all_probs": columns(classes, top_k, True),
        "preprocessing": {
            "decode": "the browser's decoder (JPEG, PNG, BMP; TIFF refused), EXIF orientation applied, no colour "
                      "management; alpha composited on black",
            "reduce": "JPEG draft / Image.reduce: the largest of 8, 4, 2 keeping both sides >= input_size, box mean",
            "resize": "Pillow BILINEAR with antialiasing (triangle filter, support scaled by the reduction, 22-bit "
                      "fixed-point coefficients, horizontal then vertical pass, uint8 between passes)",
            "reducing_gap": 3.0,
            "colour_constancy": "inside the ONNX graph (layer colour_constancy)" if any(
                "colour_constancy" in str(v) for v in (meta.get("preprocessing") or {}).values()) else "none",
            "scaling": (meta.get("preprocessing") or {}).get("in_model"),
            "max_pixels": images.MAX_PIXELS,
            "min_side_share": images.MIN_SIDE_SHARE,
            "extensions": sorted(images.IMAGE_EXTENSIONS),
        },
        # One pass: the graph ends at the pooled features; logits = features @ weight + bias.
        "classifier": classifier,
        "post_hoc": {"where": "folded into the classifier (logits = features x weight + bias, float32 little-endian, "
                              "base64): probabilities = softmax(logits)" if classifier else
                              "folded into the ONNX graph's last layer: probabilities = softmax(logits)",
                     "tau": post_hoc.get("tau"), "prior_correction": post_hoc.get("prior_correction"),
                     "decision_weight": post_hoc.get("decision_weight"),
                     "temperature": (meta.get("calibration") or {}).get("temperature", post_hoc.get("temperature"))},
        "ood": ood_out,
        "metadata_head": head,
        "metadata_head_note": head_note,
        "metadata": {"sexes": list(md.SEXES), "sites": list(md.SITES), "site_groups": dict(md.SITE_GROUPS),
                     "age": list(md.AGE_RANGE), "age_center": md.AGE_CENTER, "age_scale": md.AGE_SCALE,
                     "encoding_width": md.ENCODING_WIDTH},
        "warnings": {"unusual": WARNING, "very_unlike": WARNING_RARE,
                     "too_small": "image is {w}x{h} pixels, far below the model's {n}x{n} input: the result is "
                                  "unreliable",
                     "separator": "; "},
        "errors": {"empty": "empty file (0 bytes)", "not_an_image": images.NOT_AN_IMAGE,
                   "too_large": "image too large ({w}x{h} pixels; the limit is {limit})",
                   "tiff": "TIFF images cannot be decoded by a browser: classify them with skinclf predict"},
        "metrics": {"accepted_with": {"split": headline, **shown.get(headline, {})}, **shown},
        "disclaimer": DISCLAIMER,
        "short_disclaimer": SHORT_DISCLAIMER,
        "runtime": {"package": "onnxruntime-web", "version": ORT_WEB_VERSION, "integrity": ORT_WEB_INTEGRITY,
                    "files": [f"ort/{n}" for n in RUNTIME_FILES], "threads": 1, "backend": "wasm"},
    }


def _notice(package_json: bytes) -> str:
    info = json.loads(package_json)
    return (f"ONNX Runtime Web {info.get('version')} ({info.get('name')}), licence {info.get('license')}, "
            f"Copyright (c) Microsoft Corporation.\nFrom the npm registry: {ORT_WEB_URL}\n"
            f"Integrity: {ORT_WEB_INTEGRITY}\nFiles: {', '.join(RUNTIME_FILES)} (from its dist/).\n")


def _is_site(folder: Path) -> bool:
    try:
        return json.loads((folder / CONFIG).read_text(encoding="utf-8")).get("format") == SITE_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_out_dir(out: Path, *, overwrite: bool) -> None:
    """Refuse a file, a folder with anything in it but an earlier web export (never emptied, even
    with --overwrite: the site replaces the whole folder), and an earlier export without --overwrite."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SkinclfError(f"--out {out} is a file: --format web writes a folder (the static site)")
    if out.is_dir() and any(out.iterdir()):
        if not _is_site(out):
            raise SkinclfError(f"--out {out} is a folder with other files in it (not a site skinclf export wrote): "
                               "choose a new or empty folder")
        if not overwrite:
            raise SkinclfError(f"--out {out} already holds a site skinclf export wrote: add --overwrite to replace it")


def export_web(*, model: Path | None, out: Path | None, weights: str = "auto", runtime: Path | None = None,
               top_k: int = 3, overwrite: bool = False) -> WebExport:
    """Write the static site for `model` into `out` (see the module's docstring)."""
    from skinclf.data.layout import default_model_path
    from skinclf.web.page import SHARED_FILES, render_page, shared_file

    started = time.perf_counter()
    if weights not in WEIGHTS:
        raise SkinclfError(f"--weights {weights!r}: choose one of {', '.join(WEIGHTS)}")
    if out is None:
        raise SkinclfError("--format web needs --out DIR: the folder to write the site into")
    out = Path(out)
    check_out_dir(out, overwrite=overwrite)
    weights = _weights_for(Path(model or default_model_path()), weights)
    source = _source_onnx(Path(model or default_model_path()), weights)
    rt_path, rt_data = fetch_runtime(runtime)
    files = runtime_files(rt_data)
    data, meta, classifier = site_model(source, weights)
    if not 1 <= top_k <= len(meta["classes"]):
        raise SkinclfError(f"--top-k {top_k}: must be 1..{len(meta['classes'])}")
    has_features = _has_output(data, "features")
    config = site_config(meta, weights=weights, model_bytes=data, top_k=top_k, has_features=has_features,
                         source=source, classifier=classifier)
    page = resources.files("skinclf.web").joinpath("site")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / "index.html").write_text(render_page("site/parts.html", ""), encoding="utf-8")
        for name in PAGE_FILES[1:]:
            (tmp / name).write_bytes(page.joinpath(name).read_bytes())
        for name in SHARED_FILES:  # what serve's page shares with this one, as serve answers it at /static/
            (tmp / name).write_bytes(shared_file(name))
        (tmp / MODEL_FILE).write_bytes(data)
        (tmp / CONFIG).write_text(json.dumps(config, separators=(",", ":")), encoding="utf-8")
        (tmp / "ort").mkdir()
        for name in RUNTIME_FILES:
            (tmp / "ort" / name).write_bytes(files[name])
        (tmp / "ort" / "NOTICE.txt").write_text(_notice(files["package.json"]), encoding="utf-8")
        os.chmod(tmp, 0o755)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    runtime_bytes = sum((out / "ort" / n).stat().st_size for n in RUNTIME_FILES)
    return WebExport(out=out, size_bytes=size, model_bytes=len(data), runtime_bytes=runtime_bytes, weights=weights,
                     runtime=rt_path, seconds=time.perf_counter() - started, over_budget=size > BUDGET_BYTES)


def _has_output(data: bytes, name: str) -> bool:
    from skinclf.engines.onnx import session

    return name in {o.name for o in session(data, threads=1).get_outputs()}


def report_line(result: WebExport) -> str:
    """What `skinclf export --format web` prints."""
    mb = 1e6
    line = (f"Wrote the site {result.out} ({result.size_bytes / mb:.1f} MB: model {result.model_bytes / mb:.1f} MB, "
            f"{result.weights} weights; ONNX Runtime Web {ORT_WEB_VERSION} {result.runtime_bytes / mb:.1f} MB, verified, "
            f"from {result.runtime}) in {result.seconds:.1f} s. Host it with: skinclf serve --static {result.out}")
    if result.over_budget:
        line += (f". Warning: over the {BUDGET_BYTES / mb:.0f} MB budget for a page load"
                 + ("; --weights float16 halves the model" if result.weights == "float32" else ""))
    return line
