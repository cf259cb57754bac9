"""A model that travels with its run as a ``torch.export`` program — graph as JSON, tensors as safetensors.

For a model whose class a reader cannot import (defined in a notebook, a script's ``__main__`` or inside a
function) and that is not a ``Sequential`` of ``torch.nn`` layers (:mod:`dynascope.models.structure`), the
Tracker exports it once (:func:`export_model`) and the run's model spec is
``{"exported": "<run>/model.export.json"}``:

* ``model.export.json``: the exported program's graph — ATen operators, the graph signature, the input
  and output tree specs — in torch's serialization schema (``torch._export.serde``), the same JSON
  ``torch.export.save`` writes into its archive;
* ``model.export.safetensors``: the tensors it was exported with: ``state.<name>`` (parameters and
  persistent buffers; a checkpoint replaces them) and ``constant.<name>`` (non-persistent buffers and
  lifted tensor constants).

Loading (:func:`load_exported`) reads only those two files, as JSON and safetensors: nothing is unpickled
and no code a file names is imported or run. (``torch.export.load`` is not used: in torch 2.13 it reads its
tensors with ``torch.load`` and falls back to ``weights_only=False`` — arbitrary pickled code — when the
safe load fails; see ``torch/_export/serde/serialize.py: deserialize_torch_artifact``.)

Mode: the program is traced with the model in **eval mode** (dropout off, BatchNorm's running statistics)
and the batch dimension of every input dynamic. A traced graph holds one mode, so the reloaded module
accepts ``eval()`` / ``train(False)`` and refuses ``train(True)`` with a ``ValueError`` (train-mode probes
need the model's code: a factory spec). Double backward (Hessian-vector products, ``torch.func``
transforms) runs through it like through the original: the graph is made of differentiable ATen ops.
Why not train mode too (checked in torch 2.13): ``ep.module()`` refuses both ``train()`` and ``eval()``
(``NotImplementedError``), a graph traced in train mode bakes ``aten.dropout`` and ``aten.batch_norm`` with
in-place running-statistics updates, and ``torch.func.jvp(grad(...))`` through it fails ("attempted to call
in-place operation (aten::add_.Tensor) that would mutate a captured Tensor").

Export fails for data-dependent control flow, unsupported ops or non-tensor constants; :func:`export_model`
then raises :class:`ExportError` saying why, and the caller falls back to the spec route.
"""

from __future__ import annotations

import json
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "ExportError",
    "EXPORT_FILE",
    "export_model",
    "load_exported",
    "tensors_file",
    "export_fingerprint",
]

EXPORT_FILE = "model.export.json"


class ExportError(ValueError):
    """The model could not travel as an exported program (the message says why)."""


def tensors_file(path: str | Path) -> Path:
    """The safetensors file beside an exported program's JSON (``model.export.json`` →
    ``model.export.safetensors``)."""
    p = Path(path)
    return p.with_name(p.name.removesuffix(".json") + ".safetensors")


def _inputs(x: Any) -> tuple[tuple[Any, ...], dict[str, Any], Any]:
    """``(args, kwargs, dynamic_shapes)`` for ``torch.export.export``: the batch dimension of every tensor is
    one dynamic ``Dim``."""
    batch = torch.export.Dim("batch", min=1)
    if isinstance(x, Mapping):
        kwargs = dict(x)
        return (), kwargs, {k: {0: batch} if isinstance(v, Tensor) else None for k, v in kwargs.items()}
    args = tuple(x) if isinstance(x, (tuple, list)) else (x,)
    return args, {}, tuple({0: batch} if isinstance(a, Tensor) else None for a in args)


def _call(module: nn.Module, x: Any) -> Any:
    if isinstance(x, Mapping):
        return module(**x)
    return module(*x) if isinstance(x, (tuple, list)) else module(x)


def export_model(model: nn.Module, example: Any, path: str | Path, *, rtol: float = 1e-5) -> dict[str, Any]:
    """Export ``model`` (eval mode, dynamic batch) on the example input ``example`` (a tensor, a tuple of
    tensors or a dict of keyword tensors, two or more samples) and write ``path`` (JSON) and its tensors file
    (module docstring). The files are reloaded with :func:`load_exported` and must reproduce the model's
    outputs on ``example`` (to ``rtol``, and its state-dict names and shapes). Returns the model spec
    ``{"exported": path}``; raises :class:`ExportError` saying why when the model cannot travel so."""
    from safetensors.torch import save_file
    from torch._export.serde.serialize import serialize

    from .atomic import atomic_write

    was_training = model.training
    model.eval()
    try:
        args, kwargs, dynamic = _inputs(example)
        try:
            ep = torch.export.export(model, args, kwargs or None, dynamic_shapes=dynamic)
        except Exception as e:  # noqa: BLE001 - export's errors are many; the reason is what matters
            raise ExportError(f"torch.export failed ({type(e).__name__}: {_first_line(e)})") from None
        bad = [k for k, v in ep.constants.items() if not isinstance(v, Tensor)]
        if bad:
            raise ExportError(f"the exported program holds constants that are not tensors: {bad[:5]}")
        try:
            art = serialize(ep, serialize_state_dict=False, serialize_constants=False,
                            serialize_example_inputs=False)  # fmt: skip
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"serializing the exported program failed ({type(e).__name__}: {e})") from None
        tensors = {f"state.{k}": v.detach().to("cpu").clone().contiguous() for k, v in ep.state_dict.items()}
        tensors.update(
            {f"constant.{k}": v.detach().to("cpu").clone().contiguous() for k, v in ep.constants.items()}
        )
        path = Path(path)
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(art.exported_program))
        atomic_write(tensors_file(path), lambda tmp: save_file(tensors, tmp))
        with torch.no_grad():
            want = _call(model, example)
            loaded = load_exported(path)
            got = _call(loaded, example)
        _check_same(model, loaded, want, got, rtol)
    finally:
        model.train(was_training)
    return {"exported": str(path.resolve())}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else ""


