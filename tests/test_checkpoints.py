"""Checkpoint I/O: round trips in every format and prefix convention, and every bad-input error."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import tracemalloc
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from dynascope.models import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    EmptyCheckpointError,
    NonFiniteWeightsError,
    NoStateDictError,
    StateDictMismatchError,
    UnknownFormatError,
    UnsafeCheckpointError,
    build,
    load_checkpoint,
    model_config,
    save_checkpoint,
)
from dynascope.models.tiny import TINY_CONFIGS, build_tiny, example_input


class CustomPayload:
    """A user class: pickling an instance makes a checkpoint need a non-allowlisted global."""

    def __init__(self, value: int = 3) -> None:
        self.value = value


CUSTOM_GLOBAL = f"{CustomPayload.__module__}.{CustomPayload.__qualname__}"


def trained_like(key: str) -> nn.Module:
    """A model whose weights differ from any seed's init and whose BN buffers are non-trivial."""
    model = build_tiny(key, seed=0)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    model.train()
    model(example_input(TINY_CONFIGS[key], n=6, seed=3))  # updates BatchNorm running stats
    return model.eval()


def assert_same_function(a: nn.Module, b: nn.Module, key: str) -> None:
    x = example_input(TINY_CONFIGS[key], n=5, seed=2)
    a.eval(), b.eval()
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def no_temp_files(folder: Path) -> bool:
    return not [f for f in os.listdir(folder) if f.endswith(".tmp")]


# ----------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("suffix", [".pt", ".pth", ".safetensors", ".ckpt"])
@pytest.mark.parametrize("key", sorted(TINY_CONFIGS))
def test_round_trip_every_model_every_format(tmp_path, key, suffix):
    model = trained_like(key)
    path = save_checkpoint(model, tmp_path / f"m{suffix}", metadata={"step": 12, "epoch": 3, "note": "x"})
    assert no_temp_files(tmp_path)
    fresh = build_tiny(key, seed=1)
    ck = load_checkpoint(path, fresh)
    assert ck.model is fresh and ck.format == {".ckpt": "lightning", ".safetensors": "safetensors"}.get(
        suffix, "torch"
    )
    assert_same_function(model, fresh, key)
    assert ck.metadata["step"] == 12 and ck.metadata["epoch"] == 3 and ck.metadata["note"] == "x"
    assert ck.model_config == model_config(model) and ck.step == 12 and ck.epoch == 3
    assert ck.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    # Without a model, the state_dict comes back with the model's own key names.
    bare = load_checkpoint(path)
    assert bare.state_dict.keys() == model.state_dict().keys()


@pytest.mark.parametrize(
    "wrap",
    [
        "ddp",
        "compile",
        "ddp+compile",
        "compile_submodule",
        "nested_state_dict",
        "model_state_dict",
        "model_key",
    ],
)
@pytest.mark.parametrize("key", ["cnn_bn_flatten", "transformer", "resnet"])
def test_prefixed_and_nested_state_dicts(tmp_path, key, wrap):
    model = trained_like(key)
    sd = model.state_dict()
    if wrap == "ddp":
        obj = {f"module.{k}": v for k, v in sd.items()}
    elif wrap == "compile":
        obj = {f"_orig_mod.{k}": v for k, v in sd.items()}
    elif wrap == "ddp+compile":
        obj = {f"module._orig_mod.{k}": v for k, v in sd.items()}
    elif wrap == "compile_submodule":  # torch.compile applied to the model's `head` only
        obj = {
            k.replace("head.", "head._orig_mod.", 1) if k.startswith("head.") else k: v for k, v in sd.items()
        }
    elif wrap == "nested_state_dict":
        obj = {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "step": 5}
    elif wrap == "model_state_dict":
        obj = {"model_state_dict": sd, "optimizer_state_dict": {"state": {}, "param_groups": []}, "epoch": 2}
    else:
        obj = {"model": sd, "args": {"lr": 0.1}}
    for suffix in (
        (".pt", ".safetensors")
        if wrap in ("ddp", "compile", "ddp+compile", "compile_submodule")
        else (".pt",)
    ):
        path = tmp_path / f"w{suffix}"
        save_checkpoint(obj, path) if suffix == ".safetensors" else torch.save(obj, path)
        fresh = build_tiny(key, seed=3)
        ck = load_checkpoint(path, fresh)
        assert_same_function(model, fresh, key)
        assert load_checkpoint(path).state_dict.keys() == sd.keys()
        if wrap.startswith("ddp"):
            assert "module." in ck.stripped_prefixes


