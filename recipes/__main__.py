"""``python -m dynascope.recipes NAME --out DIR [--small] [--steps N] [--seed S] [--set key=value ...]``.

``python -m dynascope.recipes list`` prints the recipes. After training, the phenomenon's detector runs
on the folder and its evidence is printed as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv: list[str] | None = None) -> int:
    from . import RECIPES, detect

    ap = argparse.ArgumentParser(prog="python -m dynascope.recipes", description=__doc__.split("\n")[0])
    ap.add_argument("name", help="recipe name, or 'list'")
    ap.add_argument("--out", help="run folder to write (default runs/<name>)")
    ap.add_argument("--small", action="store_true", help="the CI/demo-sized variant")
    ap.add_argument("--steps", type=int, help="training steps (recipes that train)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", help="cpu (default) or cuda")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads")
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (JSON value)"
    )
    ap.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    ap.add_argument("--no-resume", action="store_true", help="start over instead of resuming")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)

    if args.name == "list":
        for r in RECIPES.values():
            print(f"{r.name:28s} {r.description}")
        return 0
    if args.name not in RECIPES:
        print(f"unknown recipe {args.name!r}; available: {', '.join(RECIPES)}", file=sys.stderr)
        return 2
    recipe = RECIPES[args.name]
    overrides: dict[str, Any] = {}
    for item in args.set:
        if "=" not in item:
            print(f"--set expects KEY=VALUE, got {item!r}", file=sys.stderr)
            return 2
        k, v = item.split("=", 1)
        overrides[k.strip()] = _value(v)
    if args.steps is not None:
        overrides["steps"] = args.steps
    if args.device is not None:
        overrides["device"] = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or f"runs/{args.name}"
    t0 = time.perf_counter()
    try:
        run = recipe.run(
            out,
            small=args.small,
            seed=args.seed,
            progress=not args.quiet,
            overwrite=args.overwrite,
            resume=not args.no_resume,
            **overrides,
        )
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    wall = time.perf_counter() - t0
    print(f"{args.name}: wrote {run.path} in {wall:.1f} s")
    try:
        print(json.dumps(detect(run).to_dict(), indent=2))
    except ValueError as e:
        print(f"detector: {e}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
