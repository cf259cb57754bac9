"""Subcommands of the ``dynascope`` console command: ``probe``, ``export``, ``recipe``, ``runs``.

Imported by :mod:`dynascope.cli`, which registers them; heavy imports (torch, pandas) happen inside
the commands. Exit codes: 0 success, 2 bad input (one readable line: unknown probe, bad ``--param``,
not a run folder, corrupt checkpoint, ...), 1 an unexpected failure (one line; the traceback with
``DYNASCOPE_DEBUG=1``).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dynascope.cli import UsageError, command

_CKPT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


# ------------------------------------------------------------------------------------------ helpers
def guarded(
    name: str,
) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    """Map bad input (``ValueError`` and friends) to :class:`UsageError` (exit 2) and anything else
    to one line and exit 1 (re-raised when ``DYNASCOPE_DEBUG`` is set)."""

    def wrap(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        @functools.wraps(fn)
        def run(args: argparse.Namespace) -> int:
            try:
                return fn(args)
            except (UsageError, KeyboardInterrupt, BrokenPipeError):
                raise
            except (ValueError, FileNotFoundError, NotADirectoryError) as exc:
                raise UsageError(
                    str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
                ) from None
            except Exception as exc:  # noqa: BLE001
                if os.environ.get("DYNASCOPE_DEBUG"):
                    raise
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                print(
                    f"dynascope {name}: unexpected error: {type(exc).__name__}: {first} "
                    "(set DYNASCOPE_DEBUG=1 for the traceback)",
                    file=sys.stderr,
                )
                return 1

        return run

    return wrap


def parse_value(text: str) -> Any:
    """A ``--param`` value: JSON when it parses (``5``, ``1e-3``, ``true``, ``[1, 2]``), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


_DTYPES = {"float64": "float64", "double": "float64", "float32": "float32", "float": "float32",
           "float16": "float16", "half": "float16", "bfloat16": "bfloat16"}  # fmt: skip


def parse_params(pairs: list[str], spec: Any) -> dict[str, Any]:
    """``["k=5", "method=hutch++"]`` → ``{"k": 5, "method": "hutch++"}``, checked against the signature.

    Names must be keyword parameters of the probe (not ``device``/``reduce_fn``, which the CLI sets);
    a value must match the type of the parameter's default (ints stay ints, ints widen to floats);
    ``dtype`` takes ``float64``/``float32``/... .
    """
    import torch

    from dynascope.runner import RESERVED_PARAMS

    accepted = spec.parameters()
    reserved = {"device": "--device", "reduce_fn": "torchrun"}
    reserved.update({n: None for n in RESERVED_PARAMS if n not in reserved})
    out: dict[str, Any] = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        name = name.strip()
        if not sep or not name:
            raise UsageError(f"--param expects NAME=VALUE, got {pair!r}")
        if name in reserved:
            how = f" (use {reserved[name]})" if reserved[name] else ""
            raise UsageError(f"parameter {name!r} cannot be set with --param{how}")
        if name not in accepted:
            valid = ", ".join(n for n in accepted if n not in reserved)
            raise UsageError(f"probe {spec.name!r} has no parameter {name!r}; valid: {valid}")
        value = parse_value(raw)
        if name == "dtype":
            key = str(value).removeprefix("torch.")
            if key not in _DTYPES:
                raise UsageError(f"dtype must be one of {sorted(_DTYPES)}, got {raw!r}")
            value = getattr(torch, _DTYPES[key])
        else:
            default = accepted[name].default
            if isinstance(default, bool) and not isinstance(value, bool):
                raise UsageError(f"parameter {name!r} takes true/false, got {raw!r}")
            if isinstance(default, int) and not isinstance(default, bool):
                if isinstance(value, bool) or not isinstance(value, int):
                    raise UsageError(f"parameter {name!r} takes an integer, got {raw!r}")
            if isinstance(default, float) and not isinstance(value, bool) and isinstance(value, int):
                value = float(value)
            if isinstance(default, float) and (
                isinstance(value, bool) or not isinstance(value, (int, float))
            ):
                raise UsageError(f"parameter {name!r} takes a number, got {raw!r}")
        out[name] = value
    return out


