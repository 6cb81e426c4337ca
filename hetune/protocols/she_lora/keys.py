"""CKKS key set-up: the secret context goes to a 0600 file for clients only; the server gets a public one.

All clients share one CKKS secret key (spec). ``setup_keys`` generates it in a separate
Python process (``python -m hetune.protocols.she_lora.keys``), so the process that
orchestrates the run and hosts the ServerApp never deserializes the secret context. In
a real deployment one client (or the clients' key ceremony) runs the same module and
hands ``secret.ctx`` to the other clients over a private channel, and ``public.ctx``
to the server.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from hetune.errors import ConfigError, HetuneError
from hetune.files import write_atomic
from hetune.protocols.she_lora.config import CkksParams

SECRET_NAME, PUBLIC_NAME = "secret.ctx", "public.ctx"


class KeySetupError(HetuneError):
    """A CKKS context file is missing, unreadable, or of the wrong kind (secret where public is required)."""

    exit_code = 7


@dataclass(frozen=True)
class KeyFiles:
    secret: Path  # full context with the secret key, mode 0600, for ClientApps only
    public: Path  # public key and (for the column methods) Galois keys; no secret, no relinearization keys; for the server


def make_context(ckks: CkksParams):
    import tenseal as ts

    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=ckks.poly_modulus_degree,
                     coeff_mod_bit_sizes=list(ckks.coeff_mod_bit_sizes))
    ctx.global_scale = 2.0**ckks.scale_bits
    return ctx


def write_keys(key_dir: Path, ckks: CkksParams, galois: bool = True) -> KeyFiles:
    """Generate a fresh shared context and write both files. Run in the key-holder's process.

    ``galois``: put Galois (rotation) keys in ``public.ctx``; the server's encrypted
    vector-matrix products for SHE-LoRA and MaskCrypt rotate ciphertexts. They are a
    one-time set-up upload (~18 MB at N=8192); clients only encrypt and decrypt, so
    ``secret.ctx`` carries neither Galois nor relinearization keys.
    """
    key_dir.mkdir(parents=True, exist_ok=True)
    ctx = make_context(ckks)
    if galois:
        ctx.generate_galois_keys()
    files = KeyFiles(key_dir / SECRET_NAME, key_dir / PUBLIC_NAME)
    write_atomic(files.secret, ctx.serialize(save_secret_key=True, save_galois_keys=False, save_relin_keys=False), 0o600)
    public = ctx.serialize(save_public_key=True, save_secret_key=False, save_galois_keys=galois, save_relin_keys=False)
    write_atomic(files.public, public, 0o644)
    return files


def setup_keys(key_dir: Path, ckks: CkksParams, galois: bool = True) -> KeyFiles:
    """Generate the shared context in a child process; this process never sees the secret key."""
    cmd = [sys.executable, "-m", "hetune.protocols.she_lora.keys", str(key_dir), str(ckks.poly_modulus_degree),
           ",".join(map(str, ckks.coeff_mod_bit_sizes)), str(ckks.scale_bits), str(int(galois))]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise KeySetupError(f"CKKS key set-up failed: {done.stderr.strip()[-500:]}", "check that tenseal is installed (pip install -e '.[fed]')")
    return KeyFiles(key_dir / SECRET_NAME, key_dir / PUBLIC_NAME)


def load_public_context(path: Path):
    """The server's context: refuses a file that holds a secret key."""
    ctx = _load(path)
    if ctx.is_private():
        raise KeySetupError(f"{path} holds a secret key; the server may only load a public context",
                        f"give the server {PUBLIC_NAME}, never {SECRET_NAME}")
    return ctx


def load_secret_context(path: Path):
    """A client's context (secret key included)."""
    ctx = _load(path)
    if not ctx.is_private():
        raise KeySetupError(f"{path} holds no secret key, so a client cannot decrypt with it",
                        f"give clients {SECRET_NAME} from the key set-up")
    return ctx


def _load(path: Path):
    import tenseal as ts

    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise KeySetupError(f"cannot read CKKS context {path}: {err}", "run the key set-up first (setup_keys)") from err
    try:
        return ts.context_from(data)
    except Exception as err:  # tenseal raises ValueError / RuntimeError on bad streams
        raise KeySetupError(f"{path} is not a TenSEAL context: {err}", "re-run the key set-up") from err


if __name__ == "__main__":  # python -m hetune.protocols.she_lora.keys DIR N BITS SCALE [GALOIS]
    if len(sys.argv) not in (5, 6):
        raise SystemExit("usage: python -m hetune.protocols.she_lora.keys DIR POLY_DEGREE BITS(60,40,60) SCALE_BITS [GALOIS(1|0)]")
    try:
        params = CkksParams(int(sys.argv[2]), tuple(int(b) for b in sys.argv[3].split(",")), int(sys.argv[4]))
    except (ValueError, ConfigError) as err:
        raise SystemExit(f"bad CKKS parameters: {err}")
    write_keys(Path(sys.argv[1]), params, galois=sys.argv[5] != "0" if len(sys.argv) == 6 else True)
