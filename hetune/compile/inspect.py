"""Human and JSON summaries of a bundle (no heavy imports: reads the manifest and the scheme registry)."""

from __future__ import annotations

from pathlib import Path

from hetune.compile.bundle import read_manifest


def bundle_summary(path: Path) -> dict:
    m = read_manifest(path)
    params = m.crypto.resolve_session()
    weight_bytes = {op.name: op.params * (1 if m.quant.bits_w <= 8 else 2) for op in m.ops}
    return {
        "path": str(path),
        "model": m.model.id,
        "model_weights_sha256": m.model.weights_sha256,
        "hetune_version": m.hetune_version,
        "bits": {"w": m.quant.bits_w, "a": m.quant.bits_a, "g": m.quant.bits_g},  # a, g: at most (per op below)
        "rotation": m.quant.rotation if m.quant.rotation == "none" else f"{m.quant.rotation} (seed {m.quant.rotation_seed})",
        "clip_a": m.quant.clip_a,
        "fused": m.fused,
        "crypto": {"scheme": params.scheme, "param_set": params.name, "budget_bits": params.budget_bits,
                   "exact": params.exact, "polynomial_size": params.poly_size},
        "ops": [
            {"name": op.name, "in": op.in_features, "out": op.out_features, "members": [mm.module for mm in op.members],
             "bits_a": op.bits_a, "bits_g": op.bits_g, "acc_bits": op.worst_acc_bits, "weight_l2": max(op.forward_l2, op.backward_l2),
             "weight_bytes": weight_bytes[op.name], "wire_bytes": op.wire_bytes}
            for op in m.ops
        ],
        "files_bytes": sum(f["bytes"] for f in m.files.values()),
        "outsourced_params": m.outsourced_params,
        "total_params": m.model.total_params,
        "outsourced_share": m.outsourced_params / m.model.total_params,
    }


def format_summary(s: dict) -> str:
    clip = "" if s["clip_a"] == 1 else f"clip {s['clip_a']:g}, "
    lines = [
        f"bundle   {s['path']}",
        f"model    {s['model']} (sha256 {s['model_weights_sha256'][:16]}...)",
        f"bits     w{s['bits']['w']} a{s['bits']['a']} g{s['bits']['g']}, rotation {s['rotation']}, {clip}fused={s['fused']}, "
        f"{s['crypto']['scheme']}/{s['crypto']['param_set']} budget {s['crypto']['budget_bits']} bits",
        f"{'op':<22}{'in':>7}{'out':>8}{'bits a/g':>10}{'acc bits':>10}{'bytes':>12}  wire B/value fwd | bwd",
    ]
    lines += [f"{op['name']:<22}{op['in']:>7}{op['out']:>8}{str(op['bits_a']) + '/' + str(op['bits_g']):>10}{op['acc_bits']:>10}"
              f"{op['weight_bytes']:>12,}  {_wire(op['wire_bytes'])}" for op in s["ops"]]
    lines.append(
        f"{len(s['ops'])} ops, {s['files_bytes']:,} bytes on disk, {s['outsourced_params']:,} of "
        f"{s['total_params']:,} parameters outsourced ({s['outsourced_share']:.1%})"
    )
    if any(op["wire_bytes"] for op in s["ops"]):
        lines.append("wire B/value: upload = request, fresh = result with masks per request (A_out and B_out); with fixed "
                     "masks body = result per call, hint = once per session")
    return "\n".join(lines)


def _wire(widths: dict) -> str:
    """upload 6 fresh 10 body 4.125 hint 5 | ... per direction; '-' where the scheme's widths do not follow the norms."""
    parts = [" ".join(f"{k.removesuffix('_result')} {v:g}" for k, v in widths.get(d, {}).items()) or "-"
             for d in ("forward", "backward")]
    return " | ".join(parts) if widths else "-"