def _json_arg(text: str, what: str, forms: tuple[str, ...] = ("name",)) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{what} is not valid JSON ({exc.msg} at character {exc.pos}): {text!r}") from None
    if not isinstance(value, dict) or not any(isinstance(value.get(k), str) for k in forms):
        others = " or ".join(f'"{k}"' for k in forms[1:])
        raise UsageError(
            f'{what} must be a JSON object with a "name"{", " + others if others else ""}, '
            f'e.g. {{"name": "mlp", ...}}; got {text!r}'
        )
    return value


def model_spec_arg(text: str, what: str = "--model-config") -> dict[str, Any]:
    """``--model``/``--model-config``: a JSON model spec (``{"name": ...}``, ``{"factory": ..., "kwargs":
    ...}``, ``{"hf": folder}``) or the shorthand ``module:function`` / ``path/file.py:function``."""
    from dynascope.datasets import is_factory_ref

    text = text.strip()
    if not text.startswith("{") and is_factory_ref(text):
        return {"factory": text}
    return _json_arg(text, what, ("name", "factory", "hf"))


def dataset_arg(text: str, what: str = "--dataset") -> dict[str, Any]:
    """``--dataset``: a registered name (``digits``), ``module:function`` (a data factory) or a JSON data spec
    (``{"name": "xor", "n_train": 64}``, ``{"file": "d.safetensors", "x": "x", "y": "y"}``, ...)."""
    from dynascope.datasets import is_factory_ref

    text = text.strip()
    if text.startswith("{"):
        return _json_arg(text, what, ("name", "file", "factory"))
    return {"factory": text} if is_factory_ref(text) else {"name": text}


def loss_arg(text: str) -> str | dict[str, Any]:
    """``--loss``: a name (``cross_entropy``, ``token_cross_entropy``, ...), ``module:function`` or a JSON
    spec with options (``{"name": "token_cross_entropy", "shift": true}``)."""
    text = text.strip()
    return _json_arg(text, "--loss") if text.startswith("{") else text


def store_folder(text: str) -> Path:
    """``--store``: a folder (created) for ``results.sqlite``, or a path ending in ``.sqlite``."""
    path = Path(text)
    if path.suffix == ".sqlite":
        return path
    if path.exists() and not path.is_dir():
        raise UsageError(f"--store '{path}' is a file; give a folder (or a path ending in .sqlite)")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, list):
        head = ", ".join(_fmt(e) for e in v[:6])
        return f"[{head}{', …' if len(v) > 6 else ''}]"
    return str(v)


def summarize(result: Any, width: int = 160) -> str:
    """One compact line: the result's scalars and short vectors (``values=[3.2, 1.1, …]``)."""
    parts = []
    for name, value in result.to_dict().items():
        if name == "meta":
            continue
        if isinstance(value, (int, float, bool)) or value is None:
            parts.append(f"{name}={_fmt(value)}")
        elif isinstance(value, list) and value and all(isinstance(e, (int, float)) for e in value):
            if len(value) <= 16:
                parts.append(f"{name}={_fmt(value)}")
    line = "  ".join(parts) or type(result).__name__
    return line if len(line) <= width else line[: width - 1] + "…"


