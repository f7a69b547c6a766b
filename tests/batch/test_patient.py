"""Patient metadata (age, sex, body site): reading and joining the CSV, the head, predict, serve, evaluate."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest

from utils.models import make_tiny_bundle, random_spec
from utils.paths import require, BUNDLED_MODEL, SHARED_HAM
from utils.synthetic import lesion_image, CLASSES, CLASS_COLOURS
from skinclf.batch.patient import join, metas_from_json, read_metadata
from skinclf.cli import app
from skinclf.errors import SkinclfError
from skinclf.model.patient_head import (
    HEAD_KEY,
    NO_METADATA,
    MetadataHead,
    PatientMeta,
    encode,
    load_head,
    parse_age,
    parse_sex,
    parse_site,
)

HAM_HEADER = "lesion_id,image_id,dx,dx_type,age,sex,localization\n"


# --- fixtures ---------------------------------------------------------------------------------------
def add_head(src: Path, dst: Path, **kwargs) -> Path:
    from skinclf.model.bundle import load_bundle, save_bundle

    bundle = load_bundle(src)
    return save_bundle(bundle.model, dst, {**bundle.meta, HEAD_KEY: random_spec(bundle.meta, **kwargs)})


@pytest.fixture(scope="module")
def head_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("metahead")
    return add_head(make_tiny_bundle(root / "plain.keras"), root / "with-head.keras")


@pytest.fixture(scope="module")
def plain_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("plain") / "plain.keras")


@pytest.fixture
def clinic(tmp_path: Path) -> Path:
    """A visit: four images (one in a sub-folder) and a corrupt file."""
    root = tmp_path / "visit"
    (root / "left").mkdir(parents=True)
    for i, (name, colour) in enumerate([("ISIC_0000001", "mel"), ("ISIC_0000002", "nv"), ("ISIC_0000003", "bkl")]):
        lesion_image(CLASS_COLOURS[colour], i).save(root / f"{name}.jpg", "JPEG")
    lesion_image(CLASS_COLOURS["akiec"], 5).save(root / "left" / "arm.png", "PNG")
    (root / "broken.jpg").write_bytes(b"not an image")
    return root


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --- values -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("raw", "expected"), [("45", 45.0), ("45.0", 45.0), (" 80 years", 80.0), ("", None),
                                               ("unknown", None), ("NaN", None), (0, 0.0), (120, 120.0)])
def test_ages_parse_tolerantly(raw, expected) -> None:
    assert parse_age(raw) == expected


@pytest.mark.parametrize(("raw", "expected"), [("male", "male"), ("M", "male"), ("Female", "female"), ("f", "female"),
                                               ("unknown", None), ("", None)])
def test_sexes_parse_tolerantly(raw, expected) -> None:
    assert parse_sex(raw) == expected


@pytest.mark.parametrize(("raw", "expected"), [
    ("lower extremity", "lower extremity"), ("Lower_Extremities", "lower extremity"), ("BACK", "back"),
    ("lower extremety", "lower extremity"), ("head/neck", "head/neck"), ("Head / Neck", "head/neck"),
    ("anterior torso", "anterior torso"), ("palms/soles", "palms/soles"), ("unknown", None), ("", None),
])
def test_sites_parse_tolerantly_ham_and_isic(raw, expected) -> None:
    assert parse_site(raw) == expected


@pytest.mark.parametrize(("parse", "raw", "message"), [
    (parse_age, "130", "age 130 is outside 0 to 120 years"),
    (parse_age, "-3", "is not a number of years"),
    (parse_age, "old", "age 'old' is not a number of years"),
    (parse_sex, "x", "sex 'x' is not one of female, male"),
    (parse_site, "elbowpit", "site 'elbowpit' is not a known body site"),
])
def test_bad_values_name_the_value_and_what_is_accepted(parse, raw, message) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("?", r"\?")):
        parse(raw)


def test_isic_site_groups_spread_over_the_ham_sites_they_cover() -> None:
    x, present = encode([PatientMeta(site="head/neck"), NO_METADATA])
    assert present.tolist() == [True, False]
    assert x[0, 6:20].sum() == pytest.approx(1.0) and np.count_nonzero(x[0, 6:20]) == 4


# --- the CSV ----------------------------------------------------------------------------------------
def test_ham10000_csv_is_read_as_it_is_with_a_note_on_unknown_columns(tmp_path: Path) -> None:
    source = read_metadata(write(tmp_path / "meta.csv", HAM_HEADER + "HAM_1,ISIC_0000001,mel,histo,55.0,male,back\n"
                                 "HAM_2,ISIC_0000002,nv,follow_up,,unknown,unknown\n"))
    assert source.columns == {"id": "image_id", "age": "age", "sex": "sex", "site": "localization"}
    assert source.by_id["isic_0000001"] == PatientMeta(55.0, "male", "back")
    assert not source.by_id["isic_0000002"].present
    assert "ignored columns lesion_id, dx, dx_type" in source.notes()[0]


def test_isic_column_names_work_as_they_are(tmp_path: Path) -> None:
    source = read_metadata(write(tmp_path / "isic.csv", "image,age_approx,sex,anatom_site_general_challenge,lesion_id\n"
                                 "ISIC_0000001,45,female,anterior torso,L1\nISIC_0000002,,,,L2\n"))
    assert source.by_id["isic_0000001"] == PatientMeta(45.0, "female", "anterior torso")


@pytest.mark.parametrize(("text", "message"), [
    ("image_id,age\nISIC_1,130\n", "line 2 (image ISIC_1): age 130 is outside 0 to 120 years"),
    ("image_id,age,sex\nISIC_1,40,male\nISIC_2,50,robot\n", "line 3 (image ISIC_2): sex 'robot' is not one of"),
    ("image_id,localization\nISIC_1,moon\n", "line 2 (image ISIC_1): site 'moon' is not a known body site"),
    ("image_id,age\nISIC_1,4o\n", "line 2 (image ISIC_1): age '4o' is not a number of years"),
    ("image_id,age\nISIC_1,40\nisic_1,41\n", "line 3: image isic_1 is listed twice (also on line 2)"),
    ("age,sex\n40,male\n", "no column naming the image"),
    ("image_id,dx\nISIC_1,mel\n", "no age, sex or site column"),
    ("image_id,age\n", "no rows below the header"),
    ("", "empty"),
    ("image_id,age\n,40\n", "line 2: no image id or path"),
])
def test_every_bad_metadata_file_is_one_clear_error(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(SkinclfError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_metadata(write(tmp_path / "meta.csv", text))


def test_a_missing_or_binary_metadata_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SkinclfError, match="file not found"):
        read_metadata(tmp_path / "nope.csv")
    (tmp_path / "bin.csv").write_bytes(b"\x00\x01\x02")
    with pytest.raises(SkinclfError, match="not a text file"):
        read_metadata(tmp_path / "bin.csv")


def test_join_by_id_and_by_path_and_report_rows_not_in_the_folder(tmp_path: Path) -> None:
    files = ["ISIC_0000001.jpg", "left/arm.png", "right/arm.png", "x/ISIC_0000003.JPG"]
    source = read_metadata(write(tmp_path / "m.csv", "image_id,path,age,sex,localization\n"
                                 "ISIC_0000001,,40,male,back\n,left/arm.png,70,female,face\n"
                                 "isic_0000003,,30,,\nISIC_9999999,,20,male,trunk\n,./gone/x.jpg,50,male,\n"))
    joined = join(source, files)
    assert joined.get("ISIC_0000001.jpg") == PatientMeta(40.0, "male", "back")  # by id (file name without extension)
    assert joined.get("left/arm.png") == PatientMeta(70.0, "female", "face")  # by relative path
    assert joined.get("x/ISIC_0000003.JPG").age == 30.0  # ids ignore case, at any depth
    assert joined.get("right/arm.png") is NO_METADATA and joined.status("right/arm.png") == "missing"
    assert joined.not_in_folder == ["gone/x.jpg", "ISIC_9999999"]  # reported, not fatal
    assert "2 rows for images not in the folder" in joined.notes()[0]


def test_an_id_naming_two_images_is_refused(tmp_path: Path) -> None:
    source = read_metadata(write(tmp_path / "m.csv", "image_id,age\narm,40\n"))
    with pytest.raises(SkinclfError, match="image id arm matches 2 images"):
        join(source, ["left/arm.png", "right/arm.png"])


def test_serve_metadata_json_by_order_or_by_name() -> None:
    metas, notes = metas_from_json('[{"age": 40, "sex": "M"}, null]', ["a.jpg", "b.jpg"])
    assert metas == [PatientMeta(40.0, "male", None), NO_METADATA] and notes == []
    metas, notes = metas_from_json('{"b.jpg": {"age_approx": 70, "localization": "Face", "dx": "mel"}, "c.jpg": {}}',
                                   ["a.jpg", "b.jpg"])
    assert metas == [NO_METADATA, PatientMeta(70.0, None, "face")]
    assert any("ignored field dx" in n for n in notes) and any("c.jpg, which is not among" in n for n in notes)
    with pytest.raises(SkinclfError, match="metadata for a.jpg: age 200 is outside"):
        metas_from_json('[{"age": 200}]', ["a.jpg"])
    with pytest.raises(SkinclfError, match="one entry per file"):
        metas_from_json("[null]", ["a.jpg", "b.jpg"])


# --- the head ---------------------------------------------------------------------------------------
META = {"classes": list(CLASSES), "input_size": [32, 32], "created": "x"}


def test_no_metadata_gives_exactly_the_image_only_logits() -> None:
    head = MetadataHead(random_spec(META), classes=list(CLASSES))
    z = np.random.default_rng(1).normal(0, 3, (4, 7)).astype("float32")
    metas = [NO_METADATA, PatientMeta(age=50.0), NO_METADATA, PatientMeta(sex="female", site="back")]
    out = head.apply(z, metas)
    assert np.array_equal(out[[0, 2]], z[[0, 2]])  # bit for bit
    assert not np.allclose(out[[1, 3]], z[[1, 3]])
    nan = np.full((1, 7), np.nan, dtype="float32")  # an unreadable file stays NaN
    assert np.isnan(head.apply(nan, [PatientMeta(age=50.0)])).all()


@pytest.mark.parametrize(("hidden", "features"), [(0, 0), (4, 0), (4, 5)])
def test_numpy_forward_equals_the_training_forward(hidden: int, features: int) -> None:
    """The head fitted by `training.metadata` (float64, the function L-BFGS differentiates) and the
    numpy forward every engine runs from the bundle's JSON agree to 1e-5."""
    from skinclf.training.patient_fit import Outputs, Variant, fit_variant

    rng = np.random.default_rng(0)
    n = 300
    labels = rng.integers(0, 7, n)
    logits = rng.normal(0, 1, (n, 7)) + 2 * np.eye(7)[labels]
    metas = [PatientMeta(age=float(rng.integers(5, 90)), sex=["male", "female", None][i % 3],
                         site=[None, "back", "face", "head/neck"][i % 4]) for i in range(n)]
    x, present = encode(metas)
    feats = rng.normal(0, 1, (n, features)) if features else None
    data = Outputs(logits=logits, labels=labels, metadata=x, present=present, features=feats)
    inputs = ("metadata", "logits") + (("features",) if features else ())
    fitted = fit_variant(Variant("t", inputs=inputs, hidden=hidden, l2=1e-3, copies=1), data)
    fitted.temperature = 1.37
    spec = json.loads(json.dumps(fitted.spec(classes=list(CLASSES), image_model="x", extra={})))  # as stored
    numpy_out = MetadataHead(spec, classes=list(CLASSES)).apply(logits.astype("float32"), metas, feats)
    assert np.abs(numpy_out - fitted.fused(data)).max() < 1e-5


