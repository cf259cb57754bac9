"""Run folders: what recipes write and what the app and CLI read.

Layout::

    <run>/run.json                              schema, model/dataset/optimizer/lr-schedule, seed, notes
    <run>/checkpoints/step_000123.safetensors   weights; metadata {"step", "epoch", "metrics", "model_config"}
    <run>/checkpoints/step_000123.optim.pt      optional optimizer state, keyed by parameter name
    <run>/metrics.csv                           one row per logged step (step, train_loss, ..., any columns)

Every file is written atomically (temp file + ``os.replace``); writers of ``metrics.csv`` are
serialised with an advisory lock on the run folder. The optimizer file is a plain
``{"format", "optimizer", "state": {param_name: {"exp_avg": Tensor, ...}}, "param_groups":
[{"params": [names], "lr": ..., ...}]}`` dict so it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import math
import os
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .atomic import atomic_write, atomic_write_text, dir_lock, remove_orphans
from .checkpoints import (
    CheckpointError,
    _json_value,
    json_object,
    load_checkpoint,
    save_checkpoint,
)
from .registry import model_config
from .run_index import CheckpointIndex, checkpoint_index
from .schedules import lr_at, validate_schedule
from .specs import MODEL_SPEC_FORMS, build_from_spec, is_model_spec, normalize_model_spec
from .trust import CodeRef, TrustedCode, spec_refs
from .weights import load_weights

__all__ = ["Run", "RunError", "CheckpointInfo", "CheckpointFile", "RUN_SCHEMA", "RUN_SCHEMA_VERSION"]

RUN_SCHEMA = "dynascope.run"
RUN_SCHEMA_VERSION = 1
OPTIM_FORMAT = "dynascope.optim/1"
#: probe results queued for the result store by code below the runner (:meth:`Run.add_pending_result`)
PENDING_DIR = "pending_results"
#: A temporary file older than this when a run is opened is a killed writer's, not a write in progress.
ORPHAN_AGE_S = 600.0
_CKPT_RE = re.compile(r"^step_(\d+)\.safetensors$")
_PREFERRED_COLUMNS = ("step", "epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr")


class RunError(ValueError):
    """A run folder is missing, malformed, or an operation on it is invalid; the message names the path."""

    def __init__(self, path: str | os.PathLike[str], detail: str) -> None:
        self.path = str(path)
        self.detail = detail
        super().__init__(f"run '{self.path}': {detail}")

    def __reduce__(self):
        return (self.__class__, (self.path, self.detail))


@dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint of a run: ``step``, ``epoch`` (or None), file ``path`` and its ``metadata``."""

    step: int
    epoch: int | None
    path: Path
    metadata: dict[str, Any]

    @property
    def metrics(self) -> dict[str, Any]:
        m = self.metadata.get("metrics")
        return dict(m) if isinstance(m, Mapping) else {}

    @property
    def optimizer_path(self) -> Path | None:
        p = self.path.with_name(f"step_{self.step:06d}.optim.pt")
        return p if p.exists() else None


def _named_config(kind: str, cfg: Any) -> dict[str, Any]:
    if not isinstance(cfg, Mapping) or not isinstance(cfg.get("name"), str):
        raise ValueError(f"{kind} config must be a dict with a string 'name', got {cfg!r}")
    return _json_value(dict(cfg), kind)


def _spec_label(spec: Mapping[str, Any]) -> str:
    """A short label of a model or data spec: its registry name, factory reference, file or HF folder."""
    for key in ("name", "factory", "hf", "exported", "file"):
        if isinstance(spec.get(key), str):
            return spec[key]
    return "?"


def _data_spec(dataset: Any) -> dict[str, Any]:
    """A registry dataset config is stored as given; other data specs normalised (datasets.specs)."""
    from ..datasets.specs import normalize_data_spec

    if isinstance(dataset, Mapping) and isinstance(dataset.get("name"), str):
        return _named_config("dataset", dataset)
    if not isinstance(dataset, Mapping):
        raise ValueError(f"dataset config must be a dict (a data spec); got {dataset!r}")
    return _json_value(normalize_data_spec(dataset), "dataset")


def _loss_spec(loss: Any) -> Any:
    """The loss spec: ``None``, a name / ``"module:function"`` string, or a dict ``{"name", ...options}``."""
    if loss is None or isinstance(loss, str):
        return loss
    if isinstance(loss, Mapping) and isinstance(loss.get("name"), str):
        return _json_value(dict(loss), "loss")
    raise ValueError(f"loss must be a name, 'module:function' or a dict with a 'name'; got {loss!r}")


