"""Mixed-precision int8: which nodes of a features graph stay in float so that int8 holds.

Measured with `bench/int8_probe.py` (model card, "int8"): quantizing the whole network loses
0.065 of validation balanced accuracy, almost all of it in the stem and the first blocks (their
activations span the widest range after batch-norm folding); keeping the colour constancy, the
preprocessing and the first few convolutions of every member in float holds the float model's
accuracy and keeps most of the speed.
"""

from __future__ import annotations


def float_nodes(float_onnx: bytes, first_convs: int) -> list[str]:
    """Names of the nodes to leave in float: everything before any convolution, and each
    convolution with fewer than `first_convs` convolutions before it on its path from the input
    (the first `first_convs` of every ensemble member, whatever the members' topology)."""
    import onnx

    graph = onnx.load_from_string(float_onnx).graph
    depth: dict[str, int] = {}  # tensor -> convolutions on the longest path from the input to it
    keep: list[str] = []
    for node in graph.node:  # ONNX graphs are stored in topological order
        before = max((depth.get(name, 0) for name in node.input), default=0)
        is_conv = node.op_type == "Conv"
        if (is_conv and before < first_convs) or (not is_conv and before == 0):
            keep.append(node.name)
        for out in node.output:
            depth[out] = before + (1 if is_conv else 0)
    return keep
