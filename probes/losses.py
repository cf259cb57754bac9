"""Loss resolution shared by every probe.

A probe's objective is always the mean over the whole dataset,
``L(θ) = (1/N) Σ_i ℓ(f(x_i; θ), y_i)``, i.e. batches are weighted by their sample count.
A :class:`Loss` therefore exposes the *per-sample* loss ``ℓ`` (shape ``[B]``); probes sum it
over a batch and divide by the global sample count ``N``.

Built-in losses (``loss=`` argument of every probe):

* ``"cross_entropy"``: ``ℓ_i = −log softmax(f_i)[y_i]`` (integer targets).
* ``"mse"``: ``ℓ_i = mean_o (f_io − y_io)²`` (PyTorch's ``mse_loss`` convention, mean over outputs).
* ``"half_sse"``: ``ℓ_i = ½ Σ_o (f_io − y_io)²`` (the convention of the edge-of-stability papers).
* ``"token_cross_entropy"``: language-model outputs ``[B, T, V]`` against token targets ``[B, T]``;
  targets equal to ``ignore_index`` (−100) are not counted. Options as a dict spec
  ``{"name": "token_cross_entropy", "shift": true, "ignore_index": -100}``: ``shift`` predicts token
  ``t+1`` from position ``t`` (Hugging Face causal-LM convention, ``labels = input_ids``).
  **Reduction: the mean over counted tokens of the whole dataset**,
  ``L = Σ_i Σ_t ℓ_it / Σ_i T_i`` (``T_i`` the counted tokens of sequence ``i``). Its per-sample form is
  the *sum* over the sequence's counted tokens, ``ℓ_i = Σ_t ℓ_it``, and :meth:`Loss.count` is ``T_i``
  summed over a batch, so every probe's ``Σ_i ℓ_i / Σ_batches count`` is exactly that mean (batches
  weighted by their counted tokens, not their sequences). Per-example quantities (gradient coherence)
  use the per-sequence sums.
* ``"auto"``: integer targets → ``cross_entropy``, floating targets → ``mse``.

Class labels must lie in ``[0, C)`` for a model with ``C`` outputs (``-100``, PyTorch's ignore index,
is the one exception for ``cross_entropy``); anything else is a ``ValueError`` naming the first bad
label, never torch's ``IndexError`` or a device-side assert. :func:`check_model_input` runs the
model once on a few samples of the first batch and turns a dtype or shape error into a ``ValueError``
stating what the first layer expects and what it got; ``resolve_loss(..., model=, inputs=)`` does both.
* a callable ``fn(outputs, targets) -> scalar`` returning the *batch mean*, like ``nn.CrossEntropyLoss()``;
  its per-sample form is obtained by evaluating it on single-sample batches (``vmap``). A callable whose
  second parameter is named ``batch`` (``fn(outputs, batch)``) sees the model's **whole output** (a tuple,
  dict or ``ModelOutput``, unless ``output=`` selects a part) and the batch as a dict: every input key
  (a tensor input is ``"x"``) and the targets under ``"labels"``.
* ``"auto"`` with integer targets ``[B, T]`` (token labels, e.g. Hugging Face ``labels``) is
  ``token_cross_entropy`` (unshifted; ``-100`` ignored).
* ``"pkg.module:function"`` or ``"path/file.py:function"``: such a callable imported by reference (from
  the environment or a file on this machine, never from an uploaded file).

Every built-in loss checks its shapes and names them with a suggestion when they do not fit (e.g.
``[B, T, V]`` outputs with ``cross_entropy`` suggest ``token_cross_entropy``).
"""

from __future__ import annotations

import functools
import inspect
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap
from torch.utils._pytree import tree_map

from ..datasets.batching import Inputs, input_tensors, map_inputs

IGNORE_INDEX = -100  # F.cross_entropy's default: such targets contribute zero loss
_CHECKED_LABELS: OrderedDict[tuple, torch.Tensor] = OrderedDict()  # label batches known to be in range

PerSample = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _count_samples(targets: torch.Tensor) -> int:
    return int(targets.shape[0])