def _optimizer_config(optimizer: Any) -> dict[str, Any] | None:
    if optimizer is None:
        return None
    if isinstance(optimizer, torch.optim.Optimizer):
        cfg: dict[str, Any] = {"name": type(optimizer).__name__.lower()}
        for k, v in optimizer.defaults.items():
            try:
                cfg[k] = _json_value(v, k)
            except TypeError:
                continue
        return cfg
    cfg = _named_config("optimizer", optimizer)
    if "lr" in cfg and (not isinstance(cfg["lr"], (int, float)) or isinstance(cfg["lr"], bool)):
        raise ValueError(f"optimizer lr must be a number, got {cfg['lr']!r}")
    return cfg


def _scalar(value: Any, where: str) -> Any:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"metric {where!r} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    elif hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        value = value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"metric {where!r} must be a number, string, bool or None, got {type(value).__name__}")


def _format_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return (
            repr(value)
            if math.isfinite(value)
            else ("nan" if math.isnan(value) else ("inf" if value > 0 else "-inf"))
        )
    return str(value)


def optimizer_state_by_name(
    optimizer: torch.optim.Optimizer | Mapping[str, Any], model: nn.Module
) -> dict[str, Any]:
    """Convert a torch optimizer (or its ``state_dict()``) to the name-keyed, weights_only-safe format."""
    sd = optimizer.state_dict() if isinstance(optimizer, torch.optim.Optimizer) else optimizer
    if isinstance(sd, Mapping) and sd.get("format") == OPTIM_FORMAT:
        return dict(sd)
    if not isinstance(sd, Mapping) or "state" not in sd or "param_groups" not in sd:
        raise TypeError("optimizer must be a torch Optimizer or its state_dict() ({'state', 'param_groups'})")
    names = [n for n, _ in model.named_parameters()]
    index_to_name: dict[int, str] = {}
    if isinstance(optimizer, torch.optim.Optimizer):
        by_id = {id(p): n for n, p in model.named_parameters()}
        flat = [p for g in optimizer.param_groups for p in g["params"]]
        for i, p in enumerate(flat):
            if id(p) not in by_id:
                raise ValueError("the optimizer holds a parameter that is not in the model")
            index_to_name[i] = by_id[id(p)]
    else:  # state_dict indices follow the order the parameters were given; assume model.parameters()
        for i, n in enumerate(names):
            index_to_name[i] = n
    state: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        name = index_to_name.get(int(idx))
        if name is None:
            raise ValueError(f"optimizer state index {idx} has no matching model parameter")
        state[name] = {
            k: (v.detach().cpu().clone() if isinstance(v, Tensor) else _json_value(v, k))
            for k, v in st.items()
        }
    groups = []
    for g in sd["param_groups"]:
        gg = {}
        for k, v in g.items():
            if k == "params":
                gg[k] = [index_to_name[int(i)] for i in v]
            else:
                try:
                    gg[k] = _json_value(v, k)
                except TypeError:
                    continue
        groups.append(gg)
    opt_name = type(optimizer).__name__.lower() if isinstance(optimizer, torch.optim.Optimizer) else None
    return {"format": OPTIM_FORMAT, "optimizer": opt_name, "state": state, "param_groups": groups}