def test_a_stale_or_foreign_head_is_refused() -> None:
    spec = random_spec(META)
    assert load_head({**META, HEAD_KEY: spec}) is not None
    with pytest.raises(SkinclfError, match="another version of the image model"):
        load_head({**META, "created": "retrained", HEAD_KEY: spec})
    with pytest.raises(SkinclfError, match="fitted for classes"):
        load_head({**META, HEAD_KEY: {**spec, "classes": ["a", "b"]}})
    with pytest.raises(SkinclfError, match="malformed"):
        load_head({**META, HEAD_KEY: {**spec, "out": {"W": [[1.0]], "b": [0.0]}}})
    assert load_head(META) is None


# --- predict ----------------------------------------------------------------------------------------
def rows_of(path: Path) -> dict[str, dict[str, str]]:
    return {r["path"]: r for r in csv.DictReader(io.StringIO(path.read_text(encoding="utf-8")))}


def test_predict_with_metadata_cli(runner, clinic: Path, head_model: Path, tmp_path: Path) -> None:
    meta_csv = write(tmp_path / "meta.csv", HAM_HEADER + "H1,ISIC_0000001,mel,histo,70,male,back\n"
                     "H2,ISIC_0000002,nv,histo,,,\nH3,ISIC_0000404,nv,histo,30,female,face\n"
                     "H4,ISIC_0000003,bkl,histo,65,female,face\n")
    out, plain = tmp_path / "with.csv", tmp_path / "plain.csv"
    result = runner.invoke(app, ["predict", str(clinic), "--out", str(out), "--model", str(head_model),
                                 "--metadata", str(meta_csv), "--all-probs"])
    assert result.exit_code == 0, result.output
    assert "ignored columns lesion_id, dx, dx_type" in result.output
    assert "1 row for images not in the folder (e.g. ISIC_0000404)" in result.output
    assert runner.invoke(app, ["predict", str(clinic), "--out", str(plain), "--model", str(head_model),
                               "--all-probs"]).exit_code == 0
    got, image_only = rows_of(out), rows_of(plain)
    assert set(got) == set(image_only)  # no row lost
    assert "metadata" not in next(iter(image_only.values()))  # without --metadata: the CSV as before
    assert {p: r["metadata"] for p, r in got.items()} == {
        "ISIC_0000001.jpg": "used", "ISIC_0000002.jpg": "missing", "ISIC_0000003.jpg": "used",
        "left/arm.png": "missing", "broken.jpg": ""}
    for path in ("ISIC_0000002.jpg", "left/arm.png", "broken.jpg"):  # no metadata: exactly the image-only row
        assert {k: v for k, v in got[path].items() if k != "metadata"} == image_only[path]
    assert got["ISIC_0000001.jpg"]["prob_mel"] != image_only["ISIC_0000001.jpg"]["prob_mel"]
    sidecar = json.loads((tmp_path / "with.csv.json").read_text(encoding="utf-8"))
    record = sidecar["options"]["metadata"]
    from skinclf.files import sha256_file

    assert record["sha256"] == sha256_file(meta_csv) and record["file"] == str(meta_csv.resolve())
    assert record["rows_not_in_folder"] == 1 and record["images_with_metadata"] == 2

    # Resume: the same file keeps every row; an edited metadata file redoes them all.
    again = runner.invoke(app, ["predict", str(clinic), "--out", str(out), "--model", str(head_model),
                                "--metadata", str(meta_csv), "--all-probs", "--resume"])
    assert again.exit_code == 0 and "5 rows kept" in again.output
    write(meta_csv, meta_csv.read_text(encoding="utf-8").replace("70,male", "20,male"))
    redo = runner.invoke(app, ["predict", str(clinic), "--out", str(out), "--model", str(head_model),
                               "--metadata", str(meta_csv), "--all-probs", "--resume"])
    assert redo.exit_code == 0 and "another --metadata file" in redo.output


