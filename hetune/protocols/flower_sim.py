"""Run a Flower ServerApp + ClientApp on Flower's simulation engine (Ray), quietly.

The same apps run as a real deployment (SuperLink + SuperNodes); only this launcher is
simulation-specific. Flower's own INFO logging is lowered to WARNING unless asked.
"""

from __future__ import annotations

import logging
import os


def run_flower_simulation(server_app, client_app, num_clients: int, cpus_per_client: float = 1.0, verbose: bool = False) -> None:
    """Run the apps with ``num_clients`` SuperNodes; returns when the ServerApp finishes."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    from flwr.common.logger import FLOWER_LOGGER
    from flwr.simulation import run_simulation

    FLOWER_LOGGER.setLevel(logging.INFO if verbose else logging.WARNING)
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=num_clients,
        backend_config={
            "client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0},
            "init_args": {"logging_level": logging.WARNING, "log_to_driver": verbose, "include_dashboard": False},
        },
        verbose_logging=verbose,
    )
