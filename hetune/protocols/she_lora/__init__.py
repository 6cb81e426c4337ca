"""SHE-LoRA: selective homomorphic encryption for heterogeneous federated LoRA, on Flower.

Spec: shared/specs/she_lora.md; design and limits: docs/she_lora.md. Clients with
different LoRA ranks r_i and HE budgets k_i agree (round 0) on one ordered subset of
input columns per layer; each round they upload B_i and the other columns of A_i in the
clear and the first k_i agreed columns of A_i as CKKS ciphertexts. The server computes
``sum_i w_i B_i A_i`` column by column (for the encrypted columns, packed densely one
ciphertext per layer, an encrypted vector-matrix product with rotations) holding only a
public TenSEAL context (public and Galois keys); clients decrypt and re-factor the
aggregate to their own rank by truncated SVD.

Modules: ``config`` (settings), ``keys`` (CKKS context setup: secret file for clients,
public file for the server), ``columns`` (sensitivity, negotiation, the column swap), ``cipher``
(CKKS packing and the server's encrypted products), ``wire`` (safe payload format),
``reparam`` (SVD to the client's rank), ``task`` (knowledge/text on a causal LM, the digits toy; LoRA,
training), ``strategy`` (``SheLoraStrategy``: negotiation and column-aware
aggregation), ``apps`` (Flower ServerApp / ClientApp), ``run`` (the federated run,
metrics, plot, centralized and local-only references), ``attack`` (DAGER's token check on a real LM).
"""
