"""The model: the network, its bundle (a `.keras` file with metadata), ensembles, post-hoc steps, ONNX conversion.

Imports the ground floor and `data`. Entry points: `network.build_model`, `bundle.load_bundle`,
`bundle.save_bundle`, `onnx_meta.read_meta` (no Keras needed), `outlier.flag`.
"""
