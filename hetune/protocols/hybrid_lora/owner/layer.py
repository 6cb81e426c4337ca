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

import ctypes
import ctypes.util
import os
import sys
from contextlib import contextmanager

import torch

from hetune.errors import ConfigError
from hetune.models.layers import decoder_layers, member_linear


def _heap_trimmer():
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c")), "malloc_trim")
    except (OSError, AttributeError):
        return None


_TRIM = _heap_trimmer()


# Resident growth since the last trim that makes the next product trim the heap. Trimming after
# every product cost SmolLM2's 2,048-token step 25% (each product refaulted the transients the
# trim had just returned: 1.8x the page faults); with 1 GiB of slack 7 of its 239 products
# trim, the step costs what it does untrimmed, and the peak stays within 0.3 GiB of trimming
# always (docs/benchmarks.md, "The owner's heap").
TRIM_SLACK_BYTES = 1 << 30
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
# Resident bytes after the last trim, lowered whenever the process shrinks on its own. Owners in
# threads of one process (PrivTuner) share it unlocked: a race costs at most an early or extra trim.
_trimmed_rss = 0


def resident_bytes() -> int:
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * _PAGE


def release_freed_heap() -> None:
    """Give the pages of freed heap blocks back to the OS once resident memory grew by the slack.

    After a large free, glibc raises its mmap threshold (up to 32 MiB), so a product's
    transients (encoded tokens, ciphertext chunks, decrypted limbs) then come from the heap,
    and the freed holes between long-lived blocks stay resident: on the 1B-shape step they
    grew the owner's RSS by about 0.35 GiB per layer. Called after every product; it trims
    only when the process grew by ``TRIM_SLACK_BYTES`` since the last trim.
    """
    global _trimmed_rss
    if _TRIM is None:
        return
    rss = resident_bytes()
    if rss - _trimmed_rss > TRIM_SLACK_BYTES:
        _TRIM(0)
        _trimmed_rss = resident_bytes()
    else:
        _trimmed_rss = min(_trimmed_rss, rss)


class _FrozenProduct(torch.autograd.Function):
    """y = x W^T through a backend; dL/dx = g W through the same backend."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, op: "OutsourcedOp") -> torch.Tensor:
        ctx.op = op
        if op.replayed is not None:  # recomputed for backward (checkpointing): the first pass's answer, no round trip
            y, op.replayed = op.replayed, None
            return y
        y = op.backend.forward(op.name, x.detach().reshape(-1, x.shape[-1]))  # (T, out) float64
        y = y.to(x.dtype).reshape(*x.shape[:-1], op.out_features)
        release_freed_heap()
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None  # below the lowest LoRA target: no round trip at all
        op = ctx.op
        dx = op.backend.backward(op.name, g.reshape(-1, g.shape[-1]))  # (T, in) float64
        dx = dx.to(g.dtype).reshape(*g.shape[:-1], op.in_features)
        release_freed_heap()
        return dx, None


class Replay:
    """Activation checkpointing of the decoder layers that never repeats a worker's product.

    With checkpointing the data owner keeps only each layer's input and its ops' answers;
    the rest (norms, attention, LoRA, activations) is recomputed in backward. Recomputing an
    outsourced op would cost a new encrypted round trip, so each forward answer is kept,
    keyed by a fingerprint of its input, and handed back when backward recomputes the same
    input (bit for bit: the clear ops are deterministic). An answer with no match (a
    recomputation of an input never seen) costs a round trip, never a wrong result.
    :meth:`contexts` is ``torch.utils.checkpoint``'s ``context_fn``.
    """

    def __init__(self) -> None:
        self.first = self.again = False
        self._kept: dict[tuple, torch.Tensor] = {}

    @staticmethod
    def _key(op: "OutsourcedOp", x: torch.Tensor) -> tuple:
        flat = x.detach().reshape(-1)
        return (op.name, tuple(x.shape), float(torch.sum(flat, dtype=torch.float64)),
                float(torch.sum(flat[::97], dtype=torch.float64)), float(flat[-1]))

    def keep(self, op: "OutsourcedOp", x: torch.Tensor, y: torch.Tensor) -> None:
        self._kept[self._key(op, x)] = y.detach()

    def take(self, op: "OutsourcedOp", x: torch.Tensor) -> torch.Tensor | None:
        return self._kept.pop(self._key(op, x), None)

    def clear(self) -> None:
        """Drop answers no backward will use (a forward with grad whose backward never ran)."""
        self._kept.clear()

    @contextmanager
    def _flag(self, name: str):
        setattr(self, name, True)
        try:
            yield
        finally:
            setattr(self, name, False)

    def contexts(self):
        return self._flag("first"), self._flag("again")


def checkpoint_layers(model: torch.nn.Module, ops: dict[str, "OutsourcedOp"]) -> Replay:
    """Turn on activation checkpointing of ``model``'s decoder layers (a transformers model, peft-wrapped or not),
    answers replayed for the ``ops``. Puts the model in training mode: transformers checkpoints only there."""
    replay = Replay()
    model.train()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.config.use_cache = False
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False, "context_fn": replay.contexts})
    for op in ops.values():
        op.replay = replay
    return replay


class OutsourcedOp:
    """One (possibly fused) op; computes the product once per input, serves each member's slice."""

    def __init__(self, name: str, in_features: int, out_features: int, n_members: int, backend):
        self.name, self.in_features, self.out_features = name, in_features, out_features
        self.n_members = n_members
        self.backend = backend
        self.replay: Replay | None = None  # activation checkpointing (checkpoint_layers)
        self.replayed: torch.Tensor | None = None  # a kept answer for the product being recomputed
        self._input = None
        self._output = None
        self._served = 0

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        replay = self.replay
        if replay is None:
            return _FrozenProduct.apply(x, self)
        if replay.again:
            self.replayed = replay.take(self, x)  # None (no match): a round trip, never a wrong answer
        y = _FrozenProduct.apply(x, self)
        if replay.first and torch.is_grad_enabled():  # (autograd.Function.forward itself runs without grad)
            replay.keep(self, x, y)
        return y

    def output_for(self, x: torch.Tensor) -> torch.Tensor:
        if self._input is not x or self._served >= self.n_members:
            self._input, self._output, self._served = x, self._product(x), 0
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