def _check_same(model: nn.Module, loaded: nn.Module, want: Any, got: Any, rtol: float) -> None:
    """The reloaded program has the model's state-dict names and shapes and reproduces its outputs."""
    mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in loaded.state_dict().items()}
    if mine != theirs:
        raise ExportError(
            "the exported program's state dict differs from the model's (missing "
            f"{sorted(set(mine) - set(theirs))[:5]}, unexpected {sorted(set(theirs) - set(mine))[:5]})"
        )
    flat_w, spec_w = torch.utils._pytree.tree_flatten(want)
    flat_g, spec_g = torch.utils._pytree.tree_flatten(got)
    if spec_w != spec_g or len(flat_w) != len(flat_g):
        raise ExportError("the exported program returns another output structure than the model")
    for a, b in zip(flat_w, flat_g):
        if isinstance(a, Tensor) and not torch.allclose(a.float(), b.float(), rtol=rtol, atol=rtol * 1e-1):
            err = (a.float() - b.float()).abs().max().item()
            raise ExportError(
                f"the exported program's outputs differ from the model's (max abs error {err:.3g})"
            )


def _eval_only(module: nn.Module) -> None:
    """Set eval mode and make ``train(True)`` a clear error (the graph holds eval-mode behaviour)."""

    def train(self: nn.Module, mode: bool = True) -> nn.Module:
        if mode:
            raise ValueError(
                "this model was loaded from an exported program traced in eval mode (dropout off, BatchNorm "
                "running statistics); a train-mode probe needs the model's code: give the run a factory spec"
            )
        return self

    for m in module.modules():
        m.training = False
    module.train = types.MethodType(train, module)  # type: ignore[method-assign]
    module.eval = types.MethodType(lambda self: self, module)  # type: ignore[method-assign]


def load_exported(path: str | Path) -> nn.Module:
    """The module of the exported program at ``path`` (module docstring: JSON and safetensors only, no
    pickle). Bad files raise ``ValueError`` naming the file and what was expected."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from torch._export.serde.schema import ExportedProgram as SerializedProgram
    from torch._export.serde.serialize import ExportedProgramDeserializer, _bytes_to_dataclass

    path = Path(path)
    tfile = tensors_file(path)
    for f in (path, tfile):
        if not f.is_file():
            raise ValueError(f"exported model: {f} does not exist (expected it beside the run's model spec)")
    raw = path.read_bytes()
    try:
        if not isinstance(json.loads(raw), dict):
            raise ValueError("not a JSON object")
        program = _bytes_to_dataclass(SerializedProgram, raw)
    except Exception as e:  # noqa: BLE001 - any parse failure: the file is not an exported program
        raise ValueError(
            f"exported model: {path} is not a torch.export program in JSON "
            f"({type(e).__name__}: {_first_line(e)})"
        ) from None
    try:
        tensors = load_file(str(tfile))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"exported model: {tfile} is not a safetensors file ({e})") from None
    params = {
        s.parameter.parameter_name
        for s in program.graph_module.signature.input_specs
        if s.type == "parameter"
    }
    state = {
        k[len("state."):]: nn.Parameter(v) if k[len("state."):] in params else v
        for k, v in tensors.items() if k.startswith("state.")
    }  # fmt: skip
    constants = {k[len("constant.") :]: v for k, v in tensors.items() if k.startswith("constant.")}
    try:
        ep = ExportedProgramDeserializer().deserialize(program, state, constants, None)
        module = ep.module()
    except Exception as e:  # noqa: BLE001 - a program that does not match its tensors or this torch
        raise ValueError(
            f"exported model: {path} could not be rebuilt ({type(e).__name__}: {_first_line(e)}); written by "
            f"another torch version, or {tfile.name} does not belong to it"
        ) from None
    _eval_only(module)
    return module


def export_fingerprint(path: str | Path) -> dict[str, str | None]:
    """The sha256 of an exported program's two files (for cache keys)."""
    from .checkpoints import file_sha256

    p = Path(path)
    return {
        "exported_sha256": file_sha256(p) if p.is_file() else None,
        "exported_tensors_sha256": file_sha256(tensors_file(p)) if tensors_file(p).is_file() else None,
    }
