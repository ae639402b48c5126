"""A model cut at one layer: the part below it and the part above it, as two callables.

Methods that perturb a layer's output many times per image (Ablation-CAM: once per channel) only
need to re-run what lies *above* the layer; pytorch-grad-cam re-runs the whole network instead.
:func:`split_at_layer` traces the model with :mod:`torch.fx` (the layer kept as one opaque call)
and builds

* ``below(images) -> (layer_output, *side_values)`` and
* ``above(layer_output, *side_values) -> model output``,

where the side values are what the part above reads from below the layer other than the layer's
own output (a transformer block's residual input, say). Both share the model's parameters and
modules, so eval mode and weights are the model's own. Models fx cannot trace (data-dependent
control flow) raise :class:`SplitError`; callers fall back to full forwards.
"""

from __future__ import annotations

import torch.fx as fx
import torch.nn as nn


class SplitError(Exception):
    """The model cannot be cut at this layer (untraceable, or the layer runs more or less than once)."""


class _LayerAsLeaf(fx.Tracer):
    """fx's default tracer, with ``layer_name`` kept as a single call and modules that contain it
    traced through (so a layer inside a ``torch.nn`` container is still reached)."""

    def __init__(self, layer_name: str) -> None:
        super().__init__()
        self.layer_name = layer_name

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        if qualified_name == self.layer_name:
            return True
        if self.layer_name.startswith(qualified_name + ".") or not qualified_name:
            return False
        return super().is_leaf_module(module, qualified_name)


def split_at_layer(model: nn.Module, layer_name: str) -> tuple[fx.GraphModule, fx.GraphModule]:
    """``(below, above)`` as described in the module docstring; raises :class:`SplitError`."""
    try:
        graph = _LayerAsLeaf(layer_name).trace(model)
    except Exception as error:  # fx raises many types (TraceError, TypeError, NotImplementedError...)
        raise SplitError(f"torch.fx cannot trace {type(model).__name__}: {error}".splitlines()[0]) from error
    calls = [node for node in graph.nodes if node.op == "call_module" and node.target == layer_name]
    if len(calls) != 1:
        raise SplitError(f"layer {layer_name!r} is called {len(calls)} times in the traced forward, not once")
    layer_node = calls[0]
    depends, above_nodes = _above(graph, layer_node)
    output = next(node for node in graph.nodes if node.op == "output")
    if output not in depends:
        raise SplitError(f"the model's output does not depend on layer {layer_name!r}")
    sides = _side_values(above_nodes, depends)
    return (
        fx.GraphModule(model, _below_graph(graph, layer_node, depends, sides)),
        fx.GraphModule(model, _above_graph(layer_node, above_nodes, sides)),
    )


def _above(graph: fx.Graph, layer_node: fx.Node) -> tuple[set[fx.Node], list[fx.Node]]:
    """The nodes that depend on the layer's output (with it), and those after it in graph order."""
    above_nodes: list[fx.Node] = []
    depends = {layer_node}
    for node in graph.nodes:
        if node is not layer_node and any(source in depends for source in node.all_input_nodes):
            depends.add(node)
            above_nodes.append(node)
    return depends, above_nodes


def _side_values(above_nodes: list[fx.Node], depends: set[fx.Node]) -> list[fx.Node]:
    """What the part above reads from below besides the layer's output (a block's residual), in order."""
    sides: list[fx.Node] = []
    for node in above_nodes:
        for source in node.all_input_nodes:
            if source not in depends and source not in sides and source.op != "get_attr":
                sides.append(source)
    return sides


def _above_graph(layer_node: fx.Node, above_nodes: list[fx.Node], sides: list[fx.Node]) -> fx.Graph:
    above_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {layer_node: above_graph.placeholder("layer_output")}
    for index, side in enumerate(sides):
        env[side] = above_graph.placeholder(f"side_{index}")
    for node in above_nodes:
        for source in node.all_input_nodes:
            if source.op == "get_attr" and source not in env:  # parameters/buffers read above the layer
                env[source] = above_graph.node_copy(source, lambda n: env[n])
        env[node] = above_graph.node_copy(node, lambda n: env[n])
    return above_graph


def _below_graph(graph: fx.Graph, layer_node: fx.Node, depends: set[fx.Node], sides: list[fx.Node]) -> fx.Graph:
    below_graph = fx.Graph()
    below_env: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        if (node in depends and node is not layer_node) or node.op == "output":
            continue
        below_env[node] = below_graph.node_copy(node, lambda n: below_env[n])
    below_graph.output(tuple(below_env[node] for node in (layer_node, *sides)))
    return below_graph
