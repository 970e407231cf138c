"""The shared EfficientNet-Lite0 ONNX export as a trainable torch module (exact mirror, BatchNorm folded).

Walks the ONNX graph's Conv / Clip / Add nodes in order; the export's static "same" padding subgraphs become a
TF-style same pad computed from each conv's kernel and stride. ``Backbone.prefix`` runs the frozen start and
``Backbone.forward_from`` the rest, returning the block outputs the training scripts need. Weights keep their
ONNX initializer names, so trained values go straight back into a graph.
"""

from __future__ import annotations

import re

import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

from training.common import BACKBONE


def _same_pad(x: torch.Tensor, k: int, s: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    ph = max((-(-h // s) - 1) * s + k - h, 0)
    pw = max((-(-w // s) - 1) * s + k - w, 0)
    if ph == 0 and pw == 0:
        return x
    return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])


class ConvOp(nn.Module):
    def __init__(self, name: str, w: torch.Tensor, b: torch.Tensor, stride: int, group: int, act: bool,
                 w_name: str, b_name: str) -> None:
        super().__init__()
        self.name = name
        self.weight = nn.Parameter(w)
        self.bias = nn.Parameter(b)
        self.stride, self.group, self.act = stride, group, act
        self.k = int(w.shape[-1])
        self.w_name, self.b_name = w_name, b_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _same_pad(x, self.k, self.stride)
        y = F.conv2d(x, self.weight, self.bias, self.stride, 0, 1, self.group)
        return F.relu6(y) if self.act else y


class Backbone(nn.Module):
    """Convs grouped by block: ``stem``, ``blocks.0`` .. ``blocks.15``, ``head``; input = (x-127)/128 floats."""

    def __init__(self) -> None:
        super().__init__()
        model = onnx.load(str(BACKBONE))
        inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        clipped = {n.input[0] for n in model.graph.node if n.op_type == "Clip"}
        self.stem: list[ConvOp] = []
        self.blocks: list[list[ConvOp]] = [[] for _ in range(16)]
        self.head: list[ConvOp] = []
        self.residual = [False] * 16
        for n in model.graph.node:
            if n.op_type == "Add" and n.name.startswith("/_blocks."):
                self.residual[int(n.name.split(".")[1].split("/")[0])] = True
            if n.op_type != "Conv":
                continue
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            w = torch.from_numpy(inits[n.input[1]].copy())
            b = torch.from_numpy(inits[n.input[2]].copy())
            op = ConvOp(n.name, w, b, int(attrs.get("strides", [1, 1])[0]), int(attrs.get("group", 1)),
                        n.output[0] in clipped, n.input[1], n.input[2])
            m = re.match(r"/_blocks\.(\d+)/", n.name)
            if m:
                self.blocks[int(m.group(1))].append(op)
            elif n.name.startswith("/_conv_stem"):
                self.stem.append(op)
            else:
                self.head.append(op)
        # registered once, in graph order, so parameters() / state_dict() / torch.save see every conv
        self.convs = nn.ModuleList(self.stem + [op for ops in self.blocks for op in ops] + self.head)

    def run_block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        y = x
        for op in self.blocks[i]:
            y = op(y)
        return x + y if self.residual[i] else y

    def forward_from(self, x: torch.Tensor, start: int, want: tuple[int, ...] = ()) -> dict[str, torch.Tensor]:
        """Run blocks ``start``..15 and the head conv on ``x`` (the input of block ``start``; -1 = pixels)."""
        out: dict[str, torch.Tensor] = {}
        if start < 0:
            for op in self.stem:
                x = op(x)
            start = 0
        for i in range(start, 16):
            x = self.run_block(i, x)
            if i in want:
                out[f"b{i}"] = x
        for op in self.head:
            x = op(x)
        out["features"] = x.mean(dim=(2, 3))
        return out

    def prefix(self, x: torch.Tensor, stop: int) -> torch.Tensor:
        """Pixels -> the input of block ``stop``."""
        for op in self.stem:
            x = op(x)
        for i in range(stop):
            x = self.run_block(i, x)
        return x

    def tuned_parameters(self, start: int) -> list[nn.Parameter]:
        """Parameters of blocks ``start``..15 and the head conv."""
        return [p for op in [op for i in range(start, 16) for op in self.blocks[i]] + self.head
                for p in (op.weight, op.bias)]

    def named_inits(self, start: int) -> dict[str, torch.Tensor]:
        """ONNX initializer name -> trained tensor for blocks ``start``..15 and the head conv."""
        out: dict[str, torch.Tensor] = {}
        mods = [op for i in range(start, 16) for op in self.blocks[i]] + list(self.head)
        for op in mods:
            out[op.w_name] = op.weight.detach()
            out[op.b_name] = op.bias.detach()
        return out
