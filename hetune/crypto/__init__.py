"""Homomorphic-encryption primitives. Heavy extension imports happen inside functions."""
