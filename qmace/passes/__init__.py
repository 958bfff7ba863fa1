"""Graph passes. Each edits a graph in place, keeps outputs equal on any input, and returns its count of
changes; ``optimize`` runs the standard pipeline on a copy."""

from __future__ import annotations

import logging

from qmace.ir import Graph
from qmace.passes.affine import fold_affine
from qmace.passes.bn import fold_batchnorm
from qmace.passes.cleanup import remove_identities
from qmace.passes.decomposed import fuse_decomposed
from qmace.passes.deconv import deconv_to_conv, fold_deconv_bias
from qmace.passes.fold import fold_constants
from qmace.passes.fuse import fuse_activations
from qmace.passes.hardswish import fuse_hardswish
from qmace.passes.pad import fold_pads
from qmace.passes.pool import spatial_means_to_global_pool
from qmace.passes.shapes import infer_shapes
from qmace.passes.transpose import sink_transposes

log = logging.getLogger(__name__)

__all__ = ["deconv_to_conv", "fold_affine", "fold_batchnorm", "fold_constants", "fold_deconv_bias", "fold_pads",
           "fuse_activations", "fuse_decomposed", "fuse_hardswish", "infer_shapes", "optimize", "remove_identities",
           "sink_transposes", "spatial_means_to_global_pool"]


def optimize(graph: Graph, fuse: bool = True) -> Graph:
    """Identity removal, shape inference + constant folding to a fixed point, decomposed LayerNorm/GELU/Swish and
    HardSigmoid/HardSwish fusion (before transpose sinking, which would split those patterns), transpose sinking,
    spatial ReduceMean -> GlobalAveragePool, ConvTranspose bias Adds,
    BatchNorm and per-channel Mul/Add folding, zero Pad into Conv, activation fusion, ConvTranspose with
    kernel == stride as Conv + DepthToSpace, dead-node removal, final shape inference.

    Args:
        graph: the float graph (not modified).
        fuse: fuse Relu/Clip activations into their producers (False keeps them as separate nodes).

    Returns:
        The optimized copy; its ``metadata["passes"]`` holds each pass's count of changes.

    Raises:
        ModelError: constant folding cannot evaluate a node on its constant inputs.
        ResourceLimitError: a folded constant would exceed the memory budget.
    """
    g = graph.copy()
    stats = {"identities": remove_identities(g)}
    folded = 0
    for _ in range(8):
        infer_shapes(g)
        n = fold_constants(g)
        folded += n
        if n == 0:
            break
    g.remove_unused()
    stats["constants"] = folded
    fused_ops = fuse_decomposed(g)
    stats["layer_norms"], stats["gelus"] = fused_ops["LayerNormalization"], fused_ops["Gelu"]
    stats["swishes"] = fused_ops["Swish"]
    stats["hardswish"] = fuse_hardswish(g)
    stats["transposes"] = sink_transposes(g)
    if stats["transposes"]:
        stats["identities"] += remove_identities(g)
        infer_shapes(g)
    stats["pools"] = spatial_means_to_global_pool(g)
    stats["deconv_biases"] = fold_deconv_bias(g)
    stats["batchnorms"] = fold_batchnorm(g)
    stats["affine"] = fold_affine(g)
    stats["pads"] = fold_pads(g)
    stats["activations"] = fuse_activations(g) if fuse else 0
    stats["deconvs"] = deconv_to_conv(g)
    g.remove_unused()
    infer_shapes(g)
    log.info("passes: removed %(identities)d identities, folded %(constants)d constant nodes, "
             "%(transposes)d transpose rewrites, %(pools)d spatial means, %(batchnorms)d batchnorms, %(affine)d affine ops, "
             "%(pads)d pads, fused %(layer_norms)d LayerNorms, %(gelus)d GELUs, %(swishes)d Swishes, "
             "%(hardswish)d HardSwish/HardSigmoid spellings, %(activations)d activations, "
             "%(deconv_biases)d ConvTranspose bias Adds, %(deconvs)d ConvTransposes as Conv + DepthToSpace", stats)
    g.metadata["passes"] = stats
    return g
