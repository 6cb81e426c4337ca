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

The hostile row (``--hostile``): 4 owners with API keys (``--api-keys``, a rate limit
they do not reach) against a worker that two attackers hit at full speed at the same
time: one without a key (session opens and status reads: 401) and one with a key but
over its limits (session opens past its cap: 429, op requests on its session with a
wrong token: 401, a declared 1 GiB body: 413). Reported: the owners' p50/p99 next to the
same 4 owners without attackers, the attackers' answers, and the worker's peak memory.

    .venv/bin/python benchmarks/worker_load.py            # about 1.5 minutes on 2 cores
    .venv/bin/python benchmarks/worker_load.py --hostile  # the hostile row, about 1 minute
"""

from __future__ import annotations

import argparse
import collections
import os
import socket
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from common import environment, write_json
from step_time import ServedWorker, make_bundle

from hetune.crypto.keys import generate_keys
from hetune.protocols.hybrid_lora.owner.remote import WorkerAccess, WorkerClient

OP = "layers.0.qkv"  # micro-llama: 32 inputs, 96 outputs
LEVELS = (1, 2, 4, 8)


class Owner:
    """One data owner: keys, a session, one encrypted request reused for every call."""

    def __init__(self, url: str, weight: np.ndarray, tokens: int, seed: int, api_key: str | None = None):
        self.keys = generate_keys("rlwe")
        self.client = WorkerClient(url, access=WorkerAccess(api_key=api_key))
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


def attack(url: str, key: str, until: float, answers: collections.Counter) -> None:
    """Two attackers at full speed until ``until``: one without a key, one with a key but over its limits."""
    import httpx

    def keyless() -> None:
        with httpx.Client(base_url=f"{url}/v2") as http:
            while time.perf_counter() < until:
                answers[("keyless", http.post("/sessions").status_code)] += 1
                answers[("keyless", http.get("/info", headers={"authorization": "Bearer htk_guess"}).status_code)] += 1

    def declared_gib(port: int, path: str, token: str) -> int:
        """A request that declares a 1 GiB body and sends none (httpx will not): the worker must answer at once."""
        with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
            conn.sendall(f"POST {path}?rows=4096&cols=32 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                         f"Content-Length: {2**30}\r\nConnection: close\r\n\r\n".encode())
            return int(conn.recv(4096).split()[1])

    def over_limits() -> None:
        auth = {"authorization": f"Bearer {key}"}
        with httpx.Client(base_url=f"{url}/v2") as http:
            s = http.post("/sessions", headers=auth).json()  # its only session (--owner-sessions 1)
            op = f"/sessions/{s['session_id']}/ops/{OP}/forward"
            while time.perf_counter() < until:
                answers[("keyed", http.post("/sessions", headers=auth).status_code)] += 1
                answers[("keyed", http.post(op, params={"rows": 16, "cols": 32}, content=b"x",
                                            headers={"authorization": "Bearer wrong"}).status_code)] += 1
                answers[("keyed", declared_gib(int(url.rsplit(":", 1)[1]), f"/v2{op}", s["token"]))] += 1

    threads = [threading.Thread(target=keyless), threading.Thread(target=over_limits)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def hostile(bundle: Path, weight: np.ndarray, args) -> dict:
    """The owners' latency with and without the two attackers, against a worker that admits by API key."""
    from hetune.serving.admission import add_owner

    keys_file = bundle.parent / "keys.txt"
    keys = [add_owner(keys_file, f"owner{i}") for i in range(5)]  # 4 owners, then the attacker with a key
    worker = ServedWorker(bundle, "--api-keys", str(keys_file), "--owner-sessions", "1", "--owner-rpm", "1000000")
    try:
        owners = [Owner(worker.url, weight, args.tokens, seed, keys[seed]) for seed in range(4)]
        drive(owners, 3 * args.warmup)
        quiet = level(owners, args.warmup, args.seconds)
        answers: collections.Counter = collections.Counter()
        until = time.perf_counter() + args.warmup + args.seconds + 1
        attackers = threading.Thread(target=attack, args=(worker.url, keys[4], until, answers))
        attackers.start()
        loud = level(owners, args.warmup, args.seconds)
        attackers.join()
        for owner in owners:
            owner.client.close()
    finally:
        peak = worker.stop()
    for name, row in (("without attackers", quiet), ("with both attackers", loud)):
        print(f"4 owners {name}: p50 {row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms, {row['requests_per_s']:.1f} requests/s")
    print(f"attackers' answers: {dict(answers)}; worker peak {peak:.2f} GiB")
    return {"quiet": quiet, "hostile": loud, "attacker_answers": {f"{who} {status}": n for (who, status), n in answers.items()},
            "worker_peak_gib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=16, help="tokens per request")
    parser.add_argument("--seconds", type=float, default=10.0, help="timed seconds per level")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds per level")
    parser.add_argument("--out", type=Path, default=None, help="default: results/worker_load.json (or worker_load_hostile.json)")
    parser.add_argument("--hostile", action="store_true", help="only the hostile row (4 owners, two attackers)")
    args = parser.parse_args()
    load_before = os.getloadavg()
    if args.hostile:
        with tempfile.TemporaryDirectory() as tmp:
            from hetune.compile.bundle import load_bundle

            bundle = make_bundle("micro-llama", Path(tmp))
            result = hostile(bundle, load_bundle(bundle).tensors[f"{OP}.weight"].numpy().astype(np.int64), args)
        out = args.out or Path(__file__).parent / "results" / "worker_load_hostile.json"
        write_json(out, {"benchmark": "worker_load --hostile", "environment": environment(),
                         "config": {"model": "micro-llama", "op": OP, "tokens": args.tokens, "seconds": args.seconds,
                                    "warmup_s": args.warmup, "owners": 4, "admission": "api keys, --owner-sessions 1"},
                         "load_average_before": load_before, "load_average_after": os.getloadavg(), **result})
        print(f"wrote {out}")
        return
    args.out = args.out or Path(__file__).parent / "results" / "worker_load.json"
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