@dataclass(frozen=True)
class Loss:
    """A resolved loss: its name, its per-sample form ``ℓ(outputs [B, ...], targets [B, ...]) -> [B]`` and
    ``counter(targets) -> int``, the units a batch adds to the normaliser (its samples; for
    ``token_cross_entropy`` its counted tokens), named by ``unit``."""

    name: str
    per_sample: PerSample
    counter: Callable[[torch.Tensor], int | torch.Tensor] = _count_samples
    unit: str = "samples"
    takes_batch: bool = False  # per_sample(outputs, targets, inputs): a loss fn(outputs, batch)

    def losses(self, outputs: Any, targets: torch.Tensor, inputs: Inputs | None = None) -> torch.Tensor:
        """ℓ_i for every sample of the batch ``[B]`` (``inputs`` reach a loss taking ``(outputs, batch)``)."""
        if self.takes_batch:
            return self.per_sample(outputs, targets, inputs)  # type: ignore[call-arg]
        return self.per_sample(outputs, targets)

    def total(self, outputs: Any, targets: torch.Tensor, inputs: Inputs | None = None) -> torch.Tensor:
        """Σ_i ℓ_i over the batch (divide by the dataset's :meth:`count` for the mean)."""
        return self.losses(outputs, targets, inputs).sum()

    def count(self, targets: torch.Tensor) -> int:
        """The batch's weight in the dataset mean: its sample count, or its counted tokens."""
        return int(self.counter(targets))

    @property
    def counts_samples(self) -> bool:
        """Whether the normaliser is the sample count (every built-in loss but ``token_cross_entropy``)."""
        return self.unit == "samples"


