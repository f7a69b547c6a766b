"""Batch prediction: a folder in, one CSV out (`skinclf predict`), streamed, atomic and resumable.

Imports `engines`, `model`, `data` and the ground floor. Entry point: `predict.predict_directory`;
`results` defines the CSV's columns and rows, `output` the `.partial` file and its atomic rename,
`resume` what each row was computed from, and `ray` the same classification on a Ray cluster's
workers (`predict --ray`; Ray is imported only there, inside functions).
"""
