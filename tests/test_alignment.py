"""Permutation alignment: permuted copies compute the same function, weight matching and activation
matching recover a random permutation exactly, unsupported architectures fail clearly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dynascope.models import build
from dynascope.probes.alignment import (
    UnsupportedArchitectureError,
    activation_matching,
    activation_matching_permutations,
    apply_permutations,
    invert_permutations,
    permutation_spec,
    random_permutations,
    weight_matching,
    weight_matching_permutations,
)


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm distinct affine parameters and running statistics (init values are uniform)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(1 + 0.5 * torch.rand(m.num_features, generator=g))
                m.bias.copy_(0.5 * torch.randn(m.num_features, generator=g))
                m.running_mean.copy_(0.3 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.num_batches_tracked.fill_(7)
    return model


def _randomize_ln(model: nn.Module, seed: int = 0) -> nn.Module:
    """Distinct LayerNorm affine parameters (init values are uniform and would hide a wrong permutation)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(1 + 0.5 * torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.5 * torch.randn(m.bias.shape, generator=g))
    return model


def _resnet_bn(x: torch.Tensor) -> nn.Module:
    """A ResNet with random BN affine parameters and running statistics estimated on ``x`` (no unit is
    dead on ``x``, so activation matching can identify every channel)."""
    from dynascope.datasets.batching import as_batches
    from dynascope.probes.connectivity import reestimate_batchnorm

    model = build(
        "resnet", in_channels=2, image_size=6, widths=[4, 6, 8], out_dim=3, blocks_per_stage=2, seed=6
    )
    model = _randomize_bn(model).double()
    reestimate_batchnorm(model, as_batches((x, torch.zeros(len(x)))))
    return model


def _models() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    x_flat = torch.randn(32, 12, dtype=torch.float64)
    x_img = torch.randn(16, 2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return {
        "mlp": (build("mlp", in_dim=12, width=16, depth=3, out_dim=5, seed=1).double(), x_flat),
        "mlp_tanh_nobias": (
            build(
                "mlp", in_dim=12, width=10, depth=2, out_dim=5, activation="tanh", bias=False, seed=2
            ).double(),
            x_flat,
        ),
        "cnn_bn_avg": (
            _randomize_bn(
                build("cnn", in_channels=2, image_size=6, channels=[6, 8], out_dim=4, batchnorm=True, seed=3)
            ).double(),
            x_img,
        ),
        "cnn_bn_flatten": (
            _randomize_bn(
                build(
                    "cnn",
                    in_channels=2,
                    image_size=6,
                    channels=[5, 7],
                    out_dim=4,
                    batchnorm=True,
                    pool="flatten",
                    seed=4,
                )
            ).double(),
            x_img,
        ),
        "cnn_nobn": (
            build("cnn", in_channels=2, image_size=6, channels=[4, 6], out_dim=3, seed=5).double(),
            x_img,
        ),
        "sequential": (
            nn.Sequential(
                nn.Flatten(), nn.Linear(12, 9), nn.ReLU(), nn.Linear(9, 7), nn.GELU(), nn.Linear(7, 3)
            ).double(),
            x_flat,
        ),
        "resnet_bn": (_resnet_bn(x_img), x_img),
        "resnet_nobn": (
            build(
                "resnet", in_channels=2, image_size=6, widths=[5, 7], out_dim=3, batchnorm=False, seed=7
            ).double(),
            x_img,
        ),
        "transformer": (
            _randomize_ln(
                build(
                    "transformer",
                    vocab_size=11,
                    seq_len=4,
                    d_model=12,
                    n_heads=3,
                    n_layers=2,
                    d_mlp=20,
                    seed=8,
                )
            ).double(),
            torch.randint(0, 11, (40, 4), generator=torch.Generator().manual_seed(0)),
        ),
    }


@pytest.mark.parametrize("name", list(_models()))
def test_permuted_copy_computes_the_same_function(name: str) -> None:
    model, x = _models()[name]
    perms = random_permutations(model, seed=11)
    assert perms and any(not np.array_equal(p, np.arange(len(p))) for p in perms.values())
    permuted = apply_permutations(model, perms)
    model.eval()
    permuted.eval()
    with torch.no_grad():
        torch.testing.assert_close(permuted(x), model(x), atol=1e-10, rtol=1e-10)
    # the weights really moved, integer buffers did not
    sa, sb = model.state_dict(), permuted.state_dict()
    assert any(not torch.equal(sa[k], sb[k]) for k in sa if sa[k].is_floating_point())
    for k, v in sa.items():
        if not v.is_floating_point():
            assert torch.equal(v, sb[k])


@pytest.mark.parametrize("name", list(_models()))
def test_weight_matching_recovers_the_permutation_exactly(name: str) -> None:
    model, _ = _models()[name]
    perms = random_permutations(model, seed=12)
    permuted = apply_permutations(model, perms)
    al = weight_matching_permutations(model, permuted)
    assert al.converged
    inverse = invert_permutations(perms, permutation_spec(model))
    for p, true in perms.items():  # within-head permutations ([heads, d_head]) undo after their heads move
        np.testing.assert_array_equal(al.perms[p], np.argsort(true) if true.ndim == 1 else inverse[p])
    aligned = weight_matching(model, permuted)
    for k, v in model.state_dict().items():
        assert torch.equal(aligned.state_dict()[k], v), k


@pytest.mark.parametrize(
    "name", ["mlp", "cnn_bn_avg", "cnn_bn_flatten", "sequential", "resnet_bn", "resnet_nobn", "transformer"]
)
def test_activation_matching_recovers_the_permutation_exactly(name: str) -> None:
    model, x = _models()[name]
    perms = random_permutations(model, seed=13)
    permuted = apply_permutations(model, perms)
    al = activation_matching_permutations(model, permuted, (x, torch.zeros(len(x))), batch_size=5)
    inverse = invert_permutations(perms, permutation_spec(model))
    for p, true in perms.items():  # within-head permutations ([heads, d_head]) undo after their heads move
        np.testing.assert_array_equal(al.perms[p], np.argsort(true) if true.ndim == 1 else inverse[p])
    aligned = activation_matching(model, permuted, (x, torch.zeros(len(x))))
    for k, v in model.state_dict().items():
        assert torch.equal(aligned.state_dict()[k], v), k


def test_weight_matching_of_independent_nets_increases_similarity_and_keeps_function() -> None:
    a = build("mlp", in_dim=12, width=16, depth=2, out_dim=5, seed=1).double()
    b = build("mlp", in_dim=12, width=16, depth=2, out_dim=5, seed=2).double()
    al = weight_matching_permutations(a, b, seed=3)
    identity = {p: np.arange(n) for p, n in permutation_spec(a).sizes.items()}
    base = sum(
        float((a.state_dict()[k] * apply_permutations(b, identity).state_dict()[k]).sum())
        for k in permutation_spec(a).params
    )
    assert al.objective > base
    aligned = apply_permutations(b, al.perms)
    x = torch.randn(20, 12, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(aligned(x), b(x), atol=1e-10, rtol=1e-10)
    assert not b.head.weight.data_ptr() == aligned.head.weight.data_ptr()  # a copy, b untouched


def test_spec_of_cnn_flatten_head() -> None:
    cnn = build(
        "cnn", in_channels=1, image_size=4, channels=[3, 5], out_dim=2, batchnorm=True, pool="flatten"
    )
    spec = permutation_spec(cnn)
    assert spec.sizes == {"body.0": 3, "body.3": 5}
    assert spec.axes["body.3.weight"] == ("body.3", "body.0", None, None)
    assert spec.axes["body.4.running_var"] == ("body.3",)
    assert spec.views["head.weight"] == (2, 5, 16)
    assert "body.4.num_batches_tracked" not in spec.axes
    assert spec.activations == {"body.0": "body.2", "body.3": "body.5"}


@pytest.mark.parametrize(
    "model",
    [
        nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 2)),
        nn.GRU(3, 4),
        nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)),
        nn.Linear(3, 2),
    ],
    ids=["conv_sequential", "recurrent", "layernorm_sequential", "bare_linear"],
)
def test_unsupported_architectures_raise_clearly(model: nn.Module) -> None:
    with pytest.raises(UnsupportedArchitectureError, match="not|support"):
        weight_matching(model, model)