def optimizer_state_to_torch(
    named: Mapping[str, Any], optimizer: torch.optim.Optimizer, model: nn.Module
) -> None:
    """Load a name-keyed optimizer state (see ``optimizer_state_by_name``) into ``optimizer``."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    flat_names = [by_id.get(id(p)) for g in optimizer.param_groups for p in g["params"]]
    if None in flat_names:
        raise ValueError("the optimizer holds a parameter that is not in the model")
    index = {n: i for i, n in enumerate(flat_names)}
    state = {}
    for name, st in named["state"].items():
        if name not in index:
            raise ValueError(f"saved optimizer state for {name!r}, which this optimizer does not hold")
        state[index[name]] = dict(st)
    cur = optimizer.state_dict()
    if len(cur["param_groups"]) != len(named["param_groups"]):
        raise ValueError(
            f"saved optimizer has {len(named['param_groups'])} param groups, "
            f"this one {len(cur['param_groups'])}"
        )
    groups = []
    for g_cur, g_saved in zip(cur["param_groups"], named["param_groups"]):
        g = dict(g_cur)
        g.update({k: v for k, v in g_saved.items() if k != "params" and k in g_cur})
        if isinstance(g_cur.get("betas"), tuple) and isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


class Run(TrustedCode):
    """A run folder (see the module docstring). Use ``Run.create`` or ``Run.open``."""

    _kind = "run"

    def __init__(self, path: Path, config: dict[str, Any]) -> None:
        self.path = Path(path)
        self.config = config

    # ------------------------------------------------------------------ creation / opening
    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        *,
        model: nn.Module | Mapping[str, Any] | str,
        dataset: Mapping[str, Any] | str,
        optimizer: Mapping[str, Any] | torch.optim.Optimizer | None = None,
        lr_schedule: Mapping[str, Any] | None = None,
        seed: int = 0,
        notes: str = "",
        loss: str | Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
        overwrite: bool = False,
    ) -> Run:
        """Create a run folder. ``model``: a model built by ``build``/``build_from_spec`` or a model spec
        (``{"name", ...}``, ``{"factory", "kwargs"}``, ``{"hf": folder}``; see ``dynascope.models.specs``);
        ``dataset``: a data spec (``{"name", ...}``, ``{"file", ...}``, ``{"factory", ...}``; see
        ``dynascope.datasets.specs``); ``optimizer``: ``{"name", "lr",
        "weight_decay", ...}`` or a torch optimizer; ``lr_schedule``: see ``dynascope.models.schedules``.

        An existing run is only replaced with ``overwrite=True`` (its checkpoints and metrics are
        deleted); a non-empty folder that is not a run is never written into. ``loss``: the
        training loss spec (``"cross_entropy"``, ``"mse"``, ``"half_sse"``, ``"token_cross_entropy"``, a dict
        ``{"name": ..., options}`` or ``"module:function"``) that probes should use;
        ``extra``: any further JSON-able facts about the run (e.g. the recipe and its phenomenon).
        """
        path = Path(path)
        config = cls.new_config(
            path, model=model, dataset=dataset, optimizer=optimizer, lr_schedule=lr_schedule, seed=seed,
            notes=notes, loss=loss, extra=extra,
        )  # fmt: skip
        if path.exists():
            if not path.is_dir():
                raise RunError(path, "exists and is not a folder")
            if (path / "run.json").exists():
                if not overwrite:
                    raise RunError(path, "already holds a run; pass overwrite=True to replace it")
                cls._clear(path)
            elif any(path.iterdir()):
                raise RunError(
                    path, "exists, is not empty and is not a run folder; refusing to write into it"
                )
        path.mkdir(parents=True, exist_ok=True)
        (path / "checkpoints").mkdir(exist_ok=True)
        atomic_write_text(path / "run.json", json.dumps(config, indent=2, sort_keys=False) + "\n")
        run = cls(path, config)
        run.trust()  # the specs were given in this process: their code is the user's own
        return run

    @staticmethod
    def new_config(
        path: Path,
        *,
        model: nn.Module | Mapping[str, Any] | str,
        dataset: Mapping[str, Any] | str,
        optimizer: Mapping[str, Any] | torch.optim.Optimizer | None = None,
        lr_schedule: Mapping[str, Any] | None = None,
        seed: int = 0,
        notes: str = "",
        loss: str | Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The ``run.json`` content :meth:`create` writes for these arguments (checked, JSON-able)."""
        if isinstance(model, nn.Module):
            model_cfg = model_config(model)
        else:
            model_cfg = _json_value(normalize_model_spec(model), "model")
        dataset_cfg = _data_spec(dataset)
        loss = _loss_spec(loss)
        optim_cfg = _optimizer_config(optimizer)
        base_lr = optim_cfg.get("lr") if optim_cfg else None
        sched = None
        if lr_schedule is not None:
            try:
                sched = _json_value(validate_schedule(lr_schedule, base_lr), "lr_schedule")
            except (ValueError, TypeError) as e:
                raise RunError(path, f"invalid lr_schedule: {e}") from None
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        from ..version import __version__ as version

        return {
            "schema": RUN_SCHEMA,
            "schema_version": RUN_SCHEMA_VERSION,
            "model": model_cfg,
            "dataset": dataset_cfg,
            "optimizer": optim_cfg,
            "lr_schedule": sched,
            "seed": seed,
            "loss": loss,
            "extra": _json_value(dict(extra or {}), "extra"),
            "notes": str(notes),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "dynascope_version": version,
        }

    @staticmethod
    def _clear(path: Path) -> None:
        """Delete the files a run owns (never anything else)."""
        for name in ("run.json", "metrics.csv"):
            (path / name).unlink(missing_ok=True)
        ck = path / "checkpoints"
        if ck.is_dir():
            for f in ck.iterdir():
                if _CKPT_RE.match(f.name) or re.match(r"^step_\d+\.optim\.pt$", f.name):
                    f.unlink()

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, trust: bool = False) -> Run:
        """Open an existing run folder; ``RunError`` if it is not one or ``run.json`` is malformed.
        ``trust=True`` records trust in the code its specs name (:meth:`trust`)."""
        path = Path(path)
        if not path.is_dir():
            raise RunError(path, "does not exist or is not a folder")
        cfg_path = path / "run.json"
        if not cfg_path.is_file():
            raise RunError(path, "is not a run folder (no run.json)")
        try:
            config = json_object(cfg_path.read_bytes())
        except (ValueError, OSError) as e:  # UnicodeDecodeError is a ValueError
            raise RunError(path, f"run.json is not a dynascope run: {e}") from None
        if config.get("schema") != RUN_SCHEMA:
            raise RunError(path, f"run.json is not a dynascope run (schema must be {RUN_SCHEMA!r})")
        version = config.get("schema_version")
        if not isinstance(version, int) or version > RUN_SCHEMA_VERSION:
            raise RunError(
                path,
                f"run.json schema_version {version!r} is not supported "
                f"(this dynascope reads <= {RUN_SCHEMA_VERSION})",
            )
        if not is_model_spec(config.get("model")):
            raise RunError(path, f"run.json: 'model' must be a spec dict, one of {list(MODEL_SPEC_FORMS)}")
        data, forms = config.get("dataset"), ("name", "file", "factory")
        if not isinstance(data, dict) or not any(isinstance(data.get(k), str) for k in forms):
            raise RunError(path, f"run.json: 'dataset' must be a spec dict with one of {list(forms)}")
        run = cls(path, config)
        run.remove_orphans(ORPHAN_AGE_S)
        if trust:
            run.trust()
        return run

    def add_pending_result(self, probe: str, step: int, params: Mapping[str, Any], result: Any) -> Path:
        """Queue a probe result computed where the result store is out of reach (a training recipe, below
        the runner's layer): ``pending_results/<probe>_step_<step>.json`` with the runner ``probe``, the
        checkpoint ``step``, the runner ``params`` and ``result.to_dict()`` with its class name. The runner
        files it into the store under its key the next time the run is read
        (:func:`dynascope.runner.ingest_pending`), after the checkpoint exists."""
        from .atomic import atomic_write_text

        folder = self.path / PENDING_DIR
        folder.mkdir(exist_ok=True)
        record = {"probe": probe, "step": int(step), "params": _json_value(dict(params), "params"),
                  "result_class": type(result).__name__, "result": result.to_dict()}  # fmt: skip
        path = folder / f"{probe}_step_{int(step):06d}.json"
        atomic_write_text(path, json.dumps(record, allow_nan=True) + "\n")
        return path

    def pending_results(self) -> list[Path]:
        """The queued results of :meth:`add_pending_result`, oldest step first."""
        folder = self.path / PENDING_DIR
        return sorted(folder.glob("*.json")) if folder.is_dir() else []

    def remove_orphans(self, min_age_s: float = 0.0) -> list[Path]:
        """Delete temporary files that a killed writer left in the run folder and ``checkpoints/``
        (``.step_….safetensors.XXXXXXXX.tmp``, ``.run.json.….tmp``) older than ``min_age_s``."""
        return remove_orphans(self.path, min_age_s) + remove_orphans(self.checkpoint_dir, min_age_s)

    @staticmethod
    def is_run(path: str | os.PathLike[str]) -> bool:
        return (Path(path) / "run.json").is_file()

    def __repr__(self) -> str:
        model, data = _spec_label(self.model_config), _spec_label(self.dataset_config)
        return f"Run({str(self.path)!r}, model={model!r}, dataset={data!r})"

    # ------------------------------------------------------------------ config accessors
    @property
    def model_config(self) -> dict[str, Any]:
        return dict(self.config["model"])

    @property
    def dataset_config(self) -> dict[str, Any]:
        return dict(self.config["dataset"])

    @property
    def optimizer_config(self) -> dict[str, Any] | None:
        o = self.config.get("optimizer")
        return dict(o) if o else None

    @property
    def lr_schedule(self) -> dict[str, Any] | None:
        s = self.config.get("lr_schedule")
        return dict(s) if s else None

    @property
    def loss(self) -> str | dict[str, Any] | None:
        """The training loss spec recorded at creation (``None``: probes use ``"auto"``)."""
        return self.config.get("loss")

    @property
    def extra(self) -> dict[str, Any]:
        return dict(self.config.get("extra") or {})

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", 0))

    @property
    def notes(self) -> str:
        return str(self.config.get("notes", ""))

    @property
    def created(self) -> str | None:
        return self.config.get("created")

    def lr_at(self, step: int) -> float:
        """Learning rate at ``step`` from the run's schedule (constant optimizer lr when there is none)."""
        base = (self.optimizer_config or {}).get("lr")
        sched = self.lr_schedule or ({"type": "constant", "lr": base} if base is not None else None)
        if sched is None:
            raise RunError(self.path, "has neither an lr_schedule nor an optimizer lr")
        return lr_at(sched, step, base)

    # ------------------------------------------------------------------ trust (models/trust.py)
    def code_refs(self) -> list[CodeRef]:
        """Every piece of code the run's specs name: run.json's model, dataset and loss, then each
        checkpoint's own ``model_config``."""
        refs = spec_refs(self.config)
        seen = {r.ref for r in refs}
        for info in self.checkpoints():
            cfg = info.metadata.get("model_config")
            if not isinstance(cfg, Mapping):
                continue
            for r in spec_refs({"model": cfg}, f" (checkpoint step {info.step})"):
                if r.ref not in seen:
                    refs.append(r)
                    seen.add(r.ref)
        return refs

    @property
    def _trust_key(self) -> Path:
        return self.path

    @property
    def _manifest(self) -> Path:
        return self.path / "run.json"

    def build_model(self) -> nn.Module:
        """A freshly built model from the run's model spec (``build_from_spec``)."""
        with self.code_scope():
            return build_from_spec(self.model_config)

    def load_dataset(self) -> Any:
        """The run's data spec loaded (``dynascope.datasets.load_spec``; ``.train`` / ``.test`` tensors)."""
        from ..datasets.specs import load_spec

        with self.code_scope():
            return load_spec(self.dataset_config)

    def model_config_at(self, step: int | None = None) -> dict[str, Any]:
        """The model config checkpoint ``step`` is built from: its own metadata ``model_config``
        (one size of a sweep run) when it names one, else the run's."""
        ck_cfg = self.checkpoint(step).metadata.get("model_config")
        if is_model_spec(ck_cfg):
            return dict(ck_cfg)
        return self.model_config

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    def checkpoint_path(self, step: int) -> Path:
        return self.checkpoint_dir / f"step_{int(step):06d}.safetensors"

    def save_checkpoint(
        self,
        model: nn.Module | Mapping[str, Tensor],
        step: int,
        epoch: int | None = None,
        optimizer: torch.optim.Optimizer | Mapping[str, Any] | None = None,
        metrics: Mapping[str, Any] | None = None,
    ) -> CheckpointInfo:
        """Write ``checkpoints/step_<step>.safetensors`` (+ ``.optim.pt`` when ``optimizer`` is given).

        ``model`` may be a state dict (a snapshot) when ``optimizer`` is one too, keyed by name
        (:func:`optimizer_state_by_name`).
        A model built by ``build`` must match the run's architecture (the seed may differ).
        The optimizer file is written first, so a visible checkpoint always has its optimizer state.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        if isinstance(model, nn.Module):
            try:
                cfg = model_config(model)
            except ValueError:
                cfg = None
            if cfg is not None:
                a = {k: v for k, v in cfg.items() if k != "seed"}
                b = {k: v for k, v in self.model_config.items() if k != "seed"}
                if a != b:
                    raise RunError(
                        self.path, f"model config {cfg} does not match the run's {self.model_config}"
                    )
        meta: dict[str, Any] = {"step": step, "epoch": epoch, "model_config": self.model_config}
        if metrics:
            meta["metrics"] = {str(k): _scalar(v, str(k)) for k, v in metrics.items()}
        if optimizer is not None:
            named_already = isinstance(optimizer, Mapping) and optimizer.get("format") == OPTIM_FORMAT
            if not isinstance(model, nn.Module) and not named_already:
                raise TypeError(
                    "saving optimizer state needs the model (for parameter names), not a state_dict, "
                    "unless the state is already keyed by name (optimizer_state_by_name)"
                )
            named = optimizer_state_by_name(optimizer, model)
            opt_path = self.checkpoint_dir / f"step_{step:06d}.optim.pt"
            atomic_write(opt_path, lambda tmp: torch.save(named, tmp))
        path = save_checkpoint(model, self.checkpoint_path(step), metadata=meta)
        return CheckpointInfo(step=step, epoch=epoch, path=path, metadata=_json_value(meta, "metadata"))

    def set_checkpoint_refs(self, refs: Iterable[Mapping[str, Any]]) -> None:
        """Record checkpoint files kept outside the run (an import by reference): ``[{"step", "epoch",
        "path"}]`` in ``run.json``'s ``checkpoint_refs``; :meth:`checkpoints` lists them beside its own."""
        clean = []
        for r in refs:
            step = r.get("step")
            if isinstance(step, bool) or not isinstance(step, int) or step < 0:
                raise RunError(self.path, f"checkpoint ref {dict(r)}: step must be a non-negative int")
            clean.append({"step": step, "epoch": r.get("epoch"), "path": str(r["path"])})
        self.config["checkpoint_refs"] = clean
        self.save_config()

    def save_config(self) -> None:
        """Write ``self.config`` to ``run.json``; a run that was trusted stays trusted (the new run.json is
        dynascope's own write, not an edit from outside)."""
        kept = bool(self.code_refs()) and not self.untrusted_refs()
        atomic_write_text(self.path / "run.json", json.dumps(self.config, indent=2, sort_keys=False) + "\n")
        if kept:
            self.trust()

    def _referenced_checkpoints(self) -> list[CheckpointInfo]:
        out = []
        for r in self.config.get("checkpoint_refs") or []:
            p = Path(r["path"])
            meta = {"step": r["step"], "epoch": r.get("epoch")}
            out.append(CheckpointInfo(step=int(r["step"]), epoch=r.get("epoch"), path=p, metadata=meta))
        return out

    def _index(self) -> CheckpointIndex:
        """This process's index of the checkpoint folder (listing and headers read once; models/run_index)."""
        return checkpoint_index(self.checkpoint_dir, _CKPT_RE, CheckpointInfo)

    def checkpoints(self) -> list[CheckpointInfo]:
        """All checkpoints, sorted by step (metadata read from the safetensors headers only, once per
        process while a file is unchanged); files of an import by reference (``checkpoint_refs``) included."""
        return sorted([*self._referenced_checkpoints(), *self._index().records()], key=lambda c: c.step)

    def steps(self) -> list[int]:
        return [c.step for c in self.checkpoints()]

    def checkpoint(self, step: int | None = None) -> CheckpointInfo:
        """The checkpoint at ``step`` (the last one when None); ``RunError`` if absent."""
        if step is not None:
            found = next((c for c in self._referenced_checkpoints() if c.step == step), None)
            found = found if found is not None else self._index().get(step)
            if found is not None:
                return found
        cks = self.checkpoints()
        if not cks:
            raise RunError(self.path, "has no checkpoints")
        if step is None:
            return cks[-1]
        raise RunError(self.path, f"has no checkpoint at step {step}; steps: {[c.step for c in cks]}")

    def load_model(self, step: int | None = None, *, allow_nonfinite: bool = False) -> nn.Module:
        """Build the run's model and load the checkpoint at ``step`` (the last one when None).

        A checkpoint whose metadata names a different ``model_config`` (e.g. one model size of a
        sweep run, where ``step`` is the size) is built from that config instead; outside a sweep run
        (no ``sweep_variable`` in run.json's extra) a different architecture is warned about. The
        model's ``dynascope_config_source`` (``"run.json"`` or ``"checkpoint"``) says which config was
        used, and probes record it in ``.meta["model_config_source"]``.
        """
        info = self.checkpoint(step)
        cfg = self.model_config_at(info.step)
        source = "run.json"
        if cfg != self.model_config:
            source = "checkpoint"
            differs = {k: v for k, v in cfg.items() if k != "seed"} != {
                k: v for k, v in self.model_config.items() if k != "seed"
            }
            if differs and "sweep_variable" not in self.extra:
                warnings.warn(
                    f"run '{self.path}': the checkpoint of step {info.step} holds a different architecture "
                    f"than run.json: checkpoint {cfg} vs run.json {self.model_config}; using the "
                    "checkpoint's (recorded as model_config_source='checkpoint' in probe results)",
                    UserWarning,
                    stacklevel=2,
                )
        with self.code_scope():
            model = build_from_spec(cfg)
        model.dynascope_config_source = source
        load_weights(info.path, model, allow_nonfinite=allow_nonfinite)
        return model

    def load_optimizer_state(
        self,
        step: int,
        optimizer: torch.optim.Optimizer | None = None,
        model: nn.Module | None = None,
    ) -> dict[str, Any]:
        """The name-keyed optimizer state saved at ``step``; loaded into ``optimizer`` when given
        (``model`` is then needed to map names to parameters)."""
        p = self.checkpoint_dir / f"step_{int(step):06d}.optim.pt"
        if not p.is_file():
            raise RunError(self.path, f"has no optimizer state at step {step} ({p.name})")
        try:
            named = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(p, f"optimizer state could not be read ({type(e).__name__}: {e})") from None
        if not isinstance(named, dict) or named.get("format") != OPTIM_FORMAT:
            raise CheckpointError(p, f"is not a dynascope optimizer state (format {OPTIM_FORMAT!r})")
        if optimizer is not None:
            if model is None:
                raise TypeError("loading into an optimizer needs model= to map parameter names")
            optimizer_state_to_torch(named, optimizer, model)
        return named

    # ------------------------------------------------------------------ metrics
    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.csv"

    def truncate_metrics(self, after_step: int) -> None:
        """Drop ``metrics.csv`` rows with step > ``after_step`` (a resumed run logs them again)."""
        path = self.metrics_path
        if not path.is_file():
            return
        with dir_lock(self.path):
            with open(path, encoding="utf-8", newline="") as f:
                rows = list(csv.reader(f))
            if not rows or "step" not in rows[0]:
                return
            header, body = rows[0], rows[1:]
            i = header.index("step")
            keep = []
            for r in body:
                try:
                    if len(r) == len(header) and float(r[i]) <= after_step:
                        keep.append(r)
                except ValueError:
                    continue
            if len(keep) == len(body):
                return
            buf = io.StringIO()
            w = csv.writer(buf, lineterminator="\n")
            w.writerow(header)
            w.writerows(keep)
            atomic_write_text(path, buf.getvalue())

    def log_metrics(self, rows: Mapping[str, Any] | Iterable[Mapping[str, Any]]) -> None:
        """Append one row (dict) or several to ``metrics.csv``; every row needs a ``step``.

        New columns rewrite the file atomically with the widened header; otherwise the rows are
        appended with a single write. Writers are serialised by a lock on the run folder.
        """
        rows = [rows] if isinstance(rows, Mapping) else list(rows)
        clean: list[dict[str, Any]] = []
        for r in rows:
            if not isinstance(r, Mapping):
                raise TypeError(f"metrics rows must be dicts, got {type(r).__name__}")
            if "step" not in r:
                raise ValueError(f"every metrics row needs a 'step', got keys {sorted(r)}")
            clean.append({str(k): _scalar(v, str(k)) for k, v in r.items()})
        if not clean:
            return
        with dir_lock(self.path):
            header = self._read_header()
            new_cols = [c for r in clean for c in r if c not in (header or [])]
            if header is not None and not new_cols:
                buf = io.StringIO()
                w = csv.writer(buf, lineterminator="\n")
                for r in clean:
                    w.writerow([_format_cell(r.get(c)) for c in header])
                with open(self.metrics_path, "a", encoding="utf-8", newline="") as f:
                    f.write(buf.getvalue())
                    f.flush()
                    os.fsync(f.fileno())
                return
            old_rows: list[dict[str, str]] = []
            if header is not None:
                with open(self.metrics_path, encoding="utf-8", newline="") as f:
                    old_rows = [row for row in csv.DictReader(f) if None not in row]
            cols = list(dict.fromkeys([*(header or []), *new_cols]))
            ordered = [c for c in _PREFERRED_COLUMNS if c in cols] + [
                c for c in cols if c not in _PREFERRED_COLUMNS
            ]
            buf = io.StringIO()
            w = csv.writer(buf, lineterminator="\n")
            w.writerow(ordered)
            for r in old_rows:
                w.writerow([r.get(c, "") for c in ordered])
            for r in clean:
                w.writerow([_format_cell(r.get(c)) for c in ordered])
            atomic_write_text(self.metrics_path, buf.getvalue())

    def _read_header(self) -> list[str] | None:
        if not self.metrics_path.is_file():
            return None
        with open(self.metrics_path, encoding="utf-8", newline="") as f:
            first = f.readline()
        if not first.strip():
            return None
        return next(csv.reader([first]))

    def metrics(self) -> Any:
        """``metrics.csv`` as a pandas DataFrame (empty with a ``step`` column when nothing is logged)."""
        import pandas as pd

        if not self.metrics_path.is_file() or self._read_header() is None:
            return pd.DataFrame({"step": pd.Series(dtype="int64")})
        try:
            return pd.read_csv(self.metrics_path, on_bad_lines="skip")
        except Exception as e:  # noqa: BLE001
            raise RunError(self.path, f"metrics.csv could not be parsed ({type(e).__name__}: {e})") from None


