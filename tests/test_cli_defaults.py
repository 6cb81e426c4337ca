"""Every CLI default equals its config dataclass's default: the defaults have one home."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import typer

from hetune.cli import app


def _configs():
    from hetune.compile.compiler import CompileConfig
    from hetune.models.pretrain import PretrainConfig
    from hetune.protocols.hybrid_lora.owner.converge import ConvergeConfig
    from hetune.protocols.hybrid_lora.owner.demo import DemoConfig
    from hetune.protocols.hybrid_lora.owner.train import TrainConfig
    from hetune.protocols.hybrid_lora.worker.ray_serve import RayServeConfig
    from hetune.protocols.hybrid_lora.worker.server import ServeConfig
    from hetune.protocols.privtuner.federate import FederateConfig
    from hetune.protocols.privtuner.run import PlanConfig
    from hetune.protocols.sfprompt.config import SfpromptConfig
    from hetune.protocols.she_lora.config import SheLoraConfig
    from hetune.quant.config import QuantConfig

    return {
        ("compile",): (CompileConfig, QuantConfig),
        ("serve",): (ServeConfig, RayServeConfig),
        ("train",): (TrainConfig,),
        ("demo",): (DemoConfig,),
        ("pretrain",): (PretrainConfig,),
        ("converge",): (ConvergeConfig, QuantConfig),
        ("federate", "she-lora"): (SheLoraConfig,),
        ("federate", "sfprompt"): (SfpromptConfig,),
        ("plan", "privtuner"): (PlanConfig,),
        ("federate", "privtuner"): (FederateConfig,),
    }


# Where a command's default rightly differs: the library writes no files unless asked, the command does.
DIFFERENT = {("federate", "sfprompt"): {"out"}}


def _command(path: tuple[str, ...]):
    cmd = typer.main.get_command(app)
    for name in path:
        cmd = cmd.commands[name]
    return cmd


def _field_defaults(config) -> dict:
    out = {}
    for f in dataclasses.fields(config):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _same(cli, field) -> bool:
    if cli is None and field in ((), None):  # an option left out means "none"
        return True
    if isinstance(field, Path) or isinstance(cli, Path):
        return cli is not None and field is not None and Path(cli) == Path(field)
    if isinstance(field, (tuple, list)) and isinstance(cli, (tuple, list)):
        return tuple(cli) == tuple(field)
    if isinstance(field, tuple) and isinstance(cli, str):  # "2,4,8" or "1:1" on the command line
        return re.split(r"[,:]", cli) == [str(v) for v in field]
    return cli == field


@pytest.mark.parametrize("path", list(_configs()), ids=" ".join)
def test_cli_defaults_equal_the_config_defaults(path):
    defaults = {}
    for config in _configs()[path]:
        defaults.update({k: v for k, v in _field_defaults(config).items() if k not in defaults})
    params = [p for p in _command(path).params
              if p.name in defaults and not p.required and p.name not in DIFFERENT.get(path, ())]
    assert params, f"{' '.join(path)}: no option matches a field of its config"
    wrong = {p.name: (p.default, defaults[p.name]) for p in params if not _same(p.default, defaults[p.name])}
    assert not wrong, f"hetune {' '.join(path)}: CLI default vs dataclass default differ: {wrong}"
