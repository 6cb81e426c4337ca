"""Deployment hardening of the worker link: TLS verification, admission by API key, no secrets in logs."""

import datetime
import ipaddress
import logging

import pytest
from fastapi.testclient import TestClient

from hetune.compile.bundle import load_bundle
from hetune.crypto.rlwe_wire import HEADER_BYTES
from hetune.errors import ConfigError
from hetune.serving.admission import OwnerLimits, add_owner, read_keys_file
from hetune.protocols.hybrid_lora.owner import remote
from hetune.protocols.hybrid_lora.owner.remote import WorkerAccess
from hetune.protocols.hybrid_lora.worker.server import LoopbackWorker, ServeConfig, create_app


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 (its own CA) and its key, made with `cryptography`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hetune test worker")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    out = tmp_path_factory.mktemp("tls")
    (out / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (out / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()))
    return out / "cert.pem", out / "key.pem"


@pytest.fixture
def fast_retry(monkeypatch):
    monkeypatch.setattr(remote, "DEFAULT_RETRY", remote.RetryPolicy(retries=1, backoff_s=0.05, timeout_s=30.0))


def train_args(train_jsonl, out, url, *extra):
    return ("train", "--model", "micro-llama", "--data", train_jsonl, "--out", out, "--backend", "remote", "--worker", url,
            "--steps", "1", "--seq-len", "4", "--batch-size", "1", "--warmup-steps", "1", *extra)


# ---- TLS ----


def test_train_over_https_verifies_the_worker_with_ca_cert(run_cli, micro_bundle, tls_files, train_jsonl, tmp_path, fast_retry):
    cert, key = tls_files
    with LoopbackWorker(load_bundle(micro_bundle), ServeConfig(tls_cert=cert, tls_key=key)) as worker:
        assert worker.url.startswith("https://127.0.0.1:")
        code, stdout, stderr = run_cli(*train_args(train_jsonl, tmp_path / "ok", worker.url, "--ca-cert", cert))
        assert code == 0, stderr
        assert "final loss" in stdout and (tmp_path / "ok" / "adapter" / "adapter_model.safetensors").is_file()
        # the system's trust store does not know this self-signed worker: refused at once, no retries, no output
        code, _, stderr = run_cli(*train_args(train_jsonl, tmp_path / "no", worker.url))
        assert code == 6 and "signed by a CA not in the system's trust store" in stderr and "--ca-cert" in stderr
        assert not (tmp_path / "no").exists()


def test_plain_http_only_on_loopback_or_with_insecure(run_cli, train_jsonl, tmp_path):
    code, _, stderr = run_cli(*train_args(train_jsonl, tmp_path / "r", "http://10.1.2.3:8765"))
    assert code == 2 and "http://10.1.2.3:8765 is plain http" in stderr and "--insecure" in stderr and "--tls-cert" in stderr
    for url in ("http://127.0.0.1:8765", "http://localhost:1", "http://[::1]:8765", "https://10.1.2.3:8765"):
        WorkerAccess().check_url(url)
    WorkerAccess(insecure=True).check_url("http://10.1.2.3:8765")
    with pytest.raises(ConfigError, match="not an http"):
        WorkerAccess().check_url("10.1.2.3:8765")


def test_serve_refuses_half_or_mismatched_tls(run_cli, micro_bundle, tls_files, tmp_path):
    cert, _ = tls_files
    code, _, stderr = run_cli("serve", micro_bundle, "--tls-cert", cert)
    assert code == 2 and "--tls-cert and --tls-key go together" in stderr
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    other = tmp_path / "other.pem"
    other.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    code, _, stderr = run_cli("serve", micro_bundle, "--tls-cert", cert, "--tls-key", other)
    assert code == 2 and "cannot use --tls-cert" in stderr


# ---- admission ----


