"""SHE-LoRA end to end on Flower's simulation engine (Ray), and the CLI.

The default run (about 30 s) federates 3 clients for 3 rounds on micro-llama; the slow
tier runs all four methods side by side with 6 clients.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hetune.protocols.she_lora.config import SheLoraConfig


def _run(tmp_path: Path, method: str, **kw):
    from hetune.protocols.she_lora.run import run_federation

    cfg = SheLoraConfig(out=tmp_path / method, method=method, **{"clients": 3, "rounds": 3, "max_samples": 600, "local_steps": 30, "alpha": 1.0, **kw})
    return run_federation(cfg, echo=lambda s: None), cfg


@pytest.mark.he
def test_short_she_lora_federation_improves_accuracy(tmp_path):
    result, cfg = _run(tmp_path, "she-lora")
    rounds = result["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    # chance is 0.1; the round-0 model (zero head) scores one class
    assert rounds[-1]["accuracy"] >= rounds[0]["accuracy"] + 0.15, rounds
    assert rounds[-1]["test_loss"] < rounds[0]["test_loss"]
    for r in rounds[1:]:
        assert r["clients_accepted"] == 3 and r["clients_rejected"] == []
        # 4 layers (q, v of 2 blocks): each client packs its k_i selected columns of a layer
        # densely in 1 ciphertext; the aggregate holds max k_i = 4 columns (x m <= 32) in 1
        assert r["ciphertexts_up"] == 3 * 4 and r["ciphertexts_down"] == 4 and r["cipher_columns_down"] == 4 * 4
        assert r["bytes_up"] > r["ciphertexts_up"] * 100_000  # ~235 kB per N=8192 ciphertext
        assert r["enc_time_s"] > 0 and r["agg_time_s"] > 0
    assert rounds[1]["bytes_down"] < 10_000 < rounds[2]["bytes_down"]  # round 1 starts from nothing
    for name, subset in result["subsets"].items():
        assert len(subset) == 4 and len(set(subset)) == 4
    saved = json.loads((cfg.out / "metrics.json").read_text())
    assert saved["rounds"] == rounds and (cfg.out / "metrics.png").stat().st_size > 0
    assert result["setup_bytes"] > 10_000_000  # public key + Galois keys, sent once (not per round)
    assert not list(cfg.out.glob(".*tmp*"))  # atomic writes leave no temp files


def test_cli_refuses_a_budget_above_the_layer_width(run_cli, tmp_path):
    code, _, err = run_cli("federate", "she-lora", "--budgets", "1,64", "--out", tmp_path / "o")
    assert code == 2 and "budgets" in err and "32" in err
    assert not (tmp_path / "o" / "metrics.json").exists()
    code, _, err = run_cli("federate", "she-lora", "--method", "fedsgd", "--out", tmp_path / "o")
    assert code == 2 and "method" in err
    code, _, err = run_cli("federate", "she-lora", "--task", "knowledge", "--clients", "7", "--out", tmp_path / "o")
    assert code == 2 and "6 topics" in err
    code, _, err = run_cli("federate", "she-lora", "--task", "poems", "--out", tmp_path / "o")
    assert code == 2 and "task" in err
    assert not (tmp_path / "o" / "metrics.json").exists()


@pytest.mark.slow
@pytest.mark.he
def test_all_methods_side_by_side(tmp_path):
    results = {m: _run(tmp_path, m, clients=6, rounds=4, max_samples=0)[0]["rounds"] for m in ("flexlora", "she-lora", "maskcrypt", "full-he")}
    # SHE-LoRA aggregates the same sum_i w_i B_i A_i as plaintext FlexLoRA, up to CKKS noise
    assert abs(results["she-lora"][-1]["accuracy"] - results["flexlora"][-1]["accuracy"]) < 0.03
    assert results["she-lora"][-1]["accuracy"] > results["she-lora"][0]["accuracy"] + 0.1
    # SHE-LoRA's encrypted set is a prefix of one list (max k_i = 4 per layer); MaskCrypt's the union
    assert results["she-lora"][-1]["cipher_columns_down"] == 4 * 4
    assert results["maskcrypt"][-1]["cipher_columns_down"] > results["she-lora"][-1]["cipher_columns_down"]
    assert results["full-he"][-1]["encrypted_share"] == 1.0 and results["flexlora"][-1]["ciphertexts_up"] == 0
    assert all(r["clients_rejected"] == [] for rows in results.values() for r in rows[1:])
