"""The data owner's heap: trim after every product, after 1 GiB of growth (the default), or never.

Question: what does giving freed heap pages back to the OS cost the step, and what does it
save in peak memory? A trim returns the pages of freed blocks; the next product's
transients then fault them back in. One encrypted step of the real SmolLM2-135M at 2,048
tokens (4 x 512), worker in process, masks per request, each variant in a fresh child
process (its own high-water mark), in the order given. Reported per variant: step
seconds, client crypto, worker, clear compute, the step's page faults (minor), system
CPU seconds, trims, and the step's resident high-water mark.

    .venv/bin/python benchmarks/owner_heap.py    # about 10 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_json  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "owner_heap.json"
VARIANTS = {"every product": 0, "1 GiB slack (default)": None, "never": -1}  # TRIM_SLACK_BYTES; None: the default


def child(name: str, slack: int | None, bundle: str, tokens: int) -> dict:
    from step_time import _measure

    from hetune.protocols.hybrid_lora.owner import layer

    trims = [0]
    if slack == -1:
        layer._TRIM = None
    else:
        if slack is not None:
            layer.TRIM_SLACK_BYTES = slack
        real = layer._TRIM

        def counted(pad):
            trims[0] += 1
            return real(pad)

        layer._TRIM = counted
    ids = torch.randint(0, 49152, (tokens // 512, 512), generator=torch.Generator().manual_seed(0))
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    row = _measure("smollm2-135m", "encrypted", ids, {"bundle": bundle})
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    row.pop("timeline", None)
    row.update(variant=name, trim_slack_bytes=layer.TRIM_SLACK_BYTES if slack != -1 else None, trims=trims[0],
               minor_faults=r1.ru_minflt - r0.ru_minflt, sys_s=r1.ru_stime - r0.ru_stime, user_s=r1.ru_utime - r0.ru_utime)
    return row


def main() -> None:
    from step_time import make_bundle

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        bundle = str(make_bundle("smollm2-135m", Path(tmp)))
        for name, slack in VARIANTS.items():
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                row = pool.submit(child, name, slack, bundle, args.tokens).result()
            rows.append(row)
            print(f"{name:<24} step {row['step_s']:6.1f} s  crypto {row['client_crypto_s']:5.1f} s  worker {row['worker_s']:5.1f} s  "
                  f"clear {row['client_clear_s']:5.1f} s  faults {row['minor_faults'] / 1e6:5.1f} M  sys {row['sys_s']:5.1f} s  "
                  f"trims {row['trims']:4d}  peak {row['client_peak_gib']:.2f} GiB", flush=True)
    write_json(args.out, {"environment": environment(), "model": "smollm2-135m", "tokens": args.tokens, "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