@pytest.fixture
def keys_file(tmp_path):
    path = tmp_path / "keys.txt"
    return path, {owner: add_owner(path, owner) for owner in ("clinic", "bank")}


def open_session(client, key=None):
    return client.post("/v2/sessions", headers={"authorization": f"Bearer {key}"} if key else {})


def test_keys_new_prints_the_key_once_and_keeps_its_hash(run_cli, tmp_path):
    path = tmp_path / "keys.txt"
    code, stdout, stderr = run_cli("keys", "new", "--owner", "clinic", "--keys-file", path)
    key = stdout.strip()
    assert code == 0 and key.startswith("htk_") and len(key) > 40 and "clinic" in stderr
    assert key not in path.read_text() and (path.stat().st_mode & 0o777) == 0o600
    assert list(read_keys_file(path)) == ["clinic"]
    code, _, stderr = run_cli("keys", "new", "--owner", "clinic", "--keys-file", path)
    assert code == 2 and "already has a key" in stderr
    path.write_text(path.read_text() + "bank not-a-hash\n")
    with pytest.raises(ConfigError, match="line 2 is not `OWNER SHA256HEX`"):
        read_keys_file(path)


def test_sessions_need_a_listed_key(micro_bundle, keys_file):
    path, keys = keys_file
    client = TestClient(create_app(load_bundle(micro_bundle), ServeConfig(api_keys=path)))
    assert open_session(client).status_code == 401
    r = open_session(client, "htk_" + "x" * 43)
    assert r.status_code == 401 and "API key" in r.json()["error"]
    assert open_session(client, keys["clinic"]).status_code == 201
    assert open_session(client, keys["bank"]).status_code == 201
    assert client.get("/v2/info").status_code == 200  # public data stays open


def test_per_owner_session_cap_and_rate_limit_with_retry_after(micro_bundle, keys_file):
    path, keys = keys_file
    cfg = ServeConfig(api_keys=path, owner_limits=OwnerLimits(sessions=1, requests_per_minute=4))
    client = TestClient(create_app(load_bundle(micro_bundle), cfg))
    first = open_session(client, keys["clinic"]).json()  # request 1 of clinic's 4
    r = open_session(client, keys["clinic"])  # 2
    assert r.status_code == 429 and r.headers["retry-after"] == "5" and "1 concurrent sessions" in r.json()["error"]
    assert open_session(client, keys["bank"]).status_code == 201  # other owners are not affected
    auth = {"authorization": f"Bearer {first['token']}"}
    assert client.delete(f"/v2/sessions/{first['session_id']}", headers=auth).status_code == 204  # 3
    assert open_session(client, keys["clinic"]).status_code == 201  # 4: room again
    r = open_session(client, keys["clinic"])  # past 4 per minute
    assert r.status_code == 429 and "requests per minute" in r.json()["error"]
    assert 1 <= int(r.headers["retry-after"]) <= 15  # one request's worth of a 4-per-minute bucket


def test_training_client_sends_the_key_from_env_or_file(run_cli, micro_bundle, keys_file, train_jsonl, tmp_path, monkeypatch, fast_retry):
    path, keys = keys_file
    with LoopbackWorker(load_bundle(micro_bundle), ServeConfig(api_keys=path)) as worker:
        monkeypatch.delenv(remote.API_KEY_ENV, raising=False)
        code, _, stderr = run_cli(*train_args(train_jsonl, tmp_path / "none", worker.url))
        assert code == 6 and "401" in stderr and "HETUNE_API_KEY" in stderr
        monkeypatch.setenv(remote.API_KEY_ENV, keys["clinic"])
        code, _, stderr = run_cli(*train_args(train_jsonl, tmp_path / "env", worker.url))
        assert code == 0, stderr
        monkeypatch.delenv(remote.API_KEY_ENV)
        (tmp_path / "key").write_text(keys["bank"] + "\n")
        code, _, stderr = run_cli(*train_args(train_jsonl, tmp_path / "file", worker.url, "--api-key-file", tmp_path / "key"))
        assert code == 0, stderr
        state = (tmp_path / "file" / "checkpoints" / "step-1" / "trainer_state.pt").read_bytes()
        assert keys["bank"].encode() not in state  # the config in checkpoints names the file, never the key


