"""Token recovery from a real causal LM's LoRA update (DAGER's span check, Petrov et al. 2024): the threat SHE-LoRA targets.

For y = W x + B A x, the gradient of A over a batch of tokens is
dA = B^T G^T X (r x n): every row of dA is a combination of the input rows x_t, so a
token the client used lies in the span of the rows. A server that sees A's update with
the selected columns encrypted only sees the other coordinates.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import numpy as np


def layer0_inputs(lm) -> np.ndarray:
    """(V, n): what layer 0's q_proj and v_proj see for every vocabulary token.

    Their input is input_layernorm(embedding) of the token, independent of its position
    (RoPE acts after the projection): the candidate set of DAGER's first-layer check.
    """
    import torch

    with torch.no_grad():
        return lm.model.layers[0].input_layernorm(lm.model.embed_tokens.weight).double().numpy()


def lora_a_gradients(lm, loras: dict, x: np.ndarray, y: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
    """dL/dA (r, n) of the named LoRA layers for one batch: what a FedSGD client uploads for A."""
    import torch

    from hetune.protocols.she_lora.task import lm_loss

    for lora in loras.values():
        lora.A.grad = None
    lm.train()
    lm_loss(lm, torch.as_tensor(x), torch.as_tensor(y)).backward()
    return {name: loras[name].A.grad.double().numpy().copy() for name in names}


def span_distances(rows: np.ndarray, candidates: np.ndarray, hidden: Sequence[int] = (), adaptive: bool = True,
                   tol: float = 1e-6) -> np.ndarray:
    """Each candidate's squared distance to the row span of ``rows``, relative to its squared norm.

    A token the client used lies in the span of the first-layer gradient rows when the
    rank covers the batch (DAGER's check): distance ~0. ``hidden`` columns are unknown
    (encrypted). The naive attacker fills them with zeros and keeps full candidates; the
    adaptive one drops those coordinates from both the rows and the candidates.
    """
    rows = np.array(rows, dtype=np.float64)
    cand = np.asarray(candidates, dtype=np.float64)
    hidden = list(hidden)
    if adaptive and hidden:
        keep = np.setdiff1d(np.arange(rows.shape[1]), hidden)
        rows, cand = rows[:, keep], cand[:, keep]
    else:
        rows[:, hidden] = 0.0
    _, s, vt = np.linalg.svd(rows, full_matrices=False)
    basis = vt[s > tol * s[0]]  # orthonormal rows spanning the update's row space
    norm2 = (cand**2).sum(1)
    return 1.0 - ((cand @ basis.T) ** 2).sum(1) / np.maximum(norm2, 1e-300)


def nearest_tokens(distances: np.ndarray, k: int) -> set[int]:
    """The attacker's guess: the ``k`` candidate ids nearest to the span (ties by id)."""
    order = np.lexsort((np.arange(len(distances)), distances))
    return set(int(t) for t in order[:k])


def token_recall(distances: np.ndarray, true_ids: Sequence[int]) -> float:
    """Share of the client's distinct tokens among the |tokens| candidates nearest to the span (recall at K = |tokens|)."""
    truth = set(int(t) for t in true_ids)
    return len(truth & nearest_tokens(distances, len(truth))) / len(truth)


def document_words(ids: Sequence[int], decode: Callable[[list[int]], str]) -> list[tuple[str, frozenset[int]]]:
    """The words of one tokenized document, each with the ids of the tokens that spell it.

    A word is a maximal run of letters, digits or underscores (``\\w+``) of the decoded
    text, so whitespace and punctuation split words. A token spells a word when its
    characters (found by decoding ever longer prefixes) overlap the word's: " company,"
    as one token spells "company"; "comp"+"any" both spell it.
    """
    ids = [int(t) for t in ids]
    ends = [len(decode(ids[: j + 1])) for j in range(len(ids))]
    starts = [0] + ends[:-1]
    return [(m.group(), frozenset(ids[j] for j in range(len(ids)) if starts[j] < m.end() and ends[j] > m.start()))
            for m in re.finditer(r"\w+", decode(ids))]


def word_recall(docs: Sequence[Sequence[int]], decode: Callable[[list[int]], str], recovered: set[int]) -> float:
    """Share of the client's distinct words that the recovered tokens spell.

    A word counts as recovered when every token of at least one of its occurrences is
    among the attacker's recovered tokens: from a bag of tokens the attacker can then
    write the word, and cannot otherwise (a partial word is not counted). Words are
    distinct strings, as the tokens in :func:`token_recall` are distinct ids.
    """
    spelled: dict[str, bool] = {}
    for doc in docs:
        for word, toks in document_words(doc, decode):
            spelled[word] = spelled.get(word, False) or toks <= recovered
    if not spelled:
        raise ValueError("the documents hold no word")
    return sum(spelled.values()) / len(spelled)


def token_recovery(cfg, client: int = 0, batches: Sequence[int] = (1, 2, 4)) -> dict:
    """DAGER's first-layer span check against one client of ``cfg`` (a causal-LM task), on the real model.

    The client starts from the state of round 2 (one local round of training, so B != 0
    and A's gradient is not zero), then for each batch size computes what it would
    upload: the FedSGD gradient of A (DAGER's setting) and, separately, the change of A
    over one local round of AdamW (what this protocol uploads). The attacker scores every
    vocabulary token by its distance to the span of layer 0's q_proj and v_proj rows and
    takes as many nearest tokens as the batch has distinct ones: recall of the client's
    distinct tokens (``gradient``, ``update``) and of its words (``words``, see
    :func:`word_recall`) against the full clear update, and against SHE-LoRA's clear part
    (the client's top-k_i sensitivity columns hidden) for a naive and an adaptive attacker.
    """
    from hetune.protocols.she_lora import task
    from hetune.protocols.she_lora.client import client_seed
    from hetune.protocols.she_lora.columns import sensitivity, top_columns

    if not cfg.causal_lm:
        raise ValueError("the token-recovery attack needs a causal-LM task (knowledge or text)")
    data = task.local_data(cfg, client)
    model, loras = task.build_model(cfg, cfg.rank_of(client))
    task.fresh_adapters(loras, client_seed(cfg, client, 0))
    task.train_local(cfg, model, data, client_seed(cfg, client, 1))
    names = [n for n in loras if n.startswith("layers.0.")]
    k = cfg.budget_of(client)
    norms = task.input_norms(model, {n: loras[n] for n in names}, data.x[: cfg.calibration_samples])
    hidden = {n: top_columns(sensitivity(loras[n].A.detach().numpy(), norms[n]), k) for n in names}
    # q_proj and v_proj read the same input: the attacker stacks their rows; hidden = the union
    hidden_cols = sorted(set().union(*hidden.values()))
    cand = layer0_inputs(model)
    tok = task.frozen_lm(cfg.model, cfg.seed)[1]
    start = {n: (loras[n].B.detach().clone(), loras[n].A.detach().clone()) for n in loras}
    out = {"client": client, "rank": cfg.rank_of(client), "budget": k, "hidden_columns": hidden_cols,
           "vocabulary": len(cand), "batches": []}
    for size in batches:
        x, y = data.x[:size], data.y[:size]
        true_ids = sorted(set(int(t) for t in x[y != -100]))
        docs = [row[lab != -100] for row, lab in zip(x, y)]  # the text the client trained on (cut at seq_len)
        grads = lora_a_gradients(model, loras, x, y, names)
        task.set_adapters(loras, {n: (b.numpy(), a.numpy()) for n, (b, a) in start.items()})
        batch = task.LocalData(x, y, data.test_x, data.test_y)
        task.train_local(cfg, model, batch, client_seed(cfg, client, 2), steps=cfg.local_steps)
        deltas = {n: loras[n].A.detach().double().numpy() - start[n][1].double().numpy() for n in names}
        task.set_adapters(loras, {n: (b.numpy(), a.numpy()) for n, (b, a) in start.items()})
        words = {w for d in docs for w, _ in document_words(d, tok.decode)}
        row = {"documents": size, "tokens": int((y != -100).sum()), "distinct_tokens": len(true_ids),
               "distinct_words": len(words), "words": {}}
        for what, upd in (("gradient", grads), ("update", deltas)):
            rows = np.vstack([upd[n] for n in names])
            row[what], row["words"][what] = {}, {}
            for view, dist in (("full", span_distances(rows, cand)),
                               ("she_clear_naive", span_distances(rows, cand, hidden_cols, adaptive=False)),
                               ("she_clear_adaptive", span_distances(rows, cand, hidden_cols, adaptive=True))):
                row[what][view] = token_recall(dist, true_ids)
                row["words"][what][view] = word_recall(docs, tok.decode, nearest_tokens(dist, len(true_ids)))
        out["batches"].append(row)
    return out
