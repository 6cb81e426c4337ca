"""The registry that names encryption schemes (the public, worker-safe half of each).

A new scheme is one module with a :class:`~hetune.crypto.scheme.Scheme` (imported here
or passed to :func:`register_scheme`) and, for the data owner, a key module registered
in :mod:`hetune.crypto.keys`.
"""

from __future__ import annotations

from hetune.crypto import glwe, rlwe
from hetune.crypto.scheme import ParamSet, Scheme
from hetune.errors import ConfigError

DEFAULT_SCHEME = rlwe.NAME

_SCHEMES: dict[str, Scheme] = {}


def register_scheme(scheme: Scheme) -> Scheme:
    if not scheme.name.isidentifier() or scheme.name in _SCHEMES:
        raise ValueError(f"scheme name {scheme.name!r} is invalid or already registered")
    if scheme.default_param_set not in scheme.param_sets:
        raise ValueError(f"{scheme.name}: default set {scheme.default_param_set!r} is not one of its sets")
    _SCHEMES[scheme.name] = scheme
    return scheme


for _builtin in (rlwe.SCHEME, glwe.SCHEME):
    register_scheme(_builtin)


def scheme_names() -> tuple[str, ...]:
    return tuple(_SCHEMES)


def get_scheme(name: str | None = None) -> Scheme:
    """The registered scheme (default: batched RLWE); ConfigError naming the choices otherwise."""
    name = name or DEFAULT_SCHEME
    if name not in _SCHEMES:
        raise ConfigError(f"encryption scheme {name!r} is unknown", f"choose one of {', '.join(_SCHEMES)}")
    return _SCHEMES[name]


def resolve_params(scheme: str | None, param_set: str | None) -> ParamSet:
    return get_scheme(scheme).resolve(param_set)


def describe_param_sets() -> str:
    """One line per registered scheme and allow-listed set: security, ring degree, budget, exactness, sizes."""
    lines = [f"{'scheme':<6} {'set':<5} {'bits':>5} {'N':>5} {'budget':>6} {'result':>10} {'session key':>11} {'B/input value':>13}"]
    for name in scheme_names():
        scheme = get_scheme(name)
        for set_name in scheme.param_sets:
            p = scheme.params(set_name)
            mark = "*" if p.security.extrapolated else ""
            n = p.poly_size
            per_value = (scheme.request_bytes(p, n, n) - scheme.request_bytes(p, n, 0)) / (n * n)
            result = "exact" if p.exact else f"+-{p.noise_bound}"
            default = " (default)" if name == DEFAULT_SCHEME and set_name == scheme.default_param_set else ""
            lines.append(f"{name:<6} {set_name:<5} {p.security.bits:>4}{mark:1} {p.poly_size:>5} {p.budget_bits:>4} b "
                         f"{result:>10} {p.session_key_bytes / 2**20:>7.0f} MiB {per_value:>13.2f}{default}")
    lines.append("bits: largest lattice-estimator curve level met (Zama's security curves, q = 2^64, binary secrets);")
    lines.append("* dimension beyond the curves' fitted range (n <= 2048): extrapolated, cross-checked with the HE standard")
    return "\n".join(lines)
