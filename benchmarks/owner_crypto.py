"""The data owner's crypto per ciphertext: encryption and decryption of the batched RLWE scheme.

Question: what does one ciphertext (one feature x one block of N tokens) cost the data
owner to encrypt and to decrypt? One product of T = N tokens, ``--features`` inputs and
``--outputs`` outputs; best of ``--repeat`` after one warm-up; per ciphertext = time /
ciphertexts. Also the wire's packing of ``--values`` int64 values at each of ``--widths``
bits (``rlwe_wire.pack_top``/``unpack_top``), in ns per value. Run it on two checkouts
(PYTHONPATH) to compare before and after.

``--fixed-masks``: the step's layout instead (fixed masks, a fresh secret per product, the hint
computed here once): encryption alone; the unmasking term H s alone (``CallKey.prepare``, in its
thread); and a product as the owner runs it, H s started before the encryption and finished
beside it, then the decryption (per output: its wait for H s and the rest). Use the 1B step's
sizes (``--features 2048 --outputs 8192``) to see its chunks run side by side.

    .venv/bin/python benchmarks/owner_crypto.py [--features 64 --outputs 64 --repeat 5 --threads 1] [--out FILE]
    .venv/bin/python benchmarks/owner_crypto.py --fixed-masks --features 2048 --outputs 8192 --repeat 3
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import environment, write_json

from hetune.crypto import rlwe_wire
from hetune.crypto.keys import fixed_mask_keys, generate_keys
from hetune.crypto.registry import get_scheme


def best(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", type=int, default=64)
    ap.add_argument("--outputs", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--widths", type=lambda v: [int(b) for b in v.split(",")], default=[33, 40],
                    help="wire widths in bits whose packing is timed")
    ap.add_argument("--values", type=int, default=2048 * 2048, help="values packed per timing (a multiple of 256)")
    ap.add_argument("--fixed-masks", action="store_true", help="time the fixed-mask layout (the hint) instead")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.fixed_masks:
        return fixed_masks(args)
    scheme = get_scheme("rlwe")
    keys = generate_keys("rlwe", "p128")
    n = keys.params.poly_size
    x = torch.randint(-127, 128, (n, args.features))
    w = torch.randint(-127, 128, (args.outputs, args.features))
    body = keys.encrypt(x)
    result = scheme.multiply(keys.params, None, body, w)
    enc = best(lambda: keys.encrypt(x), args.repeat)
    dec = best(lambda: keys.decrypt(result, n, args.outputs), args.repeat)
    report = {
        "environment": environment(), "threads": torch.get_num_threads(), "n": n, "features": args.features,
        "outputs": args.outputs, "encrypt_us_per_ciphertext": 1e6 * enc / args.features,
        "decrypt_us_per_ciphertext": 1e6 * dec / args.outputs,
        "request_bytes": len(body), "result_bytes": len(result),
    }
    print(f"encrypt {report['encrypt_us_per_ciphertext']:.1f} us, decrypt {report['decrypt_us_per_ciphertext']:.1f} us "
          f"per ciphertext (N = {n}, {torch.get_num_threads()} threads)")
    values = torch.randint(-2**63, 2**63 - 1, (args.values,), dtype=torch.int64)
    report["wire_ns_per_value"] = {}
    for bits in args.widths:
        data = rlwe_wire.pack_top(values, bits)
        pack = best(lambda: rlwe_wire.pack_top(values, bits), args.repeat)  # noqa: B023 (called before the next width)
        unpack = best(lambda: rlwe_wire.unpack_top(data, args.values, bits), args.repeat)  # noqa: B023
        report["wire_ns_per_value"][bits] = {"pack": 1e9 * pack / args.values, "unpack": 1e9 * unpack / args.values}
        print(f"wire at {bits} bits: pack {1e9 * pack / args.values:.2f} ns, unpack {1e9 * unpack / args.values:.2f} ns per value")
    if args.out:
        write_json(args.out, report)


def fixed_masks(args) -> None:
    scheme = get_scheme("rlwe")
    n, f, o = 2048, args.features, args.outputs
    x = torch.randint(-2047, 2048, (n, f))  # 12-bit inputs, as the step's
    w = torch.randint(-255, 256, (o, f))  # within the set's weight norm at 2,048 inputs

    def fetch(op, direction, query, rows, cols, sink):  # the worker's hint, computed here
        sink.begin()
        for chunk in scheme.multiply_stream(keys.params, None, query, w):
            sink.write(chunk)

    with tempfile.TemporaryDirectory() as cache:
        keys = fixed_mask_keys("p128", Path(cache))
        keys.attach("0" * 64, fetch)
        keys.new_call("op", "forward").prepare(n, o, f)  # fetches the hint
        call = keys.new_call("op", "forward")
        result = scheme.multiply(keys.params, None, call.encrypt(x), w)
        if not np.array_equal(call.decrypt(result, n, o, f), (x.double() @ w.T.double()).long().numpy()):
            raise SystemExit("a fixed-mask product did not decrypt exactly")
        enc = best(lambda: keys.new_call("op", "forward").encrypt(x), args.repeat)

        def unmask():
            c = keys.new_call("op", "forward")
            c.prepare(n, o, f)
            c._unmask.result()  # noqa: SLF001 (H s alone, as prepare runs it)

        hs = best(unmask, args.repeat)
        rows = []
        for _ in range(args.repeat):
            c = keys.new_call("op", "forward")
            t0 = time.perf_counter()
            c.prepare(n, o, f)
            body = c.encrypt(x)
            t1 = time.perf_counter()
            r = scheme.multiply(keys.params, None, body, w)  # untimed: the worker
            t2 = time.perf_counter()
            c.decrypt(r, n, o, f)
            rows.append((t1 - t0, time.perf_counter() - t2))
    report = {
        "environment": environment(), "threads": torch.get_num_threads(), "n": n, "features": f, "outputs": o,
        "layout": "fixed masks", "encrypt_us_per_ciphertext": 1e6 * enc / f, "unmask_us_per_output": 1e6 * hs / o,
        "product_encrypt_us_per_ciphertext": 1e6 * min(r[0] for r in rows) / f,
        "product_decrypt_us_per_output": 1e6 * min(r[1] for r in rows) / o,
    }
    print(f"fixed masks, {f} features -> {o} outputs, {torch.get_num_threads()} threads: encrypt "
          f"{report['encrypt_us_per_ciphertext']:.1f} us per ciphertext, H s {report['unmask_us_per_output']:.1f} us per "
          f"output; as a product: encrypt (H s beside) {report['product_encrypt_us_per_ciphertext']:.1f} us, decrypt "
          f"{report['product_decrypt_us_per_output']:.1f} us per output")
    if args.out:
        write_json(args.out, report)


if __name__ == "__main__":
    main()
