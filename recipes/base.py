"""Recipe registry: a recipe is a named default config (plus a CI-sized ``small`` variant) and a function
``fn(out, *, seed, progress, overwrite, resume, **config) -> Run`` that writes a run folder."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..models import Run

__all__ = ["Recipe", "RECIPES", "recipe_function", "register_recipe", "resolve_config", "run_recipe"]


@dataclass(frozen=True)
class Recipe:
    """A phenomenon recipe: ``config`` is the full default, ``small`` the overrides of the CI/demo variant."""

    name: str
    phenomenon: str
    description: str
    fn: Callable[..., Run]
    config: Mapping[str, Any]
    small: Mapping[str, Any] = field(default_factory=dict)
    gpu_only: bool = False

    def resolve(self, *, small: bool = False, **overrides: Any) -> dict[str, Any]:
        """The config used by :meth:`run`: defaults, then ``small`` overrides, then ``overrides``."""
        return resolve_config(self, small=small, **overrides)

    def run(
        self,
        out: str | os.PathLike[str],
        *,
        small: bool = False,
        seed: int = 0,
        progress: Any = True,
        overwrite: bool = False,
        resume: bool = True,
        **overrides: Any,
    ) -> Run:
        """Run the recipe into folder ``out`` and return its :class:`Run`."""
        cfg = self.resolve(small=small, **overrides)
        return self.fn(out, seed=seed, progress=progress, overwrite=overwrite, resume=resume, **cfg)


RECIPES: dict[str, Recipe] = {}


def register_recipe(recipe: Recipe) -> Recipe:
    if recipe.name in RECIPES and RECIPES[recipe.name] is not recipe:
        raise ValueError(f"recipe {recipe.name!r} is already registered")
    RECIPES[recipe.name] = recipe
    return recipe


def check_config_keys(name: str, given: Any, accepted: Any) -> None:
    """``ValueError`` naming the recipe, the unknown keys and the accepted ones."""
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        raise ValueError(f"recipe {name!r}: unknown config keys {unknown}; accepted: {sorted(accepted)}")


def recipe_function(
    name: str, defaults: Mapping[str, Any], *, accepted: Mapping[str, Any] | None = None
) -> Callable[[Callable[..., Run]], Callable[..., Run]]:
    """Give a recipe body ``body(out, cfg, seed, progress, overwrite, resume) -> Run`` the public signature
    ``fn(out, *, seed=0, progress=True, overwrite=False, resume=True, **config) -> Run``: the config keys
    are checked against ``accepted`` (default: ``defaults``) and ``cfg = {**defaults, **config}``."""

    def wrap(body: Callable[..., Run]) -> Callable[..., Run]:
        def fn(
            out: str | os.PathLike[str],
            *,
            seed: int = 0,
            progress: Any = True,
            overwrite: bool = False,
            resume: bool = True,
            **config: Any,
        ) -> Run:
            check_config_keys(name, config, defaults if accepted is None else accepted)
            return body(out, {**defaults, **config}, seed, progress, overwrite, resume)

        fn.__name__, fn.__qualname__, fn.__doc__, fn.__module__ = (
            body.__name__, body.__qualname__, body.__doc__, body.__module__
        )  # fmt: skip
        return fn

    return wrap


def resolve_config(recipe: Recipe, *, small: bool = False, **overrides: Any) -> dict[str, Any]:
    cfg = dict(recipe.config)
    if small:
        cfg.update(recipe.small)
    check_config_keys(recipe.name, overrides, cfg)
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    return cfg


def run_recipe(name: str, out: str | os.PathLike[str], **kwargs: Any) -> Run:
    """``RECIPES[name].run(out, **kwargs)`` with a clear error for an unknown name."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; available: {', '.join(sorted(RECIPES))}")
    return RECIPES[name].run(out, **kwargs)
