"""`skinclf export`: a model bundle as ONNX (float32 or int8) or TensorFlow Lite, checked first.

Every export is run before it is written: its probabilities on fixed probe images must match
the Keras model's (max abs diff <= 1e-4 for float formats); an int8 model is compared on top-1
agreement and, when a validation folder is at hand, balanced accuracy and melanoma recall. A
failed check raises SkinclfError and writes nothing. Files are written atomically.

The ONNX file carries the bundle's whole metadata (`skinclf.json` in its metadata_props) plus
an `export` record (format, the source .keras SHA-256, the check's figures), so it needs
nothing beside it: `skinclf predict --model model.onnx` runs it without TensorFlow.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from skinclf import __version__
from skinclf.config import EXPORT
from skinclf.data.layout import model_path
from skinclf.errors import SkinclfError
from skinclf.files import atomic_path, check_output_file
from skinclf.own_outputs import MODEL, ONNX

FORMATS = ("onnx", "onnx-int8", "tflite", "tfjs")
SUFFIX = {"onnx": ".onnx", "onnx-int8": ".int8.onnx", "tflite": ".tflite", "tfjs": ""}
TFJS_UNAVAILABLE = (
    "--format tfjs is not available: the TensorFlow.js converter (tensorflowjs 4.22, the latest) needs Keras 2 "
    "(tf-keras), tensorflow-decision-forests and packaging 23, which cannot be installed beside skinclf's "
    "TensorFlow 2.21 / Keras 3; export --format onnx and run it in a browser with onnxruntime-web"
)


@dataclass
class ExportResult:
    """What an export wrote and how it was checked."""

    out: Path
    format: str
    size_bytes: int
    probes: int
    max_abs_diff: float
    seconds: float
    top1_agreement: float | None = None  # int8: on the probe and validation images
    validation: dict[str, Any] = field(default_factory=dict)  # int8: keras vs int8 figures


def probe_images(size: int, *, count: int = EXPORT.probes, folder: Path | None = None) -> np.ndarray:
    """Fixed images to compare an export with Keras: seeded noise, smooth colour-cast blobs
    (they exercise colour constancy) and, with `folder`, its first images."""
    rng = np.random.default_rng(0)
    half = count // 2
    noise = rng.uniform(0, 255, (half, size, size, 3))
    yy, xx = np.mgrid[0:size, 0:size] / size
    blobs = []
    for i in range(count - half):
        cast = rng.uniform(0.4, 1.0, 3)
        disc = np.exp(-(((xx - rng.uniform(0.3, 0.7)) ** 2 + (yy - rng.uniform(0.3, 0.7)) ** 2) / 0.05))
        base = 200 - 150 * disc[..., None] * rng.uniform(0.3, 1.0, 3)
        blobs.append(np.clip(base * cast + rng.normal(0, 6, (size, size, 3)), 0, 255))
    images = [noise, np.stack(blobs)]
    if folder is not None:
        from skinclf.data.images import ImageError, load_image
        from skinclf.data.walk import walk_images

        real = []
        for path in [Path(folder) / rel for rel in walk_images(Path(folder), recursive=True).files[:count]]:
            try:
                real.append(load_image(path, size))
            except ImageError:
                continue
        if real:
            images.append(np.stack(real))
    return np.concatenate(images).astype("float32")


def sample_images(folder: Path, classes: list[str], count: int) -> list[Path]:
    """Up to `count` images spread evenly over a labelled folder (every k-th, all classes)."""
    from skinclf.data.layout import list_labelled_images

    paths = list_labelled_images(Path(folder), classes=tuple(classes)).paths
    step = max(1, len(paths) // count)
    return list(paths[::step][:count])


def _decoded(paths: list[Path], size: int) -> np.ndarray:
    from skinclf.data.images import load_image

    return np.stack([load_image(p, size) for p in paths]).astype("float32")


def _keras_logits(bundle) -> Any:
    """The bundle's model, batch norms folded, softmax split off: what every export converts."""
    from skinclf.model.network import fold_batch_norm, logits_model

    return fold_batch_norm(logits_model(bundle.model))


def _export_meta(bundle, fmt: str) -> dict[str, Any]:
    outputs = (["features (pooled; logits = the skinclf.head affine map of them, probabilities = softmax)"]
               if fmt.startswith("onnx") else ["logits", "probabilities"])
    return {**bundle.meta, "export": {"format": fmt, "source": bundle.path.name, "source_sha256": bundle.sha256,
                                      "skinclf": __version__, "inputs": "image: NHWC float32 RGB 0..255, any batch",
                                      "outputs": outputs}}