def test_bad_permutations_and_mismatched_models() -> None:
    a = build("mlp", in_dim=4, width=6, depth=1, out_dim=2)
    with pytest.raises(ValueError, match="missing permutation"):
        apply_permutations(a, {})
    with pytest.raises(ValueError, match="not a permutation"):
        apply_permutations(a, {"body.0": np.array([0, 0, 1, 2, 3, 4])})
    b = build("mlp", in_dim=4, width=7, depth=1, out_dim=2)
    with pytest.raises(ValueError, match="different architectures"):
        weight_matching(a, b)
    with pytest.raises(ValueError, match="max_iter"):
        weight_matching(a, a, max_iter=0)


def test_spec_of_resnet_shares_one_permutation_per_residual_stream() -> None:
    model = build("resnet", in_channels=1, image_size=8, widths=[4, 6], out_dim=3, blocks_per_stage=2)
    spec = permutation_spec(model)
    # stage 0: stem + both blocks' conv2 write the stem's stream; stage 1's stream starts at its shortcut
    assert spec.sizes == {
        "stem.0": 4,
        "body.0.conv1": 4,
        "body.1.conv1": 4,
        "body.2.conv1": 6,
        "body.2.shortcut.0": 6,
        "body.3.conv1": 6,
    }
    assert spec.axes["body.1.conv2.weight"] == ("stem.0", "body.1.conv1", None, None)
    assert spec.axes["body.3.conv2.weight"] == ("body.2.shortcut.0", "body.3.conv1", None, None)
    assert spec.axes["body.2.shortcut.0.weight"] == ("body.2.shortcut.0", "stem.0", None, None)
    assert spec.axes["body.3.bn2.running_mean"] == ("body.2.shortcut.0",)
    assert spec.axes["head.weight"] == (None, "body.2.shortcut.0")