# ------------------------------------------------------------------------------------ bare checkpoints
def resolve_target(args: argparse.Namespace) -> Any:
    """The run (or :class:`~dynascope.models.CheckpointFile`) and the steps ``probe`` should visit."""
    from dynascope.models import CheckpointFile, Run

    path = Path(args.target)
    if not path.exists():
        raise UsageError(f"'{path}' does not exist (expected a run folder or a checkpoint file)")
    bare_opts = args.model_config is not None or args.dataset is not None
    step = args.step
    trust = bool(getattr(args, "trust", False))
    if path.is_file() and path.parent.name == "checkpoints" and Run.is_run(path.parent.parent):
        run = Run.open(path.parent.parent, trust=trust)  # a checkpoint inside a run folder: use the run
        matches = [c.step for c in run.checkpoints() if c.path.resolve() == path.resolve()]
        if matches:
            if args.all or args.steps or (step is not None and step != matches[0]):
                raise UsageError(
                    f"'{path}' is the checkpoint of step {matches[0]}; drop --all/--step/--steps"
                )
            return run, [matches[0]]
    if path.is_dir():
        if bare_opts:
            raise UsageError("--model-config/--dataset apply to bare checkpoint files, not run folders")
        run = Run.open(path, trust=trust)
        steps = run.steps()
        if not steps:
            raise UsageError(f"run '{path}' has no checkpoints")
        if args.all:
            return run, steps
        if args.steps:
            absent = [s for s in args.steps if s not in steps]
            if absent:
                raise UsageError(f"run '{path}' has no checkpoint at step(s) {absent}; steps: {steps}")
            return run, list(args.steps)
        if step is not None and step not in steps:
            raise UsageError(f"run '{path}' has no checkpoint at step {step}; steps: {steps}")
        return run, [step if step is not None else steps[-1]]
    if args.all or args.steps:
        raise UsageError("--all/--steps need a run folder, not a single checkpoint file")
    target = CheckpointFile(
        path,
        model_config=model_spec_arg(args.model_config) if args.model_config else None,
        dataset_config=dataset_arg(args.dataset) if args.dataset else None,
        loss=loss_arg(args.loss) if args.loss else None,
        store_dir=store_folder(args.store) if args.store else None,
        trust=trust,
    )
    return target, [target.checkpoint(step).step]


# -------------------------------------------------------------------------------------------- probe
def _probe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("probe", nargs="?", default=None, help="probe name (without one: list the probes)")
    p.add_argument(
        "target",
        nargs="?",
        default=None,
        help="run folder, or a checkpoint file (bare: with --model-config/--dataset); without one: list "
        "the probe's parameters",
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
    which.add_argument("--all", action="store_true", help="every checkpoint of the run")
    which.add_argument(
        "--steps",
        type=_int_list,
        default=None,
        metavar="S,S,...",
        help="these checkpoint steps (ntk_trajectory: the checkpoints of one trajectory)",
    )
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="probe parameter (JSON value or string), repeatable: --param k=10 --param tol=1e-5",
    )
    p.add_argument("--max-samples", type=int, default=None, help="use N samples of the split (see --sample)")
    p.add_argument(
        "--sample",
        choices=("first", "stratified"),
        default="first",
        help="which N samples --max-samples keeps: the first N (default) or a class-stratified subset "
        "(the app's default on large splits: its cached results are reused)",
    )
    p.add_argument(
        "--split", choices=("train", "test"), default="train", help="dataset split (default train)"
    )
    p.add_argument(
        "--device", default=None, help="cpu, cuda or cuda:I (under torchrun: cuda → cuda:LOCAL_RANK)"
    )
    p.add_argument("--seed", type=int, default=None, help="seed for the probe's random vectors (and torch)")
    p.add_argument("--recompute", action="store_true", help="ignore cached results")
    p.add_argument(
        "--model-config",
        default=None,
        metavar="SPEC",
        help='bare checkpoints: a model spec, \'{"name": "mlp", "in_dim": 64, ...}\', '
        '\'{"factory": "pkg.mod:fn", "kwargs": {...}}\', \'{"hf": "folder"}\' or pkg.mod:fn',
    )
    p.add_argument(
        "--dataset",
        default=None,
        metavar="SPEC",
        help='bare checkpoints: dataset name, pkg.mod:fn or a JSON data spec ({"file": ...} ...)',
    )
    p.add_argument(
        "--loss",
        default=None,
        metavar="SPEC",
        help="loss: cross_entropy, mse, half_sse, token_cross_entropy, pkg.mod:fn or a JSON spec "
        '(\'{"name": "token_cross_entropy", "shift": true}\'); default: the run\'s',
    )
    p.add_argument(
        "--store",
        default=None,
        metavar="DIR",
        help="result store folder (default: the run folder / the checkpoint's folder)",
    )
    p.add_argument(
        "--distribute",
        choices=("auto", "data", "checkpoints"),
        default="auto",
        help="under torchrun: shard the data of each checkpoint, or split checkpoints (default auto)",
    )
    p.add_argument(
        "--shard",
        choices=("fsdp", "ddp"),
        default=None,
        help="under torchrun: shard the model over the ranks (FSDP2 fully_shard, or DDP) and the data "
        "with it; every rank reads the checkpoint, rank 0 writes (Hessian spectral probes)",
    )
    p.add_argument(
        "--other",
        default=None,
        metavar="RUN|CKPT",
        help="lmc_barrier: the second model's run folder or checkpoint (same options as the target)",
    )
    p.add_argument(
        "--other-step", type=int, default=None, help="lmc_barrier: step of --other (default: last)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object per checkpoint")  # fmt: skip
    p.add_argument("--trust", action="store_true",
                   help="trust the code named by the specs of the run (or file), and remember it")


