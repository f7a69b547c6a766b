"""Training: the loader and augmentation, the training loop, post-hoc fitting on validation, ensembles.

Imports every stage below it (`trust`, `evaluation`, `batch`, `engines`, `model`, `data`) and the
ground floor. Entry points: `train.train_model` (a `config.TrainConfig`), `ensemble.ensemble_bundles`,
`distill.distill` (with `views.build_views`).
"""
