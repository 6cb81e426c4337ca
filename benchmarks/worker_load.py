"""Requests per second and latency of one worker against the number of concurrent data owners.

Question: how many op requests does one worker answer per second on loopback, and how
does a request's latency grow, as 1, 2, 4 and 8 data owners send at once?

The worker is ``hetune serve`` on the micro-llama bundle in a child process (its own
interpreter, as in a deployment), on a free loopback port, admission open. Each owner
is a thread here with its own RLWE keys and session, sending one ``forward`` request of
``layers.0.qkv`` (32 -> 96, --tokens tokens) at a time, back to back: the request is
encrypted once per owner before timing (the first answer is decrypted and checked
exact), so the timing is HTTP plus the worker's product. Per level: a warm-up, then
--seconds of timed requests (after one warm-up of all owners at once, since the worker's
first products on fresh threads are several times slower); latency is per request, from
send to the whole answer.

    .venv/bin/python benchmarks/worker_load.py      # about 1.5 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from common import environment, write_json
from step_time import ServedWorker, make_bundle

from hetune.crypto.keys import generate_keys
from hetune.protocols.hybrid_lora.owner.remote import WorkerClient

OP = "layers.0.qkv"  # micro-llama: 32 inputs, 96 outputs
LEVELS = (1, 2, 4, 8)


class Owner:
    """One data owner: keys, a session, one encrypted request reused for every call."""

    def __init__(self, url: str, weight: np.ndarray, tokens: int, seed: int):
        self.keys = generate_keys("rlwe")
        self.client = WorkerClient(url)
        self.client.open(self.keys.params, self.keys.session_key())
        self.tokens, (self.out, self.cols) = tokens, weight.shape
        q = np.random.default_rng(seed).integers(0, 256, (tokens, self.cols))
        self.payload = self.keys.encrypt(q)
        result, _ = self.call()
        assert np.array_equal(self.keys.decrypt(result, tokens, self.out), q @ weight.T), "worker answer is not exact"

    def call(self) -> tuple[bytes, float]:
        return self.client.run(OP, "forward", self.payload, self.tokens, self.cols)

    def loop(self, until: float, latencies: list[float], worker_s: list[float]) -> None:
        while time.perf_counter() < until:
            t0 = time.perf_counter()
            _, seconds = self.call()
            latencies.append(time.perf_counter() - t0)
            worker_s.append(seconds)


def drive(owners: list[Owner], span: float) -> tuple[list[float], list[float], float]:
    """Every owner sends back to back for ``span`` seconds: latencies, worker seconds, elapsed."""
    latencies: list[float] = []
    worker_s: list[float] = []
    t0 = time.perf_counter()
    threads = [threading.Thread(target=o.loop, args=(t0 + span, latencies, worker_s)) for o in owners]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, worker_s, time.perf_counter() - t0


def level(owners: list[Owner], warmup_s: float, seconds: float) -> dict:
    drive(owners, warmup_s)
    latencies, worker_s, elapsed = drive(owners, seconds)
    ms = np.array(latencies) * 1e3
    return {"owners": len(owners), "requests": len(ms), "seconds": elapsed, "requests_per_s": len(ms) / elapsed,
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()),
            "worker_ms_mean": float(np.mean(worker_s) * 1e3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=16, help="tokens per request")
    parser.add_argument("--seconds", type=float, default=10.0, help="timed seconds per level")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds per level")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "worker_load.json")
    args = parser.parse_args()
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        from hetune.compile.bundle import load_bundle

        bundle = make_bundle("micro-llama", Path(tmp))
        weight = load_bundle(bundle).tensors[f"{OP}.weight"].numpy().astype(np.int64)  # (96, 32)
        worker = ServedWorker(bundle)
        try:
            owners = [Owner(worker.url, weight, args.tokens, seed) for seed in range(max(LEVELS))]
            drive(owners, 3 * args.warmup)  # the worker's first products, on fresh threads, are several times slower
            for n in LEVELS:
                row = level(owners[:n], args.warmup, args.seconds)
                rows.append(row)
                print(f"{n} owners: {row['requests_per_s']:.1f} requests/s, p50 {row['p50_ms']:.1f} ms, "
                      f"p99 {row['p99_ms']:.1f} ms (worker {row['worker_ms_mean']:.1f} ms per product)", flush=True)
            for owner in owners:
                owner.client.close()
        finally:
            worker_peak_gib = worker.stop()
    write_json(args.out, {
        "benchmark": "worker_load", "environment": environment(),
        "config": {"model": "micro-llama", "op": OP, "direction": "forward", "tokens": args.tokens, "scheme": "rlwe/p128",
                   "seconds": args.seconds, "warmup_s": args.warmup, "transport": "http on loopback, worker in a child process"},
        "load_average_before": load_before, "load_average_after": os.getloadavg(), "worker_peak_gib": worker_peak_gib,
        "rows": rows,
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