def _int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


@command("probe", "run a probe on one checkpoint or every checkpoint of a run (results cached)", _probe_args)
@guarded("probe")
def run_probe_command(args: argparse.Namespace) -> int:
    from dynascope.runner import PROBES

    if args.probe is not None and args.probe not in PROBES:
        raise UsageError(f"unknown probe {args.probe!r}; choose one of {', '.join(sorted(PROBES))}")
    if args.target is None:
        return _list_probes(args.probe)
    spec = PROBES[args.probe]
    if args.max_samples is not None and args.max_samples < 1:
        raise UsageError(f"--max-samples must be >= 1, got {args.max_samples}")
    params = parse_params(args.param, spec)
    if args.loss and spec.uses_loss and spec.accepts("loss") and Path(args.target).is_dir():
        params.setdefault("loss", loss_arg(args.loss))
    if args.seed is not None:
        if spec.accepts("seed"):
            params.setdefault("seed", args.seed)
    if args.device is not None and not (args.device == "cpu" or args.device.startswith(("cuda", "mps"))):
        raise UsageError(f"--device must be cpu, cuda, cuda:I or mps; got {args.device!r}")
    target, steps = resolve_target(args)
    if spec.inputs != "model":
        return _run_multi_checkpoint(args, spec, target, steps, params)

    import torch

    from dynascope.distributed import distributed_sweep, init_from_env
    from dynascope.runner import TqdmProgress
    from dynascope.store import ResultStore

    if args.seed is not None:
        torch.manual_seed(args.seed)
    if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda: CUDA is not available")
    if args.shard is not None and int(os.environ.get("WORLD_SIZE") or 1) < 2:
        raise UsageError(f"--shard {args.shard} shards the model over ranks: start it with torchrun")
    ctx = init_from_env(args.device)
    try:
        store = ResultStore(store_folder(args.store)) if args.store else ResultStore(target.path)
        bar = TqdmProgress(args.probe, file=sys.stderr) if ctx.is_main and len(steps) > 1 else None
        try:
            rows = distributed_sweep(
                target, args.probe, steps, ctx, strategy=args.distribute, store=store,
                recompute=args.recompute, progress=bar, params=params, split=args.split,
                max_samples=args.max_samples, sample=args.sample,
                device=ctx.device if ctx.active else args.device, shard=args.shard,
            )  # fmt: skip
            if ctx.active:  # every rank past its last collective before any tears the group down
                torch.distributed.barrier()
        finally:
            if bar is not None:
                bar.close()
    finally:
        ctx.shutdown()
    if rows is None:  # not rank 0
        return 0
    for step, result, cached in rows:
        if args.json:
            print(
                json.dumps({"probe": args.probe, "step": step, "cached": cached, "result": result.to_dict()})
            )
        else:
            print(f"{args.probe} step {step}{' (cached)' if cached else ''}: {summarize(result)}")
    if not args.json:
        n_cached = sum(c for _, _, c in rows)
        where = store.path
        dist = f" over {ctx.world_size} ranks" if ctx.active else ""
        print(
            f"{len(rows)} checkpoint(s){dist}: {len(rows) - n_cached} computed, {n_cached} cached → {where}"
        )
    return 0