def _onnx_bytes(bundle, folded, meta: dict[str, Any]) -> bytes:
    from skinclf.model.onnx_convert import keras_to_onnx
    from skinclf.model.onnx_meta import META_KEY

    proto = keras_to_onnx(folded, doc=f"skinclf {bundle.meta.get('name', bundle.path.stem)}: "
                                      "decision support, not a diagnosis", metadata={META_KEY: json.dumps(meta)})
    return proto.SerializeToString()


def float_onnx(bundle) -> bytes:
    """The bundle's float ONNX form (features graph, head in its metadata), unchecked: what int8
    quantizes (bench/int8_probe.py)."""
    return _onnx_bytes(bundle, _keras_logits(bundle), _export_meta(bundle, "onnx"))


def _onnx_run(data: bytes, images: np.ndarray, *, batch: int = 16) -> np.ndarray:
    """Probabilities of an exported graph: its features, the numpy head, the softmax."""
    from skinclf.engines.base import softmax
    from skinclf.model.head import HEAD_KEY, LinearHead
    from skinclf.engines.onnx import session

    sess = session(data)
    head = LinearHead.from_json(sess.get_modelmeta().custom_metadata_map[HEAD_KEY])
    return np.concatenate([softmax(head(sess.run(["features"], {"image": images[i : i + batch]})[0]))
                           for i in range(0, len(images), batch)])


def _check_features(data: bytes, images: np.ndarray, folded, tolerance: float) -> float:
    """The ONNX `features` output against the Keras engine's pooled features on the probe images
    (what the out-of-distribution score reads); raises like `_check`."""
    from skinclf.engines.keras import features_model
    from skinclf.engines.onnx import session

    sess = session(data)
    exported = np.concatenate([sess.run(["features"], {"image": images[i : i + 16]})[0]
                               for i in range(0, len(images), 16)])
    pooled = features_model(folded)
    if pooled is None:
        raise SkinclfError("the model has no global average pooling to take features from; nothing written")
    expected = np.asarray(pooled.predict(images, batch_size=16, verbose=0), dtype="float32")
    diff = float(np.nanmax(np.abs(exported - expected))) if exported.shape == expected.shape else float("inf")
    scale = max(1.0, float(np.abs(expected).max()))  # features are not bounded by 1 like probabilities
    if not diff <= tolerance * scale:
        raise SkinclfError(f"the onnx export's features do not match the Keras model's (max abs difference "
                           f"{diff:.3g} > {tolerance:g} x {scale:.3g} on the probe images); nothing written")
    return diff


def quantize(float_onnx: bytes, calibration: np.ndarray, **options) -> bytes:
    """Static int8 quantization (QDQ, per-channel weights), calibrated on `calibration` images;
    `options` go to ONNX Runtime's `quantize_static` (e.g. `nodes_to_exclude`: bench/int8_probe.py)."""
    import tempfile

    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter([{"image": calibration[i : i + 8]} for i in range(0, len(calibration), 8)])

        def get_next(self):
            return next(self._batches, None)

    with tempfile.TemporaryDirectory(prefix="skinclf-int8-") as tmp:
        src, pre, dst = Path(tmp) / "float.onnx", Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(float_onnx)
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        settings = {"quant_format": QuantFormat.QDQ, "per_channel": True, "activation_type": QuantType.QInt8,
                    "weight_type": QuantType.QInt8, **options}
        quantize_static(str(pre), str(dst), Reader(), **settings)
        import onnx

        proto = onnx.load(str(dst))
        src_meta = onnx.load_from_string(float_onnx).metadata_props
        del proto.metadata_props[:]
        proto.metadata_props.extend(src_meta)
        return proto.SerializeToString()


def _tflite_bytes(folded) -> tuple[bytes, Any]:
    """A TensorFlow Lite flatbuffer (float32) with outputs logits and probabilities, and a runner."""
    try:
        import tensorflow as tf
        from tensorflow.python.framework.convert_to_constants import (
            convert_variables_to_constants_v2,
        )
    except ImportError:
        raise SkinclfError('--format tflite needs TensorFlow: pip install "skinclf[train]"') from None
    size = int(folded.inputs[0].shape[1])

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32, name="image")])
    def serve(image):
        z = folded(image, training=False)
        return {"logits": z, "probabilities": tf.nn.softmax(z)}

    # Weights as constants: resource variables would read as uninitialised (NaN) in the interpreter.
    frozen = convert_variables_to_constants_v2(serve.get_concrete_function())
    try:
        data = tf.lite.TFLiteConverter.from_concrete_functions([frozen]).convert()
    except Exception as exc:  # noqa: BLE001 - converter failures are long TF errors
        raise SkinclfError(f"TensorFlow Lite could not convert the model: {' '.join(str(exc).split())[:200]}") from None
    order = sorted(["logits", "probabilities"])  # the flattened outputs: Identity, Identity_1

    def run(images: np.ndarray) -> np.ndarray:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            interpreter = tf.lite.Interpreter(model_content=data)
        inp = interpreter.get_input_details()[0]
        interpreter.resize_tensor_input(inp["index"], images.shape)
        interpreter.allocate_tensors()
        interpreter.set_tensor(inp["index"], images)
        interpreter.invoke()
        outs = {d["name"]: interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()}
        name = "Identity" if order.index("probabilities") == 0 else f"Identity_{order.index('probabilities')}"
        return outs[name]

    return data, run


