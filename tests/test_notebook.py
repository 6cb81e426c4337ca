"""The fine-tuning notebook, executed with its parameter cell switched to the built-in micro model."""

import json

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.he


def test_notebook_runs_on_the_tiny_model(tmp_path):
    nb = nbformat.read("notebooks/private_finetune.ipynb", as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    params.source += f"\nTINY = True\nENCRYPTED_STEPS = 1\nTRAIN_STEPS = 6\nSEQ_LEN = 16\nBATCH_SIZE = 2\nOUT = {str(tmp_path)!r}\n"
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": "."}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    summary = json.loads(text.split("SUMMARY ", 1)[1].splitlines()[0])
    assert summary["model"] == "micro-llama" and summary["encrypted_equals_quantized"]
    assert abs(summary["gap"]) < 0.05
    assert 0 <= summary["correct_after"] <= summary["held_out"] == 6
    assert (tmp_path / "loss.png").is_file() and (tmp_path / "private" / "adapter" / "adapter_config.json").is_file()
    assert "before:" in text and "after:" in text
