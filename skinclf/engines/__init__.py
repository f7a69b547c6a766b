"""Engines: a batch of images in, logits out, the same for Keras and ONNX Runtime; the batch runner and export.

Imports `model`, `data` and the ground floor. Entry points: `registry.register_engine` (each
engine module registers itself), `load.load_engine`,
`runner.predict_files` (decode in threads, test-time augmentation), `export.export_model`.
"""
