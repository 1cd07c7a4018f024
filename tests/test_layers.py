"""The import-linter layers contract (pyproject.toml) names every module of billing and workers,
so no module escapes the architecture check that ``make lint`` runs."""

from __future__ import annotations

import pkgutil
import tomllib
from pathlib import Path

import billing

ROOT = Path(__file__).resolve().parent.parent


def layered_modules() -> set[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contracts = config["tool"]["importlinter"]["contracts"]
    (layers,) = [contract["layers"] for contract in contracts if contract["type"] == "layers"]
    return {name.strip() for layer in layers for name in layer.split("|")}


def test_every_top_level_module_is_in_a_layer() -> None:
    modules = {f"billing.{module.name}" for module in pkgutil.iter_modules(billing.__path__)}
    assert "billing.core" in modules  # the walk found the package
    assert modules - layered_modules() == set()


def test_the_layers_name_only_modules_that_exist() -> None:
    modules = {f"billing.{module.name}" for module in pkgutil.iter_modules(billing.__path__)}
    assert layered_modules() - modules == {"workers"}
