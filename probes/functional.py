"""One functional view of a model: ``f(x; θ_S, θ_F)`` as a pure function of a selected parameter block.

Every probe that differentiates a network with ``torch.func`` (curvature operators, the empirical NTK,
per-example gradients) sees it the same way:

* **parameter selection** — :func:`select_parameters`: the trainable parameters ``θ_S`` (optionally a
  block named by parameter names or module prefixes), flattened by :class:`ParamSpace` in
  ``named_parameters`` order into one vector of length ``P``;
* **fixed tensors** — ``θ_F``: the other parameters (detached) and every buffer (BatchNorm statistics);
  ``functional_call(model, {**θ_F, **θ_S}, (x,))`` evaluates the network at a given ``θ_S``;
* **mode** — ``"eval"`` (default: running statistics, no dropout) or ``"train"``, set for a block by
  :class:`ModeGuard`, which restores every submodule's flag afterwards;
* **dtype/device** — :func:`prepare_model` checks the model (a module with parameters, all finite) and
  copies it only when the dtype or device differs, so the caller's model is never modified;
* **attention kernels** — every evaluation runs under PyTorch's math SDPA backend
  (``sdpa_kernel(SDPBackend.MATH)``, :func:`attention_kernels`): the fused flash / memory-efficient kernels
  have no double-backward nor forward-mode rules, so Hessian, NTK and per-example products would fail on
  ``nn.MultiheadAttention`` or Hugging Face attention. Models with attention modules record
  ``"attention": "math SDPA"`` in their probes' ``.meta`` (:meth:`FunctionalModel.kernel_meta`); another op
  without a derivative rule is re-raised once by :func:`derivative_error` naming it and the fallbacks tried;
* **inputs** — a tensor is the positional argument, a dict of tensors (Hugging Face style batches) reaches
  ``forward`` as keyword arguments (:func:`call_model`);
* **outputs** — a model returning a tuple, dict or Hugging Face ``ModelOutput`` is reduced to one tensor by
  ``output=`` (:func:`select_output`: a key, an attribute, an index or a callable), by default by
  :func:`dynascope.models.logits_of` (``.logits``, else the first tensor); the rule used goes to ``.meta``
  as ``"outputs"``. A loss taking ``(outputs, batch)`` sees the model's whole output instead;
* **unused parameters** — selected parameters that do not reach the loss (an auxiliary head, a dead
  layer) have zero rows in every curvature operator, are listed in ``.meta["unused_params"]`` and warned
  about (:func:`unused_parameters`);
* **data on the device** — :class:`ResidentBatches` keeps the batches of a
  :class:`~dynascope.datasets.batching.BatchSource` on the model's device, in its dtype, after the first
  pass, so repeated products do not re-collate or re-copy them, as long as their bytes fit
  :data:`DEVICE_DATA_BUDGET`.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Union

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.utils.parametrizations import _WeightNorm
from torch.overrides import TorchFunctionMode

from ..datasets.batching import Batch, BatchSource, Inputs, as_batches, inputs_nbytes
from ..models.freezing import frozen_parameters, name_matches
from ..models.outputs import RULE_ATTR, logits_of, output_rule, raw_outputs

#: ``output=``: what the loss sees of a model's outputs (see :func:`select_output`).
OutputSelector = Union[None, str, int, Callable[[Any], torch.Tensor]]  # noqa: UP007 (a runtime alias)

#: The attention backend every differentiated evaluation runs under (recorded in ``.meta["attention"]``).
ATTENTION_BACKEND = "math SDPA"


def attention_kernels() -> AbstractContextManager[None]:
    """PyTorch's math scaled-dot-product-attention backend: it has double-backward and forward-mode rules."""
    return sdpa_kernel(SDPBackend.MATH)


def has_attention(model: nn.Module) -> bool:
    """Whether any submodule is an attention layer (its class name contains ``Attention``)."""
    return any("Attention" in type(m).__name__ for m in model.modules())


class _SDPAWatch(TorchFunctionMode):
    """Notes whether ``F.scaled_dot_product_attention`` is called (models calling it directly)."""

    seen = False

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.nn.functional.scaled_dot_product_attention:
            self.seen = True
        return func(*args, **(kwargs or {}))