def test_startup_line_says_how_sessions_are_admitted(micro_bundle, keys_file, caplog, monkeypatch):
    import uvicorn

    from hetune.protocols.hybrid_lora.worker.server import serve

    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: None)
    caplog.set_level(logging.INFO, logger="hetune.worker")
    bundle = load_bundle(micro_bundle)
    serve(bundle, ServeConfig())
    assert "worker on http://127.0.0.1:8765; admission open (no --api-keys)" in caplog.text
    serve(bundle, ServeConfig(api_keys=keys_file[0]))
    assert "admission by API key (2 owners" in caplog.text


# ---- secrets in logs ----


def all_loggers_to(caplog):
    """Every logger at DEBUG into caplog, those that do not propagate (uvicorn's access log) included.

    Not torch's: its autograd DEBUG logging imports torch's test utilities, which need `expecttest`."""
    loggers = [logging.getLogger()] + [l for l in logging.root.manager.loggerDict.values()
                                       if isinstance(l, logging.Logger) and not l.name.startswith("torch")]
    for logger in loggers:
        caplog.set_level(logging.DEBUG, logger=logger.name)
        if not logger.propagate:
            logger.addHandler(caplog.handler)
    return loggers


def test_logs_hold_no_token_api_key_secret_key_or_payload(micro_bundle, keys_file, train_jsonl, tmp_path, caplog, capsys, monkeypatch):
    from hetune.protocols.hybrid_lora.owner.train import TrainConfig, train

    path, keys = keys_file
    (tmp_path / "api_key").write_text(keys["clinic"])
    sent, tokens = [], []
    original = remote.WorkerClient._request

    def recording(self, method, url_path, **kwargs):
        response = original(self, method, url_path, **kwargs)
        sent.append(kwargs.get("content") or b"")
        if method == "POST" and url_path == "/sessions" and response.status_code == 201:
            tokens.append(response.json()["token"])
        return response

    monkeypatch.setattr(remote.WorkerClient, "_request", recording)
    with LoopbackWorker(load_bundle(micro_bundle), ServeConfig(api_keys=path)) as worker:
        loggers = all_loggers_to(caplog)
        try:
            train(TrainConfig(model="micro-llama", data=(str(train_jsonl),), out=tmp_path / "run", backend="remote",
                              workers=(worker.url,), steps=2, seq_len=4, batch_size=1, warmup_steps=1,
                              save_key=tmp_path / "secret.key", api_key_file=tmp_path / "api_key"))
        finally:
            for logger in loggers:
                logger.removeHandler(caplog.handler)
    printed = capsys.readouterr()
    text = caplog.text + "\n".join(str(r.args) for r in caplog.records) + printed.out + printed.err
    assert "-> 201" in text and "-> 200" in text  # the worker's access log was captured, and uvicorn's:
    assert {"uvicorn.access", "httpx", "httpcore.http11", "hetune.worker"} <= {r.name for r in caplog.records}

    secret = tmp_path.joinpath("secret.key").read_bytes()[16:]  # packed secret bits after magic and set name
    bodies = [b[HEADER_BYTES : HEADER_BYTES + 64] for b in sent if len(b) > HEADER_BYTES + 64]  # ciphertext values
    assert tokens and bodies and len(secret) >= 128
    needles = [*tokens, keys["clinic"], secret.hex(), secret[:32].hex(), *(b.hex() for b in bodies)]
    assert not [n for n in needles if n in text]
    raw = text.encode("utf-8", "surrogateescape")
    assert not [b for b in [secret[:32], *bodies] if b in raw or repr(b)[2:-1] in text]