def _run_multi_checkpoint(
    args: argparse.Namespace, spec: Any, target: Any, steps: list[int], params: dict[str, Any]
) -> int:
    """``ntk_trajectory`` over ``steps`` (default: every checkpoint) or ``lmc_barrier`` between the
    target's checkpoint and ``--other``: one evaluation in one process, through the runner's cache."""
    from dynascope.runner import run_probe
    from dynascope.store import ResultStore

    if int(os.environ.get("WORLD_SIZE") or 1) > 1:
        raise UsageError(f"probe {spec.name!r} runs in one process; start it without torchrun")
    where: dict[str, Any] = {}
    if spec.inputs == "checkpoints":
        if not (args.all or args.steps or args.step is not None):
            steps = target.steps()
        if len(steps) < 2:
            raise UsageError(f"probe {spec.name!r} needs at least two checkpoints (--steps S,S,... or --all)")
        where["steps"] = steps
    else:
        if args.other is None:
            raise UsageError(f"probe {spec.name!r} compares two checkpoints: pass --other RUN|CHECKPOINT")
        if len(steps) != 1:
            raise UsageError(
                f"probe {spec.name!r} takes one checkpoint of the target (--step), not --all/--steps"
            )
        other_args = argparse.Namespace(
            **{**vars(args), "target": args.other, "step": args.other_step, "all": False, "steps": None}
        )
        other, (other_step,) = resolve_target(other_args)
        where.update(step=steps[0], other=(other, other_step))
    store = ResultStore(store_folder(args.store)) if args.store else ResultStore(target.path)
    result, cached = run_probe(
        target, spec.name, params=params, split=args.split, max_samples=args.max_samples, sample=args.sample,
        store=store,
        recompute=args.recompute, device=args.device, **where,
    )  # fmt: skip
    which = where.get("steps") or [where["step"], where["other"][1]]
    if args.json:
        print(json.dumps({"probe": spec.name, "steps": which, "cached": cached, "result": result.to_dict()}))
    else:
        print(f"{spec.name} steps {','.join(map(str, which))}{' (cached)' if cached else ''}: "
              f"{summarize(result)}")  # fmt: skip
        print(f"1 evaluation: {'cached' if cached else 'computed'} → {store.path}")
    return 0


def _list_probes(name: str | None) -> int:
    """``dynascope probe``: every probe the runner can evaluate; ``dynascope probe NAME``: its parameters."""
    from dynascope.runner import PROBES, RESERVED_PARAMS

    if name is not None:
        spec = PROBES[name]
        print(f"{spec.name}: {spec.description}  (function dynascope.probes.{spec.function})")
        for pname, par in spec.parameters().items():
            if pname in RESERVED_PARAMS:
                continue
            default = spec.defaults.get(pname, par.default)
            print(f"  --param {pname}={default!r}")
        return 0
    for spec in PROBES.values():
        shard = "  [data-shardable]" if spec.shardable else ""
        print(f"{spec.name:<22} {spec.description}{shard}")
    return 0


# ------------------------------------------------------------------------------------------- export
def _export_args(p: argparse.ArgumentParser) -> None:
    from dynascope.export import FORMATS

    p.add_argument("run", help="run folder (or a folder holding results.sqlite)")
    p.add_argument("--probe", required=True, help="probe whose cached results to export")
    p.add_argument(
        "--format",
        choices=FORMATS,
        default=None,
        help="output format (default: from the --out suffix): csv/parquet (tidy: one row per step and "
        "quantity, parameters in <stem>.params.json), json (every result whole), html, png, svg, pdf "
        "(every checkpoint on the x axis; images need Chrome/Chromium)",
    )
    p.add_argument("--out", required=True,
                   help="output file; its folder must exist (not created); a file is replaced")  # fmt: skip
    p.add_argument("--step", type=int, default=None, help="only the result at this checkpoint step")