@pytest.mark.parametrize("attr", ["model", "net", "backbone"])
def test_lightning_checkpoint_with_attribute_prefix(tmp_path, attr):
    key = "cnn_bn_flatten"
    model = trained_like(key)
    ck_obj = {
        "state_dict": {f"{attr}.{k}": v for k, v in model.state_dict().items()},
        "epoch": 4,
        "global_step": 400,
        "pytorch-lightning_version": "2.4.0",
        "hyper_parameters": {"lr": 0.01, "width": 3},
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.01, "params": []}]}],
        "callbacks": {},
    }
    path = tmp_path / "epoch=4-step=400.ckpt"
    torch.save(ck_obj, path)
    fresh = build_tiny(key, seed=9)
    ck = load_checkpoint(path, fresh)
    assert_same_function(model, fresh, key)
    assert ck.format == "lightning" and ck.stripped_prefixes == [f"{attr}."]
    assert ck.metadata["epoch"] == 4 and ck.metadata["global_step"] == 400 and ck.step == 400
    assert ck.metadata["hyper_parameters"] == {"lr": 0.01, "width": 3}
    bare = load_checkpoint(path)  # without a model only well-known attribute names are stripped
    expected = (
        set(model.state_dict()) if attr in ("model", "net") else {f"{attr}.{k}" for k in model.state_dict()}
    )
    assert set(bare.state_dict) == expected


def test_float64_model_round_trip(tmp_path):
    model = trained_like("transformer").double()
    save_checkpoint(model, tmp_path / "m.safetensors")
    fresh = build_tiny("transformer", seed=2).double()
    load_checkpoint(tmp_path / "m.safetensors", fresh)
    assert_same_function(model, fresh, "transformer")
    assert load_checkpoint(tmp_path / "m.safetensors").state_dict["head.weight"].dtype == torch.float64


def test_tied_weights_save_in_safetensors(tmp_path):
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(5, 3)
            self.head = nn.Linear(3, 5, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, x):
            return self.head(self.embed(x))

    torch.manual_seed(0)
    a, b = Tied(), Tied()
    save_checkpoint(a, tmp_path / "t.safetensors")
    load_checkpoint(tmp_path / "t.safetensors", b)
    assert torch.equal(a.head.weight, b.head.weight) and b.head.weight is b.embed.weight


def test_format_sniffed_from_content_not_suffix(tmp_path):
    model = trained_like("mlp")
    save_checkpoint(model, tmp_path / "weights.bin", format="safetensors")
    fresh = build_tiny("mlp", seed=4)
    assert load_checkpoint(tmp_path / "weights.bin", fresh).format == "safetensors"
    assert_same_function(model, fresh, "mlp")


def test_non_strict_reports_missing_and_unexpected(tmp_path):
    small = trained_like("mlp")
    sd = dict(small.state_dict())
    sd["extra.weight"] = torch.zeros(2)
    del sd["head.bias"]
    save_checkpoint(sd, tmp_path / "p.pt")
    fresh = build_tiny("mlp", seed=5)
    bias_before = fresh.head.bias.clone()
    ck = load_checkpoint(tmp_path / "p.pt", fresh, strict=False)
    assert ck.missing_keys == ["head.bias"] and ck.unexpected_keys == ["extra.weight"]
    assert torch.equal(fresh.head.weight, small.head.weight) and torch.equal(fresh.head.bias, bias_before)


def test_save_is_atomic_and_leaves_no_temp_on_failure(tmp_path, monkeypatch):
    model = build_tiny("mlp")
    target = save_checkpoint(model, tmp_path / "a.pt")
    before = target.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(build_tiny("mlp", seed=1), target)
    assert target.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["a.pt"]


def test_save_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="cannot infer checkpoint format"):
        save_checkpoint(build_tiny("mlp"), tmp_path / "m.weights")
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        save_checkpoint(build_tiny("mlp"), tmp_path / "m.pt", format="onnx")
    with pytest.raises(ValueError, match="empty state_dict"):
        save_checkpoint({}, tmp_path / "m.pt")
    with pytest.raises(TypeError, match="offending keys: a"):
        save_checkpoint({"a": 1.0}, tmp_path / "m.pt")
    with pytest.raises(TypeError, match="not JSON-able"):
        save_checkpoint(build_tiny("mlp"), tmp_path / "m.pt", metadata={"x": object()})
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------- errors
def check_error(exc_info, path: Path, kind: str, *fragments: str) -> None:
    err = exc_info.value
    msg = str(err)
    assert isinstance(err, CheckpointError) and isinstance(err, ValueError)
    assert err.kind == kind and err.path == str(path)
    assert str(path) in msg, msg
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in {msg!r}"


def test_missing_file(tmp_path):
    p = tmp_path / "nope.pt"
    with pytest.raises(CheckpointNotFoundError) as e:
        load_checkpoint(p)
    check_error(e, p, "not_found", "does not exist")
    assert isinstance(e.value, FileNotFoundError)


def test_empty_file(tmp_path):
    p = tmp_path / "empty.safetensors"
    p.write_bytes(b"")
    with pytest.raises(EmptyCheckpointError) as e:
        load_checkpoint(p)
    check_error(e, p, "empty", "0 bytes")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors", ".ckpt"])
@pytest.mark.parametrize("fraction", [0.5, 0.9])
def test_truncated_file(tmp_path, suffix, fraction):
    p = save_checkpoint(build_tiny("cnn"), tmp_path / f"t{suffix}")
    data = p.read_bytes()
    p.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(CorruptCheckpointError) as e:
        load_checkpoint(p, build_tiny("cnn"))
    check_error(e, p, "corrupt", "corrupt or truncated")