def call_model(model: nn.Module, params: Mapping[str, torch.Tensor], x: Inputs) -> Any:
    """``model(x)`` at ``params`` (``functional_call``): a tensor is the positional argument, a tuple of
    tensors the positional arguments (``forward(x_t, t)``), a dict of tensors the keyword arguments
    (``forward(input_ids=..., attention_mask=...)``)."""
    if isinstance(x, Mapping):
        return functional_call(model, dict(params), (), dict(x))
    return functional_call(model, dict(params), x if isinstance(x, tuple) else (x,))


def forward(model: nn.Module, x: Inputs) -> Any:
    """``model(x)``, or ``model(**x)`` for a dict of inputs (plain evaluation, no parameter substitution)."""
    if isinstance(x, Mapping):
        return model(**x)
    return model(*x) if isinstance(x, tuple) else model(x)


def select_output(out: Any, output: OutputSelector = None) -> tuple[torch.Tensor, str]:
    """The tensor the loss sees of a model output, and the rule that chose it.

    ``output``: ``None`` (default: a tensor as is, else ``.logits`` / ``["logits"]``, else the first
    tensor), a string (a mapping key, else an attribute), an int (an index of a tuple/list) or a callable
    ``fn(outputs) -> tensor``. ``ValueError`` names what the output holds when the selection fails."""
    if output is None:
        return logits_of(out), output_rule(out)
    if callable(output):
        sel, rule = output(out), f"output={getattr(output, '__name__', type(output).__name__)}"
    elif isinstance(output, bool) or not isinstance(output, (str, int)):
        raise ValueError(f"output= must be a key, an attribute, an index or a callable; got {output!r}")
    elif isinstance(output, int):
        if not isinstance(out, (tuple, list)) or not -len(out) <= output < len(out):
            raise ValueError(f"output={output}: the model returned {_describe(out)}, which has no such index")
        sel, rule = out[output], f"output[{output}]"
    elif isinstance(out, Mapping) and output in out:
        sel, rule = out[output], f"output[{output!r}]"
    elif hasattr(out, output) and not isinstance(out, torch.Tensor):
        sel, rule = getattr(out, output), f"output.{output}"
    else:
        raise ValueError(f"output={output!r}: the model returned {_describe(out)}, which has no such key")
    if not isinstance(sel, torch.Tensor):
        raise ValueError(f"output={output!r} selects a {type(sel).__name__}, not a tensor ({_describe(out)})")
    return sel, rule


def _describe(out: Any) -> str:
    if isinstance(out, torch.Tensor):
        return f"a tensor {list(out.shape)}"
    if isinstance(out, Mapping):
        keys = [f"{k} {list(v.shape)}" if isinstance(v, torch.Tensor) else str(k) for k, v in out.items()]
        return f"a {type(out).__name__} with keys {keys}"
    if isinstance(out, (tuple, list)):
        return f"a {type(out).__name__} of {len(out)}"
    return f"a {type(out).__name__}"