@command("export", "export cached probe results (csv, parquet, json, html, png, svg, pdf)", _export_args)
@guarded("export")
def run_export_command(args: argparse.Namespace) -> int:
    from dynascope.export import FORMATS, export_results
    from dynascope.models import Run
    from dynascope.store import STORE_FILENAME, ResultStore

    fmt = args.format or Path(args.out).suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise UsageError(
            f"cannot tell the format from --out {args.out!r}; pass --format {{{','.join(FORMATS)}}}"
        )
    out_path = Path(args.out)
    if out_path.is_dir():
        example = out_path / f"results.{fmt}"
        raise UsageError(f"--out '{out_path}' is a folder; give a file name, e.g. {example}")
    if not out_path.parent.is_dir():
        raise UsageError(f"the folder of --out '{out_path}' does not exist ({out_path.parent}); create it")
    path = Path(args.run)
    if path.is_file() and path.suffix == ".sqlite":
        store_path = path
    elif path.is_dir() and (Run.is_run(path) or (path / STORE_FILENAME).is_file()):
        if Run.is_run(path):
            Run.open(path)  # readable error for a malformed run.json
        store_path = path / STORE_FILENAME
        if not store_path.is_file():
            raise UsageError(
                f"run '{path}' has no cached results yet; run `dynascope probe {args.probe} {path}`"
            )
    elif path.is_dir():
        raise UsageError(f"'{path}' is not a run folder (no run.json) and holds no {STORE_FILENAME}")
    else:
        raise UsageError(f"'{path}' does not exist (expected a run folder)")
    out = export_results(ResultStore(store_path), args.probe, fmt, args.out, step=args.step)
    print(f"wrote {out}")
    return 0


# ------------------------------------------------------------------------------------------- recipe
def _recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="recipe name (e.g. grokking, double_descent, edge_of_stability)")
    p.add_argument("--out", default=None, help="run folder to write")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="further options passed to the recipe")


@command("recipe", "train a phenomena recipe into a run folder", _recipe_args)
@guarded("recipe")
def run_recipe_command(args: argparse.Namespace) -> int:
    argv = [args.name] + (["--out", args.out] if args.out else []) + list(args.extra)
    try:
        has_main = importlib.util.find_spec("dynascope.recipes.__main__") is not None
    except ModuleNotFoundError:
        has_main = False
    if has_main:
        return subprocess.call([sys.executable, "-m", "dynascope.recipes", *argv])
    entry = getattr(importlib.import_module("dynascope.recipes"), "main", None)
    if callable(entry):
        return int(entry(argv) or 0)
    raise UsageError("no training recipes are installed (dynascope.recipes has no entry point)")


# --------------------------------------------------------------------------------------------- runs
def _import_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "folder",
        help="checkpoint folder: Hugging Face Trainer output (checkpoint-N/), Lightning *.ckpt files, "
        "or .pt/.safetensors files with the step in their names",
    )
    p.add_argument("--model", required=True, metavar="SPEC", help="model spec (JSON or pkg.mod:fn)")
    p.add_argument("--data", required=True, metavar="SPEC", help="data spec (name, JSON or pkg.mod:fn)")
    p.add_argument("--loss", default=None, metavar="SPEC", help="loss spec (name, JSON or pkg.mod:fn)")
    p.add_argument("--out", required=True, help="run folder to create (e.g. runs/NAME)")
    p.add_argument("--copy", action="store_true", help="copy the weights into the run (default: reference)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run at --out")
    p.add_argument("--no-check", action="store_true", help="skip the dry run (build, load, one forward)")


@command("import", "import a checkpoint folder of another tool (HF Trainer, Lightning, plain) as a run",
         _import_args)  # fmt: skip