def test_truncated_legacy_pickle(tmp_path):
    p = tmp_path / "legacy.pt"
    torch.save(build_tiny("mlp").state_dict(), p, _use_new_zipfile_serialization=False)
    fresh = build_tiny("mlp", seed=1)
    load_checkpoint(p, fresh)  # the legacy format itself loads
    assert_same_function(build_tiny("mlp"), fresh, "mlp")
    p.write_bytes(p.read_bytes()[:200])
    with pytest.raises(CorruptCheckpointError) as e:
        load_checkpoint(p)
    check_error(e, p, "corrupt")


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".safetensors", ".ckpt", ".bin"])
def test_random_bytes_under_checkpoint_suffix(tmp_path, suffix):
    p = tmp_path / f"r{suffix}"
    p.write_bytes(bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).tolist()))
    with pytest.raises(CorruptCheckpointError) as e:
        load_checkpoint(p)
    check_error(e, p, "corrupt", "matches no known checkpoint format")


def test_random_bytes_unknown_suffix(tmp_path):
    p = tmp_path / "weights.dat"
    p.write_bytes(b"\x13\x37 not a checkpoint at all" * 10)
    with pytest.raises(UnknownFormatError) as e:
        load_checkpoint(p)
    check_error(e, p, "unknown_format", "unknown format", "'.dat'")


def test_safetensors_with_garbage_header(tmp_path):
    p = tmp_path / "bad.safetensors"
    header = b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 99]}}'
    p.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 16)
    with pytest.raises(CorruptCheckpointError) as e:
        load_checkpoint(p)
    check_error(e, p, "corrupt", "safetensors")


def test_wrong_architecture_names_keys_and_shapes(tmp_path):
    p = save_checkpoint(build("mlp", in_dim=5, width=7, depth=2, out_dim=3), tmp_path / "mlp.safetensors")
    # wider: every layer mis-shaped
    with pytest.raises(StateDictMismatchError) as e:
        load_checkpoint(p, build("mlp", in_dim=5, width=8, depth=2, out_dim=3))
    check_error(e, p, "mismatch", "shape mismatches (5)", "body.0.weight: checkpoint [7, 5] vs model [8, 5]")
    assert ("head.weight", (3, 7), (3, 8)) in e.value.mismatched
    # deeper: missing keys by name with shapes
    with pytest.raises(StateDictMismatchError) as e:
        load_checkpoint(p, build("mlp", in_dim=5, width=7, depth=3, out_dim=3))
    check_error(e, p, "mismatch", "missing keys (2)", "body.4.weight [7, 7]", "body.4.bias [7]")
    assert e.value.missing == ["body.4.weight", "body.4.bias"] and not e.value.unexpected
    # shallower: unexpected keys
    with pytest.raises(StateDictMismatchError) as e:
        load_checkpoint(p, build("mlp", in_dim=5, width=7, depth=1, out_dim=3))
    check_error(e, p, "mismatch", "unexpected keys (2)", "body.2.weight [7, 7]")
    # a different architecture entirely
    with pytest.raises(StateDictMismatchError) as e:
        load_checkpoint(p, build_tiny("transformer"))
    check_error(e, p, "mismatch", "does not fit Transformer", "missing keys", "embed.weight [11, 8]")
    check_error(
        e, p, "mismatch", "unexpected keys (4): body.0.bias [7], body.0.weight [7, 5]", "shape mismatches (2)"
    )
    # same key names, different layer types: shapes tell
    with pytest.raises(StateDictMismatchError) as e:
        load_checkpoint(p, build_tiny("cnn"))
    check_error(
        e, p, "mismatch", "does not fit CNN", "body.0.weight: checkpoint [7, 5] vs model [3, 1, 3, 3]"
    )
    # shape mismatches are errors even when not strict
    with pytest.raises(StateDictMismatchError):
        load_checkpoint(p, build("mlp", in_dim=5, width=8, depth=2, out_dim=3), strict=False)


@pytest.mark.parametrize("legacy", [False, True])
def test_unsafe_pickle_refused_naming_the_global(tmp_path, legacy):
    model = trained_like("mlp")
    p = tmp_path / "unsafe.pt"
    torch.save(
        {"state_dict": model.state_dict(), "extra": CustomPayload(5)},
        p,
        _use_new_zipfile_serialization=not legacy,
    )
    with pytest.raises(UnsafeCheckpointError) as e:
        load_checkpoint(p, build_tiny("mlp"))
    check_error(e, p, "unsafe", CUSTOM_GLOBAL, f"safe_globals=[{CUSTOM_GLOBAL!r}]", "weights_only")
    assert e.value.globals == [CUSTOM_GLOBAL]
    # The caller names the global it trusts (by name or as the class): exactly that one is allowed.
    for named in (CUSTOM_GLOBAL, CustomPayload):
        fresh = build_tiny("mlp", seed=1)
        load_checkpoint(p, fresh, safe_globals=[named])
        assert_same_function(model, fresh, "mlp")
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint(p, build_tiny("mlp"), safe_globals=["argparse.Namespace"])  # not the one it needs


