"""Time, memory and bytes of one private LoRA step on each backend, with Concrete ML's GLWE extrapolated.

Question: what does a full encrypted training step of a real-size model cost with the
batched RLWE scheme, in process and through a worker, and where does the time go?

Workloads (LoRA r=8 on all seven linears of every block, one forward + backward):
- ``micro-llama`` (built-in, hidden 32), 3 tokens: plain, quantized, encrypted and
  remote on batched RLWE, and encrypted on Concrete ML's GLWE; all measured.
- ``smollm2-135m`` (the real SmolLM2-135M-Instruct weights, 30 blocks), 512 tokens
  (4 x 128, the ``converge`` setting): plain, quantized, encrypted and remote on
  batched RLWE, each once: what a user's step costs on each backend.
- ``llama-3.2-1b-shape`` (the real Llama-3.2-1B configuration, all 16 blocks, random
  weights: the checkpoint cannot be downloaded here), 2048 tokens: quantized, encrypted
  (worker in this process) and remote (``hetune serve`` in a child process on
  loopback), each timed once. Concrete ML's GLWE time for the same step is
  *extrapolated*: output values of the step x GLWE seconds per output value, measured
  in this run at n_in = 2048.

Both mask layouts run side by side: masks per request (``encrypted``, ``remote``) and
fixed masks with a fresh secret per product (``encrypted-hint``, ``remote-hint``: the
hints are fetched before the timed step, their seconds and bytes reported apart as
``hint_s`` and ``hint_bytes``; one hint cache per run, so the first fixed-mask row
downloads the hints and the later ones only check them on disk, ``hint_bytes`` 0).

Wall time is split into client crypto (encryption, decryption), the worker's product
(as the worker reports it), transfer (request to result, minus the worker) and the
client's clear compute (the rest: non-linearities, attention, LoRA, loss, quantization).
Peak memory is the resident-set high-water mark of the client process during the step
(``client_peak_gib``; in process: the worker too), of the client process from its start
(``client_load_peak_gib``: a built-in model is generated whole, its outsourced weights then
dropped) and of the worker process.

    .venv/bin/python benchmarks/step_time.py            # about 1 hour on 2 cores
    .venv/bin/python benchmarks/step_time.py --quick    # micro-llama only, under a minute
    .venv/bin/python benchmarks/step_time.py --smollm2  # micro-llama and SmolLM2, about 20 minutes
    .venv/bin/python benchmarks/step_time.py --overlap  # remote with and without overlap, one-block SmolLM2 shape

Overlap (``-overlap`` rows): each product pipelined (encryption ahead of the upload, the result
streamed and decrypted as it comes); the worker then reports no seconds, so ``products_s`` (the
products' wall time) and each row's ``timeline`` (per product: encrypt, send, wait and receive
or transport, decrypt spans in seconds from the step's start) say what overlapped.

Checkpointed (``-ckpt`` rows, after any ``-overlap``): the owner's decoder layers under activation
checkpointing with the worker's answers replayed (``build_private_model(checkpoint=True)``): its
peak memory against a recomputation of its clear ops in backward, the same products.

    .venv/bin/python benchmarks/step_time.py --skip-micro --backends remote,remote-hint-overlap-ckpt,quantized
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import environment, write_json

from hetune.crypto.registry import get_scheme
from hetune.crypto.keys import fixed_mask_keys, generate_keys
from hetune.protocols.hybrid_lora.owner.client import build_private_model

HETUNE = str(Path(sys.executable).with_name("hetune"))


def gib(kib: int) -> float:
    return kib / 2**20


def make_bundle(model_id: str, root: Path) -> Path:
    """``hetune compile`` in a child process: this process stays small while the steps are measured."""
    out = root / Path(model_id).name
    subprocess.run([HETUNE, "compile", model_id, "--out", str(out), "--calibration-tokens", "32"], check=True,
                   stdout=subprocess.DEVNULL)
    return out


def vm_hwm_kib(pid: int | str = "self") -> int:
    """Linux's resident high-water mark of a process (VmHWM), in KiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM")))


def one_step(pm, ids: torch.Tensor) -> tuple[float, float]:
    """(seconds, its start on perf_counter)."""
    t0 = time.perf_counter()
    pm.model.zero_grad(set_to_none=True)
    pm.loss(ids).backward()
    return time.perf_counter() - t0, t0


def relative_timeline(timeline: list[dict], t0: float) -> list[dict]:
    """Each product's spans in seconds from the step's start (the backend records perf_counter times)."""
    def rel(v):
        if isinstance(v, list):
            return [None if x is None else round(x - t0, 6) for x in v]
        return round(v - t0, 6) if isinstance(v, float) else v

    return [{k: rel(v) if k in ("encrypt", "send", "wait", "transport", "receive", "decrypt", "start", "end") else v
             for k, v in span.items()} for span in timeline]