@guarded("import")
def run_import_command(args: argparse.Namespace) -> int:
    from dynascope.dry_run import dry_run
    from dynascope.models import import_checkpoints, scan_checkpoint_folder

    model, data = model_spec_arg(args.model, "--model"), dataset_arg(args.data, "--data")
    loss = loss_arg(args.loss) if args.loss else None
    scan = scan_checkpoint_folder(args.folder)
    if not args.no_check:
        report = dry_run(model, data, loss, checkpoint=scan.checkpoints[0].path)
        print(report.summary())
    run = import_checkpoints(
        args.folder, args.out, model=model, dataset=data, loss=loss, copy=args.copy, overwrite=args.overwrite
    )
    how = "copied" if args.copy else "by reference"
    print(
        f"imported {len(scan.checkpoints)} {scan.layout} checkpoint(s) {how} (steps {scan.steps[0]}…"
        f"{scan.steps[-1]}), {len(scan.metrics)} metrics row(s) → {run.path}"
    )
    return 0


def _runs_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "dir", nargs="?", default=None, help="folder of run folders (default $DYNASCOPE_RUNS_DIR or ./runs)"
    )
    p.add_argument("--json", action="store_true", help="one JSON object per run")


def _spec_label(spec: dict[str, Any]) -> str | None:
    """A registry name, factory reference, Hugging Face folder, exported program or data file naming a
    spec."""
    keys = ("name", "factory", "hf", "exported", "file")
    return next((spec[k] for k in keys if isinstance(spec.get(k), str)), None)


def list_runs(root: str | os.PathLike) -> list[dict[str, Any]]:
    """Summaries of the run folders in ``root`` (or ``root`` itself if it is a run), two levels deep."""
    from dynascope.models import Run, RunError
    from dynascope.store import STORE_FILENAME, ResultStore
    from dynascope.tracker import describe_status, run_status

    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"'{root}' is not a folder")
    if Run.is_run(root):
        candidates = [root]
    else:
        found = [*root.glob("*/run.json"), *root.glob("*/*/run.json")]
        candidates = sorted({p.parent for p in found})
    rows = []
    for path in candidates:
        try:
            run = Run.open(path)
        except RunError as exc:
            rows.append({"run": str(path), "error": exc.detail})
            continue
        steps, broken = _readable_steps(run)
        status = describe_status(run_status(path))  # a Tracker's run: still being written?
        try:
            n_results = len(ResultStore(path).list()) if (path / STORE_FILENAME).is_file() else 0
        except Exception as exc:  # noqa: BLE001 - one damaged store must not hide the other runs
            n_results = 0
            broken = [*broken, {"file": STORE_FILENAME, "error": f"{type(exc).__name__}: {exc}"}]
        rows.append({
            "run": str(path), "model": _spec_label(run.model_config),
            "dataset": _spec_label(run.dataset_config),
            "checkpoints": len(steps), "first_step": steps[0] if steps else None,
            "last_step": steps[-1] if steps else None, "results": n_results, "created": run.created,
            **({"broken": broken} if broken else {}), **({"status": status} if status else {}),
        })  # fmt: skip
    return rows


def _readable_steps(run: Any) -> tuple[list[int], list[dict[str, str]]]:
    """Steps whose checkpoint header reads, and ``{"file", "error"}`` for each one that does not."""
    from dynascope.models import CheckpointError, checkpoint_counter, read_safetensors_metadata

    try:
        return run.steps(), []
    except (CheckpointError, OSError):
        pass  # find the broken file(s); keep the others
    steps, broken = [], []
    for f in sorted(run.checkpoint_dir.glob("step_*.safetensors")):
        try:
            meta = read_safetensors_metadata(f)
            for key in ("step", "epoch"):  # as Run.checkpoints() checks them
                checkpoint_counter(meta.get(key), key, f.name)
            steps.append(int(f.stem.split("_", 1)[1]))
        except (CheckpointError, OSError, ValueError) as exc:
            broken.append({"file": f.name, "error": getattr(exc, "detail", str(exc))})
    return sorted(steps), broken