def test_unsafe_pickle_stdlib_global_and_the_old_flag(tmp_path):
    model = trained_like("mlp")
    p = tmp_path / "hparams.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": argparse.Namespace(lr=0.1)}, p)
    with pytest.raises(UnsafeCheckpointError) as e:
        load_checkpoint(p)
    check_error(e, p, "unsafe", "argparse.Namespace")
    fresh = build_tiny("mlp", seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_checkpoint(p, fresh, safe_globals=["argparse.Namespace"])
    assert_same_function(model, fresh, "mlp")
    for flag in (True, "pickle"):  # the flag that let the file choose its globals is gone, loudly
        with pytest.raises(ValueError, match="allow_unsafe is gone.*safe_globals"):
            load_checkpoint(p, build_tiny("mlp"), allow_unsafe=flag)


def test_whole_pickled_module_is_refused(tmp_path):
    p = tmp_path / "module.pt"
    torch.save(build_tiny("mlp"), p)
    with pytest.raises(UnsafeCheckpointError) as e:
        load_checkpoint(p)
    check_error(e, p, "unsafe", "dynascope.models.architectures.MLP")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors", ".ckpt"])
def test_nonfinite_weights(tmp_path, suffix):
    model = trained_like("cnn")
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
        model.head.weight[1, 1] = float("nan")
        model.body[0].bias[0] = float("inf")
    p = save_checkpoint(model, tmp_path / f"nan{suffix}")
    with pytest.raises(NonFiniteWeightsError) as e:
        load_checkpoint(p, build_tiny("cnn"))
    check_error(
        e, p, "nonfinite", "head.weight (2 NaN, 0 Inf of", "body.0.bias (0 NaN, 1 Inf of", "allow_nonfinite"
    )
    assert sorted(e.value.tensors) == ["body.0.bias", "head.weight"]
    fresh = build_tiny("cnn", seed=1)
    load_checkpoint(p, fresh, allow_nonfinite=True)
    assert torch.isnan(fresh.head.weight[0, 0])


@pytest.mark.parametrize(
    "obj,fragment",
    [({"epoch": 3, "lr": 0.1}, "no state_dict found"), ([1, 2, 3], "contains a list"), ({}, "empty dict")],
)
def test_no_state_dict(tmp_path, obj, fragment):
    p = tmp_path / "x.pt"
    torch.save(obj, p)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(p)
    assert isinstance(e.value, (NoStateDictError, EmptyCheckpointError))
    assert str(p) in str(e.value) and fragment in str(e.value)


def test_directory_is_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="is not a file"):
        load_checkpoint(tmp_path)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # emitted by torch internals on import
def test_saving_a_compiled_model_round_trips(tmp_path):
    model = trained_like("mlp")
    compiled = torch.compile(model)  # state_dict keys gain `_orig_mod.`; nothing is compiled here
    assert all(k.startswith("_orig_mod.") for k in compiled.state_dict())
    p = save_checkpoint(compiled, tmp_path / "c.safetensors")
    fresh = build_tiny("mlp", seed=1)
    ck = load_checkpoint(p, fresh)
    assert ck.stripped_prefixes == ["_orig_mod."] and ck.model_config == model_config(model)
    assert_same_function(model, fresh, "mlp")


def test_file_sha256_is_memoised_but_sees_rewrites(tmp_path) -> None:
    import hashlib
    import os

    from dynascope.models.checkpoints import file_sha256

    p = tmp_path / "w.bin"
    p.write_bytes(b"first")
    assert file_sha256(p) == hashlib.sha256(b"first").hexdigest() == file_sha256(p)
    tmp = tmp_path / "w.tmp"
    tmp.write_bytes(b"second, longer")
    os.replace(tmp, p)  # the way checkpoints are written
    assert file_sha256(p) == hashlib.sha256(b"second, longer").hexdigest()


# ----------------------------------------------------------------------------------------- hardening
def safetensors_with_header_length(path: Path, n: int) -> Path:
    """A valid safetensors checkpoint whose JSON header is exactly ``n`` bytes (metadata padded)."""
    model = build("mlp", in_dim=3, width=4, depth=1, out_dim=2)

    def length(pad: int) -> int:
        save_checkpoint(model, path, format="safetensors", metadata={"step": 12, "pad": "x" * pad})
        return int.from_bytes(path.read_bytes()[:8], "little")

    pad = max(0, n - length(0) - 16)  # one more pad byte adds one header byte (before 8-byte alignment)
    while (got := length(pad)) < n:
        pad += 1
    assert got == n, f"header length {got}, wanted {n}"
    return path


@pytest.mark.parametrize("suffix", [".safetensors", ".bin", ".pt"])
@pytest.mark.parametrize("n", [640, 896, 1152, 1408])
def test_safetensors_header_length_that_looks_like_a_pickle_opcode(tmp_path, n, suffix):
    p = safetensors_with_header_length(tmp_path / "w.safetensors", n)
    assert p.read_bytes()[0] == 0x80 and 2 <= p.read_bytes()[1] <= 5  # what fooled the old sniffer
    q = p.with_name(f"copy{suffix}")
    q.write_bytes(p.read_bytes())
    model = build("mlp", in_dim=3, width=4, depth=1, out_dim=2)
    fresh = build("mlp", in_dim=3, width=4, depth=1, out_dim=2, seed=1)
    ck = load_checkpoint(q, fresh)
    assert ck.format == "safetensors" and ck.step == 12 and ck.metadata["pad"].startswith("x")
    assert ck.model_config == model_config(model)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))