class CheckpointFile(TrustedCode):
    """A single checkpoint file used like a one-checkpoint :class:`Run`.

    The model config comes from ``model_config`` or else the file's dynascope metadata; the dataset
    from ``dataset_config`` (required); results go to ``results.sqlite`` beside the file (``store_dir``
    to change). Missing configs raise ``ValueError``; an unreadable file ``CheckpointError``. Code that
    the file's own metadata names runs only once trusted (``trust=True``, or ``dynascope trust FILE``).
    """

    _kind = "checkpoint"

    def __init__(
        self,
        file: str | os.PathLike[str],
        *,
        model_config: Mapping[str, Any] | None = None,
        dataset_config: Mapping[str, Any] | None = None,
        loss: str | Mapping[str, Any] | None = None,
        store_dir: str | os.PathLike[str] | None = None,
        trust: bool = False,
    ) -> None:
        self.file = Path(file)
        loaded = load_checkpoint(self.file)  # validates the file: CheckpointError names the problem
        cfg = model_config or loaded.model_config
        if cfg is None:
            raise ValueError(
                f"checkpoint '{self.file}' carries no dynascope model config; pass one "
                '(CLI: --model-config \'{"name": "mlp", "in_dim": ..., ...}\')'
            )
        if dataset_config is None:
            raise ValueError(
                f"checkpoint '{self.file}' needs a dataset config "
                "(CLI: --dataset NAME or --dataset '{\"name\": ..., ...}')"
            )
        data_ok = isinstance(dataset_config, Mapping) and any(
            isinstance(dataset_config.get(k), str) for k in ("name", "file", "factory")
        )
        for what, c, ok, forms in (("model", cfg, is_model_spec(cfg), MODEL_SPEC_FORMS[1:]),
                                   ("dataset", dataset_config, data_ok, ("file", "factory"))):  # fmt: skip
            if not ok:
                raise ValueError(
                    f"checkpoint '{self.file}': the {what} config needs a \"name\" (registry) or one of "
                    f"{list(forms)}; got {c!r}"
                )
        self.model_config = dict(cfg)
        self.dataset_config = dict(dataset_config)
        self.loss = _loss_spec(loss)
        # What the caller passed is theirs; a model config read from the file's metadata is the file's.
        given = {"dataset": self.dataset_config, "loss": self.loss}
        self._given_refs = frozenset(r.ref for r in spec_refs({**given, "model": model_config or {}}))
        if trust:
            self.trust()
        self.path = Path(store_dir) if store_dir is not None else self.file.parent
        step = loaded.step if loaded.step is not None else 0
        self.info = CheckpointInfo(
            step=step, epoch=loaded.epoch, path=self.file, metadata=dict(loaded.metadata)
        )

    def checkpoint(self, step: int | None = None) -> CheckpointInfo:
        if step is not None and step != self.info.step:
            raise ValueError(f"checkpoint '{self.file}' is step {self.info.step}, not {step}")
        return self.info

    def checkpoints(self) -> list[CheckpointInfo]:
        return [self.info]

    def steps(self) -> list[int]:
        return [self.info.step]

    def model_config_at(self, step: int | None = None) -> dict[str, Any]:
        self.checkpoint(step)
        return dict(self.model_config)

    def code_refs(self) -> list[CodeRef]:
        """The code the model config names (what the caller passed is in ``_given_refs``: theirs)."""
        return spec_refs({"model": self.model_config})

    @property
    def _trust_key(self) -> Path:
        return self.file

    @property
    def _manifest(self) -> Path:
        return self.file

    def load_model(self, step: int | None = None) -> nn.Module:
        """The model built from the model config with this file's weights loaded."""
        self.checkpoint(step)
        try:
            with self.code_scope():
                model = build_from_spec(self.model_config)
        except TypeError as exc:
            raise ValueError(f"model config {self.model_config}: {exc}") from None
        load_weights(self.file, model)
        return model

    def load_dataset(self) -> Any:
        from ..datasets.specs import load_spec

        with self.code_scope():
            return load_spec(self.dataset_config)
