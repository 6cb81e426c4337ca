"""Would int8 limbs speed up the CPU worker's exact product? Byte limbs on onnxruntime against float64 limbs.

Question (issue 18, part 5): this CPU has AVX-512 VNNI, which torch 2.3.1 cannot reach on the
CPU (no CPU ``torch._int_mm``); onnxruntime's ``MatMulInteger`` (uint8 x int8 -> int32, MLAS's
VNNI kernels) can. Does a product W @ B mod 2^64 with B split into unsigned byte limbs beat
the worker's float64 limbs (two of them, :func:`hetune.crypto.ring.limb_plan`) at the 1B
step's shapes?

The body B is what a fixed-mask request carries: 48-bit values (the upload width), so six byte
limbs, each exact in int32 (n_in x 255 x 128 < 2^31). Two ways, on the same random 8-bit
weights and body, one after the other in this run:

- ``whole``: the product in one go: float64 as :func:`~hetune.crypto.ring.gemm_mod_2_64`; bytes as
  six ``MatMulInteger`` calls on B^T's byte planes, recombined with shifts in int64.
- ``streamed``: the worker's :class:`~hetune.crypto.rlwe.ProductAccumulator` fed the packed body
  in its 2 MiB pieces of whole features (each unpacked, float64 limb sums grown in place by
  ``addmm_``); bytes from the same pieces unpacked the same way, with int32 sums, since
  ``MatMulInteger`` cannot accumulate in place: each piece's six products are added to them.

Both are checked equal (array equality) to the float64 result; ``gemm_ratio`` is the six
``MatMulInteger`` calls alone against the whole float64 product (what fusing the limb
handling could at best reach). Packing the result is the same for both and left out.

    .venv/bin/python benchmarks/int8_limbs.py     # about a minute on 2 cores (each timing the fastest of 3)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper

from common import environment, timed, write_json

from hetune.crypto import rlwe_wire as wire
from hetune.crypto.ring import combine_limbs, gemm_mod_2_64, limb_plan
from hetune.crypto.rlwe import FEED_BYTES, NAME, ProductAccumulator
from hetune.crypto.rlwe_params import PARAM_SETS

SHAPES = ((2048, 2048), (8192, 2048), (2048, 8192))  # (n_out, n_in) of Llama-3.2-1B's linears
TOKENS = 2048  # one ring block of coefficients per feature at p128


def matmul_integer(threads: int) -> ort.InferenceSession:
    """Y (M, N) int32 = A (M, K) uint8 @ B (K, N) int8."""
    a = helper.make_tensor_value_info("A", TensorProto.UINT8, ["M", "K"])
    b = helper.make_tensor_value_info("B", TensorProto.INT8, ["K", "N"])
    y = helper.make_tensor_value_info("Y", TensorProto.INT32, ["M", "N"])
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["A", "B"], ["Y"])], "matmul_integer", [a, b], [y])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def byte_planes(b: np.ndarray, skip: int) -> list[np.ndarray]:
    """B (f, C) int64 -> its byte limbs above the ``skip`` zero low bytes, each transposed to (C, f) uint8."""
    planes = b.view(np.uint8).reshape(*b.shape, 8)  # little-endian
    return [np.ascontiguousarray(planes[:, :, k].T) for k in range(skip, 8)]


def best(fn, repeats: int):
    """(result, the fastest of ``repeats`` runs' seconds)."""
    runs = [timed(fn) for _ in range(repeats)]
    return runs[0][0], min(seconds for _, seconds in runs)


def row(sess, n_out: int, n_in: int, bits: int, gen: torch.Generator, repeats: int) -> dict:
    w = torch.randint(-128, 128, (n_out, n_in), generator=gen)
    b = torch.randint(0, 2**bits, (n_in, TOKENS), generator=gen) << (64 - bits)  # as unpacked from the wire
    wf, w8 = w.to(torch.float64), np.ascontiguousarray(w.T.numpy().astype(np.int8))  # (n_in, n_out)
    skip = (64 - bits) // 8
    assert n_in * 255 * 128 < 2**31, "the int32 sums of byte limbs would overflow"
    shift = [8 * k for k in range(skip, 8)]

    ref, f64_whole = best(lambda: gemm_mod_2_64(wf, b, max_abs_weight=128), repeats)

    gemm_s = []

    def bytes_whole():
        gemm_s.append(0.0)
        out = np.zeros((TOKENS, n_out), dtype=np.int64)
        for s, plane in zip(shift, byte_planes(b.numpy(), skip)):
            y, seconds = timed(lambda: sess.run(None, {"A": plane, "B": w8})[0])
            gemm_s[-1] += seconds
            out += y.astype(np.int64) << s
        return out.T

    got_whole, i8_whole = best(bytes_whole, repeats)
    rp = PARAM_SETS["p128"]
    body = memoryview(wire.pack_top(b, bits))  # the request's ciphertexts as sent (the low bits are zero: no rounding)
    header = wire.Header(wire.HINTED_REQUEST, NAME, rp.name, TOKENS, n_in, bits, bytes(16))
    feature_bytes = wire.packed_bytes(TOKENS, bits)
    piece = max(1, FEED_BYTES // feature_bytes)  # whole features per 2 MiB piece, as the accumulator takes them

    def f64_streamed():  # the worker's own accumulator, fed the body a piece at a time
        acc = ProductAccumulator(rp, header, w, "cpu")
        for i in range(0, len(body), acc.feed_bytes):
            acc.feed(body[i : i + acc.feed_bytes])
        return combine_limbs([s.to(torch.int64) for s in acc.sums], acc.limb_bits)

    def bytes_streamed():  # the same pieces, unpacked the same way, multiplied as byte limbs
        sums = [np.zeros((TOKENS, n_out), dtype=np.int32) for _ in shift]
        for j in range(0, n_in, piece):
            f = min(piece, n_in - j)
            values = wire.unpack_top(body[j * feature_bytes : (j + f) * feature_bytes], f * TOKENS, bits).view(f, TOKENS)
            for total, plane in zip(sums, byte_planes(values.numpy(), skip)):
                total += sess.run(None, {"A": plane, "B": w8[j : j + f]})[0]
        out = np.zeros((TOKENS, n_out), dtype=np.int64)
        for s, total in zip(shift, sums):
            out += total.astype(np.int64) << s
        return out.T

    got_f64, f64_stream = best(f64_streamed, repeats)
    got_streamed, i8_stream = best(bytes_streamed, repeats)
    ref = ref.numpy()
    return {"n_out": n_out, "n_in": n_in, "tokens": TOKENS, "body_bits": bits, "byte_limbs": len(shift),
            "float64_limbs": limb_plan(64, n_in, 128)[1], "piece_features": piece,
            "whole_float64_s": f64_whole, "whole_bytes_s": i8_whole, "whole_ratio": i8_whole / f64_whole,
            "whole_bytes_gemm_s": min(gemm_s), "gemm_ratio": min(gemm_s) / f64_whole,
            "streamed_float64_s": f64_stream, "streamed_bytes_s": i8_stream, "streamed_ratio": i8_stream / f64_stream,
            "exact": bool(np.array_equal(got_whole, ref) and np.array_equal(got_streamed, ref)
                          and np.array_equal(got_f64.numpy(), ref))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="each timing is the fastest of this many runs")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "int8_limbs.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sess, gen = matmul_integer(args.threads), torch.Generator().manual_seed(0)
    bits = PARAM_SETS["p128"].input_bits
    rows = []
    for n_out, n_in in SHAPES:
        rows.append(row(sess, n_out, n_in, bits, gen, args.repeats))
        r = rows[-1]
        print(f"{n_out:>5} x {n_in:>5} @ {TOKENS}: whole {r['whole_float64_s']:.3f} s float64 vs {r['whole_bytes_s']:.3f} s bytes "
              f"({r['whole_ratio']:.2f}x; its MatMulIntegers {r['whole_bytes_gemm_s']:.3f} s, {r['gemm_ratio']:.2f}x); streamed {r['streamed_float64_s']:.3f} vs {r['streamed_bytes_s']:.3f} s "
              f"({r['streamed_ratio']:.2f}x); exact {r['exact']}", flush=True)
    write_json(args.out, {"environment": {**environment(), "onnxruntime": ort.__version__, "threads": args.threads, "repeats": args.repeats},
                          "rows": rows})


if __name__ == "__main__":
    main()