def _check(name: str, exported: np.ndarray, expected: np.ndarray, tolerance: float) -> float:
    diff = float(np.nanmax(np.abs(exported - expected))) if exported.shape == expected.shape else float("inf")
    if not diff <= tolerance:  # NaN fails too
        raise SkinclfError(f"the {name} export does not match the Keras model (max abs difference of probabilities "
                           f"{diff:.3g} > {tolerance:g} on the probe images); nothing written")
    return diff


def _class_figures(probs: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict[str, float]:
    from skinclf.metrics import balanced_accuracy

    pred = probs.argmax(axis=1)
    out = {"balanced_accuracy": round(balanced_accuracy(labels, pred), 4)}
    if "mel" in classes:
        m = classes.index("mel")
        out["mel_recall"] = round(float(np.mean(pred[labels == m] == m)), 4) if (labels == m).any() else None
    return out


def _format_for(format: str | None, out: Path | None) -> str:  # noqa: A002 - the CLI option's name
    """The format to write: `format`, else the one `out`'s suffix names, else onnx; a suffix that
    contradicts `format` is refused (predict chooses the runtime by suffix)."""
    name = Path(out).name.lower() if out is not None else ""
    named = ("onnx-int8" if name.endswith(".int8.onnx") else "onnx" if name.endswith(".onnx")
             else "tflite" if name.endswith(".tflite") else None)
    chosen = format or named or EXPORT.format
    if chosen not in FORMATS:
        raise SkinclfError(f"--format {chosen!r}: choose one of {', '.join(FORMATS)}")
    if chosen == "tfjs":
        raise SkinclfError(TFJS_UNAVAILABLE)
    if named is not None and named.split("-")[0] != chosen.split("-")[0]:
        raise SkinclfError(f"--out {out}: its suffix says {named} but --format {chosen} was given; name it "
                           f"{Path(out).name.split('.')[0]}{SUFFIX[chosen]}, or leave out --format")
    return chosen


def _paths(*, format: str | None, model: Path | None, out: Path | None, overwrite: bool) -> tuple[str, Path, Path]:
    """The format, the bundle and the output file, all checked before the minutes of converting."""
    format = _format_for(format, out)
    path = model_path(model)
    if path.suffix != ".keras":
        raise SkinclfError(f"{path}: export converts a .keras bundle (e.g. models/skinclf-mobilenet.keras)")
    out = Path(out) if out is not None else path.with_name(path.stem + SUFFIX[format])
    if out.resolve() == path.resolve():
        raise SkinclfError(f"--out {out} would overwrite the model itself; choose another path")
    # A folder, an unwritable place, or a file that is not an earlier export of ours (a TFLite
    # file has no metadata to tell: replaced only with --overwrite).
    check_output_file(out, example=path.stem + SUFFIX[format], kind=ONNX if format.startswith("onnx") else MODEL,
                      overwrite=overwrite)
    if format.startswith("onnx"):
        from skinclf.engines.onnx import onnxruntime_available

        if not onnxruntime_available():
            raise SkinclfError("skinclf export needs ONNX Runtime to check the export: pip install onnxruntime")
    return format, path, out


def _with_meta(data: bytes, meta: dict[str, Any]) -> bytes:
    """`data` (an ONNX model) with its skinclf.json metadata replaced by `meta`."""
    import onnx

    from skinclf.model.onnx_meta import META_KEY

    proto = onnx.load_from_string(data)
    for entry in proto.metadata_props:
        if entry.key == META_KEY:
            entry.value = json.dumps(meta)
    return proto.SerializeToString()


def _int8(bundle, folded, meta: dict, float_data: bytes, images: np.ndarray, expected: np.ndarray, *,
          calibration: Path, calibration_images: int, validation: Path | None,
          min_agreement: float) -> tuple[bytes, float, float, dict]:
    """The int8 form, its largest difference from Keras on the probes, its top-1 agreement and
    validation figures; refused below `min_agreement`."""
    if calibration is None or not Path(calibration).is_dir():
        raise SkinclfError(f"--calibration {calibration}: int8 needs a labelled folder of training images "
                           "(e.g. data/prepared/train, made by skinclf prepare)")
    size = bundle.image_size
    calib = _decoded(sample_images(Path(calibration), bundle.classes, calibration_images), size)
    from skinclf.engines.int8 import float_nodes

    keep = EXPORT.int8_float_convs
    meta["export"]["calibration"] = {"images": len(calib), "folder": str(calibration),
                                     "method": "static, QDQ, per-channel int8 weights, int8 activations (min-max)",
                                     "float": f"colour constancy, preprocessing, the first {keep} convolutions of "
                                              "every member, and the numpy head"}
    source = _onnx_bytes(bundle, folded, meta)
    data = quantize(source, calib, nodes_to_exclude=float_nodes(source, keep))
    int8_probs = _onnx_run(data, images)
    diff = float(np.abs(int8_probs - expected).max())
    agree, figures = [int8_probs.argmax(1) == expected.argmax(1)], {}
    if validation is not None and Path(validation).is_dir():
        from skinclf.data.layout import list_labelled_images

        val = list_labelled_images(Path(validation), classes=tuple(bundle.classes))
        x = _decoded(list(val.paths), size)
        labels = np.asarray(val.labels)
        ref, q = _onnx_run(float_data, x), _onnx_run(data, x)
        agree.append(q.argmax(1) == ref.argmax(1))
        figures = {"images": len(labels), "folder": str(validation), "float": _class_figures(ref, labels, bundle.classes),
                   "int8": _class_figures(q, labels, bundle.classes)}
    # Validation images when given (a random-noise probe's top class means nothing), else the probes.
    agreement = float(np.mean(agree[-1]))
    if figures:
        figures["top1_agreement"] = round(agreement, 4)
        meta["export"]["int8_validation"] = figures
        data = _with_meta(data, meta)
    if agreement < min_agreement:
        cost = (f"; validation balanced accuracy {figures['float']['balanced_accuracy']:.3f} float vs "
                f"{figures['int8']['balanced_accuracy']:.3f} int8" if figures else "")
        raise SkinclfError(f"the int8 export agrees with the float model on top-1 for only {agreement:.1%} of "
                           f"the {'validation' if figures else 'probe'} images (< {min_agreement:.0%}){cost}; nothing written. Use --format onnx")
    return data, diff, agreement, figures


def export_model(
    *,
    model: Path | None = None,
    format: str | None = None,  # noqa: A002 - the CLI option's name
    out: Path | None = None,
    probes: Path | None = None,
    calibration: Path = EXPORT.calibration,
    calibration_images: int = EXPORT.calibration_images,
    validation: Path | None = EXPORT.validation,
    tolerance: float = EXPORT.tolerance,
    min_agreement: float = EXPORT.min_agreement,
    overwrite: bool = False,
) -> ExportResult:
    """Convert the bundle at `model` to `format`, check it against Keras, and write it to `out`.

    `out` defaults to the bundle's path with the format's suffix (`.onnx`, `.int8.onnx`,
    `.tflite`); `format` None: the one `out`'s suffix names, else onnx. int8 needs `calibration` (a labelled folder, e.g. data/prepared/train) and is
    refused if its top-1 agreement with Keras falls below `min_agreement`.
    """
    format, path, out = _paths(format=format, model=model, out=out, overwrite=overwrite)
    from skinclf.model.bundle import load_bundle

    started = time.perf_counter()
    bundle = load_bundle(path)
    images = probe_images(bundle.image_size, folder=probes)
    expected = np.asarray(bundle.model.predict(images, batch_size=16, verbose=0), dtype="float32")
    folded = _keras_logits(bundle)
    meta = _export_meta(bundle, format)
    agreement, figures = None, {}
    if format == "tflite":
        data, run = _tflite_bytes(folded)
        diff = _check("tflite", run(images), expected, tolerance)
    else:
        data = _onnx_bytes(bundle, folded, meta)
        diff = _check("onnx", _onnx_run(data, images), expected, tolerance)
        meta["export"]["features_max_abs_diff"] = _check_features(data, images, folded, tolerance)
        data = _onnx_bytes(bundle, folded, meta)  # the same graph, its check recorded
        if format == "onnx-int8":
            data, diff, agreement, figures = _int8(bundle, folded, meta, data, images, expected,
                                                   calibration=calibration, calibration_images=calibration_images,
                                                   validation=validation, min_agreement=min_agreement)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        Path(tmp).write_bytes(data)
    return ExportResult(out=out, format=format, size_bytes=len(data), probes=len(images), max_abs_diff=diff,
                        seconds=time.perf_counter() - started, top1_agreement=agreement, validation=figures)

