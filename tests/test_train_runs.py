"""A run's directory as the user handles it: no mixed runs, checked resumes, Ctrl-C, retention, TensorBoard."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hetune.protocols.hybrid_lora.owner.train import latest_checkpoint, read_metrics

HETUNE = str(Path(sys.executable).with_name("hetune"))


def _args(out, data, bundle, *extra, backend="quantized"):
    where = ("--bundle", bundle) if backend == "quantized" else ()
    return ("train", "--model", "micro-llama", "--data", data, "--out", out, "--backend", backend, *where,
            "--seq-len", "16", "--batch-size", "2", "--warmup-steps", "1", "--lr", "5e-3", *extra)


def _adapter(out):
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def test_existing_run_is_refused_then_overwritten(run_cli, tmp_path, train_jsonl, micro_bundle):
    out = tmp_path / "run"
    assert run_cli(*_args(out, train_jsonl, micro_bundle, "--steps", "3", "--save-every", "1"))[0] == 0
    code, _, err = run_cli(*_args(out, train_jsonl, micro_bundle, "--steps", "2"))
    assert code == 2 and "already holds a run (metrics.jsonl, checkpoints, adapter)" in err and "--overwrite" in err
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]  # untouched
    code, _, err = run_cli(*_args(out, train_jsonl, micro_bundle, "--steps", "1", "--overwrite"))
    assert code == 0, err
    assert [r["step"] for r in read_metrics(out)] == [1]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-1"]  # old step-2, step-3 gone


def test_resume_checks_settings_and_total_steps(run_cli, tmp_path, train_jsonl, micro_bundle):
    out = tmp_path / "run"
    assert run_cli(*_args(out, train_jsonl, micro_bundle, "--steps", "3"))[0] == 0
    code, _, err = run_cli(*_args(out, train_jsonl, micro_bundle, "--steps", "6", "--resume", "--seq-len", "32"))
    assert code == 2 and "was trained with seq_len=16, not 32" in err and "--seq-len" in err
    code, _, err = run_cli(*_args(out, train_jsonl, micro_bundle, "--steps", "6", "--resume", "--seed", "1"))
    assert code == 2 and "seed=0, not 1" in err
    before = _adapter(out)
    code, _, err = run_cli(*_args(out, train_jsonl, micro_bundle, "--steps", "2", "--resume"))
    assert code == 2 and "is at step 3 (step-3); --steps 2 is the total" in err and "Traceback" not in err
    after = _adapter(out)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the adapter was not rewritten
    code, _, err = run_cli(*_args(out, train_jsonl, micro_bundle, "--steps", "6", "--stop-after", "2", "--resume"))
    assert code == 2 and "already at step 3; --stop-after 2 is a step" in err
    code, _, err = run_cli(*_args(out, train_jsonl, micro_bundle, "--steps", "5", "--resume"))
    assert code == 0, err
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4, 5]


def test_resume_with_another_bundle_is_refused(run_cli, tmp_path, train_jsonl, micro_bundle):
    from hetune.compile.compiler import CompileConfig, compile_bundle
    from hetune.quant.config import QuantConfig

    other = tmp_path / "w6"
    compile_bundle("micro-llama", other, CompileConfig(calibration_tokens=16, quant=QuantConfig(bits_w=6)), progress=False)
    out = tmp_path / "run"
    assert run_cli(*_args(out, train_jsonl, micro_bundle, "--steps", "2"))[0] == 0
    code, _, err = run_cli(*_args(out, train_jsonl, other, "--steps", "4", "--resume"))
    assert code == 2 and "a bundle with other weights" in err


def test_save_total_limit_and_confined_latest(run_cli, tmp_path, train_jsonl, micro_bundle):
    out = tmp_path / "run"
    assert run_cli(*_args(out, train_jsonl, micro_bundle, "--steps", "5", "--save-every", "1", "--save-total-limit", "2"))[0] == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-4", "step-5"]
    (out / "checkpoints" / "latest").write_text("../../../etc")
    code, _, err = run_cli(*_args(out, train_jsonl, micro_bundle, "--steps", "6", "--resume"))
    assert code == 9 and "not a step-N checkpoint directory beside it" in err


def test_tensorboard_events_and_warmup_warning(run_cli, tmp_path, train_jsonl, micro_bundle):
    out = tmp_path / "run"
    code, _, err = run_cli(*_args(out, train_jsonl, micro_bundle, "--steps", "2", "--warmup-steps", "5", "--report-to", "tensorboard",
                                  "--eval-every", "1"))
    assert code == 0, err
    assert "warning: --warmup-steps 5 >= --steps 2" in err
    from tensorboard_reader import scalars

    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    got = scalars(events[0])
    assert [s for s, _ in got["train/loss"]] == [1, 2] and [s for s, _ in got["eval/loss"]] == [1, 2]
    assert [v for _, v in got["train/loss"]] == pytest.approx([r["loss"] for r in read_metrics(out)])


@pytest.mark.parametrize("backend", ["quantized", "remote"])
def test_sigint_mid_run_checkpoints_and_resumes_bit_for_bit(run_cli, tmp_path, train_jsonl, micro_bundle, loopback_worker, backend):
    """Ctrl-C in a running `hetune train` (a subprocess; remote: against a loopback worker): the step in flight
    finishes, a checkpoint is written, the exit code is 130 with how to resume; resuming ends on the uninterrupted
    (quantized) run's adapter, bit for bit."""
    steps = "12"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH")]))}
    out = tmp_path / "stopped"
    where = ("--worker", loopback_worker().url) if backend == "remote" else ()
    stopped_args = _args(out, train_jsonl, micro_bundle, "--steps", steps, "--eval-every", "1000", *where, backend=backend)
    proc = subprocess.Popen([HETUNE, *map(str, stopped_args)],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while len(read_metrics(out)) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() is not None else "slow"
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    stopped = latest_checkpoint(out)
    done = int(stopped.name.removeprefix("step-"))
    assert 2 <= done < int(steps), err
    assert f"SIGINT: stopped after step {done} of {steps}; checkpoint" in err and "Traceback" not in err
    assert "--resume" in err.splitlines()[-1]
    assert run_cli(*stopped_args, "--resume")[0] == 0
    straight = tmp_path / "straight"
    assert run_cli(*_args(straight, train_jsonl, micro_bundle, "--steps", steps, "--eval-every", "1000"))[0] == 0
    a, b = _adapter(straight), _adapter(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in read_metrics(straight)] == [r["loss"] for r in read_metrics(out)]


def test_second_signal_abandons_the_step_and_checkpoints_the_one_before(tmp_path, train_jsonl, micro_bundle, monkeypatch):
    """SIGTERM, then SIGINT during step 3: step 3 is dropped, step 2 checkpointed, exit code 143 (the first signal's);
    the resumed run equals an uninterrupted one bit for bit."""
    from hetune.data import text
    from hetune.protocols.hybrid_lora.owner.train import TrainConfig, TrainingInterrupted, train

    def cfg(out):
        return TrainConfig(model="micro-llama", data=(str(train_jsonl),), out=out, backend="quantized", bundle=micro_bundle,
                           seq_len=16, batch_size=2, steps=5, warmup_steps=1, save_every=10, eval_every=10, progress=False)

    calls = {"n": 0}
    original = text.BlockSampler.next

    def signals_in_step_3(self):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)
        return original(self)

    monkeypatch.setattr(text.BlockSampler, "next", signals_in_step_3)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted) as info:
        train(cfg(tmp_path / "b"), echo=lambda m: None)
    monkeypatch.setattr(text.BlockSampler, "next", original)
    assert info.value.exit_code == 143 and "SIGTERM: step 3 abandoned; stopped after step 2 of 5" in info.value.message
    assert latest_checkpoint(tmp_path / "b").name == "step-2" and [r["step"] for r in read_metrics(tmp_path / "b")] == [1, 2]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # restored
    train(cfg(tmp_path / "b"), resume=True)
    train(cfg(tmp_path / "a"))
    a, b = _adapter(tmp_path / "a"), _adapter(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
