"""The core protocol: interactive private LoRA fine-tuning (data owner + remote worker).

Spec: shared/specs/hybrid_lora.md. Split by who holds what: :mod:`.owner` (data, secret
key, adapters; the model's non-linearities, LoRA, loss and optimizer), :mod:`.worker`
(integer weights, ciphertexts) and :mod:`.wire` (API version and paths), the only module
both sides import. Every frozen linear product of the owner's model goes through a
:class:`~hetune.protocols.hybrid_lora.owner.backends.FrozenBackend`.
"""