@pytest.mark.parametrize("legacy", [False, True])
def test_torch_content_named_safetensors_is_loaded_as_torch(tmp_path, legacy):
    model = trained_like("mlp")
    p = tmp_path / "really_torch.safetensors"
    torch.save(model.state_dict(), p, _use_new_zipfile_serialization=not legacy)
    fresh = build_tiny("mlp", seed=1)
    assert load_checkpoint(p, fresh).format == "torch"
    assert_same_function(model, fresh, "mlp")
    p.write_bytes(p.read_bytes()[:300])  # damaged: a CheckpointError, never a SafetensorError
    with pytest.raises(CorruptCheckpointError) as e:
        load_checkpoint(p)
    check_error(e, p, "corrupt")


PEAK_BYTES = 64 * 2**20  # a refused file costs kilobytes; the sizes these files claim are gigabytes


@contextlib.contextmanager
def at_most_python_bytes(limit: int):
    """Fail when the block's peak of Python allocations (tracemalloc: bytes objects, pickle buffers) passes
    ``limit`` — a count, where a wall-clock bound would depend on the machine."""
    tracemalloc.start()
    try:
        yield
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak <= limit, f"peak Python allocation {peak} B > {limit} B"


@pytest.mark.filterwarnings("ignore::UserWarning")  # sparse CSR is beta, quantized deprecated
@pytest.mark.parametrize(
    "make,fragment",
    [
        (lambda: torch.zeros(4, 3).to_sparse(), "layout sparse_coo"),
        (lambda: torch.zeros(4, 3).to_sparse_csr(), "layout sparse_csr"),
        (lambda: torch.empty(10**7, 10**4, device="meta"), "device meta"),
        (lambda: torch.quantize_per_tensor(torch.zeros(4, 3), 0.1, 0, torch.qint8), "quantized"),
    ],
    ids=["sparse_coo", "sparse_csr", "meta", "quantized"],
)
def test_non_dense_tensors_refused_up_front(tmp_path, make, fragment):
    from dynascope.models import UnsupportedTensorError

    p = tmp_path / "odd.pt"
    torch.save({"head.weight": make(), "head.bias": torch.zeros(4)}, p)
    with pytest.raises(UnsupportedTensorError) as e, at_most_python_bytes(PEAK_BYTES):
        load_checkpoint(p, build("mlp", in_dim=3, width=4, depth=0, out_dim=4))
    check_error(e, p, "unsupported_tensor", "head.weight", fragment, "dense")


def _legacy_with_huge_string_length(path: Path) -> None:
    import pickletools

    torch.save(build_tiny("mlp").state_dict(), path, _use_new_zipfile_serialization=False)
    data = bytearray(path.read_bytes())
    with open(path, "rb") as f:  # a legacy file is several pickles in a row; find a string in any
        ops = (op for _ in range(4) for op in pickletools.genops(f))
        pos = next(p for op, _a, p in ops if op.name in ("BINUNICODE", "BINSTRING"))
    data[pos + 1 : pos + 5] = (0xFFFFFFF0).to_bytes(4, "little")  # a 4 GiB string in a small file
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("safe_globals", [[], ["argparse.Namespace"]])
def test_legacy_pickle_with_a_huge_string_length_is_corrupt(tmp_path, safe_globals):
    p = tmp_path / "huge.pt"
    _legacy_with_huge_string_length(p)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CorruptCheckpointError) as e, at_most_python_bytes(PEAK_BYTES):
            load_checkpoint(p, safe_globals=safe_globals)  # never allocates the 4 GiB the length claims
    check_error(e, p, "corrupt")


@pytest.mark.parametrize("key", ["step", "epoch", "global_step"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1, 3.5, 2**63, 1e30, True])
def test_step_and_epoch_must_be_integers_in_range(tmp_path, key, value):
    import json

    from dynascope.models import CheckpointMetadataError

    p = tmp_path / "meta.pt"
    sd = build_tiny("mlp").state_dict()
    torch.save({"state_dict": sd, "dynascope_metadata": json.dumps({key: value})}, p)
    with pytest.raises(CheckpointMetadataError) as e:
        load_checkpoint(p)
    check_error(e, p, "metadata", repr(key))
    with pytest.raises(CheckpointMetadataError, match=repr(key)):
        save_checkpoint(build_tiny("mlp"), tmp_path / "out.safetensors", metadata={key: value})
    assert not (tmp_path / "out.safetensors").exists()