def unused_parameters(loss: torch.Tensor, named: Sequence[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the parameters ``loss`` does not depend on (one backward with ``allow_unused``)."""
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    return [n for (n, _), g in zip(named, grads) if g is None]


def warn_unused(names: Sequence[str]) -> None:
    """The warning for parameters that do not reach the loss (their rows are zero)."""
    if names:
        shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
        warnings.warn(
            f"dynascope: {len(names)} parameter tensor(s) do not reach the loss ({shown}): their gradient "
            "and curvature rows are zero (listed in meta['unused_params']; restrict with params=[...] or "
            "choose the output with output=)",
            RuntimeWarning,
            stacklevel=3,
        )


_MISSING_DERIVATIVE = re.compile(r"derivative for (\S+) is not implemented|(\S+) does not (?:have|support)"
                                 r" (?:a )?(?:forward[- ]mode|batching|vmap)")  # fmt: skip


def derivative_error(err: BaseException, tried: str) -> RuntimeError | None:
    """A ``RuntimeError`` naming the op without a derivative rule and the fallbacks ``tried``, when ``err``
    is such a missing-derivative error (else ``None``: re-raise ``err`` itself)."""
    msg = str(err)
    m = _MISSING_DERIVATIVE.search(msg)
    if "once_differentiable" in msg:
        op = "a custom autograd.Function marked @once_differentiable"
    elif "functorch transforms" in msg:
        op = "a custom autograd.Function without torch.func support (no setup_context)"
    elif m is not None:
        op = m.group(1) or m.group(2)
    elif "not implemented" in msg or "forward AD" in msg or "forward-mode" in msg:
        op = "an op"
    else:
        return None
    return RuntimeError(
        f"{op} has no derivative rule needed here (tried: {tried}; attention ran under the "
        f"{ATTENTION_BACKEND} backend). Replace that op (e.g. a fused kernel) with a differentiable one, "
        "or restrict the probe with params=[...] to parameters before it. "
        f"Original error: {msg.splitlines()[0]}"
    )


MODES = ("eval", "train")

#: Bytes of input and target tensors :class:`ResidentBatches` keeps on the device across passes (1 GiB).
#: Counted batch by batch on the first pass (``x.nbytes + y.nbytes`` after the move and cast); data
#: larger than this is streamed from its source on every pass, as before.
DEVICE_DATA_BUDGET = 1 << 30


class ParamSpace:
    """Flattening of a subset of a model's parameters into one vector (in ``named_parameters`` order)."""

    def __init__(self, named: Sequence[tuple[str, torch.Tensor]]) -> None:
        if not named:
            raise ValueError("no parameters selected")
        self.names = [n for n, _ in named]
        self.shapes = [tuple(p.shape) for _, p in named]
        self.numels = [p.numel() for _, p in named]
        self.size = sum(self.numels)

    def split(self, vec: torch.Tensor) -> dict[str, torch.Tensor]:
        """Flat ``[size, ...]`` (extra trailing dims allowed) → {name: tensor of the param's shape, ...}."""
        parts = torch.split(vec, self.numels, dim=0)
        tail = tuple(vec.shape[1:])
        return {n: p.reshape(s + tail) for n, p, s in zip(self.names, parts, self.shapes)}

    def flatten(self, tensors: dict[str, torch.Tensor] | Sequence[torch.Tensor]) -> torch.Tensor:
        """{name: tensor} or a list in order → one flat vector."""
        seq = [tensors[n] for n in self.names] if isinstance(tensors, dict) else list(tensors)
        return torch.cat([t.reshape(-1) for t in seq])


def select_parameters(
    model: nn.Module, params: Sequence[str] | str | None = None
) -> list[tuple[str, nn.Parameter]]:
    """Trainable parameters of ``model``; ``params`` keeps those whose name equals or starts with
    one of the given names/module prefixes (``"body.0"`` selects ``body.0.weight``, ``body.0.bias``)
    or matches a glob (``"*.bias"``)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if params is None:
        return named
    wanted = [params] if isinstance(params, str) else list(params)
    chosen = [(n, p) for n, p in named if any(name_matches(n, w) for w in wanted)]
    if not chosen:
        raise ValueError(f"no trainable parameter matches {wanted}; names are {[n for n, _ in named]}")
    return chosen


def parameter_groups(model: nn.Module) -> dict[str, list[str]]:
    """Trainable parameter names grouped by the module that owns them (the per-layer blocks)."""
    groups: dict[str, list[str]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault(name.rpartition(".")[0] or name, []).append(name)
    return groups


def check_finite(model: nn.Module, what: str = "model") -> None:
    """``ValueError`` naming every parameter or floating buffer that holds NaN or Inf values."""
    bad = [
        f"{name} ({int((~torch.isfinite(t)).sum())} of {t.numel()})"
        for name, t in [*model.named_parameters(), *model.named_buffers()]
        if t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]
    if bad:
        raise ValueError(f"the {what} has non-finite (NaN/Inf) values in: {', '.join(bad)}")


def check_mode(mode: Any) -> str:
    """``mode`` if it is ``"eval"`` or ``"train"``, else a ``ValueError``."""
    if mode not in MODES:
        raise ValueError(f"mode must be 'eval' or 'train'; got {mode!r}")
    return mode


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper holds (``_orig_mod``): the same function, whose derivatives
    eager autograd gives (a compiled graph donates its buffers and has no double backward)."""
    orig = getattr(model, "_orig_mod", None)
    return orig if isinstance(orig, nn.Module) and type(model).__name__ == "OptimizedModule" else model


def _weight_norm(v: torch.Tensor, g: torch.Tensor, dim: int) -> torch.Tensor:
    """``g · v / ‖v‖`` with the norm over every dim but ``dim`` (all of them for ``dim = -1``), in plain
    differentiable ops: torch 2.13's fused ``_weight_norm`` has a wrong double backward (its products
    disagree with differences of its gradients by 26 %)."""
    dims = [d for d in range(v.dim()) if d != dim] if dim != -1 else list(range(v.dim()))
    return v * (g / v.pow(2).sum(dim=dims, keepdim=True).sqrt())


class _PlainWeightNorm(_WeightNorm):
    """torch's weight-norm parametrization, evaluated by :func:`_weight_norm`."""

    def forward(self, weight_g: torch.Tensor, weight_v: torch.Tensor) -> torch.Tensor:
        return _weight_norm(weight_v, weight_g, self.dim)


def plain_parametrizations(model: nn.Module) -> nn.Module:
    """``model``, or a copy whose ``weight_norm`` parametrizations evaluate :func:`_weight_norm` (the same
    function; derivatives of every order from plain ops)."""
    if not any(type(m) is _WeightNorm for m in model.modules()):
        return model
    model = copy.deepcopy(model)
    for m in model.modules():
        if type(m) is _WeightNorm:
            m.__class__ = _PlainWeightNorm
    return model


_COMPLEX_OF = {
    torch.float64: torch.complex128, torch.float32: torch.complex64, torch.float16: torch.complex32
}


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype`` if floating, in the complex dtype of that precision if complex (never dropping
    an imaginary part), unchanged otherwise (integer and bool buffers)."""
    if t.is_complex():
        return t.to(_COMPLEX_OF.get(dtype, torch.complex128))
    return t.to(dtype) if t.is_floating_point() else t


def prepare_model(
    model: nn.Module, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> nn.Module:
    """Check ``model`` (a module with parameters, all finite) and return it in ``dtype`` on ``device``.

    The caller's model is never modified: a deep copy is made when the dtype or device differs. A
    ``torch.compile``d module is probed through its original module (:func:`unwrap_compiled`), weight-norm
    parametrizations through plain ops (:func:`plain_parametrizations`); complex buffers (a fixed FFT
    filter) go to the complex dtype of ``dtype``'s precision.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    model = plain_parametrizations(unwrap_compiled(model))
    first = next(iter(model.parameters()), None)
    if first is None:
        raise ValueError("the model has no parameters")
    check_finite(model)
    change_dtype = dtype is not None and dtype != first.dtype
    change_device = device is not None and torch.device(device) != first.device
    if change_dtype or change_device:
        model = copy.deepcopy(model).to(device=device)
        if change_dtype:
            model._apply(lambda t: _cast(t, dtype))
    return model


class _RunDirectly:
    """Stands in for ``torch.utils.checkpoint.CheckpointFunction``: calls the block."""

    @staticmethod
    def apply(function: Callable, preserve_rng_state: bool, *args: Any) -> Any:
        return function(*args)


def _no_checkpoint_context(*args: Any, **kwargs: Any) -> Iterator[None]:
    """Stands in for torch's non-reentrant checkpoint generator: no saved-tensor hooks, no recomputation."""
    yield


@contextmanager
def plain_checkpointing() -> Iterator[None]:
    """Inside the block, ``torch.utils.checkpoint.checkpoint`` runs its function plainly (the same function
    and activations, every derivative): reentrant checkpointing detaches the block's inputs (its parameters
    then get no second derivative, and a first block's gradients are lost under ``torch.func``), and the
    non-reentrant kind's saved-tensor hooks are refused by ``torch.func`` transforms. The block's
    activations are kept, as without checkpointing."""
    import torch.utils.checkpoint as ckpt

    saved = ckpt.CheckpointFunction, ckpt._checkpoint_without_reentrant_generator
    ckpt.CheckpointFunction = _RunDirectly
    ckpt._checkpoint_without_reentrant_generator = _no_checkpoint_context
    try:
        yield
    finally:
        ckpt.CheckpointFunction, ckpt._checkpoint_without_reentrant_generator = saved


class ModeGuard:
    """Put a model in eval (default) or train mode for the duration of a block, then restore; activation
    checkpointing runs plainly meanwhile (:func:`plain_checkpointing`)."""

    def __init__(self, model: nn.Module, mode: str) -> None:
        self.model, self.mode = model, mode
        self.saved = [(m, m.training) for m in model.modules()]
        self._plain = plain_checkpointing()

    def __enter__(self) -> None:
        self.model.train(self.mode == "train")
        self._plain.__enter__()

    def __exit__(self, *exc: object) -> None:
        self._plain.__exit__(*exc)
        for m, training in self.saved:
            m.training = training


class FunctionalModel:
    """``model`` as the pure function ``(θ_S, x) ↦ f(x; θ_S, θ_F)`` of a selected parameter block.

    Attributes: ``model`` (the caller's module, or a copy in ``dtype`` / on ``device``), ``mode``,
    ``space`` (:class:`ParamSpace` of ``θ_S``), ``live`` ({name: nn.Parameter} of ``θ_S``, autograd
    leaves for reverse-over-reverse products), ``params`` (the same, detached: the primal point),
    ``fixed`` (``θ_F``: other parameters detached, and all buffers), ``dtype`` and ``device`` of ``θ_S``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        params: Sequence[str] | str | None = None,
        mode: str = "eval",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        output: OutputSelector = None,
        raw: bool = False,
    ) -> None:
        self.mode = check_mode(mode)
        self.output, self.raw = output, raw
        self.model = prepare_model(model, dtype=dtype, device=device)
        self.frozen = frozen_parameters(self.model)
        named = select_parameters(self.model, params)
        self.space = ParamSpace(named)
        self.live: dict[str, nn.Parameter] = dict(named)
        self.params = {n: p.detach() for n, p in named}
        self.fixed = {
            **{n: p.detach() for n, p in self.model.named_parameters() if n not in self.live},
            **dict(self.model.named_buffers()),
        }
        self.dtype = named[0][1].dtype
        self.device = named[0][1].device

    @property
    def names(self) -> list[str]:
        return self.space.names

    @property
    def numels(self) -> list[int]:
        return self.space.numels

    @property
    def size(self) -> int:
        """``P``, the number of entries of ``θ_S``."""
        return self.space.size

    def __call__(self, p: dict[str, torch.Tensor], x: Inputs) -> Any:
        """``f(x; p, θ_F)`` via :func:`call_model` (``p`` may be any subset-complete dict of ``θ_S``),
        under the math SDPA backend, reduced to one tensor by ``output=`` (module docstring); with
        ``raw=True`` (a loss taking ``(outputs, batch)``, no ``output=``) the whole output."""
        keep_raw = self.raw or self.output is not None
        with attention_kernels(), raw_outputs(keep_raw):
            if self._sdpa is None:  # the first evaluation: does the model call SDPA itself?
                watch = _SDPAWatch()
                with watch:
                    out = call_model(self.model, {**self.fixed, **p}, x)
                self._sdpa = watch.seen
            else:
                out = call_model(self.model, {**self.fixed, **p}, x)
        if self.raw and self.output is None:
            self.output_rule = "whole output (the loss takes (outputs, batch))"
            return out
        if self.output is not None or not isinstance(out, torch.Tensor):
            out, self.output_rule = select_output(out, self.output)
        return out

    #: The output rule applied (``None`` while the model returned plain tensors).
    output_rule: str | None = None
    _sdpa: bool | None = None

    def kernel_meta(self) -> dict[str, Any]:
        """``{"attention": "math SDPA"}`` for models with attention layers or calling
        ``scaled_dot_product_attention``, ``{"outputs": rule}`` for models whose outputs were selected,
        ``{"frozen_params": [...]}`` when some parameters do not train; empty for the rest."""
        meta: dict[str, Any] = {}
        if has_attention(self.model) or self._sdpa:
            meta["attention"] = ATTENTION_BACKEND
        rule = self.output_rule or getattr(self.model, RULE_ATTR, None)
        if rule is not None and rule != "tensor":
            meta["outputs"] = rule
        if self.frozen:
            meta["frozen_params"] = list(self.frozen)
        return meta

    def guard(self) -> ModeGuard:
        """The block's mode for a ``with`` statement (restored on exit)."""
        return ModeGuard(self.model, self.mode)

    def parameters_vector(self) -> torch.Tensor:
        """The current ``θ_S``, flattened."""
        return self.space.flatten(self.params)

    def batches(self, data: Any, batch_size: int | None = None, **shard: Any) -> ResidentBatches:
        """``data`` as batches on this model's device and in its dtype, kept there across passes; an
        encoder–decoder model's batches get their decoder inputs (:func:`decoder_inputs`)."""
        source = as_batches(data, batch_size, device=self.device, dtype=self.dtype, **shard)
        return ResidentBatches(source, prepare=decoder_inputs(self.model))


def decoder_inputs(model: nn.Module) -> Callable[[Batch], Batch] | None:
    """For a Hugging Face encoder–decoder model (T5, BART, ...): a batch of keyword inputs without
    ``decoder_input_ids`` gets them from its labels as the model's own training does (the labels shifted
    right, the start token first, −100 replaced by the pad token: ``prepare_decoder_input_ids_from_labels``).
    ``None`` for other models."""
    config = getattr(model, "config", None)
    shift = getattr(model, "prepare_decoder_input_ids_from_labels", None)
    if not getattr(config, "is_encoder_decoder", False) or shift is None:
        return None

    def prepare(b: Batch) -> Batch:
        if not isinstance(b.x, Mapping) or "decoder_input_ids" in b.x or "decoder_inputs_embeds" in b.x:
            return b
        return Batch({**b.x, "decoder_input_ids": shift(labels=b.y)}, b.y, b.n)

    return prepare


class ResidentBatches:
    """A :class:`BatchSource` whose batches stay on the device after the first full pass.

    The first pass streams from ``source`` and keeps each batch while the running total of
    ``x.nbytes + y.nbytes`` is at most ``max_bytes`` (default :data:`DEVICE_DATA_BUDGET`); when the
    pass completes within the budget the kept batches serve every later pass, otherwise they are
    dropped and every pass streams. The batches (and therefore the sums over them) are the same
    either way. Other attributes (``batch_size``, ``rank``, ``data`` ...) are the source's.
    """

    def __init__(
        self, source: BatchSource, max_bytes: int = DEVICE_DATA_BUDGET, prepare: Callable | None = None
    ) -> None:
        self.source = source
        self.prepare = prepare
        self.max_bytes = int(max_bytes)
        self._kept: list[Batch] | None = None
        self._fits = True

    def __getattr__(self, name: str) -> Any:  # batch_size, rank, world_size, data, device, dtype
        source = self.__dict__.get("source")
        if source is None:  # not yet initialised (copy / unpickle)
            raise AttributeError(name)
        return getattr(source, name)

    @property
    def resident(self) -> bool:
        """True once the whole dataset is held on the device."""
        return self._kept is not None

    def __iter__(self) -> Iterator[Batch]:
        if self._kept is not None:
            yield from self._kept
            return
        kept: list[Batch] = []
        used = 0
        for b in self.source:
            b = self.prepare(b) if self.prepare is not None else b
            if self._fits:
                used += inputs_nbytes(b.x) + b.y.nbytes
                if used <= self.max_bytes:
                    kept.append(b)
                else:
                    self._fits, kept = False, []
            yield b
        if self._fits:
            self._kept = kept

    def num_samples(self) -> int:
        if self._kept is not None:
            return sum(b.n for b in self._kept)
        return self.source.num_samples()

    def single_batch(self) -> Batch | None:
        """The data as one batch when it is held as tensors and batching is off."""
        b = self.source.single_batch()
        return self.prepare(b) if b is not None and self.prepare is not None else b

    def tensors(self) -> tuple[Inputs, torch.Tensor]:
        if self.prepare is None:
            return self.source.tensors()
        x, y = self.source.tensors()
        b = self.prepare(Batch(x, y, int(y.shape[0])))
        return b.x, b.y

    def targets(self) -> torch.Tensor:
        return self.source.targets()


__all__ = [
    "ATTENTION_BACKEND",
    "OutputSelector",
    "attention_kernels",
    "call_model",
    "forward",
    "select_output",
    "unused_parameters",
    "warn_unused",
    "derivative_error",
    "has_attention",
    "DEVICE_DATA_BUDGET",
    "FunctionalModel",
    "ModeGuard",
    "ParamSpace",
    "ResidentBatches",
    "check_finite",
    "check_mode",
    "parameter_groups",
    "prepare_model",
    "select_parameters",
]
