"""Batch prediction: a folder in, one CSV out (`skinclf predict`), streamed, atomic and resumable.

Imports `engines`, `model`, `data` and the ground floor. Entry points: `predict.predict` (a
`config.PredictConfig`) and `predict.predict_directory` (its keyword form); `results` defines the
CSV's columns and `batch_rows`, the one row builder; `output` the `.partial` file and its atomic
rename, `resume` what each row was computed from, `patient` the --metadata file, and `ray` (with
`ray_address`, `ray_netns`, `ray_actor`, `ray_hooks`) the same classification on a Ray cluster's
workers (`predict --ray`; Ray is imported only there, inside functions).
"""