def test_lightning_top_level_step_out_of_range(tmp_path):
    from dynascope.models import CheckpointMetadataError

    p = tmp_path / "big.ckpt"
    sd = {f"model.{k}": v for k, v in build_tiny("mlp").state_dict().items()}
    torch.save({"state_dict": sd, "epoch": 1, "global_step": 2**63}, p)
    with pytest.raises(CheckpointMetadataError) as e:
        load_checkpoint(p)
    check_error(e, p, "metadata", "'global_step'", "2**63")
    torch.save({"state_dict": sd, "epoch": 1, "global_step": 2**63 - 1}, p)
    ck = load_checkpoint(p)
    assert ck.step == 2**63 - 1 and ck.epoch == 1


@pytest.mark.parametrize("dtype", [torch.bool, torch.int64, torch.int8])
def test_tensor_dtype_of_another_kind_is_refused(tmp_path, dtype):
    model = build("mlp", in_dim=3, width=4, depth=0, out_dim=4)
    sd = model.state_dict()
    sd["head.weight"] = torch.ones(sd["head.weight"].shape, dtype=dtype)
    p = tmp_path / "ints.pt"
    torch.save(sd, p)
    with pytest.raises(StateDictMismatchError) as e:
        load_checkpoint(p, build("mlp", in_dim=3, width=4, depth=0, out_dim=4))
    check_error(e, p, "mismatch", "dtype", f"head.weight: checkpoint {str(dtype)[6:]} vs model float32")
    sd["head.weight"] = torch.ones(
        sd["head.weight"].shape, dtype=torch.float16
    )  # floating into floating: fine
    torch.save(sd, p)
    load_checkpoint(p, build("mlp", in_dim=3, width=4, depth=0, out_dim=4))


MARKER_ENV = "DYNASCOPE_TEST_MARKER"


class ExecPayload:
    def __reduce__(self):
        return (exec, (f"open({os.environ[MARKER_ENV]!r}, 'w').write('exec ran')",))


class EvalPayload:
    def __reduce__(self):
        return (eval, (f"open({os.environ[MARKER_ENV]!r}, 'w').write('eval ran')",))


class SystemPayload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ[MARKER_ENV]}",))


class SubprocessPayload:
    def __reduce__(self):
        import subprocess

        return (subprocess.call, (["touch", os.environ[MARKER_ENV]],))


class ImportPayload:
    def __reduce__(self):
        import importlib

        return (importlib.import_module, ("antigravity",))


class RunpyPayload:
    def __reduce__(self):
        import runpy

        return (runpy.run_path, (os.environ[MARKER_ENV] + ".py",))


class PickleLoadsPayload:
    def __reduce__(self):
        import pickle

        return (pickle.loads, (pickle.dumps(SystemPayload()),))


