"""Outsourced linears inside the data owner's model.

Each frozen ``nn.Linear`` (inside peft's LoRA wrapper, if any) is replaced by an
:class:`OutsourcedLinear` that holds no weight. Members of a fused op (q/k/v, gate/up)
share one :class:`OutsourcedOp`: the first member's call runs the whole product once,
the others take their slice of it; in backward, autograd sums the members' gradients
into one ``(T, out_total)`` tensor, so the worker gets one request per op and returns
``g_q Wq + g_k Wk + g_v Wv`` as one product. A linear's bias (Qwen2's q/k/v) never goes
to the worker: the data owner keeps it and adds it to its slice of the product.
"""

from __future__ import annotations

import torch

from hetune.errors import ConfigError
from hetune.models.layers import decoder_layers, member_linear


class _FrozenProduct(torch.autograd.Function):
    """y = x W^T through a backend; dL/dx = g W through the same backend."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, op: "OutsourcedOp") -> torch.Tensor:
        ctx.op = op
        y = op.backend.forward(op.name, x.detach().reshape(-1, x.shape[-1]))  # (T, out) float64
        return y.to(x.dtype).reshape(*x.shape[:-1], op.out_features)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None  # below the lowest LoRA target: no round trip at all
        op = ctx.op
        dx = op.backend.backward(op.name, g.reshape(-1, g.shape[-1]))  # (T, in) float64
        return dx.to(g.dtype).reshape(*g.shape[:-1], op.in_features), None


class OutsourcedOp:
    """One (possibly fused) op; computes the product once per input, serves each member's slice."""

    def __init__(self, name: str, in_features: int, out_features: int, n_members: int, backend):
        self.name, self.in_features, self.out_features = name, in_features, out_features
        self.n_members = n_members
        self.backend = backend
        self._input = None
        self._output = None
        self._served = 0

    def output_for(self, x: torch.Tensor) -> torch.Tensor:
        if self._input is not x or self._served >= self.n_members:
            self._input, self._output, self._served = x, _FrozenProduct.apply(x, self), 0
        out = self._output
        self._served += 1
        if self._served == self.n_members:  # every member served: drop references to the graph
            self._input = self._output = None
        return out


class OutsourcedLinear(torch.nn.Module):
    """Stands where a frozen nn.Linear was; holds no weight, only the linear's bias if it had one."""

    def __init__(self, op: OutsourcedOp, out_offset: int, out_features: int, bias: torch.Tensor | None = None):
        super().__init__()
        self.op, self.out_offset = op, out_offset
        self.in_features, self.out_features = op.in_features, out_features
        self.register_buffer("bias", None if bias is None else bias.detach())  # (out,) frozen, client-side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.op.output_for(x)[..., self.out_offset : self.out_offset + self.out_features]
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"op={self.op.name}, out=[{self.out_offset}:{self.out_offset + self.out_features}], backend={self.op.backend.name}"


def _set_base_linear(layers: torch.nn.ModuleList, path: str, module: torch.nn.Module) -> None:
    _, idx, *rest = path.split(".")
    parent = layers[int(idx)]
    for attr in rest[:-1]:
        parent = getattr(parent, attr)
    holder = getattr(parent, rest[-1])
    if hasattr(holder, "base_layer"):  # peft LoRA wrapper: replace the frozen base only
        holder.base_layer = module
    else:
        setattr(parent, rest[-1], module)


def attach_backend(model: torch.nn.Module, ops, backend) -> dict[str, OutsourcedOp]:
    """Replace every outsourced linear named in ``ops`` (OpSpecs) by an OutsourcedLinear.

    The original weights are dropped, so the client holds none of the outsourced base
    weights; biases stay with the client.
    """
    layers = decoder_layers(model)
    handles = {}
    for spec in ops:
        if spec.name == "lm_head":
            raise ConfigError("this bundle outsources lm_head, which the training client keeps locally",
                              "recompile the bundle without --lm-head")
        handle = OutsourcedOp(spec.name, spec.in_features, spec.out_features, len(spec.members), backend)
        for member in spec.members:
            bias = member_linear(layers, member.module).bias
            _set_base_linear(layers, member.module, OutsourcedLinear(handle, member.out_offset, member.out_features, bias))
        handles[spec.name] = handle
    return handles
