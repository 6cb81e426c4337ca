"""Token recovery from a real causal LM's LoRA update (DAGER's span check, Petrov et al. 2024): the threat SHE-LoRA targets.

For y = W x + B A x, the gradient of A over a batch of tokens is
dA = B^T G^T X (r x n): every row of dA is a combination of the input rows x_t, so a
token the client used lies in the span of the rows. A server that sees A's update with
the selected columns encrypted only sees the other coordinates.
"""

from __future__ import annotations

from collections.abc import Sequence

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


def token_recall(distances: np.ndarray, true_ids: Sequence[int]) -> float:
    """Share of the client's distinct tokens among the |tokens| candidates nearest to the span (recall at K = |tokens|)."""
    truth = set(int(t) for t in true_ids)
    order = np.lexsort((np.arange(len(distances)), distances))  # nearest first, ties by id
    return len(truth & set(int(t) for t in order[: len(truth)])) / len(truth)


def token_recovery(cfg, client: int = 0, batches: Sequence[int] = (1, 2, 4)) -> dict:
    """DAGER's first-layer span check against one client of ``cfg`` (a causal-LM task), on the real model.

    The client starts from the state of round 2 (one local round of training, so B != 0
    and A's gradient is not zero), then for each batch size computes what it would
    upload: the FedSGD gradient of A (DAGER's setting) and, separately, the change of A
    over one local round of AdamW (what this protocol uploads). The attacker scores every
    vocabulary token by its distance to the span of layer 0's q_proj and v_proj rows and
    takes as many nearest tokens as the batch has distinct ones: recall against the full
    clear update, and against SHE-LoRA's clear part (the client's top-k_i sensitivity
    columns hidden) for a naive and an adaptive attacker.
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
    start = {n: (loras[n].B.detach().clone(), loras[n].A.detach().clone()) for n in loras}
    out = {"client": client, "rank": cfg.rank_of(client), "budget": k, "hidden_columns": hidden_cols,
           "vocabulary": len(cand), "batches": []}
    for size in batches:
        x, y = data.x[:size], data.y[:size]
        true_ids = sorted(set(int(t) for t in x[y != -100]))
        grads = lora_a_gradients(model, loras, x, y, names)
        task.set_adapters(loras, {n: (b.numpy(), a.numpy()) for n, (b, a) in start.items()})
        batch = task.LocalData(x, y, data.test_x, data.test_y)
        task.train_local(cfg, model, batch, client_seed(cfg, client, 2), steps=cfg.local_steps)
        deltas = {n: loras[n].A.detach().double().numpy() - start[n][1].double().numpy() for n in names}
        task.set_adapters(loras, {n: (b.numpy(), a.numpy()) for n, (b, a) in start.items()})
        row = {"documents": size, "tokens": int((y != -100).sum()), "distinct_tokens": len(true_ids)}
        for what, upd in (("gradient", grads), ("update", deltas)):
            rows = np.vstack([upd[n] for n in names])
            row[what] = {
                "full": token_recall(span_distances(rows, cand), true_ids),
                "she_clear_naive": token_recall(span_distances(rows, cand, hidden_cols, adaptive=False), true_ids),
                "she_clear_adaptive": token_recall(span_distances(rows, cand, hidden_cols, adaptive=True), true_ids),
            }
        out["batches"].append(row)
    return out