@pytest.mark.parametrize(
    "payload,global_",
    [
        (ExecPayload, "builtins.exec"),
        (EvalPayload, "builtins.eval"),
        (SystemPayload, "posix.system"),
        (SubprocessPayload, "subprocess.call"),
        (ImportPayload, "importlib.import_module"),
        (RunpyPayload, "runpy.run_path"),
        (PickleLoadsPayload, "pickle.loads"),
    ],
)
@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("named", [False, True])
def test_denied_globals_never_run(tmp_path, monkeypatch, payload, global_, legacy, named):
    """Refused whether or not the caller names the global in ``safe_globals``."""
    marker = tmp_path / "marker"
    monkeypatch.setenv(MARKER_ENV, str(marker))
    (tmp_path / "marker.py").write_text(f"open({str(marker)!r}, 'w').write('runpy ran')\n")
    p = tmp_path / "evil.pt"
    sd = build_tiny("mlp").state_dict()
    torch.save({"state_dict": sd, "x": payload()}, p, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(UnsafeCheckpointError) as e:
        load_checkpoint(p, build_tiny("mlp"), safe_globals=[global_] if named else [])
    check_error(e, p, "unsafe", "never allows")
    if not named:
        check_error(e, p, "unsafe", global_)
    assert not marker.exists(), marker.read_text()


class PipepagerPayload:
    def __reduce__(self):
        import pydoc

        return (pydoc.pipepager, ("x", f"touch {os.environ[MARKER_ENV]}"))


class TimeitPayload:
    def __reduce__(self):
        import timeit

        return (timeit.timeit, (f"open({os.environ[MARKER_ENV]!r}, 'w')", "pass", None, 1))


@pytest.mark.parametrize("payload,global_", [(PipepagerPayload, "pydoc.pipepager"),
                                             (TimeitPayload, "timeit.timeit")])  # fmt: skip
@pytest.mark.parametrize("legacy", [False, True])
def test_globals_off_the_deny_list_are_refused_unless_named(tmp_path, monkeypatch, payload, global_, legacy):
    """An allow-list, not a deny-list: gadgets nobody listed (these ran shell commands under the old
    ``allow_unsafe=True``) are refused because the caller did not name them."""
    marker = tmp_path / "marker"
    monkeypatch.setenv(MARKER_ENV, str(marker))
    p = tmp_path / "gadget.pt"
    torch.save({"state_dict": build_tiny("mlp").state_dict(), "x": payload()}, p,
               _use_new_zipfile_serialization=not legacy)  # fmt: skip
    for named in ([], ["argparse.Namespace"]):
        with pytest.raises(UnsafeCheckpointError) as e:
            load_checkpoint(p, build_tiny("mlp"), safe_globals=named)
        check_error(e, p, "unsafe", global_, "safe_globals")
    assert not marker.exists()


def test_denied_global_under_an_alias_is_refused(tmp_path, monkeypatch):
    """`torch._utils.os.system` is os.system reached through a module that imports os."""
    marker = tmp_path / "marker"
    monkeypatch.setenv(MARKER_ENV, str(marker))
    p = tmp_path / "alias.pt"
    torch.save({"state_dict": build_tiny("mlp").state_dict(), "x": SystemPayload()}, p,
               _use_new_zipfile_serialization=False)  # fmt: skip
    data = p.read_bytes()
    assert b"cposix\nsystem\n" in data
    p.write_bytes(data.replace(b"cposix\nsystem\n", b"ctorch._utils\nos.system\n"))
    with pytest.raises(CheckpointError):
        load_checkpoint(p)
    with pytest.raises(CheckpointError) as e:  # named, it resolves to posix.system: refused by what it is
        load_checkpoint(p, safe_globals=["torch._utils.os.system"])
    check_error(e, p, "unsafe", "torch._utils.os.system (= posix.system)", "never allows")
    assert not marker.exists()


def test_deny_list_covers_names_and_spares_plain_classes():
    from dynascope.models.torch_files import _denied

    for name in ["builtins.exec", "__builtin__.eval", "os.system", "posix.system", "subprocess.Popen",
                 "importlib.import_module", "runpy.run_module", "_pickle.loads", "marshal.loads",
                 "shutil.rmtree", "sys.modules", "socket.socket", "builtins.getattr", "foo.Bar.__init__",
                 "pathlib.Path.write_text", "torch.serialization.os.system"]:  # fmt: skip
        assert _denied(name), name
    allowed = ["argparse.Namespace", "collections.OrderedDict", "pathlib.PosixPath", "builtins.set",
               "torch._utils._rebuild_tensor_v2", "numpy.core.multiarray._reconstruct"]  # fmt: skip
    for name in [*allowed, CUSTOM_GLOBAL]:
        assert not _denied(name), name


def test_flipped_weight_byte_in_a_zip_checkpoint_is_caught_by_its_crc(tmp_path):
    import zipfile

    p = save_checkpoint(trained_like("mlp"), tmp_path / "w.pt")
    data = bytearray(p.read_bytes())
    info = next(i for i in zipfile.ZipFile(p).infolist() if "/data/" in i.filename)
    h = info.header_offset  # local header: 30 bytes, then the name and the extra field
    start = (
        h
        + 30
        + int.from_bytes(data[h + 26 : h + 28], "little")
        + int.from_bytes(data[h + 28 : h + 30], "little")
    )
    data[start + 1] ^= 0x10  # one bit of one weight: torch.load alone would load it silently
    p.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError) as e:
        load_checkpoint(p, build_tiny("mlp"))
    check_error(e, p, "corrupt", "CRC")


def test_legacy_file_whose_storage_index_lost_entries_is_corrupt(tmp_path):
    """Storage keys pickle cut to an empty list: torch.load would return uninitialised tensors."""
    import pickletools

    p = tmp_path / "legacy.pt"
    torch.save(build_tiny("mlp").state_dict(), p, _use_new_zipfile_serialization=False)
    data = p.read_bytes()
    with open(p, "rb") as f:
        for _ in range(4):  # magic, protocol, sys info, object
            for _op in pickletools.genops(f):
                pass
        keys_at = f.tell()
    p.write_bytes(data[:keys_at] + b"\x80\x02]q\x00." + data[keys_at:][len(pickle_of_keys(data, keys_at)) :])
    with pytest.raises(CorruptCheckpointError) as e:
        load_checkpoint(p, build_tiny("mlp"))
    check_error(e, p, "corrupt", "storage index", "uninitialised")


def pickle_of_keys(data: bytes, start: int) -> bytes:
    import io
    import pickletools

    f = io.BytesIO(data[start:])
    for _op in pickletools.genops(f):
        pass
    return data[start : start + f.tell()]


def test_self_overlapping_tensor_is_refused(tmp_path):
    from dynascope.models import UnsupportedTensorError

    model = build("mlp", in_dim=3, width=4, depth=0, out_dim=4)
    p = tmp_path / "expanded.pt"
    torch.save({"head.weight": torch.randn(1, 3).expand(4, 3), "head.bias": torch.zeros(4)}, p)
    with pytest.raises(UnsupportedTensorError) as e:
        load_checkpoint(p, model)
    check_error(e, p, "unsupported_tensor", "head.weight (strides [0, 1] for shape [4, 3] overlap)")


