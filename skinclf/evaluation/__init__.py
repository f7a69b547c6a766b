"""Evaluation: metrics and figures of a model or of a predictions CSV on labelled images.

Imports `batch`, `engines`, `model`, `data` and the ground floor. Entry points:
`evaluate.run_evaluation`, `evaluate.evaluate_model`, `evaluate.evaluate_predictions`.
"""
