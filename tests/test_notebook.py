"""The Llama-3.2-1B notebook, executed with its parameter cell switched to the built-in tiny model."""

import json

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.he


def test_notebook_runs_on_the_tiny_model(tmp_path):
    nb = nbformat.read("notebooks/finetune_llama_3_2_1b.ipynb", as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    params.source += f"\nTINY = True\nENCRYPTED_STEPS = 1\nENCRYPTED_SEQ_LEN = 4\nTRAIN_STEPS = 20\nSEQ_LEN = 32\nBATCH_SIZE = 4\nOUT = {str(tmp_path)!r}\n"
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": "."}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    summary = json.loads(text.split("SUMMARY ", 1)[1].splitlines()[0])
    assert summary["model"] == "micro-llama"
    assert abs(summary["encrypted_eval_loss"] - summary["encrypted_check_eval_loss"]) / summary["encrypted_check_eval_loss"] < 0.01
    assert abs(summary["gap"]) < 0.02
    assert 0.0 <= summary["exact_match_after"] <= 1.0
    assert (tmp_path / "loss.png").is_file() and (tmp_path / "quantized" / "adapter" / "adapter_config.json").is_file()
    assert "before:" in text and "after:" in text
