"""Worker time and bytes per value of one encrypted product, batched RLWE beside Concrete ML's GLWE.

Question: how much cheaper is the batched RLWE scheme's product than Concrete ML's GLWE
matmul, per output value, at the shapes of real training steps?

Both schemes run through the same interface (hetune.crypto.scheme), in one run, on
random 8-bit weights and activations: in/out widths from {576, 2048, 8192} (SmolLM2's
hidden size, Llama-3.2-1B's hidden and MLP sizes), T from {1, 64, 512, 2048} tokens.
RLWE is measured at every shape (client encryption, worker product, client decryption,
bytes) and checked exact against the integer product, in both mask layouts side by side:
masks per request (`rlwe`) and fixed masks with a fresh secret per product (`rlwe-hint`:
per step only the body result comes back; the hint, W A per block, is fetched once and
reported apart, bytes and worker seconds). GLWE costs about 6-7 ms per
output value, so it is measured on one token and a few hundred output values per input
width, and its time at the other shapes is *extrapolated* as seconds per value x values
(its cost follows output values, not tokens); its request bytes come from its exact
size formula, its result bytes per value from the measured result.

    .venv/bin/python benchmarks/scheme_matmul.py            # about 10 minutes on 2 cores
    .venv/bin/python benchmarks/scheme_matmul.py --quick    # widths {576, 2048}, T {64, 2048}
    .venv/bin/python benchmarks/scheme_matmul.py --quick --schemes rlwe,rlwe-hint   # no GLWE (seconds)
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from common import environment, timed, write_json

from hetune.crypto.registry import get_scheme
from hetune.crypto.keys import fixed_mask_keys, generate_keys

WIDTHS = (576, 2048, 8192)
TOKENS = (1, 64, 512, 2048)
GLWE_VALUES = 256  # output values measured per input width


def rlwe_row(keys, t: int, n_in: int, n_out: int, gen: torch.Generator) -> dict:
    scheme = get_scheme("rlwe")
    x = torch.randint(0, 256, (t, n_in), generator=gen)
    w = torch.randint(-127, 128, (n_out, n_in), generator=gen)
    body, enc_s = timed(lambda: keys.encrypt(x))
    result, worker_s = timed(lambda: scheme.multiply(keys.params, None, body, w))
    raw, dec_s = timed(lambda: keys.decrypt(result, t, n_out))
    exact = np.array_equal(raw, (x.double() @ w.T.double()).long().numpy())
    values = t * n_out
    return {"scheme": "rlwe", "tokens": t, "n_in": n_in, "n_out": n_out, "measured": True, "exact": exact,
            "worker_s": worker_s, "worker_us_per_value": worker_s / values * 1e6,
            "encrypt_us_per_input_value": enc_s / (t * n_in) * 1e6, "decrypt_us_per_value": dec_s / values * 1e6,
            "bytes_per_input_value": len(body) / (t * n_in), "bytes_per_output_value": len(result) / values}


def rlwe_hint_row(t: int, n_in: int, n_out: int, gen: torch.Generator, cache: Path) -> dict:
    """Fixed masks: the hint fetched once (timed and sized apart), then one product call."""
    scheme = get_scheme("rlwe")
    x = torch.randint(0, 256, (t, n_in), generator=gen)
    w = torch.randint(-127, 128, (n_out, n_in), generator=gen)
    keys = fixed_mask_keys("p128", cache / f"{t}-{n_in}-{n_out}")
    once = {"bytes": 0, "worker_s": 0.0}

    def fetch(op, direction, query, rows, cols):
        hint, seconds = timed(lambda: scheme.multiply(keys.params, None, query, w))
        once["bytes"] += len(hint)
        once["worker_s"] += seconds
        return hint

    keys.attach("benchmark", fetch)
    for k in range(-(-t // keys.params.poly_size)):  # the hints first: a session fetches them once
        keys.cache.values("op", "forward", k, n_in, n_out)
    call = keys.new_call("op", "forward")
    body, enc_s = timed(lambda: call.encrypt(x))
    result, worker_s = timed(lambda: scheme.multiply(keys.params, None, body, w))
    raw, dec_s = timed(lambda: call.decrypt(result, t, n_out, n_in))
    values = t * n_out
    return {"scheme": "rlwe-hint", "tokens": t, "n_in": n_in, "n_out": n_out, "measured": True,
            "exact": np.array_equal(raw, (x.double() @ w.T.double()).long().numpy()),
            "worker_s": worker_s, "worker_us_per_value": worker_s / values * 1e6,
            "encrypt_us_per_input_value": enc_s / (t * n_in) * 1e6, "decrypt_us_per_value": dec_s / values * 1e6,
            "bytes_per_input_value": len(body) / (t * n_in), "bytes_per_output_value": len(result) / values,
            "once_bytes": once["bytes"], "once_worker_s": once["worker_s"]}


def glwe_per_value(keys, n_in: int, gen: torch.Generator) -> dict:
    """GLWE measured on one token x GLWE_VALUES outputs at this input width."""
    scheme = get_scheme("glwe")
    session = scheme.open_session(keys.params, keys.session_key())
    x = torch.randint(0, 256, (1, n_in), generator=gen)
    w = torch.randint(-127, 128, (GLWE_VALUES, n_in), generator=gen)
    body = keys.encrypt(x)
    result, worker_s = timed(lambda: scheme.multiply(keys.params, session, body, w))
    err = np.abs(keys.decrypt(result, 1, GLWE_VALUES) - (x.double() @ w.T.double()).long().numpy()).max()
    return {"n_in": n_in, "values": GLWE_VALUES, "worker_s": worker_s, "s_per_value": worker_s / GLWE_VALUES,
            "result_bytes_per_value": len(result) / GLWE_VALUES, "max_abs_error": int(err)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="widths {576, 2048}, T {64, 2048}")
    parser.add_argument("--schemes", default="rlwe,rlwe-hint,glwe", help="comma-separated: rlwe, rlwe-hint, glwe")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "scheme_matmul.json")
    args = parser.parse_args()
    widths, tokens = ((576, 2048), (64, 2048)) if args.quick else (WIDTHS, TOKENS)
    schemes = set(args.schemes.split(","))
    gen = torch.Generator().manual_seed(0)
    rlwe_keys = generate_keys("rlwe")
    glwe_keys = generate_keys("glwe") if "glwe" in schemes else None
    rows, glwe = [], {}
    cache = Path(tempfile.mkdtemp(prefix="hetune-hints-"))
    for n_in in widths:
        if "glwe" in schemes:
            g = glwe[n_in] = glwe_per_value(glwe_keys, n_in, gen)  # right before the RLWE rows it is compared with
            print(f"glwe n_in={n_in:>5}: {g['s_per_value'] * 1e3:.2f} ms per output value (measured on {g['values']})", flush=True)
        for n_out in widths:
            for t in tokens:
                if "rlwe-hint" in schemes:
                    h = rlwe_hint_row(t, n_in, n_out, gen, cache)
                    rows.append(h)
                    print(f"T={t:>4} {n_in:>5}->{n_out:<5} rlwe-hint {h['worker_us_per_value']:8.3f} us/value "
                          f"(exact={h['exact']}), {h['bytes_per_input_value']:.2f} B/input, {h['bytes_per_output_value']:.2f} "
                          f"B/output per step, hint {h['once_bytes']:,} B once", flush=True)
                if "rlwe" not in schemes:
                    continue
                r = rlwe_row(rlwe_keys, t, n_in, n_out, gen)
                if "glwe" not in schemes:
                    rows.append(r)
                    print(f"T={t:>4} {n_in:>5}->{n_out:<5} rlwe      {r['worker_us_per_value']:8.3f} us/value "
                          f"(exact={r['exact']}), {r['bytes_per_input_value']:.2f} B/input, {r['bytes_per_output_value']:.2f} "
                          "B/output", flush=True)
                    continue
                g, glwe_scheme = glwe[n_in], get_scheme("glwe")
                glwe_row = {"scheme": "glwe", "tokens": t, "n_in": n_in, "n_out": n_out, "measured": False,
                            "worker_s": g["s_per_value"] * t * n_out, "worker_us_per_value": g["s_per_value"] * 1e6,
                            "bytes_per_input_value": glwe_scheme.request_bytes(glwe_keys.params, t, n_in) / (t * n_in),
                            "bytes_per_output_value": g["result_bytes_per_value"]}
                r["speedup_vs_glwe"] = glwe_row["worker_us_per_value"] / r["worker_us_per_value"]
                rows += [r, glwe_row]
                print(f"T={t:>4} {n_in:>5}->{n_out:<5} rlwe {r['worker_us_per_value']:8.3f} us/value "
                      f"(exact={r['exact']}), glwe {glwe_row['worker_us_per_value']:8.0f} us/value: x{r['speedup_vs_glwe']:,.0f}", flush=True)
    target = [r for r in rows if r["scheme"] == "rlwe" and r["tokens"] == 2048 and r["n_in"] == 2048 and "speedup_vs_glwe" in r]
    summary = {"target": "at T = 2048, n_in = 2048 the batched worker is >= 5,000x faster per output value",
               "speedups_at_target_shape": {r["n_out"]: r["speedup_vs_glwe"] for r in target},
               "met": all(r["speedup_vs_glwe"] >= 5000 for r in target) if target else None,
               "all_exact": all(r.get("exact", True) for r in rows)}
    shutil.rmtree(cache, ignore_errors=True)
    write_json(args.out, {"benchmark": "scheme_matmul", "environment": environment(), "glwe_measured": list(glwe.values()),
                          "rows": rows, "summary": summary})
    print(summary)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
