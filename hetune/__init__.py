"""hetune: private LoRA fine-tuning of open LLMs with homomorphic encryption.

The data owner keeps data, secret key and adapters; a remote worker multiplies
encrypted activations and gradients by the frozen, integer-quantized base weights.
Heavy dependencies (torch, transformers, concrete-ml) are imported lazily by the
modules that need them, so ``import hetune`` stays cheap.
"""

__version__ = "0.1.0"