def test_spec_of_transformer_permutes_heads_in_blocks() -> None:
    model = build("transformer", vocab_size=7, seq_len=3, d_model=8, n_heads=2, n_layers=1, d_mlp=16)
    spec = permutation_spec(model)
    assert spec.sizes == {"embed": 8, "blocks.0.attn.heads": 2, "blocks.0.mlp.0": 16}
    assert spec.views["blocks.0.attn.qkv.weight"] == (3, 2, 4, 8)
    assert spec.axes["blocks.0.attn.out.weight"] == ("embed", "blocks.0.attn.heads", None)
    assert spec.axes["blocks.0.ln1.weight"] == ("embed",)
    assert spec.axes["pos_embed"] == (None, "embed")
    perms = {"embed": np.arange(8), "blocks.0.attn.heads": np.array([1, 0]), "blocks.0.mlp.0": np.arange(16)}
    swapped = apply_permutations(model, perms)
    w, w2 = model.blocks[0].attn.qkv.weight, swapped.blocks[0].attn.qkv.weight
    torch.testing.assert_close(w2[:4], w[4:8])  # query rows of head 0 ← head 1
    torch.testing.assert_close(w2[16:20], w[20:24])  # value rows of head 0 ← head 1


@pytest.mark.parametrize("name", ["resnet_bn", "transformer"])
def test_planted_permutation_of_residual_models_has_zero_barrier(name: str) -> None:
    from dynascope import probes

    model, x = _models()[name]
    model.eval()
    with torch.no_grad():
        y = model(x).argmax(1)
    perms = random_permutations(model, seed=21)
    permuted = apply_permutations(model, perms)
    with torch.no_grad():
        torch.testing.assert_close(permuted.eval()(x), model(x), atol=1e-6, rtol=0)
    r = probes.lmc_barrier(model, permuted, (x, y), n_points=7, align="weights", reset_bn=False)
    assert r.barrier == pytest.approx(0, abs=1e-6)
    assert r.barrier_unaligned > 1e-3  # the planted permutation did break the straight path


def test_within_head_permutations_move_query_key_and_value_dimensions() -> None:
    model = build("transformer", vocab_size=7, seq_len=3, d_model=8, n_heads=2, n_layers=1, d_mlp=16, seed=1)
    spec = permutation_spec(model)
    assert set(spec.within) == {"blocks.0.attn.qk", "blocks.0.attn.v"}
    assert spec.within["blocks.0.attn.qk"].parent == "blocks.0.attn.heads"
    ident = {name: np.arange(n) for name, n in spec.sizes.items()}
    qk = np.array([[0, 1, 2, 3], [3, 2, 1, 0]])  # reverse the query/key dims of head 1
    moved = apply_permutations(model, {**ident, "blocks.0.attn.qk": qk})
    w, w2 = model.blocks[0].attn.qkv.weight, moved.blocks[0].attn.qkv.weight
    torch.testing.assert_close(w2[4:8], w[4:8].flip(0))  # query rows of head 1
    torch.testing.assert_close(w2[12:16], w[12:16].flip(0))  # key rows of head 1, the same permutation
    torch.testing.assert_close(w2[:4], w[:4])
    torch.testing.assert_close(w2[16:], w[16:])  # values untouched
    v = np.array([[1, 0, 2, 3], [0, 1, 2, 3]])  # swap value dims 0 and 1 of head 0
    moved = apply_permutations(model, {**ident, "blocks.0.attn.v": v})
    w2, o, o2 = (
        moved.blocks[0].attn.qkv.weight,
        model.blocks[0].attn.out.weight,
        moved.blocks[0].attn.out.weight,
    )
    torch.testing.assert_close(w2[16:18], w[[17, 16]])
    torch.testing.assert_close(o2[:, :2], o[:, [1, 0]])  # the matching attn.out columns
    torch.testing.assert_close(w2[:16], w[:16])
    x = torch.randint(0, 7, (5, 3), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(moved(x), model(x), atol=1e-6, rtol=0)
    # composed with a head swap: head 0 of the copy is head 1 of the model with its own inner order
    both = apply_permutations(
        model, {**ident, "blocks.0.attn.heads": np.array([1, 0]), "blocks.0.attn.qk": qk}
    )
    torch.testing.assert_close(both.blocks[0].attn.qkv.weight[:4], w[4:8])
    torch.testing.assert_close(both.blocks[0].attn.qkv.weight[4:8], w[:4].flip(0))
    with pytest.raises(ValueError, match="per-unit permutations"):
        apply_permutations(model, {**ident, "blocks.0.attn.v": np.array([[0, 0, 1, 2], [0, 1, 2, 3]])})
    with pytest.raises(ValueError, match="per-unit permutations"):
        apply_permutations(model, {**ident, "blocks.0.attn.v": np.arange(4)})


def test_invert_permutations_undoes_heads_and_their_inner_dimensions() -> None:
    model, _ = _models()["transformer"]
    spec = permutation_spec(model)
    perms = random_permutations(model, seed=5)
    assert perms["blocks.1.attn.v"].shape == (3, 4)
    back = apply_permutations(apply_permutations(model, perms), invert_permutations(perms, spec))
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
