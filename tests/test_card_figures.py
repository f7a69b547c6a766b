"""tools/card_figures.py: the docs' figures tables come from the reports, between their markers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location("card_figures", Path(__file__).parents[1] / "tools" / "card_figures.py")
card_figures = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(card_figures)


def _report(bal: float, sens: float) -> dict:
    return {"n": 10, "balanced_accuracy": bal, "accuracy": 0.5, "top_k_accuracy": {"2": 0.6, "3": 0.7},
            "macro_auc": 0.9, "melanoma": {"at_decision": {"sensitivity": sens, "specificity": 0.8}, "auc": 0.85},
            "per_class": {"mel": {"precision": 0.4, "recall": sens, "f1": 0.5, "auc": 0.85, "support": 3}}}


def test_metrics_table_quotes_both_reports() -> None:
    table = card_figures.metrics_table(_report(0.8284, 0.75), _report(0.7561, 0.5))
    row = next(line for line in table.splitlines() if "balanced accuracy" in line)
    assert row.endswith("| **0.828** | **0.756** |")
    assert "| **0.750** / 0.800 | **0.500** / 0.800 |" in table


def test_replace_block_rewrites_only_between_markers(tmp_path) -> None:
    text = "before\n<!-- figures:metrics -->\nold table\n<!-- /figures:metrics -->\nafter\n"
    out = card_figures.replace_block(text, "metrics", "| new |", tmp_path / "README.md")
    assert out == "before\n<!-- figures:metrics -->\n| new |\n<!-- /figures:metrics -->\nafter\n"
    with pytest.raises(SystemExit, match="no <!-- figures:trust -->"):
        card_figures.replace_block(text, "trust", "x", tmp_path / "README.md")
