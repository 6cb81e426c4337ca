"""The layout shows the trust boundary, and import-linter holds it (contracts in pyproject.toml)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECRET_MODULES = {"hetune.crypto.keys", "hetune.crypto.rlwe_keys", "hetune.crypto.glwe_keys"}


def _lint_imports() -> str:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"
    result = subprocess.run([exe, "--config", str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_worker_never_imports_owner_code_or_secret_keys():
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    forbidden = next(c for c in contracts if c["type"] == "forbidden")
    assert "hetune.protocols.hybrid_lora.worker" in forbidden["source_modules"]
    assert {"hetune.protocols.hybrid_lora.owner", *SECRET_MODULES} <= set(forbidden["forbidden_modules"])
    assert "hetune.net" in forbidden["source_modules"]  # the owners' shared HTTP client is neither side's
    report = _lint_imports()  # every contract, the SFPrompt one below included
    assert "KEPT" in report and "BROKEN" not in report


def test_sfprompt_never_imports_the_core_protocol():
    """SFPrompt's client and server build on hetune.net and hetune.serving, not on hybrid LoRA's owner or worker."""
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    assert any(c["source_modules"] == ["hetune.protocols.sfprompt"] and c["forbidden_modules"] == ["hetune.protocols.hybrid_lora"]
               for c in contracts)


def test_worker_process_loads_no_secret_key_module():
    """At run time too: importing the server and serving a scheme loads no owner module."""
    code = ("import sys; import hetune.protocols.hybrid_lora.worker.server, hetune.protocols.hybrid_lora.worker.ray_serve; "
            "from hetune.crypto.registry import scheme_names; scheme_names(); "
            "import json; print(json.dumps(sorted(m for m in sys.modules if m.startswith('hetune'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    loaded = set(json.loads(out))
    assert loaded and not loaded & SECRET_MODULES
    assert not any(m.startswith("hetune.protocols.hybrid_lora.owner") for m in loaded)
