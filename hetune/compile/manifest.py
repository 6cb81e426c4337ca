"""The bundle manifest: everything a worker and a client need to agree on, nothing secret."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace

import torch

from hetune.errors import BundleError
from hetune.quant.config import QuantConfig
from hetune.quant.integer import OpCodec
from hetune.quant.rotation import input_rotation

FORMAT = "hetune-bundle"
FORMAT_VERSION = 2  # 2: scheme-neutral crypto record, per-op weight norms


@dataclass(frozen=True)
class MemberSpec:
    """One original linear inside a (fused) op: rows [out_offset, out_offset + out_features)."""

    module: str
    out_offset: int
    out_features: int


@dataclass(frozen=True)
class OpSpec:
    name: str
    layer: int  # decoder block index, -1 for lm_head
    in_features: int
    out_features: int
    members: tuple[MemberSpec, ...]
    forward_acc_bits: int
    backward_acc_bits: int
    generic_acc_bits: int
    forward_l2: float = 0.0  # largest L2 norm of a row of W_q (drives the batched-RLWE noise)
    backward_l2: float = 0.0  # largest L2 norm of a column of W_q
    bits_a: int = 0  # this op's activation width: QuantConfig.bits_a, narrowed to fit the scheme (0: not quantized)
    bits_g: int = 0  # this op's gradient width, likewise

    @property
    def worst_acc_bits(self) -> int:
        return max(self.forward_acc_bits, self.backward_acc_bits)

    @property
    def weight_key(self) -> str:
        return f"{self.name}.weight"

    @property
    def scale_key(self) -> str:
        return f"{self.name}.scale"

    @property
    def rowsum_key(self) -> str:  # sent by a worker's /codec instead of the weight
        return f"{self.name}.rowsum"

    @property
    def static_keys(self) -> tuple[str, str]:  # the "static" ablation's fixed input and gradient ranges
        return f"{self.name}.static_input", f"{self.name}.static_grad"

    def codec(self, tensors: Mapping[str, torch.Tensor], quant: QuantConfig) -> OpCodec:
        """The data owner's codec of this op, from a bundle's tensors or a worker's /codec tensors (row sums, no weight)."""
        rowsum = tensors[self.rowsum_key] if self.rowsum_key in tensors else tensors[self.weight_key].to(torch.float64).sum(dim=1)
        static_input, static_grad = (tensors.get(k) for k in self.static_keys)
        return OpCodec(tensors[self.scale_key], rowsum, self.bits_a, self.bits_g, static_input, static_grad,
                       input_rotation(quant, self.in_features), quant.clip_a)

    @property
    def params(self) -> int:
        return self.in_features * self.out_features


@dataclass(frozen=True)
class CryptoSpec:
    """The scheme and parameter set the bundle's widths were fitted to: sessions use them unless they name others."""

    scheme: str
    param_set: str

    def resolve_session(self, scheme: str | None = None, param_set: str | None = None):
        """The ParamSet a session runs under: the names given, else this bundle's (its set only with its scheme).

        The one rule for client and worker alike; an unknown name is a ConfigError naming the choices.
        """
        from hetune.crypto.registry import get_scheme

        scheme = scheme or self.scheme
        if param_set is None and scheme == self.scheme:
            param_set = self.param_set
        return get_scheme(scheme).resolve(param_set)


@dataclass(frozen=True)
class ModelInfo:
    id: str
    model_type: str
    weights_sha256: str  # of all the source model's base weights (float32): identifies the model, for people
    total_params: int
    config: dict  # the architecture fields a client needs (hidden size, heads, ...)
    outsourced_sha256: str = ""  # of the outsourced weights only: what the data owner checks (hetune.compile.fingerprint)
    source_sha256: str = ""  # of the GGUF file compiled from, if any: the owner's check for a GGUF model


@dataclass(frozen=True)
class Manifest:
    hetune_version: str
    model: ModelInfo
    quant: QuantConfig
    crypto: CryptoSpec
    fused: bool
    ops: tuple[OpSpec, ...]
    files: dict = field(default_factory=dict)  # filename -> {"sha256", "bytes"}
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @property
    def outsourced_params(self) -> int:
        return sum(op.params for op in self.ops)

    def problems(self, params) -> list[str]:
        """Ops that cannot run under a scheme's parameter set (hetune.crypto.scheme.ParamSet), with why."""
        found = [(op.name, params.check_op(op.forward_l2, op.backward_l2, op.worst_acc_bits)) for op in self.ops]
        return [f"{name}: {why}" for name, why in found if why]

    def session_refusal(self, params) -> str | None:
        """Why a session under ``params`` cannot use this bundle, with the fix; None if it can (client and worker check alike)."""
        problems = self.problems(params)
        if not problems:
            return None
        return (f"this bundle cannot run under {params.scheme}/{params.name}: {problems[0]}; its widths fit "
                f"{self.crypto.scheme}/{self.crypto.param_set}: compile it with --scheme {params.scheme} "
                f"--param-set {params.name} to train under that set, or pick the set it was compiled for")

    def layer_slice(self, layers: range) -> Manifest:
        """The ops of these decoder blocks, for a worker that holds one slice of a model (lm_head goes with the last block)."""
        last = max(op.layer for op in self.ops)
        return replace(self, ops=tuple(op for op in self.ops if (op.layer if op.layer >= 0 else last) in layers))

    def op(self, name: str) -> OpSpec:
        for op in self.ops:
            if op.name == name:
                return op
        raise KeyError(name)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Manifest":
        try:
            if data.get("format") != FORMAT:
                raise BundleError(f"not a hetune bundle manifest (format={data.get('format')!r})")
            if data.get("format_version") != FORMAT_VERSION:
                raise BundleError(
                    f"bundle format version {data.get('format_version')} is not supported "
                    f"(this hetune reads version {FORMAT_VERSION})",
                    "recompile the bundle with this hetune version: hetune compile MODEL --out DIR",
                )
            quant = {"rotation": "none", **data["quant"]}  # bundles from before rotation hold W itself
            if "scheme" in quant:  # bundles from before the field was renamed (it is not the encryption scheme)
                quant["ranges"] = quant.pop("scheme")
            quant = QuantConfig(**quant)
            widths = {"bits_a": quant.bits_a, "bits_g": quant.bits_g}  # bundles from before per-op widths
            ops = tuple(
                OpSpec(**{**widths, **op, "members": tuple(MemberSpec(**m) for m in op["members"])}) for op in data["ops"]
            )
            return cls(
                hetune_version=data["hetune_version"],
                model=ModelInfo(**data["model"]),
                quant=quant,
                crypto=CryptoSpec(**data["crypto"]),
                fused=bool(data["fused"]),
                ops=ops,
                files=data["files"],
            )
        except (KeyError, TypeError) as err:
            raise BundleError(f"bundle manifest is malformed: missing or bad field {err}") from err
