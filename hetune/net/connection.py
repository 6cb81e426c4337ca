"""Why a worker could not be reached, in the user's terms: one error naming the real cause.

Before a worker has answered once, a failure is a set-up mistake, not an outage, so it is
reported at once instead of retried: nothing listening on the port, plain http to a TLS
worker (detected by a TLS handshake that succeeds where http failed), https to a plain
worker, a certificate from a CA the client does not trust, or one that does not name the
host dialled (its names are read back to show which it has).
"""

from __future__ import annotations

import socket
import ssl
from urllib.parse import urlsplit

from hetune.errors import WorkerError

_PROBE_S = 3.0
_CA_CODES = {2, 7, 18, 19, 20, 21}  # issuer unknown or not the signer (7: a CA of the same name), self-signed leaf or chain
_NAME_CODES = {62, 64}  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
_EXPIRED = 10


def _chain(err: BaseException):
    while err is not None:
        yield err
        err = err.__cause__ or err.__context__


def _find(err: BaseException, kind: type):
    return next((e for e in _chain(err) if isinstance(e, kind)), None)


def _speaks_tls(host: str, port: int) -> bool:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # a probe: only whether TLS answers
    try:
        with socket.create_connection((host, port), timeout=_PROBE_S) as sock, ctx.wrap_socket(sock, server_hostname=host):
            return True
    except (OSError, ssl.SSLError):
        return False


def certificate_names(host: str, port: int) -> list[str]:
    """The subject alternative names of the certificate the worker presents (unverified: for the message only)."""
    from cryptography import x509

    try:
        pem = ssl.get_server_certificate((host, port), timeout=_PROBE_S)
        ext = x509.load_pem_x509_certificate(pem.encode()).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except (OSError, ssl.SSLError, ValueError, x509.ExtensionNotFound):
        return []
    return [str(name.value) for name in ext.value]


def connection_error(url: str, ca_cert, err: BaseException) -> WorkerError:
    """The WorkerError for a transport failure ``err`` reaching ``url`` (``ca_cert``: the --ca-cert given, or None)."""
    parts = urlsplit(url)
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    where = f"worker {url}"
    cert = _find(err, ssl.SSLCertVerificationError)
    if cert is not None:
        code = getattr(cert, "verify_code", None)
        if code in _NAME_CODES:
            names = certificate_names(host, port)
            has = f" (it names {', '.join(names)})" if names else ""
            return WorkerError(f"{where}: its certificate does not name {host}{has}",
                               f"make the worker a certificate whose subject alternative names include {host} "
                               f"(`hetune certs --host {host}` for a test), or dial a name it holds")
        if code in _CA_CODES:
            trusted = f"--ca-cert {ca_cert}" if ca_cert else "the system's trust store"
            return WorkerError(f"{where}: its certificate is signed by a CA not in {trusted}",
                               "pass --ca-cert with the PEM of the CA that signed the worker's certificate "
                               "(ca.pem from `hetune certs`)" + (", not another CA's" if ca_cert else ""))
        if code == _EXPIRED:
            return WorkerError(f"{where}: its certificate has expired", "renew the worker's certificate and restart it")
        return WorkerError(f"{where}: its certificate cannot be verified: {getattr(cert, 'verify_message', cert)}",
                           "fix the worker's certificate chain, or pass --ca-cert with the CA that signed it")
    if _find(err, ConnectionRefusedError) is not None or "refused" in str(err).lower():
        return WorkerError(f"cannot reach {where}: connection refused (nothing listens on {host}:{port})",
                           "start the worker there (`hetune serve BUNDLE --host ... --port ...`) or fix --worker")
    tls = _find(err, ssl.SSLError)
    if parts.scheme == "https" and tls is not None and "WRONG_VERSION_NUMBER" in str(tls).upper():
        return WorkerError(f"{where} does not speak TLS (plain http answered the https handshake)",
                           f"serve the worker with --tls-cert/--tls-key, or dial http://{parts.netloc} if it is on loopback")
    if parts.scheme == "http" and _speaks_tls(host, port):
        return WorkerError(f"{where} serves https: plain http gets no answer",
                           f"pass --worker https://{parts.netloc} (with --ca-cert if its CA is not in the system's store)")
    if _find(err, socket.gaierror) is not None:
        return WorkerError(f"cannot reach {where}: host {host} is not known", "check the host name in --worker")
    name = type(err).__name__
    if "Timeout" in name:
        return WorkerError(f"cannot reach {where}: no answer ({name})",
                           "check the address, that the worker runs, and that a firewall lets the port through")
    return WorkerError(f"cannot reach {where}: {err}", "check that `hetune serve` is running there and --worker is right")