def _flat_pair(out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out2 = out.reshape(out.shape[0], -1)
    y2 = y.reshape(y.shape[0], -1).to(out2.dtype)
    if out2.shape != y2.shape:
        raise ValueError(
            f"regression loss: outputs {tuple(out.shape)} and targets {tuple(y.shape)} do not match"
        )
    return out2, y2


def check_labels(
    y: torch.Tensor, n_classes: int, *, ignore_index: int | None = None, what: str = "targets"
) -> None:
    """Raise ``ValueError`` naming the first label outside ``[0, n_classes)`` (``ignore_index`` allowed).

    Skipped under ``vmap`` (data-dependent control flow); the kernel's own bounds error is translated
    there (see ``_cross_entropy``). A batch that passed is remembered (by its memory, shape and
    version, holding a reference so the memory is not reused), so the products of a probe do not
    pay a device synchronisation each.
    """
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool or y.numel() == 0:
        return
    try:
        key = (y.device, y.untyped_storage().data_ptr(), y.storage_offset(), tuple(y.shape), y.stride(),
               y._version, n_classes, ignore_index)  # fmt: skip
    except (RuntimeError, NotImplementedError):  # a functorch-wrapped tensor (under vmap)
        return
    if key in _CHECKED_LABELS:  # this batch, unchanged, passed before: no device sync per product
        return
    try:
        bad = (y < 0) | (y >= n_classes)
        if ignore_index is not None:
            bad &= y != ignore_index
        if not bool(bad.any()):
            _CHECKED_LABELS[key] = y  # holding y keeps its memory from being reused under this key
            while len(_CHECKED_LABELS) > 256:
                _CHECKED_LABELS.popitem(last=False)
            return
    except RuntimeError:  # inside a torch.func transform: the bounds check below still catches it
        return
    i = int(bad.reshape(-1).nonzero()[0, 0])
    index = list(torch.unravel_index(torch.tensor(i), tuple(y.shape))) if y.dim() > 1 else [i]
    allowed = f"[0, {n_classes})" + (f" or {ignore_index} (ignored)" if ignore_index is not None else "")
    raise ValueError(
        f"{what}: class label {int(y.reshape(-1)[i])} at index {[int(j) for j in index]} is outside "
        f"{allowed} for a model with {n_classes} outputs ({int(bad.sum())} bad labels of {y.numel()})"
    )


def _cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if out.dim() == 3 and y.dim() == 2:
        raise ValueError(
            f"cross_entropy expects outputs [B, C]; got {tuple(out.shape)} with targets {tuple(y.shape)}, "
            "a language model's [B, T, V] outputs: use loss='token_cross_entropy'"
        )
    if out.dim() != 2:
        raise ValueError(f"cross_entropy expects outputs [B, C]; got {tuple(out.shape)}")
    if y.dim() != 1:
        raise ValueError(f"cross_entropy expects integer targets [B]; got {tuple(y.shape)}")
    if y.is_floating_point():
        raise ValueError(f"cross_entropy expects integer class labels; got {y.dtype} targets (loss='mse'?)")
    check_labels(y, out.shape[1], ignore_index=IGNORE_INDEX)
    try:
        return F.cross_entropy(out, y, reduction="none")
    except (IndexError, RuntimeError) as err:
        if "out of bounds" not in str(err):
            raise
        raise ValueError(
            f"targets: a class label is outside [0, {out.shape[1]}) for a model with {out.shape[1]} outputs "
            f"({err})"
        ) from None


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    o, t = _flat_pair(out, y)
    return ((o - t) ** 2).mean(dim=1)


def _half_sse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    o, t = _flat_pair(out, y)
    return 0.5 * ((o - t) ** 2).sum(dim=1)


IGNORE_INDEX = -100


def _token_pair(
    out: torch.Tensor, y: torch.Tensor, shift: bool, name: str = "token_cross_entropy"
) -> tuple[torch.Tensor, torch.Tensor]:
    if out.dim() != 3 or y.dim() != 2 or out.shape[:2] != y.shape or y.is_floating_point():
        hint = " (outputs [B, C] with targets [B]: use loss='cross_entropy')" if out.dim() == 2 else ""
        raise ValueError(
            f"{name} expects outputs [B, T, V] and integer targets [B, T]; got outputs "
            f"{tuple(out.shape)} and targets {tuple(y.shape)} ({y.dtype}){hint}"
        )
    if shift:
        out, y = out[:, :-1], y[:, 1:]
    return out, y


@functools.cache
def token_cross_entropy(shift: bool = False, ignore_index: int = IGNORE_INDEX) -> Loss:
    """Per-token cross-entropy (module docstring): ``per_sample`` sums a sequence's counted tokens,
    ``count`` counts a batch's tokens whose target is not ``ignore_index`` (after the optional shift)."""

    def per_sample(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        o, t = _token_pair(out, y, shift)
        ll = F.cross_entropy(
            o.reshape(-1, o.shape[-1]), t.reshape(-1), reduction="none", ignore_index=ignore_index
        )
        return ll.reshape(t.shape).sum(dim=1)

    def count(y: torch.Tensor) -> torch.Tensor:  # a tensor: usable inside vmap (per-example probes)
        t = y[:, 1:] if shift else y
        return (t != ignore_index).sum()

    name = "token_cross_entropy" + (" (shifted)" if shift else "")
    return Loss(name, per_sample, count, "tokens")


BUILTIN_LOSSES: dict[str, PerSample] = {
    "cross_entropy": _cross_entropy,
    "mse": _mse,
    "half_sse": _half_sse,
}
#: Every loss name a spec may give (``token_cross_entropy`` takes options, so it is built, not looked up).
LOSS_NAMES = (*BUILTIN_LOSSES, "token_cross_entropy")


def _from_batch_mean(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> PerSample:
    def single(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return fn(o.unsqueeze(0), t.unsqueeze(0))

    return vmap(single)


def takes_batch(fn: Callable) -> bool:
    """Whether a loss callable's second parameter is named ``batch`` (``fn(outputs, batch)``)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    return len(params) >= 2 and params[1].name == "batch"


def _from_batch_loss(fn: Callable[[Any, dict[str, torch.Tensor]], torch.Tensor]) -> Callable:
    """Per-sample form of a batch-mean ``fn(outputs, batch)``: ``fn`` on single-sample slices of every
    output tensor and batch key (``vmap``; output leaves without the batch dimension are passed whole)."""

    def per_sample(out: Any, y: torch.Tensor, x: Inputs | None = None) -> torch.Tensor:
        batch = {**(input_tensors(x) if x is not None else {}), "labels": y}
        n = y.shape[0]

        def dim(t: Any) -> int | None:
            return 0 if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == n else None

        out_dims = tree_map(dim, out)

        def one(o: Any, b: dict[str, torch.Tensor]) -> torch.Tensor:
            o1 = tree_map(lambda t, d: t.unsqueeze(0) if d == 0 else t, o, out_dims)
            return fn(o1, {k: v.unsqueeze(0) for k, v in b.items()})

        return vmap(one, in_dims=(out_dims, 0))(out, batch)

    return per_sample


def _first_layer(model: nn.Module) -> tuple[str, nn.Module] | None:
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, nn.Bilinear)):
            return name, m
    return None


def _expectation(model: nn.Module) -> str:
    found = _first_layer(model)
    if found is None:
        return ""
    name, m = found
    where = f"its first layer {name or type(model).__name__} ({type(m).__name__})"
    if isinstance(m, nn.Embedding):
        return f"; {where} expects integer token ids in [0, {m.num_embeddings})"
    dtype = str(m.weight.dtype).replace("torch.", "")
    if isinstance(m, nn.Linear):
        return f"; {where} expects {dtype} inputs [..., {m.in_features}]"
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        nd = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[type(m)]
        spatial = ", ".join(["L", "H, W", "D, H, W"][nd - 1 : nd])
        return f"; {where} expects {dtype} inputs [N, {m.in_channels}, {spatial}]"
    return f"; {where} expects {dtype} inputs"


def check_model_input(model: nn.Module, x: Inputs, *, n: int = 8) -> Any:
    """The model's outputs on the first ``n`` samples of ``x`` (eval mode, no grad, modes restored).

    Floating ``x`` is cast to the model's parameter dtype and moved to its device first, as probes do;
    a dict of inputs reaches ``forward`` as keyword arguments.

    A forward that fails on a dtype or shape is re-raised as ``ValueError`` with the inputs' shape and
    dtype and what the model's first layer expects.
    """
    p = next(model.parameters(), None)

    def prep(t: torch.Tensor) -> torch.Tensor:  # as the probes prepare data: on the device, in its dtype
        if p is not None:
            t = t.to(p.device, dtype=p.dtype if t.is_floating_point() else None)
        return t[:n]

    xs = map_inputs(x, prep)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            if isinstance(xs, Mapping):
                return model(**xs)
            return model(*xs) if isinstance(xs, tuple) else model(xs)
    except (RuntimeError, TypeError, IndexError) as err:
        if isinstance(x, (Mapping, tuple)):
            got = "inputs " + ", ".join(f"{k} {list(v.shape)} ({str(v.dtype).replace('torch.', '')})"
                                        for k, v in input_tensors(x).items())  # fmt: skip
        else:
            got = f"{str(x.dtype).replace('torch.', '')} inputs of shape {list(x.shape)}"
        text = " ".join(str(err).split())[:200]
        raise ValueError(
            f"the model cannot take the data's inputs: got {got}{_expectation(model)} "
            f"({type(err).__name__}: {text})"
        ) from None
    finally:
        for m, training in modes:
            m.training = training


def resolve_loss(
    loss: str | Mapping[str, Any] | Callable | Loss,
    targets: torch.Tensor | None = None,
    *,
    model: nn.Module | None = None,
    inputs: Inputs | None = None,
) -> Loss:
    """Turn a ``loss=`` argument (a name, a dict spec ``{"name", ...options}``, ``"module:function"``,
    a callable or a :class:`Loss`) into a :class:`Loss`; ``"auto"`` looks at the targets' dtype.

    With ``model`` and ``inputs`` (a probe's first batch) the inputs are checked once against the model
    (:func:`check_model_input`) and, for cross-entropy, the first batch's labels against its outputs.
    """
    resolved = _resolve(loss, targets)
    if model is not None and inputs is not None:
        out = check_model_input(model, inputs)
        logits = isinstance(out, torch.Tensor) and out.dim() == 2
        if resolved.name == "cross_entropy" and targets is not None and logits:
            check_labels(targets, out.shape[1], ignore_index=IGNORE_INDEX)
    return resolved


def _callable_loss(name: str, fn: Callable) -> Loss:
    if takes_batch(fn):
        return Loss(name, _from_batch_loss(fn), takes_batch=True)
    return Loss(name, _from_batch_mean(fn))


def _resolve(loss: str | Mapping[str, Any] | Callable | Loss, targets: torch.Tensor | None) -> Loss:
    if isinstance(loss, Loss):
        return loss
    if callable(loss):
        return _callable_loss(getattr(loss, "__name__", type(loss).__name__), loss)
    if isinstance(loss, Mapping):
        opts = dict(loss)
        name = opts.pop("name", None)
        if name != "token_cross_entropy" and opts:
            raise ValueError(f"loss spec {dict(loss)}: only 'token_cross_entropy' takes options")
        if name == "token_cross_entropy":
            bad = sorted(set(opts) - {"shift", "ignore_index"})
            if bad:
                raise ValueError(f"loss spec {dict(loss)}: unknown options {bad}; valid: shift, ignore_index")
            return token_cross_entropy(
                bool(opts.get("shift", False)), int(opts.get("ignore_index", IGNORE_INDEX))
            )
        loss = name
    if not isinstance(loss, str):
        raise ValueError(f"loss must be a name, a callable or a Loss; got {type(loss).__name__} {loss!r:.80}")
    if loss == "token_cross_entropy":
        return token_cross_entropy()
    if ":" in loss:
        from ..datasets.factory import import_object

        fn = import_object(loss, what="loss")
        if not callable(fn):
            raise ValueError(f"loss {loss!r} is a {type(fn).__name__}, not a callable")
        return _callable_loss(loss, fn)
    if loss == "auto":
        if targets is None:
            raise ValueError("loss='auto' needs the targets to choose cross-entropy or MSE")
        if not targets.is_floating_point() and targets.dim() == 2:
            return token_cross_entropy()
        loss = "mse" if targets.is_floating_point() else "cross_entropy"
    if loss not in BUILTIN_LOSSES:
        raise ValueError(
            f"unknown loss {loss!r}; choose one of {sorted(LOSS_NAMES)}, 'auto', "
            "'module:function' or a callable"
        )
    return Loss(loss, BUILTIN_LOSSES[loss])
