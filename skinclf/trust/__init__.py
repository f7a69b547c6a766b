"""Trust: calibration, the "unlike the training images" flag and occlusion heat maps.

Imports `evaluation`, `batch`, `engines`, `model`, `data` and the ground floor. Entry points:
`calibrate.calibrate_model`, `ood.fit_ood` (with `reference_images.reference_outliers`), `explain.explain_images`.
"""
