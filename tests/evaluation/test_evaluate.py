"""`skinclf evaluate`: figures checked against hand-computed values, truth formats, reports, PNGs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from utils.models import make_tiny_bundle
from utils.predictions import one_hot_probs, write_predictions
from utils.synthetic import write_ham, CLASSES
from PIL import Image

from skinclf.cli import app
from skinclf.data.prepare import prepare_dataset
from skinclf.errors import SkinclfError
from skinclf.evaluation.evaluate import evaluate_model, evaluate_predictions, read_truth
from skinclf.metrics import classification_report, topk_accuracy

# Three classes, nine images. Predictions (argmax) below; worked out by hand:
#   true a: a a b        -> recall 2/3
#   true b: b c          -> recall 1/2
#   true c: c c a c      -> recall 3/4
Y_TRUE = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
Y_PRED = np.array([0, 0, 1, 1, 2, 2, 2, 0, 2])


def probs_for(pred: np.ndarray, n: int = 3, confidence: float = 0.8) -> np.ndarray:
    p = np.full((len(pred), n), (1 - confidence) / (n - 1))
    p[np.arange(len(pred)), pred] = confidence
    return p


def test_three_class_report_by_hand() -> None:
    report = classification_report(Y_TRUE, probs_for(Y_PRED), ["a", "b", "c"])
    assert report["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [1, 0, 3]]
    assert report["accuracy"] == pytest.approx(6 / 9)
    assert report["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 3 / 4) / 3)
    a, b, c = (report["per_class"][k] for k in "abc")
    # precision = diagonal / column sum; recall = diagonal / row sum
    assert (a["precision"], a["recall"], a["support"]) == (pytest.approx(2 / 3), pytest.approx(2 / 3), 3)
    assert (b["precision"], b["recall"]) == (pytest.approx(1 / 2), pytest.approx(1 / 2))
    assert (c["precision"], c["recall"]) == (pytest.approx(3 / 4), pytest.approx(3 / 4))
    assert c["f1"] == pytest.approx(0.75)
    assert report["confusion_matrix_normalized"][2] == [0.25, 0.0, 0.75]


def test_topk_accuracy_by_hand() -> None:
    probs = np.array([[0.5, 0.3, 0.2], [0.2, 0.3, 0.5], [0.1, 0.6, 0.3]])
    y = np.array([1, 0, 2])  # true class ranked 2nd, 3rd, 2nd
    assert topk_accuracy(y, probs, 1) == 0.0
    assert topk_accuracy(y, probs, 2) == pytest.approx(2 / 3)
    assert topk_accuracy(y, probs, 3) == 1.0


def test_auc_one_and_one_half() -> None:
    y = np.array([0, 0, 1, 1])
    separable = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.1, 0.9]])
    assert classification_report(y, separable, ["x", "y"])["per_class"]["y"]["auc"] == 1.0
    constant = np.full((4, 2), 0.5)
    uninformative = classification_report(y, constant, ["x", "y"])
    assert uninformative["per_class"]["y"]["auc"] == 0.5 and uninformative["macro_auc"] == 0.5


def test_melanoma_operating_points_by_hand() -> None:
    classes = ["mel", "nv"]
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])  # four melanomas, four nevi
    p_mel = np.array([0.9, 0.7, 0.45, 0.2, 0.6, 0.3, 0.1, 0.05])
    probs = np.stack([p_mel, 1 - p_mel], axis=1)
    mel = classification_report(y, probs, classes, mel_sensitivity=0.75)["melanoma"]
    # At the decision (p > 0.5): melanomas 0.9, 0.7 caught (2/4); one nevus (0.6) flagged (3/4 specific).
    assert mel["at_decision"] == {"sensitivity": 0.5, "specificity": 0.75}
    # Reaching 3/4 sensitivity needs flagging p >= 0.45, which also flags the nevus at 0.6.
    assert mel["at_target"]["threshold"] == pytest.approx(0.45)
    assert mel["at_target"]["sensitivity"] == 0.75 and mel["at_target"]["specificity"] == 0.75


def test_truth_forms_parse_to_the_same_labels(tmp_path: Path) -> None:
    (tmp_path / "ham.csv").write_text("lesion_id,image_id,dx\nL1,ISIC_1,mel\nL2,ISIC_2,nv\nL3,ISIC_3,bkl\n")
    header = "image,MEL,NV,BCC,AKIEC,BKL,DF,VASC\n"
    (tmp_path / "isic.csv").write_text(header + "ISIC_1,1,0,0,0,0,0,0\nISIC_2,0,1,0,0,0,0,0\nISIC_3,0.0,0.0,0.0,0.0,1.0,0.0,0.0\n")
    ham, ham_form = read_truth(tmp_path / "ham.csv")
    isic, isic_form = read_truth(tmp_path / "isic.csv")
    assert (ham_form, isic_form) == ("ham", "isic")
    assert ham.to_dict() == isic.to_dict() == {"ISIC_1": "mel", "ISIC_2": "nv", "ISIC_3": "bkl"}


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("image,MEL,NV,BCC,AKIEC,BKL,DF,VASC\nISIC_1,1,1,0,0,0,0,0\n", "not one-hot"),
        ("name,label\na,mel\n", "unrecognised truth format"),
        ("image_id,dx\nISIC_1,mel\nISIC_1,nv\n", "listed twice"),
    ],
)
def test_bad_truth_files(tmp_path: Path, content: str, needle: str) -> None:
    (tmp_path / "t.csv").write_text(content)
    with pytest.raises(SkinclfError, match=needle):
        read_truth(tmp_path / "t.csv")


def test_scoring_a_predictions_csv_reports_mismatches(runner, tmp_path: Path) -> None:
    entries = [
        ("ISIC_1.jpg", one_hot_probs("mel"), None),  # right
        ("sub/ISIC_2.jpg", one_hot_probs("nv"), None),  # right
        ("ISIC_3.jpg", one_hot_probs("nv"), None),  # wrong: truth bkl
        ("ISIC_4.jpg", None, "cannot decode image: truncated"),  # prediction error
        ("holiday.jpg", one_hot_probs("nv"), None),  # no truth for it
    ]
    preds = write_predictions(tmp_path / "r.csv", entries, all_probs=True)
    (tmp_path / "truth.csv").write_text("image_id,dx\nISIC_1,mel\nISIC_2,nv\nISIC_3,bkl\nISIC_4,df\nISIC_5,vasc\n")
    result = runner.invoke(app, ["evaluate", "--predictions", str(preds), "--truth", str(tmp_path / "truth.csv"),
                                 "--out", str(tmp_path / "rep")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert report["n"] == 3 and report["accuracy"] == pytest.approx(2 / 3)
    m = report["matching"]
    assert (m["predictions"], m["truth"], m["scored"]) == (5, 5, 3)
    assert (m["prediction_errors"], m["no_truth"], m["no_prediction"]) == (1, 1, 1)
    assert m["examples"]["no_prediction"] == ["ISIC_5"] and m["examples"]["no_truth"] == ["holiday.jpg"]
    assert report["probabilities"].startswith("exact")
    assert "1 prediction errors, 1 without truth, 1 truths without prediction" in result.output


def test_topk_only_predictions_give_approximate_probabilities(tmp_path: Path) -> None:
    preds = write_predictions(tmp_path / "r.csv", [("ISIC_1.jpg", one_hot_probs("mel"), None),
                                                   ("ISIC_2.jpg", one_hot_probs("nv"), None)], all_probs=False)
    (tmp_path / "truth.csv").write_text("image_id,dx\nISIC_1,mel\nISIC_2,nv\n")
    evaluation = evaluate_predictions(predictions=preds, truth=tmp_path / "truth.csv", out=tmp_path / "rep")
    assert evaluation.report["probabilities"].startswith("approximate")
    assert evaluation.report["balanced_accuracy"] == 1.0
    calibration = evaluation.report["calibration"]
    assert not calibration["exact"] and calibration["note"].startswith("approximate")
    assert calibration["ece"] == pytest.approx(0.3)  # confidence 0.7, both right
    assert (tmp_path / "rep" / "reliability.png").is_file()


def test_no_matching_ids_is_an_error(tmp_path: Path) -> None:
    preds = write_predictions(tmp_path / "r.csv", [("a.jpg", one_hot_probs("mel"), None)], all_probs=True)
    (tmp_path / "truth.csv").write_text("image_id,dx\nISIC_9,mel\n")
    with pytest.raises(SkinclfError, match="matches an image"):
        evaluate_predictions(predictions=preds, truth=tmp_path / "truth.csv", out=tmp_path / "rep")


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("eval")
    ham = write_ham(root / "ham", per_class=5)
    result = prepare_dataset(src=ham, out=root / "prepared", val=0.2, test=0.3, show_progress=False)
    bundle = make_tiny_bundle(root / "model.keras", fingerprint=result.fingerprint)
    return root / "prepared", bundle


def test_evaluate_model_on_a_labelled_folder(runner, labelled, tmp_path: Path) -> None:
    prepared, bundle = labelled
    out = tmp_path / "rep"
    result = runner.invoke(app, ["evaluate", "--model", str(bundle), "--data", str(prepared / "test"),
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    for needle in ("Confusion matrix", "Per class", "Balanced accuracy", "Melanoma: sensitivity", "held-out"):
        assert needle in result.output
    report = json.loads((out / "report.json").read_text())
    n_test = len(list((prepared / "test").rglob("*.jpg")))
    assert report["n"] == n_test == sum(map(sum, report["confusion_matrix"]))
    assert report["provenance"]["held_out"] is True
    assert report["model"]["sha256"] and report["data"]["fingerprint"]
    assert report["calibration"]["exact"] and 0 <= report["calibration"]["ece"] <= 1 and "Calibration: ECE" in result.output
    for name in ("confusion_matrix.png", "roc.png", "history.png", "reliability.png"):
        png = out / name
        with Image.open(png) as im:
            im.verify()
        with Image.open(png) as im:
            assert im.format == "PNG" and im.width >= 400 and im.height >= 300, name
        assert png.stat().st_size > 10_000, name


def test_evaluating_the_validation_split_is_flagged_optimistic(labelled, tmp_path: Path) -> None:
    prepared, bundle = labelled
    report = evaluate_model(model=bundle, data=prepared / "val", out=tmp_path / "rep").report
    assert report["provenance"]["held_out"] is False and "optimistic" in report["provenance"]["note"]


def test_json_output_and_history_only(runner, labelled, tmp_path: Path) -> None:
    prepared, bundle = labelled
    result = runner.invoke(app, ["evaluate", "--model", str(bundle), "--data", str(prepared / "test"),
                                 "--out", str(tmp_path / "rep"), "--json"])
    assert result.exit_code == 0
    assert json.loads(result.stdout)["classes"] == list(CLASSES)
    result = runner.invoke(app, ["evaluate", "--model", str(bundle), "--history", "--out", str(tmp_path / "h")])
    assert result.exit_code == 0 and (tmp_path / "h" / "history.png").stat().st_size > 10_000


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--predictions", "r.csv"], "go together"),
        (["--predictions", "missing.csv", "--truth", "t.csv"], "predictions file not found"),
        (["--mel-sensitivity", "1.5", "--predictions", "r.csv", "--truth", "t.csv"], "between 0 and 1"),
        (["--data", "nowhere"], "folder not found"),
    ],
)
def test_evaluate_errors(runner, labelled, tmp_path: Path, monkeypatch, args: list[str], needle: str) -> None:
    monkeypatch.chdir(tmp_path)
    write_predictions(tmp_path / "r.csv", [("a.jpg", one_hot_probs("mel"), None)], all_probs=True)
    (tmp_path / "t.csv").write_text("image_id,dx\na,mel\n")
    result = runner.invoke(app, ["evaluate", "--model", str(labelled[1]), *args])
    assert result.exit_code == 1, result.output
    assert needle in result.output