def _fuzz_module():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "fuzz_loader.py"
    spec = importlib.util.spec_from_file_location("fuzz_loader", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.filterwarnings("ignore")
def test_loader_fuzz_every_outcome_identical_weights_or_a_checkpoint_error(tmp_path):
    """2,500 seeded mutations of zip/legacy .pt, .safetensors (also named .bin) and .ckpt files
    (bench/fuzz_loader.py runs the same cases in subprocesses under a memory limit, 10,000+)."""
    from collections import Counter

    fuzz = _fuzz_module()
    case = fuzz.Case(tmp_path, seed=2026)
    outcomes = Counter()
    per_format: dict[str, Counter] = {s: Counter() for s in ("zip", "legacy", "st", "st.bin", "ckpt")}
    bad = {}
    for i in range(2500):
        outcome = case.run(i)
        outcomes[outcome] += 1
        per_format[list(per_format)[i % 5]][outcome] += 1
        if outcome.startswith("BAD"):
            bad[i] = outcome
    assert not bad, bad
    assert sum(outcomes.values()) == 2500
    for fmt, c in per_format.items():  # every format yields both loads and refusals
        assert c["identical"] > 0 and c["corrupt"] > 0, (fmt, c)
    assert {"mismatch", "unsafe", "metadata"} <= set(outcomes), outcomes


def test_zip_index_damage_that_torch_reads_as_an_empty_record_is_corrupt(tmp_path):
    """The DOS 'directory' bit in a central-directory entry's external attributes (Python's zipfile
    ignores it, CRCs intact): torch's reader then skips the record and returns the tensor's storage
    unfilled, garbage differing per load."""
    p = save_checkpoint(trained_like("mlp"), tmp_path / "w.pt")
    data = bytearray(p.read_bytes())
    entries = [i for i in range(len(data) - 4) if data[i : i + 4] == b"PK\x01\x02"]  # central directory
    name_of = {
        i: bytes(data[i + 46 : i + 46 + int.from_bytes(data[i + 28 : i + 30], "little")]) for i in entries
    }
    entry = next(i for i, n in name_of.items() if b"/data/0" in n)
    data[entry + 38] = 0x10  # external file attributes: MS-DOS directory flag
    p.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError) as e:
        load_checkpoint(p, build_tiny("mlp"))
    check_error(e, p, "corrupt", "marked as a directory")


def test_a_loaded_storage_that_matches_no_data_record_is_corrupt(tmp_path):
    """The backstop behind the zip checks: a storage whose bytes match no record's CRC-32 (what torch
    hands back when it skips a record it should have read) is refused, deterministically here by
    changing one loaded value."""
    from dynascope.models.torch_files import _check_zip_records, _check_zip_storages, _tensors_in

    p = save_checkpoint(trained_like("mlp"), tmp_path / "w.pt")
    records = _check_zip_records(p)
    sd = torch.load(p, weights_only=True)
    _check_zip_storages(sd, records, p, every_record=True)  # intact: passes
    next(t for t in _tensors_in(sd) if t.is_floating_point() and t.numel()).view(-1)[0] += 1.0
    with pytest.raises(CorruptCheckpointError) as e:
        _check_zip_storages(sd, records, p)
    check_error(e, p, "corrupt", "matches none of the file's data records")


def test_fuzz_bench_runs_cases_in_subprocesses_under_a_memory_limit(tmp_path):
    import json
    import subprocess
    import sys

    bench = Path(__file__).resolve().parents[1] / "bench" / "fuzz_loader.py"
    out = tmp_path / "fuzz.json"
    cmd = [sys.executable, str(bench), "--n", "40", "--workers", "1", "--mem-gb", "3", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert sum(report["counts"].values()) == 40 and report["bad"] == {}
    assert "RLIMIT_AS 3.0 GiB" in proc.stdout


def _rezip(src: Path, dst: Path, edit) -> None:
    """Copy a torch zip, passing data.pkl through ``edit`` (CRCs recomputed: a self-consistent zip)."""
    import zipfile

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            zout.writestr(info.filename, edit(data) if info.filename.endswith("data.pkl") else data)


def test_pickle_pointing_a_tensor_at_another_tensors_storage_is_corrupt(tmp_path):
    """A damaged storage key makes `b` show `a`'s values; its own record is then used by no tensor."""
    a, b = torch.arange(4.0), torch.arange(4.0) + 10
    src = tmp_path / "src.pt"
    torch.save({"a": a, "b": b}, src)
    ok = tmp_path / "ok.pt"
    _rezip(src, ok, lambda d: d)  # the copy itself loads, identical
    ck = load_checkpoint(ok)
    assert torch.equal(ck.state_dict["b"], b)
    bad = tmp_path / "bad.pt"
    _rezip(src, bad, lambda d: d.replace(b"X\x01\x00\x00\x001", b"X\x01\x00\x00\x000"))  # b's key "1" -> "0"
    assert torch.equal(torch.load(bad, weights_only=True)["b"], a)  # what torch.load alone returns
    with pytest.raises(CorruptCheckpointError) as e:
        load_checkpoint(bad)
    check_error(e, bad, "corrupt", "used by no tensor")


def test_a_storage_saved_on_its_own_is_not_an_unused_record(tmp_path):
    p = tmp_path / "s.pt"
    w = torch.randn(3, 2)
    torch.save({"w": w, "raw": torch.arange(5.0).untyped_storage()}, p)
    assert torch.equal(load_checkpoint(p).state_dict["w"], w)