def test_predict_metadata_failures_are_one_line_before_any_work(runner, clinic: Path, head_model: Path,
                                                                plain_model: Path, tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.csv", "image_id,age\nISIC_0000001,40\nISIC_0000002,300\n")
    out = tmp_path / "r.csv"
    result = runner.invoke(app, ["predict", str(clinic), "--out", str(out), "--model", str(head_model),
                                 "--metadata", str(bad)])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"Error: --metadata {bad}, line 3 (image ISIC_0000002): age 300 is outside 0 to 120 years"]
    assert not out.exists() and not (tmp_path / "r.csv.partial").exists()
    good = write(tmp_path / "good.csv", "image_id,age\nISIC_0000001,40\n")
    result = runner.invoke(app, ["predict", str(clinic), "--out", str(out), "--model", str(plain_model),
                                 "--metadata", str(good)])
    assert result.exit_code == 1 and "has no metadata head" in result.output and len(result.output.splitlines()) == 1
    result = runner.invoke(app, ["predict", str(clinic), "--out", str(out), "--metadata", str(tmp_path / "nope.csv")])
    assert result.exit_code == 1 and "file not found" in result.output


# --- serve and evaluate -----------------------------------------------------------------------------
def test_serve_gives_the_same_answers_as_predict_with_metadata(clinic: Path, head_model: Path, tmp_path: Path) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from skinclf.batch.predict import list_images, predict_directory
    from skinclf.engines.load import load_engine
    from skinclf.web.routes import create_app

    meta_csv = write(tmp_path / "meta.csv", "image,age_approx,sex,anatom_site_general_challenge\n"
                     "ISIC_0000001,70,male,posterior torso\nISIC_0000003,65,female,head/neck\n"
                     ",,,\n")
    predict_directory(directory=clinic, out=tmp_path / "p.csv", model=head_model, batch_size=16, show_progress=False,
                      metadata=meta_csv, all_probs=True)
    expected = (tmp_path / "p.csv").read_text(encoding="utf-8")
    files = list_images(clinic, recursive=True).files
    metadata = {"ISIC_0000001.jpg": {"age": 70, "sex": "male", "site": "posterior torso"},
                "ISIC_0000003.jpg": {"age": "65", "sex": "F", "site": "Head/Neck"}}
    client = TestClient(create_app(load_engine(head_model, batch_size=16)))
    uploads = [("files", (rel, (clinic / rel).read_bytes(), "application/octet-stream")) for rel in files]
    got = client.post("/api/predict", params={"format": "csv", "all_probs": True}, files=uploads,
                      data={"metadata": json.dumps(metadata)})
    assert got.status_code == 200, got.text
    assert got.text == expected
    model = client.get("/api/model").json()
    assert model["metadata"]["available"] and "back" in model["metadata"]["sites"]
    bad = client.post("/api/predict", files=uploads, data={"metadata": json.dumps({"left/arm.png": {"sex": "x"}})})
    assert bad.status_code == 422 and "metadata for left/arm.png: sex 'x'" in bad.json()["detail"]