def measure(model_id: str, backend: str, ids: torch.Tensor, **kwargs) -> dict:
    """One step in a fresh child process, so its memory high-water mark is this step's alone."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_measure, model_id, backend, ids, kwargs).result()


def _measure(model_id: str, backend: str, ids: torch.Tensor, kwargs: dict) -> dict:
    hint_cache = kwargs.pop("hint_cache", None)
    if hint_cache:  # fixed masks, a fresh secret per product
        kwargs["keys"] = fixed_mask_keys("p128", Path(hint_cache))
    overlap, ckpt = kwargs.get("overlap", False), kwargs.get("checkpoint", False)
    pm = build_private_model(model_id, backend, **kwargs)
    if not pm.backend.encrypted and ids.numel() < 100:
        one_step(pm, ids)  # warm-up where a step is cheap
    once = {}
    if hint_cache:  # the hints are fetched once per session: timed and sized apart from the step
        t0 = time.perf_counter()
        pm.backend.prefetch_hints(ids.numel())
        once = {"hint_s": time.perf_counter() - t0, "hint_bytes": pm.backend.stats.hint_bytes}
    pm.backend.stats.timeline = []
    load_peak = vm_hwm_kib()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM: the step's own high-water mark from here
    before = pm.backend.stats.snapshot()
    step_s, t0 = one_step(pm, ids)
    after = pm.backend.stats.snapshot()
    st = {k: v[len(before[k]):] if isinstance(v, list) else v - before[k] for k, v in after.items()}
    pm.close()
    row = {"backend": backend + (" (fixed masks)" if hint_cache else "") + (" overlapped" if overlap else "")
           + (" checkpointed" if ckpt else ""),
           "masks": "fixed" if hint_cache else "per request", "overlap": overlap, "checkpoint": ckpt,
           **once, "tokens": ids.numel(), "step_s": step_s, "values_out": st["values_out"],
           "round_trips": st["round_trips"], "client_peak_gib": gib(vm_hwm_kib()),
           "client_load_peak_gib": gib(load_peak)}
    if pm.backend.encrypted:
        crypto = st["encrypt_s"] + st["decrypt_s"]
        # With overlap the worker's seconds come in its streamed result's trailer, and crypto runs during the wire and
        # the worker (transfer_s is then what neither hid): products_s (their wall time) and the timeline tell what overlapped.
        row.update(scheme=pm.backend.keys.params.scheme, encrypt_s=st["encrypt_s"], decrypt_s=st["decrypt_s"],
                   worker_s=st["worker_s"], transfer_s=st["transport_s"] - st["worker_s"], products_s=st["round_trip_s"],
                   client_clear_s=step_s - st["round_trip_s"], client_crypto_s=crypto,
                   bytes_sent=st["bytes_sent"], bytes_received=st["bytes_received"],
                   bytes_per_token=(st["bytes_sent"] + st["bytes_received"]) / ids.numel(),
                   timeline=relative_timeline(st["timeline"], t0))
    print(f"  {model_id:<20} {row['backend']:<32} {row.get('scheme', ''):<5} {step_s:9.2f} s  "
          + (f"crypto {row['client_crypto_s']:.1f} s, products {row['products_s']:.1f} s, worker {row['worker_s']:.1f} s, "
             f"clear {row['client_clear_s']:.1f} s" if "scheme" in row else ""), flush=True)
    return row


class ServedWorker:
    """``hetune serve`` in a child process on a free loopback port."""

    def __init__(self, bundle: Path, *options: str):
        """``options``: more `hetune serve` options (e.g. --api-keys FILE)."""
        import httpx

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.proc = subprocess.Popen([HETUNE, "serve", str(bundle), "--port", str(self.port), *options], stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 300
        while True:
            try:
                httpx.get(f"{self.url}/v2/live", timeout=1)
                return
            except httpx.TransportError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the worker did not start")
                time.sleep(0.5)

    def stop(self) -> float:
        """Stop it; returns its peak resident memory in GiB (Linux's VmHWM)."""
        peak_kib = vm_hwm_kib(self.proc.pid)
        self.proc.terminate()
        self.proc.wait(timeout=60)
        return gib(peak_kib)


def glwe_seconds_per_value(n_in: int = 2048, values: int = 256) -> float:
    scheme = get_scheme("glwe")
    keys = generate_keys("glwe")
    session = scheme.open_session(keys.params, keys.session_key())
    body = keys.encrypt(np.random.default_rng(0).integers(0, 256, (1, n_in)))
    w = torch.randint(-127, 128, (values, n_in))
    t0 = time.perf_counter()
    scheme.multiply(keys.params, session, body, w)
    return (time.perf_counter() - t0) / values


def workload(model_id: str, ids: torch.Tensor, bundle: Path, backends: list[str], glwe_spv: float, save) -> dict:
    """Measure each backend in turn; ``save(partial)`` after each, so a long run keeps what it measured."""
    with tempfile.TemporaryDirectory(prefix="hetune-hints-") as hints:  # one cache for the run, as a user keeps one:
        return _workload(model_id, ids, bundle, backends, glwe_spv, save, hints)  # fetched by the first row, 6 GB at 1B


def _workload(model_id: str, ids: torch.Tensor, bundle: Path, backends: list[str], glwe_spv: float, save, hints: str) -> dict:
    rows = []
    result = {"workload": model_id, "tokens": ids.numel(), "rows": rows}
    for backend in backends:
        ckpt = {"checkpoint": True} if backend.endswith("-ckpt") else {}
        backend = backend.removesuffix("-ckpt")
        opts = {"overlap": True, **ckpt} if backend.endswith("-overlap") else ckpt  # options of the step
        backend = backend.removesuffix("-overlap")
        hint = {"hint_cache": hints} if backend.endswith("-hint") else {}
        if backend.startswith("remote"):
            worker = ServedWorker(bundle)
            try:
                row = measure(model_id, "remote", ids, workers=(worker.url,), **hint, **opts)
            finally:
                peak = worker.stop()
            rows.append({**row, "worker_peak_gib": peak})
        elif backend == "encrypted-hint":
            rows.append(measure(model_id, "encrypted", ids, bundle=bundle, **hint, **opts))
        elif backend in ("encrypted", "quantized") and opts:
            rows.append(measure(model_id, backend, ids, bundle=bundle, **opts))
        elif backend == "encrypted-glwe":
            rows.append(measure(model_id, "encrypted", ids, bundle=bundle, scheme="glwe"))
        elif backend in ("plain",):
            rows.append(measure(model_id, backend, ids))
        else:
            rows.append(measure(model_id, backend, ids, bundle=bundle))
        save(result)
    values = rows[0]["values_out"]  # the same on every backend but plain
    glwe = {"backend": "encrypted (Concrete ML GLWE, extrapolated)", "tokens": ids.numel(), "values_out": values,
            "step_s": values * glwe_spv, "extrapolated": True}
    rows.append(glwe)
    for r in rows:
        if r.get("scheme") == "rlwe":
            r["speedup_vs_glwe_extrapolated"] = glwe["step_s"] / r["step_s"]
    save(result)
    return result


ONE_B_BACKENDS = ["encrypted", "encrypted-hint", "remote", "remote-hint", "remote-hint-overlap", "quantized"]

OVERLAP_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=1, num_attention_heads=9,
                     num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=8192,
                     rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)  # SmolLM2-135M's, one block


