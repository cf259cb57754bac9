"""Architecture registry: determinism, configs, forward passes (float32/float64), torch.func support."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev, jvp, vmap

from dynascope.models import available, build, model_config, normalize_config, param_count, register
from dynascope.models.architectures import CausalSelfAttention
from dynascope.models.registry import _REGISTRY
from dynascope.models.tiny import TINY_CONFIGS, example_input, output_dim

CONFIGS = TINY_CONFIGS


def make_input(cfg: dict, n: int = 4, seed: int = 1) -> torch.Tensor:
    return example_input(cfg, n=n, seed=seed)


def build_cfg(cfg: dict, **over) -> nn.Module:
    c = {**cfg, **over}
    return build(c.pop("name"), **c)


def out_dim_of(cfg: dict) -> int:
    return output_dim(cfg)


def test_available_lists_all_required_models():
    assert {"mlp", "cnn", "transformer", "embed_mlp", "random_features", "resnet"} <= set(available())


@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_forward_float32_and_float64_and_head(key):
    cfg = CONFIGS[key]
    model = build_cfg(cfg).eval()
    x = make_input(cfg)
    y = model(x)
    assert y.shape == (4, out_dim_of(cfg)) and y.dtype == torch.float32
    assert isinstance(model.head, nn.Linear) and model.head.out_features == out_dim_of(cfg)
    # The head is the last module applied: its input (the penultimate features) determines the output.
    feats = []
    model.head.register_forward_hook(lambda m, inp, out: feats.append(inp[0]))
    y = model(x)
    torch.testing.assert_close(model.head(feats[0]), y, rtol=0, atol=0)
    m64 = model.double()
    x64 = x.double() if x.is_floating_point() else x
    y64 = m64(x64)
    assert y64.dtype == torch.float64
    torch.testing.assert_close(y64.float(), y, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_same_seed_same_weights_different_seed_different(key):
    cfg = CONFIGS[key]
    a, b, c = build_cfg(cfg), build_cfg(cfg), build_cfg(cfg, seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    floats = [k for k in sa if sa[k].is_floating_point() and sa[k].numel() > 1 and sa[k].std() > 0]
    assert floats and all(not torch.equal(sa[k], sc[k]) for k in floats)


@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_build_leaves_global_rng_untouched_and_config_rebuilds(key):
    cfg = CONFIGS[key]
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    model = build_cfg(cfg, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    mc = model_config(model)
    assert mc["name"] == cfg["name"] and mc["seed"] == 5
    assert json.loads(json.dumps(mc)) == mc  # JSON-able
    rebuilt = build(**json.loads(json.dumps(mc)))
    sa, sb = model.state_dict(), rebuilt.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_config_fills_defaults_and_lists():
    m = build("cnn", in_channels=1, image_size=4, channels=(2, 3), out_dim=2)
    cfg = model_config(m)
    assert cfg["channels"] == [2, 3] and cfg["batchnorm"] is False and cfg["pool"] == "avg"
    assert model_config(
        build("transformer", **{k: v for k, v in CONFIGS["transformer"].items() if k != "name"})
    )["layernorm"]


def test_param_count_closed_forms():
    i, w, d, o = 5, 7, 3, 2
    m = build("mlp", in_dim=i, width=w, depth=d, out_dim=o)
    assert param_count(m) == (i * w + w) + (d - 1) * (w * w + w) + (w * o + o)
    rf = build("random_features", in_dim=5, n_features=12, out_dim=2)
    assert param_count(rf) == 12 * 2  # readout only; the random layer is a buffer
    assert "feature_weight" in dict(rf.named_buffers()) and "feature_weight" in rf.state_dict()
    assert all(not n.startswith("feature") for n, _ in rf.named_parameters())
    e = build("embed_mlp", vocab_size=7, d_embed=4, width=9, out_dim=5)
    assert param_count(e) == 7 * 4 + (8 * 9 + 9) + (9 * 5 + 5)
    e2 = build("embed_mlp", vocab_size=7, d_embed=4, width=9, out_dim=5, shared_embedding=False)
    assert param_count(e2) == param_count(e) + 7 * 4
    m.head.weight.requires_grad_(False)
    assert param_count(m, trainable_only=True) == param_count(m) - w * o


def test_mlp_body_layout_for_weight_matching():
    m = build("mlp", in_dim=3, width=4, depth=3, out_dim=2)
    kinds = [type(layer) for layer in m.body]
    assert kinds == [nn.Linear, nn.ReLU] * 3
    assert build("mlp", in_dim=3, width=4, depth=0, out_dim=2).head.in_features == 3


def test_cnn_accepts_flat_inputs_and_rejects_bad_shapes():
    m = build("cnn", in_channels=1, image_size=8, channels=[2], out_dim=3).eval()
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(m(x.reshape(3, 64)), m(x))
    with pytest.raises(ValueError, match="expected images"):
        m(torch.randn(3, 10))


def test_grokking_transformer_config_builds():
    m = build(
        "transformer", vocab_size=114, seq_len=3, d_model=128, n_heads=4, n_layers=1, d_mlp=512, out_dim=113
    )
    p = 113
    x = torch.tensor([[3, 5, p], [100, 112, p]])
    assert m(x).shape == (2, 113)
    # embed 114*128 + pos 3*128 + block (2 LN + qkv + out + mlp) + ln_f + head
    d, f = 128, 512
    block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d)
    assert param_count(m) == 114 * d + 3 * d + block + 2 * d + (d * 113 + 113)


def test_attention_matches_reference_sdpa():
    torch.manual_seed(0)
    att = CausalSelfAttention(d_model=8, n_heads=2, seq_len=5).double()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    n, t, d = x.shape
    q, k, v = att.qkv(x).reshape(n, t, 3, 2, 4).permute(2, 0, 3, 1, 4)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(n, t, d)
    torch.testing.assert_close(att(x), att.out(ref), rtol=1e-12, atol=1e-12)


def test_transformer_is_causal():
    cfg = CONFIGS["transformer"]
    m = build_cfg(cfg).eval()
    hidden = []
    m.blocks[-1].register_forward_hook(lambda mod, inp, out: hidden.append(out))
    x = make_input(cfg, n=2)
    x2 = x.clone()
    x2[:, -1] = (x[:, -1] + 1) % cfg["vocab_size"]
    m(x), m(x2)
    torch.testing.assert_close(hidden[0][:, :-1], hidden[1][:, :-1], rtol=0, atol=0)
    assert not torch.allclose(hidden[0][:, -1], hidden[1][:, -1])


def test_bad_configs_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown model 'nope'.*available: .*mlp"):
        build("nope")
    with pytest.raises(ValueError, match=r"unknown config keys \['widht'\]"):
        build("mlp", in_dim=2, widht=3, depth=1, out_dim=1)
    with pytest.raises(ValueError, match=r"missing required config keys \['out_dim'\]"):
        build("mlp", in_dim=2, width=3, depth=1)
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        build("mlp", in_dim=2, width=3, depth=1, out_dim=1, activation="swish")
    with pytest.raises(ValueError, match="divisible"):
        build("transformer", vocab_size=5, seq_len=2, d_model=6, n_heads=4, n_layers=1, d_mlp=4)
    with pytest.raises(TypeError, match="seed"):
        build("mlp", in_dim=2, width=3, depth=1, out_dim=1, seed=1.5)
    with pytest.raises(ValueError, match="not built by dynascope"):
        model_config(nn.Linear(2, 2))


def test_register_custom_model_and_duplicate_name():
    @register("_test_linear")
    def factory(n: int = 2) -> nn.Module:
        return nn.Linear(n, n)

    try:
        m = build("_test_linear", n=3, seed=1)
        assert model_config(m) == {"name": "_test_linear", "seed": 1, "n": 3}
        assert "_test_linear" in available()
        with pytest.raises(ValueError, match="already registered"):
            register("_test_linear")(lambda: nn.Linear(1, 1))
    finally:
        _REGISTRY.pop("_test_linear", None)


@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_torch_func_jvp_matches_reverse_mode_and_vmap_matches_batch(key):
    """Forward-mode J·v (jvp) equals the reverse-mode Jacobian (jacrev) times v, in float64."""
    cfg = CONFIGS[key]
    model = build_cfg(cfg).double().eval()
    x = make_input(cfg, n=3)
    x = x.double() if x.is_floating_point() else x
    params = {k: v.detach() for k, v in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    tangents = {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in params.items()}

    def f(p):
        return functional_call(model, p, (x,))

    out, jv = jvp(f, (params,), (tangents,))
    jac = jacrev(f)(params)
    ref = sum((jac[k].flatten(2) @ tangents[k].flatten()) for k in params)
    torch.testing.assert_close(jv, ref, rtol=1e-9, atol=1e-10)
    # per-example evaluation under vmap agrees with the batched forward
    per_ex = vmap(lambda xi: functional_call(model, params, (xi.unsqueeze(0),)).squeeze(0))(x)
    torch.testing.assert_close(per_ex, out, rtol=1e-10, atol=1e-12)
    assert math.isfinite(float(out.abs().sum()))


def test_normalize_config_matches_built_model_config():
    cfg = dict(in_dim=3, width=4, depth=1, out_dim=2, activation="tanh")
    assert normalize_config("mlp", **cfg, seed=2) == model_config(build("mlp", **cfg, seed=2))
    with pytest.raises(ValueError, match="unknown config keys"):
        normalize_config("mlp", **cfg, dropout=0.1)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # emitted by torch internals on import
def test_model_config_sees_through_compile_and_ddp_style_wrappers():
    m = build("mlp", in_dim=3, width=4, depth=1, out_dim=2)
    compiled = torch.compile(m)  # lazy: nothing is compiled until called

    class Wrapper(nn.Module):  # DistributedDataParallel keeps the model as `.module`
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

    assert model_config(compiled) == model_config(m) == model_config(Wrapper(m))
