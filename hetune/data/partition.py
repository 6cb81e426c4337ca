"""Non-IID splits of a labelled dataset across federated clients."""

from __future__ import annotations

import numpy as np

from hetune.errors import ConfigError


def dirichlet_split(labels: np.ndarray, num_clients: int, alpha: float, seed: int = 0, min_size: int = 1) -> list[np.ndarray]:
    """Split sample indices by label with per-class client shares ~ Dirichlet(alpha).

    Small alpha gives each client a few dominant classes (alpha 0.3 is the usual
    "strongly non-IID" setting). Draws are repeated until every client holds at least
    ``min_size`` samples, so no client starts a round with an empty dataset.
    """
    labels = np.asarray(labels)
    if num_clients < 1:
        raise ConfigError(f"num_clients must be >= 1, got {num_clients}", "pass at least one client")
    if alpha <= 0:
        raise ConfigError(f"Dirichlet alpha must be > 0, got {alpha}", "use e.g. 0.3 (non-IID) or 100 (near IID)")
    if len(labels) < num_clients * min_size:
        raise ConfigError(
            f"{len(labels)} samples cannot give {num_clients} clients {min_size} each",
            "use fewer clients or more data",
        )
    rng = np.random.default_rng(seed)
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for cls in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == cls))
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.array(p, dtype=np.int64)) for p in parts]
    raise ConfigError(
        f"could not draw a Dirichlet(alpha={alpha}) split giving every one of {num_clients} clients {min_size} samples",
        "raise alpha, lower min_size, or use fewer clients",
    )