@command("runs", "list the run folders in a directory", _runs_args)
@guarded("runs")
def run_runs_command(args: argparse.Namespace) -> int:
    root = args.dir or os.environ.get("DYNASCOPE_RUNS_DIR") or "runs"
    rows = list_runs(root)
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    if not rows:
        print(f"no runs in '{root}'")
        return 0
    for r in rows:
        if "error" in r:
            print(f"{r['run']}  [unreadable: {r['error']}]")
        else:
            span = f"steps {r['first_step']}–{r['last_step']}" if r["checkpoints"] else "no checkpoints"
            note = f"  [{r['status']}]" if "status" in r else ""
            print(f"{r['run']}  {r['model']} on {r['dataset']}  {r['checkpoints']} checkpoint(s), {span}, "
                  f"{r['results']} cached result(s){note}")  # fmt: skip
            for b in r.get("broken", []):
                print(f"    [broken: {b['file']}: {b['error']}]")
    return 0



# ------------------------------------------------------------------------------------------- report
def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run folder")
    p.add_argument(
        "--out", required=True, help="the HTML file to write (its CSV/SVG go to <stem>_files/ beside it)"
    )
    p.add_argument(
        "--no-svg",
        action="store_true",
        help="interactive figures (plotly.js in <stem>_files/) instead of static SVG (needs Chromium)",
    )
    p.add_argument("--pdf", action="store_true", help="also print <stem>.pdf with Chrome/Chromium")


@command("report", "write a self-contained HTML report of everything computed for a run", _report_args)
@guarded("report")
def run_report_command(args: argparse.Namespace) -> int:
    from dynascope.models import Run
    from dynascope.report import build_report

    path = Path(args.run)
    if not path.is_dir() or not Run.is_run(path):
        raise UsageError(f"'{path}' is not a run folder (no run.json)")
    try:
        rep = build_report(Run.open(path), args.out, svg=not args.no_svg, pdf=args.pdf)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    print(
        f"wrote {rep.html_path} ({len(rep.figures)} figures, {len(rep.tables)} tables; "
        f"files in {rep.files_dir})" + (f"; PDF {rep.pdf_path}" if rep.pdf_path else "")
    )
    for note in rep.notes:
        print(f"note: {note}")
    return 0


# -------------------------------------------------------------------------------------------- trust
def _trust_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", help="run folder, or a checkpoint file whose metadata names a model factory")
    p.add_argument("--yes", action="store_true", help="do not ask (for scripts)")
    p.add_argument("--revoke", action="store_true", help="forget the trust record instead")


def _trust_target(path: Path) -> tuple[list[Any], Callable[[], Any]]:
    """The code a run folder or checkpoint file names, and the function that trusts it."""
    from dynascope.models import Run, load_checkpoint
    from dynascope.models.trust import grant, spec_refs

    if path.is_dir():
        run = Run.open(path)
        return run.code_refs(), run.trust
    if path.is_file():
        refs = spec_refs({"model": load_checkpoint(path).model_config or {}})
        return refs, lambda: grant(path, path, refs)
    raise UsageError(f"'{path}' does not exist (expected a run folder or a checkpoint file)")


@command("trust", "show the code a received run would run, and trust it (or --revoke)", _trust_args)
@guarded("trust")
def run_trust_command(args: argparse.Namespace) -> int:
    from dynascope.models.trust import revoke, trust_file

    path = Path(args.target)
    if args.revoke:
        revoke(path)
        print(f"revoked: '{path}' runs no code until trusted again ({trust_file()})")
        return 0
    refs, trust = _trust_target(path)
    if not refs:
        print(f"'{path}' names no code (registry models, built-in data and losses): nothing to trust")
        return 0
    print(f"'{path}' names this code; trusting it lets dynascope import and run it:")
    for r in refs:
        print(f"  - {r.describe()}")
    if not args.yes:
        if not sys.stdin.isatty():
            raise UsageError("not asked (no terminal): pass --yes to trust it")
        if input("Trust it? [y/N] ").strip().lower() not in ("y", "yes"):
            print("not trusted")
            return 1
    trust()
    print(f"trusted (until run.json or a listed file changes); recorded in {trust_file()}")
    return 0
