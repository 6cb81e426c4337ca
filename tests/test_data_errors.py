"""Bad training data and output faults as a user meets them: one clear error, a non-zero exit,
nothing half-written, and a run that resumes to the same result."""

import json
import os
import resource
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hetune.data.text import load_texts
from hetune.protocols.hybrid_lora.owner.train import TrainConfig, latest_checkpoint, read_metrics, train

# micro-llama on the plain backend: a run of 4 steps takes about a second
SETTINGS = dict(seq_len=32, batch_size=2, steps=4, warmup_steps=1, save_every=2, eval_every=2, lr=5e-3)


@pytest.fixture(scope="module")
def data_file(stdlib_jsonl):
    return stdlib_jsonl(6_000)


def config(out: Path, data: Path) -> TrainConfig:
    return TrainConfig(model="micro-llama", data=(str(data),), out=out, backend="plain", progress=False, **SETTINGS)


def cli_args(out: Path, data: Path) -> list:
    """The same run as ``config`` on the command line."""
    return ["train", "--model", "micro-llama", "--backend", "plain", "--data", data, "--out", out,
            *[a for k, v in SETTINGS.items() for a in (f"--{k.replace('_', '-')}", v)]]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data_file):
    """An uninterrupted run: what every interrupted-then-resumed run must reproduce exactly."""
    out = tmp_path_factory.mktemp("straight")
    train(config(out, data_file))
    return out


def assert_same_run(out: Path, straight: Path) -> None:
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3, 4]
    assert [m["loss"] for m in read_metrics(out)] == [m["loss"] for m in read_metrics(straight)]  # exact
    a, b = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (out, straight))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


BAD_DATA = [  # file name, its bytes, the error (``{}`` is the file's path)
    ("empty.jsonl", b"", "data file {} is empty"),
    ("blank.txt", b"\n  \n", "data file {} is empty"),
    ("latin1.txt", b"fine\ncaf\xe9\n", "{}:2: not UTF-8 text (byte 0xe9 at offset 8)"),
    ("latin1.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "{}:2: not UTF-8 text"),
    ("broken.jsonl", b'{"text": "a"}\n\n{"text": "b"\n', "{}:3: not valid JSON"),
    ("array-line.jsonl", b'{"text": "a"}\n["a"]\n', "{}:2: expected a JSON object, got an array"),
    ("number.jsonl", b'{"text": "a"}\n{"text": 3}\n', "{}:2: field 'text' is a number, not a string"),
    ("null.json", b'[{"text": "a"}, {"text": null}]', "{}[1]: field 'text' is null, not a string"),
    ("missing.jsonl", b'{"body": "a"}\n', "{}:1: no 'text' field (fields: body)"),
    ("no-text.jsonl", b'{"text": ""}\n{"text": "  "}\n', "data file {} holds no text"),
]


@pytest.mark.parametrize("name,content,message", BAD_DATA, ids=[b[0] for b in BAD_DATA])
def test_bad_data_is_one_clear_error_and_writes_nothing(run_cli, tmp_path, data_file, name, content, message):
    bad = tmp_path / name
    bad.write_bytes(content)
    out = tmp_path / "run"
    data = [data_file, bad] if bad.suffix == data_file.suffix else [bad]  # a good file first: the bad one is named
    code, _, stderr = run_cli("train", "--model", "micro-llama", "--backend", "plain", "--out", out,
                              *[a for d in data for a in ("--data", d)])
    assert code == 2 and f"error: {message.format(bad)}" in stderr and "hint:" in stderr, stderr
    assert "Traceback" not in stderr and not out.exists()


def test_local_files_read_as_datasets_reads_them(tmp_path):
    """Reading files ourselves must not change what training sees (datasets' loaders, same rows)."""
    import datasets

    files = {"text": tmp_path / "a.txt", "json": tmp_path / "b.jsonl"}
    files["text"].write_bytes(b"one\r\ntwo\n\nthree\rfour \n")
    files["json"].write_text('{"text": "x\u2028y", "id": 1}\r\n\n{"text": "", "id": 2}\n{"text": "z", "id": 3}', encoding="utf-8")
    for builder, path in files.items():
        expected = datasets.load_dataset(builder, data_files=[str(path)], split="train", cache_dir=str(tmp_path / "cache"))
        assert load_texts([str(path)]) == list(expected["text"])
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfhello\n")
    assert load_texts([str(tmp_path / "bom.txt")]) == ["hello"]  # an editor's byte-order mark is not text


def test_unwritable_output_is_a_clear_error(run_cli, tmp_path, data_file):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, stderr = run_cli(*cli_args(blocker / "run", data_file))
    assert code == 9 and f"could not write {blocker / 'run'}: Not a directory" in stderr and "Traceback" not in stderr


@contextmanager
def file_size_limit(n_bytes: int):
    """Writes past ``n_bytes`` fail (EFBIG) as on a full disk; unlike file modes, this also stops root."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the signal kills the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_full_disk_at_checkpoint_keeps_the_previous_one(run_cli, tmp_path, data_file, straight, monkeypatch):
    from peft import PeftModel

    original, calls = PeftModel.save_pretrained, {"n": 0}

    def disk_full_at_second_save(self, path, **kw):
        calls["n"] += 1
        if calls["n"] < 2:
            return original(self, path, **kw)
        with file_size_limit(4096):  # the adapter's safetensors file is cut off mid-write
            return original(self, path, **kw)

    monkeypatch.setattr(PeftModel, "save_pretrained", disk_full_at_second_save)
    out = tmp_path / "run"
    code, _, stderr = run_cli(*cli_args(out, data_file))
    ckpts = out / "checkpoints"
    assert code == 9 and f"could not write {ckpts / 'step-4'}" in stderr and "File too large" in stderr, stderr
    assert f"the last checkpoint ({ckpts / 'step-2'}) is intact: rerun with --resume" in stderr
    assert sorted(os.listdir(ckpts)) == ["latest", "step-2"] and latest_checkpoint(out).name == "step-2"  # no partial step-4

    monkeypatch.setattr(PeftModel, "save_pretrained", original)  # space freed
    code, _, stderr = run_cli(*cli_args(out, data_file), "--resume")
    assert code == 0, stderr
    assert_same_run(out, straight)


KILL_MID_STEP_3 = """
import json, os, signal, sys
from pathlib import Path
from hetune.data import text
from hetune.protocols.hybrid_lora.owner.train import TrainConfig, train

original, calls = text.BlockSampler.next, [0]

def kill_mid_step_3(self):
    calls[0] += 1
    if calls[0] == 3:
        os.kill(os.getpid(), signal.SIGKILL)  # as `kill -9`: no exception, no finally, no atexit
    return original(self)

text.BlockSampler.next = kill_mid_step_3
cfg = json.loads(sys.argv[1])
train(TrainConfig(**{**cfg, "data": tuple(cfg["data"]), "out": Path(cfg["out"])}))
"""


def test_client_killed_mid_step_resumes_to_the_same_result(tmp_path, data_file, straight):
    """test_train covers an interrupt (an exception: cleanup runs); this is a real kill, in a child process."""
    out = tmp_path / "run"
    cfg = {"model": "micro-llama", "data": [str(data_file)], "out": str(out), "backend": "plain", "progress": False, **SETTINGS}
    killed = subprocess.run([sys.executable, "-c", KILL_MID_STEP_3, json.dumps(cfg)], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert latest_checkpoint(out).name == "step-2" and len(read_metrics(out)) == 2
    train(config(out, data_file), resume=True)
    assert_same_run(out, straight)
