"""Each connection and TLS set-up mistake gets its own message, at once (loopback only; certificates from `hetune certs`)."""

import socket
import time

import pytest

from hetune.compile.bundle import load_bundle
from hetune.protocols.hybrid_lora.worker.server import LoopbackWorker, ServeConfig


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """`hetune certs` output for 127.0.0.1, one for localhost only (no IP SAN), and another CA's."""
    from hetune.tls import make_worker_certs

    root = tmp_path_factory.mktemp("certs")
    return {name: make_worker_certs(root / name, hosts) for name, hosts in
            (("ip", ["127.0.0.1", "localhost"]), ("dns_only", ["localhost"]), ("other", ["127.0.0.1"]))}


@pytest.fixture(scope="module")
def tls_worker(micro_bundle, certs):
    workers = {}

    def start(name):
        if name not in workers:
            files = certs[name]
            workers[name] = LoopbackWorker(load_bundle(micro_bundle), ServeConfig(tls_cert=files.cert, tls_key=files.key))
        return workers[name]

    yield start
    for w in workers.values():
        w.stop()


def _train(run_cli, tmp_path, data, url, *extra):
    """The CLI's exit code and stderr, and the seconds the same mistake takes to be reported once the model is loaded."""
    from hetune.errors import WorkerError
    from hetune.protocols.hybrid_lora.owner.remote import HttpTransport, WorkerAccess

    code, _, err = run_cli("train", "--model", "micro-llama", "--data", data, "--out", tmp_path / "run", "--backend", "remote",
                           "--worker", url, "--steps", "1", "--seq-len", "8", "--batch-size", "1", *extra)
    ca = extra[extra.index("--ca-cert") + 1] if "--ca-cert" in extra else None
    t0 = time.monotonic()
    try:
        HttpTransport([url], WorkerAccess(ca_cert=ca)).close()
    except WorkerError:
        pass
    return code, err, time.monotonic() - t0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_worker_down_fails_at_once_naming_the_address(run_cli, tmp_path, train_jsonl):
    port = _free_port()
    code, err, took = _train(run_cli, tmp_path, train_jsonl, f"http://127.0.0.1:{port}")
    assert code == 6 and f"connection refused (nothing listens on 127.0.0.1:{port})" in err and "hetune serve" in err
    assert took < 5 and "Traceback" not in err and "checkpoint" not in err


def test_plain_http_to_a_tls_worker(run_cli, tmp_path, train_jsonl, tls_worker, certs):
    url = tls_worker("ip").url.replace("https://", "http://")
    code, err, took = _train(run_cli, tmp_path, train_jsonl, url)
    assert code == 6 and "serves https: plain http gets no answer" in err and f"--worker {url.replace('http', 'https')}" in err
    assert took < 5


def test_https_to_a_plain_worker(run_cli, tmp_path, train_jsonl, loopback_worker, certs):
    url = loopback_worker().url.replace("http://", "https://")
    code, err, took = _train(run_cli, tmp_path, train_jsonl, url, "--ca-cert", certs["ip"].ca)
    assert code == 6 and "does not speak TLS" in err and took < 5


def test_unknown_ca(run_cli, tmp_path, train_jsonl, tls_worker, certs):
    url = tls_worker("ip").url
    code, err, took = _train(run_cli, tmp_path, train_jsonl, url, "--ca-cert", certs["other"].ca)
    assert code == 6 and f"signed by a CA not in --ca-cert {certs['other'].ca}" in err and "not another CA's" in err
    code, err, _ = _train(run_cli, tmp_path, train_jsonl, url)
    assert code == 6 and "signed by a CA not in the system's trust store" in err
    assert took < 5


def test_certificate_without_the_ip(run_cli, tmp_path, train_jsonl, tls_worker, certs):
    url = tls_worker("dns_only").url
    assert url.startswith("https://127.0.0.1:")
    code, err, took = _train(run_cli, tmp_path, train_jsonl, url, "--ca-cert", certs["dns_only"].ca)
    assert code == 6 and "its certificate does not name 127.0.0.1 (it names localhost)" in err
    assert "hetune certs --host 127.0.0.1" in err and took < 5
    # the name it holds works, with that CA
    code, err, _ = _train(run_cli, tmp_path, train_jsonl, url.replace("127.0.0.1", "localhost"), "--ca-cert", certs["dns_only"].ca)
    assert code == 0, err


def test_certs_command_makes_a_working_pair(run_cli, tmp_path, train_jsonl, micro_bundle):
    import stat

    code, out, err = run_cli("certs", "--out", tmp_path / "tls", "--host", "127.0.0.1", "--host", "localhost")
    assert code == 0, err
    key = tmp_path / "tls" / "worker-key.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and "--ca-cert" in out
    with LoopbackWorker(load_bundle(micro_bundle), ServeConfig(tls_cert=tmp_path / "tls" / "worker.pem", tls_key=key)) as worker:
        code, err, _ = _train(run_cli, tmp_path, train_jsonl, worker.url, "--ca-cert", tmp_path / "tls" / "ca.pem")
    assert code == 0, err
    code, _, err = run_cli("certs", "--out", tmp_path / "bad", "--host", "http://x")
    assert code == 2 and "neither an IP address nor a DNS name" in err