def test_evaluate_reports_figures_with_and_without_metadata(runner, head_model: Path, tmp_path: Path) -> None:
    data = tmp_path / "val"
    lines = ["image_id,age,sex,localization"]
    for i, c in enumerate(CLASSES):
        (data / c).mkdir(parents=True)
        for j in range(2):
            lesion_image(CLASS_COLOURS[c], 10 * i + j).save(data / c / f"ISIC_{i}{j}.jpg", "JPEG")
            if j == 0:
                lines.append(f"ISIC_{i}{j},{20 + 10 * i},{'male' if i % 2 else 'female'},back")
    meta_csv = write(tmp_path / "m.csv", "\n".join(lines) + "\n")
    result = runner.invoke(app, ["evaluate", "--model", str(head_model), "--data", str(data), "--out",
                                 str(tmp_path / "rep"), "--metadata", str(meta_csv), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{"):])
    section = report["metadata"]
    assert section["images_scored_with_metadata"] == 7 and section["image_only"]["n"] == 14
    assert section["image_only"]["balanced_accuracy"] == pytest.approx(report["balanced_accuracy"], abs=1e-4)
    assert set(section["with_metadata"]["recall"]) == set(CLASSES)


# --- the bundled model ------------------------------------------------------------------------------
@pytest.mark.integration
def test_bundled_head_on_shared_ham10000_images(tmp_path: Path) -> None:
    """The bundled model's head on real images with HAM10000's own metadata CSV: images with
    metadata get the head's answer, the rest exactly the image-only one, on either engine."""
    from skinclf.model.bundle_meta import read_bundle_meta

    model = require(BUNDLED_MODEL)
    if HEAD_KEY not in read_bundle_meta(model):
        pytest.skip("the bundled model carries no metadata head yet")
    ham = require(SHARED_HAM / "HAM10000_metadata.csv")
    images = sorted((SHARED_HAM / "HAM10000_images_part_1").glob("*.jpg"))[:6]
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in images:
        (folder / p.name).write_bytes(p.read_bytes())
    subset = write(tmp_path / "meta.csv", HAM_HEADER + "".join(
        line for line in ham.read_text(encoding="utf-8").splitlines(keepends=True)
        if any(p.stem in line for p in images[:4])))
    from skinclf.batch.predict import predict_directory

    predict_directory(directory=folder, out=tmp_path / "m.csv", metadata=subset, show_progress=False, all_probs=True)
    predict_directory(directory=folder, out=tmp_path / "p.csv", show_progress=False, all_probs=True)
    got, plain = rows_of(tmp_path / "m.csv"), rows_of(tmp_path / "p.csv")
    assert [got[p.name]["metadata"] for p in images] == ["used"] * 4 + ["missing"] * 2
    for p in images[4:]:
        assert {k: v for k, v in got[p.name].items() if k != "metadata"} == plain[p.name]


def test_product_of_experts_head_numpy_forward_equals_training_forward() -> None:
    """The chosen form: p(class | metadata) fitted on train, weight, shift and temperature on
    validation; the bundle's numpy forward reproduces the training-side one to 1e-5."""
    from skinclf.training.patient_fit import Outputs, choose

    rng = np.random.default_rng(3)

    def split(n: int) -> tuple[Outputs, list[PatientMeta]]:
        labels = np.concatenate([np.arange(7), rng.integers(0, 7, n - 7)])
        metas = [PatientMeta(age=float(20 + 8 * y + rng.integers(0, 10)), sex=["male", "female", None][i % 3],
                             site=SITES_BY_CLASS[y] if i % 4 else None) for i, y in enumerate(labels)]
        metas[0] = NO_METADATA
        x, present = encode(metas)
        logits = rng.normal(0, 1.5, (n, 7)) + 1.5 * np.eye(7)[labels]
        return Outputs(logits=logits, labels=labels, metadata=x, present=present), metas

    (train, _), (val, val_metas) = split(400), split(200)
    fitted, table = choose(train, val, list(CLASSES), l2s=(1e-2,))
    assert table and fitted.metadata_model is not None and fitted.temperature > 0
    spec = json.loads(json.dumps(fitted.spec(classes=list(CLASSES), image_model="x", extra={})))
    numpy_out = MetadataHead(spec, classes=list(CLASSES)).apply(val.logits.astype("float32"), val_metas)
    assert np.abs(numpy_out - fitted.fused(val)).max() < 1e-5
    assert np.array_equal(numpy_out[0], val.logits[0].astype("float32"))  # no metadata: the image logits
    with_meta = fitted.validation["with_metadata"]
    assert with_meta["melanoma_recall"] >= fitted.validation["image_only"]["melanoma_recall"]


SITES_BY_CLASS = ["face", "face", "back", "lower extremity", "back", "trunk", "head/neck"]