def one_block_smollm2(root: Path) -> Path:
    """A directory model of SmolLM2-135M's shape with one decoder block and random weights (the byte tokenizer)."""
    import transformers

    from hetune.models.builtin import byte_tokenizer

    out = root / "smollm2-1block-shape"
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**OVERLAP_SHAPE)).save_pretrained(out)
    byte_tokenizer().save_pretrained(out)
    return out


def overlap_comparison(args) -> None:
    """Remote on loopback, steps with and without overlap alternated in one owner process against one worker,
    for each mask layout: the same model, data, keys and worker, so the ratios compare like with like. No warm-up
    step: the first step of round 1 is the overlapped one, so first-use costs count against overlap."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    rows, result = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        model = one_block_smollm2(Path(tmp) / "models")
        bundle = make_bundle(str(model), Path(tmp))
        ids = torch.randint(0, 256, (4, 128), generator=torch.Generator().manual_seed(0))
        worker = ServedWorker(bundle)
        try:
            for hint_cache in [tempfile.mkdtemp(prefix="hetune-hints-", dir=tmp) if m == "fixed" else None for m in args.masks]:
                with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                    rows += pool.submit(_alternate, str(model), ids, worker.url, hint_cache, args.rounds).result()
                result = {"benchmark": "step_time --overlap", "environment": environment(), "workload": "smollm2-1block-shape",
                          "tokens": ids.numel(), "rows": rows, "ratios": ratios(rows)}
                write_json(args.out, result)
        finally:
            result["worker_peak_gib"] = worker.stop()
            write_json(args.out, result)
    for name, value in result["ratios"].items():
        print(f"  {name}: {value:.3f}")
    print(f"wrote {args.out}")


def _alternate(model_id: str, ids: torch.Tensor, url: str, hint_cache: str | None, rounds: int) -> list[dict]:
    keys = fixed_mask_keys("p128", Path(hint_cache)) if hint_cache else None
    pm = build_private_model(model_id, "remote", workers=(url,), keys=keys)
    if hint_cache:
        pm.backend.prefetch_hints(ids.numel())
    rows = []
    pm.backend.stats.timeline = []
    for r in range(rounds):
        for overlap in (True, False) if r % 2 == 0 else (False, True):  # round 1's first step (overlapped) pays first-use costs
            pm.backend.overlap = overlap
            before = pm.backend.stats.snapshot()
            step_s, t0 = one_step(pm, ids)
            after = pm.backend.stats.snapshot()
            st = {k: v[len(before[k]):] if isinstance(v, list) else v - before[k] for k, v in after.items()}
            rows.append({"masks": "fixed" if hint_cache else "per request", "overlap": overlap, "round": r + 1,
                         "step_s": step_s, "products_s": st["round_trip_s"], "encrypt_s": st["encrypt_s"],
                         "decrypt_s": st["decrypt_s"], "worker_s": st["worker_s"], "bytes_sent": st["bytes_sent"], "bytes_received": st["bytes_received"],
                         "client_clear_s": step_s - st["round_trip_s"], "timeline": relative_timeline(st["timeline"], t0)})
            print(f"  {rows[-1]['masks']:<12} overlap={overlap!s:<5} round {r + 1}: step {step_s:.2f} s, "
                  f"products {st['round_trip_s']:.2f} s, crypto {st['encrypt_s'] + st['decrypt_s']:.2f} s, "
                  f"worker {st['worker_s']:.2f} s", flush=True)
    pm.close()
    return rows


def ratios(rows: list[dict]) -> dict:
    """Per mask layout: the summed step and product wall times with overlap over those without (same rounds)."""
    out = {}
    for masks in ("per request", "fixed"):
        for what in ("step_s", "products_s"):
            plain = sum(r[what] for r in rows if r["masks"] == masks and not r["overlap"])
            piped = sum(r[what] for r in rows if r["masks"] == masks and r["overlap"])
            if plain:
                out[f"{masks} masks: {what} overlapped / not"] = piped / plain
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="micro-llama only")
    parser.add_argument("--smollm2", action="store_true", help="micro-llama and SmolLM2-135M, not the 1B shape")
    parser.add_argument("--overlap", action="store_true",
                        help="only remote with and without overlap on a one-block SmolLM2 shape, 512 tokens")
    parser.add_argument("--rounds", type=int, default=2, help="--overlap: rounds of one step with and one without overlap")
    parser.add_argument("--masks", type=lambda v: v.split(","), default=["per-request", "fixed"],
                        help="--overlap: mask layouts, comma-separated (per-request, fixed)")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens of the 1B-shape step")
    parser.add_argument("--backends", type=lambda v: v.split(","), default=ONE_B_BACKENDS,
                        help=f"the 1B-shape step's rows, comma-separated (default {','.join(ONE_B_BACKENDS)})")
    parser.add_argument("--skip-micro", action="store_true", help="not the micro-llama rows")
    parser.add_argument("--out", type=Path, default=None, help="default: results/step_time.json (--overlap: step_time_overlap.json)")
    args = parser.parse_args()
    args.out = args.out or Path(__file__).parent / "results" / ("step_time_overlap.json" if args.overlap else "step_time.json")
    if args.overlap:
        overlap_comparison(args)
        return
    spv = glwe_seconds_per_value()
    print(f"Concrete ML GLWE: {spv * 1e3:.2f} ms per output value at n_in = 2048", flush=True)
    done: list[dict] = []

    def save(partial: dict) -> None:
        write_json(args.out, {"benchmark": "step_time", "environment": environment(), "glwe_s_per_value": spv,
                              "workloads": [*done, partial]})

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if not args.skip_micro:
            micro = make_bundle("micro-llama", root)
            done.append(workload("micro-llama", torch.tensor([[72, 101, 108]]), micro,
                                 ["quantized", "plain", "encrypted", "encrypted-hint", "remote", "remote-hint", "remote-hint-overlap",
                                  "encrypted-glwe"], spv, save))
        if args.smollm2:
            smol = make_bundle("smollm2-135m", root)
            ids = torch.randint(0, 49152, (4, 128), generator=torch.Generator().manual_seed(0))
            done.append(workload("smollm2-135m", ids, smol, ["quantized", "plain", "encrypted", "encrypted-hint", "remote",
                                                             "remote-hint", "remote-hint-overlap"], spv, save))
        elif not args.quick:
            one_b = make_bundle("llama-3.2-1b-shape", root)
            ids = torch.randint(0, 128256, (1, args.tokens), generator=torch.Generator().manual_seed(0))
            done.append(workload("llama-3.2-1b-shape", ids, one_b, args.backends, spv, save))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
