"""The core protocol: interactive private LoRA fine-tuning (data owner + remote worker).

Spec: shared/specs/hybrid_lora.md. The data owner's model keeps embeddings, norms,
attention, SiLU, LoRA, loss and optimizer; every frozen linear product goes through a
:class:`~hetune.protocols.hybrid_lora.backends.FrozenBackend`.
"""
