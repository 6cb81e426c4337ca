"""SFPrompt: split + federated soft-prompt fine-tuning (Cao, Zhu, Gong, arXiv 2407.17533).

Spec: shared/specs/sfprompt.md; design and choices: docs/sfprompt.md. The model is cut
into head / body / tail; clients hold head + tail + soft prompts, a body server holds
the frozen middle blocks and answers split forward / backward requests over HTTP, and
Flower runs the rounds (local-loss update, EL2N pruning, split fine-tuning, FedAvg).
"""
