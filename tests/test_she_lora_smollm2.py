"""SHE-LoRA on the real SmolLM2-135M weights, at the smallest real setting (2 clients, 1 local step, short documents).

The protocol's promise on a real model's adapters: SHE-LoRA's decrypted aggregate is
FlexLoRA's sum_i w_i B_i A_i up to CKKS error. And the privacy claim, measured with
DAGER's first-layer span check on the real vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hetune.protocols.she_lora import client, task, wire
from hetune.protocols.she_lora.config import SheLoraConfig


def _cfg(method: str, **kw) -> SheLoraConfig:
    return SheLoraConfig(out=Path("unused"), model="smollm2-135m", task="knowledge", method=method, clients=2,
                         rounds=1, **{"local_steps": 1, "batch_size": 2, "seq_len": 24, "max_docs": 4, **kw})


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    from hetune.protocols.she_lora.keys import setup_keys

    return setup_keys(tmp_path_factory.mktemp("keys"), _cfg("she-lora").ckks)


@pytest.mark.he
def test_she_lora_aggregate_equals_flexlora_on_smollm2_adapters(keys):
    from hetune.protocols.she_lora.apps import strategy_for
    from hetune.protocols.she_lora.keys import load_secret_context

    secret = load_secret_context(keys.secret)
    cfg = _cfg("she-lora")
    factors, sizes = {}, {}
    for c in range(2):  # the clients' real adapters after one local step on their own facts
        data = task.local_data(cfg, c)
        model, loras = task.build_model(cfg, cfg.rank_of(c))
        client.global_factors(cfg, c, None, None, model, loras)
        task.train_local(cfg, model, data, client.client_seed(cfg, c, 1))
        factors[c] = {n: (l.B.detach().double().numpy(), l.A.detach().double().numpy()) for n, l in loras.items()}
        sizes[c] = data.n_samples
    got = {}
    for method in ("she-lora", "flexlora"):
        cfg = _cfg(method)
        strategy = strategy_for(cfg, str(keys.public) if cfg.encrypts else None)
        strategy.register([(10 + c, client.register(cfg, c), None) for c in range(2)])
        meta_in = wire.unpack(strategy.round_payload(1))[0]
        uploads = [(10 + c, client.build_upload(cfg, c, 1, meta_in, factors[c], None, secret if cfg.encrypts else None, sizes[c]),
                    {"train_loss": 1.0, "enc_time_s": 0.0, "dec_time_s": 0.0}) for c in range(2)]
        row = strategy.aggregate(1, uploads, bytes_down=0)
        assert row["clients_accepted"] == 2 and row["clients_rejected"] == []
        meta, arrays, blobs = wire.unpack(strategy.round_payload(2))
        got[method] = client.rebuild_updates(meta, arrays, blobs, secret if cfg.encrypts else None, cfg.ckks.slots)
        if method == "she-lora":
            layers = meta["layers"]
            assert len(layers) == 60  # q_proj and v_proj of SmolLM2's 30 blocks
            assert all(len(v["cipher_cols"]) == 2 for v in layers.values())  # max k_i = 2 columns encrypted per layer
            assert row["ciphertexts_up"] == 2 * 60
    scale = max(np.abs(dw).max() for dw in got["flexlora"].values())
    assert scale > 1e-4  # the clients did move their adapters
    for name, dw in got["flexlora"].items():
        assert np.abs(got["she-lora"][name] - dw).max() <= 2.0**-14 * (1 + scale)


@pytest.mark.slow
@pytest.mark.he
def test_benchmark_run_she_lora_matches_flexlora_and_beats_local_only(tmp_path):
    """The benchmark's real run (benchmarks/she_lora.py --smollm2, 3 rounds) for every federated method and local-only:
    5 min 27 s on 2 quiet cores. The 8-round benchmark had at round 3 (eval loss): FlexLoRA, SHE-LoRA and MaskCrypt
    2.154, full HE 2.291, local-only 3.041."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from she_lora import SMOLLM2_RUN, accuracy_runs

    run = dict(SMOLLM2_RUN)
    clients, rounds = run.pop("clients"), run.pop("rounds")
    runs = accuracy_runs(rounds, clients, ("flexlora", "she-lora", "maskcrypt", "full-he", "local-only"), **run)
    # SHE-LoRA and MaskCrypt within 1 point of FlexLoRA's exact match (the same aggregate up to CKKS error)
    for method in ("she-lora", "maskcrypt"):
        assert abs(runs[method]["final_accuracy"] - runs["flexlora"]["final_accuracy"]) <= 0.01, method
        assert abs(runs[method]["test_loss"][-1] - runs["flexlora"]["test_loss"][-1]) <= 1e-3, method
    # federated above local-only: each client alone never sees the other's topics; full HE averages A and B
    # separately (a different aggregate from FlexLoRA's), and still learns what neither client holds alone
    for method in ("flexlora", "full-he"):
        assert runs[method]["test_loss"][-1] < runs["local-only"]["test_loss"][-1] - 0.3, method


def test_word_recall_with_smollm2s_tokenizer():
    """Words split at spaces and punctuation; " Ac"+"me" and " 1"+"9"+"8"+"7" must all be recovered to count."""
    from hetune.protocols.she_lora.attack import document_words, word_recall

    tok = task.frozen_lm("smollm2-135m", 0)[1]
    ids = tok("The company, Acme-Corp: founded in 1987.", add_special_tokens=False)["input_ids"]
    words = dict(document_words(ids, tok.decode))
    assert list(words) == ["The", "company", "Acme", "Corp", "founded", "in", "1987"]
    assert all(len(words[w]) == 1 for w in ("The", "company", "founded", "in"))
    assert len(words["Acme"]) == 2 and len(words["1987"]) == 4  # SmolLM2 writes digits one by one
    assert word_recall([ids], tok.decode, set(ids)) == 1.0
    missing = next(iter(words["Acme"]))
    assert word_recall([ids], tok.decode, set(ids) - {missing}) == 6 / 7
    assert word_recall([ids], tok.decode, set().union(*(words[w] for w in ("The", "in")))) == 2 / 7


def test_dager_span_check_recovers_tokens_and_hiding_columns_stops_only_the_naive_attacker():
    """One document's FedSGD gradient of layer 0's LoRA A (rank 32 >= its 20 tokens: DAGER's regime)."""
    from hetune.protocols.she_lora.attack import token_recovery

    cfg = _cfg("she-lora", ranks=(32,), budgets=(4,))
    out = token_recovery(cfg, 0, (1,))
    row = out["batches"][0]
    assert out["vocabulary"] == 49152 and row["distinct_tokens"] >= 10
    grad = row["gradient"]
    # every token but the last (no loss reads its q or v, so its gradient row is zero) is in the span
    assert grad["full"] >= (row["distinct_tokens"] - 1) / row["distinct_tokens"]
    # SHE-LoRA's clear part: a naive attacker (hidden coordinates as zeros) loses tokens ...
    assert grad["she_clear_naive"] <= grad["full"] - 0.1
    # ... an adaptive one (drops those coordinates from the candidates too) loses none
    assert grad["she_clear_adaptive"] == grad["full"]
    # the same read as the client's words: the last token here is the final ".", so every word is spelled
    words = row["words"]["gradient"]
    assert row["distinct_words"] >= 8
    assert words["full"] >= (row["distinct_words"] - 1) / row["distinct_words"]
    assert words["she_clear_naive"] <= words["full"] - 0.1
    assert words["she_clear_adaptive"] == words["full"]
    assert len(out["hidden_columns"]) >= 4  # q_proj's and v_proj's top-4 columns, as the attacker is told
