"""Worker throughput on Ray Serve: one replica, two replicas, and the model split by layer range.

Question: does a second worker replica (one CPU each) nearly double the encrypted output
values per second behind one endpoint (target: at least 1.7x), and what does splitting the
ops over two layer-range deployments cost?

A local Ray cluster (2 CPUs) serves a bundle of ``--model`` on the default scheme (batched
RLWE, p128) in three set-ups, one after the other: 1 replica with 1 CPU; 2 replicas with 1
CPU each; 2 deployments holding blocks [0, L/2) and [L/2, L) with 1 CPU each behind a
router. Every replica runs torch on 1 thread and one product at a time. ``--clients``
threads each open a session and send forward requests of 2048 tokens (one full RLWE
block) for the ops of the first block of each half, round robin, as fast as answers come
back; bodies are encrypted once before timing (the client's encryption is not what is
measured). Throughput counts the output values (tokens x output width) of the requests
answered in the timed window, after a warm-up pass over every op. The set-ups alternate
for ``--rounds`` rounds, so that load from other jobs on a shared machine falls on all of
them; the summary takes each set-up's median, and the JSON keeps every round and the
machine's load average.

    .venv/bin/python benchmarks/scale_out.py                                  # smollm2-135m, about 12 minutes on 2 cores
    .venv/bin/python benchmarks/scale_out.py --model tiny-llama --seconds 10  # a quick look
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common import environment, write_json

from hetune.compile.bundle import read_manifest
from hetune.compile.compiler import CompileConfig, compile_bundle
from hetune.crypto.registry import get_scheme
from hetune.crypto.keys import generate_keys
from hetune.protocols.hybrid_lora.worker.ray_serve import RayServeConfig, build_app
from hetune.protocols.hybrid_lora.owner.remote import WorkerClient
from hetune.protocols.hybrid_lora.worker.server import ServeConfig

TOKENS = 2048


@dataclass(frozen=True)
class Request:
    op: str
    cols: int  # input width
    out_cols: int
    body: bytes


def requests_for(bundle: Path) -> list[Request]:
    """Forward requests of TOKENS random 8-bit rows for every op of the first block of each half of the model."""
    manifest = read_manifest(bundle)
    blocks = max(op.layer for op in manifest.ops) + 1
    keys, rng = generate_keys("rlwe"), np.random.default_rng(0)
    bodies: dict[int, bytes] = {}
    out = []
    for op in (op for op in manifest.ops if op.layer in (0, blocks // 2)):
        if op.in_features not in bodies:
            bodies[op.in_features] = keys.encrypt(rng.integers(0, 256, (TOKENS, op.in_features)))
        out.append(Request(op.name, op.in_features, op.out_features, bodies[op.in_features]))
    return out


def throughput(url: str, requests: list[Request], clients: int, seconds: float) -> dict:
    """Output values per second answered to ``clients`` threads sending ``requests`` round robin."""
    params = get_scheme("rlwe").params("p128")
    done: list[tuple[float, int]] = []  # (finish time, output values)
    window: dict[str, float] = {}

    def open_window() -> None:  # once every client is warm, before any is released
        window["end"] = time.perf_counter() + seconds

    lock, ready = threading.Lock(), threading.Barrier(clients, action=open_window)

    def client(offset: int) -> None:
        worker = WorkerClient(url)
        worker.open(params, b"")
        for r in requests if offset == 0 else ():  # warm-up: every op once
            worker.run(r.op, "forward", r.body, TOKENS, r.cols)
        ready.wait()
        i = offset
        while time.perf_counter() < window["end"]:
            r = requests[i % len(requests)]
            worker.run(r.op, "forward", r.body, TOKENS, r.cols)
            with lock:
                done.append((time.perf_counter(), TOKENS * r.out_cols))
            i += 1
        worker.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    answered = [values for finished, values in done if finished <= window["end"]]
    return {"requests": len(answered), "seconds": seconds, "values_per_s": sum(answered) / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--clients", type=int, default=4, help="concurrent data-owner sessions")
    parser.add_argument("--seconds", type=float, default=40.0, help="timed window per set-up and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "scale_out.json")
    args = parser.parse_args()

    import ray
    from ray import serve

    work = Path(tempfile.mkdtemp(prefix="scale_out-"))
    bundle = work / "bundle"
    compiled = compile_bundle(args.model, bundle, CompileConfig(calibration_tokens=64), progress=False)
    blocks = max(op.layer for op in compiled.manifest.ops) + 1
    requests = requests_for(bundle)
    key_file = work / "session.key"
    key_file.write_text("b" * 43)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    setups = {
        "1 replica": RayServeConfig(replicas=1),
        "2 replicas": RayServeConfig(replicas=2),
        "layer split (2 x 1 replica)": RayServeConfig(layer_ranges=((0, blocks // 2), (blocks // 2, blocks))),
    }
    rows = []
    for round_ in range(args.rounds):
        for name, rc in setups.items():
            rc = RayServeConfig(**{**rc.__dict__, "session_key_file": key_file})
            serve.run(build_app(bundle, ServeConfig(max_rows=TOKENS), rc), name="bench", route_prefix="/")
            load_before = os.getloadavg()[0]
            row = {"round": round_, "setup": name, "replicas": rc.replicas, "layer_ranges": rc.layer_ranges,
                   "num_cpus": rc.num_cpus, **throughput(f"http://127.0.0.1:{port}", requests, args.clients, args.seconds),
                   "load_average_1min": [load_before, os.getloadavg()[0]]}
            rows.append(row)
            print(f"round {round_} {name:<28} {row['values_per_s'] / 1e6:7.2f} M output values/s "
                  f"({row['requests']} requests, load average {load_before:.1f})", flush=True)
            serve.delete("bench")
    serve.shutdown()
    ray.shutdown()
    one, two, split = (statistics.median(r["values_per_s"] for r in rows if r["setup"] == name) for name in setups)
    summary = {"target": "2 replicas >= 1.7x the throughput of 1", "median_values_per_s": dict(zip(setups, (one, two, split))),
               "speedup_2_replicas": two / one, "speedup_layer_split": split / one, "met": two / one >= 1.7}
    write_json(args.out, {"benchmark": "scale_out", "environment": {**environment(), "ray": ray.__version__},
                          "model": args.model, "tokens_per_request": TOKENS, "clients": args.clients,
                          "ops": [{"op": r.op, "in": r.cols, "out": r.out_cols, "request_bytes": len(r.body)} for r in requests],
                          "rows": rows, "summary": summary})
    print(summary)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
