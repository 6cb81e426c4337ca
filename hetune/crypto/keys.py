"""The data owner's keys, per scheme: made in the training process, never sent anywhere.

Only the data owner imports this module and the key modules it names; the worker's code
reaches schemes through :mod:`hetune.crypto.registry`, which holds no secret-key type
(tests/test_layout.py checks the imports).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from hetune.crypto import glwe_keys, rlwe_keys
from hetune.crypto.registry import get_scheme
from hetune.crypto.scheme import ClientKeys

_KEYS: dict[str, tuple[Callable[[str], ClientKeys], Callable[[Path], ClientKeys]]] = {
    "rlwe": (rlwe_keys.generate, rlwe_keys.load),
    "glwe": (glwe_keys.generate, glwe_keys.load),
}


def register_keys(scheme: str, generate: Callable[[str], ClientKeys], load: Callable[[Path], ClientKeys]) -> None:
    get_scheme(scheme)  # a key module belongs to a registered scheme
    _KEYS[scheme] = (generate, load)


def generate_keys(scheme: str | None = None, param_set: str | None = None) -> ClientKeys:
    """Fresh keys for ``scheme``'s ``param_set`` (each defaults to the scheme's or the registry's default)."""
    sch = get_scheme(scheme)
    return _KEYS[sch.name][0](sch.resolve(param_set).name)


def load_keys(path: Path, scheme: str | None = None) -> ClientKeys:
    """Keys written by ``ClientKeys.save`` (``--save-key``)."""
    return _KEYS[get_scheme(scheme).name][1](Path(path))


def fixed_mask_keys(param_set: str | None, cache_root: Path) -> rlwe_keys.FixedMaskKeys:
    """Batched RLWE with fixed masks and a fresh secret per product: hints cached under ``cache_root``."""
    return rlwe_keys.fixed_masks(param_set, cache_root)
