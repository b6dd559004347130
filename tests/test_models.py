"""Backbones: shapes, gradient flow, parameter counts, weight-decay groups."""

import pytest
import torch

from hydrahead.models import (
    BACKBONES,
    VisionTransformer,
    WTACRSLinear,
    build_backbone,
    no_weight_decay_param_names,
    param_groups_for_decay,
    resnet18,
    resnet50,
    vit_base,
    vit_tiny,
)

EMBED_DIM = 16


def _small_input(model, batch: int = 2) -> torch.Tensor:
    if model.input_kind == "features":
        return torch.randn(batch, 64)
    return torch.randn(batch, 3, 32, 32)


def _trunk_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith("neck."))


@pytest.mark.parametrize("name", BACKBONES)
def test_output_shape_and_attributes(name):
    torch.manual_seed(0)
    model = build_backbone(name, EMBED_DIM, input_dim=64, image_size=32, patch_size=8 if "vit" in name else None)
    assert model.input_kind in ("features", "images")
    assert model.embed_dim == EMBED_DIM
    assert hasattr(model, "neck")
    out = model(_small_input(model, batch=3))
    assert out.shape == (3, EMBED_DIM)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    "make",
    [
        lambda: build_backbone("mlp", EMBED_DIM, input_dim=64, hidden_dim=32, depth=3),
        lambda: resnet18(EMBED_DIM, zero_init_residual=False),
        lambda: resnet50(EMBED_DIM, zero_init_residual=False),
        lambda: vit_tiny(EMBED_DIM, image_size=32, patch_size=8),
    ],
    ids=["mlp", "resnet18", "resnet50", "vit_tiny"],
)
def test_gradients_reach_every_parameter(make):
    torch.manual_seed(0)
    model = make()
    out = model(_small_input(model, batch=2))
    # A random projection: summing BatchNorm outputs would give a constant and zero grads.
    (out * torch.randn_like(out)).sum().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, n
        assert torch.isfinite(p.grad).all(), n
        assert p.grad.abs().sum() > 0, n


def _small_vit(**wta_crs) -> VisionTransformer:
    return VisionTransformer(EMBED_DIM, dim=32, depth=2, num_heads=2, image_size=32, patch_size=8, **wta_crs)


@pytest.mark.parametrize("keep, mlp, sampled", [(1.0, True, 0), (0.3, True, 4 * 2), (0.3, False, 2 * 2)])
def test_vit_wta_crs_replaces_the_block_linears(keep, mlp, sampled):
    torch.manual_seed(0)
    exact = _small_vit()
    torch.manual_seed(0)
    model = _small_vit(wta_crs_keep=keep, wta_crs_mlp=mlp)
    replaced = [n for n, m in model.named_modules() if isinstance(m, WTACRSLinear)]
    assert len(replaced) == sampled
    assert all(m.keep == keep for m in model.modules() if isinstance(m, WTACRSLinear))
    if not mlp:
        assert all(".attn." in n for n in replaced)
    assert type(model.neck) is torch.nn.Linear  # one row per sample: nothing to save there
    # Same parameters, same initial values, same forward: checkpoints and runs stay comparable.
    assert model.state_dict().keys() == exact.state_dict().keys()
    x = _small_input(model, batch=3)
    assert torch.equal(model(x), exact(x))


def test_build_backbone_passes_the_wta_crs_options_to_the_vits():
    model = build_backbone("vit_tiny", EMBED_DIM, image_size=32, patch_size=8, wta_crs_keep=0.2, wta_crs_mlp=False)
    assert [m.keep for m in model.modules() if isinstance(m, WTACRSLinear)] == [0.2] * 2 * 12


def test_vit_wta_crs_gradients_reach_every_parameter_once_tokens_are_scored():
    torch.manual_seed(0)
    model = _small_vit(wta_crs_keep=0.3)
    x = _small_input(model, batch=2)
    projection = torch.randn(2, EMBED_DIM)
    # In the last block only the class token's rows have a gradient. The first backward
    # samples them by ||x|| alone and may miss them (unbiased, yet zero); it also records
    # each token's gradient norm, which makes them certain from the second on.
    (model(x) * projection).sum().backward()
    model.zero_grad()
    (model(x) * projection).sum().backward()
    for n, p in model.named_parameters():
        assert torch.isfinite(p.grad).all(), n
        assert p.grad.abs().sum() > 0, n


def test_wta_crs_is_ignored_with_a_warning_outside_the_vits():
    with pytest.warns(UserWarning, match="wta_crs_keep"):
        model = build_backbone("resnet18", EMBED_DIM, wta_crs_keep=0.5)
    assert not any(isinstance(m, WTACRSLinear) for m in model.modules())


def test_resnet_zero_init_residual():
    model = resnet50(EMBED_DIM)
    assert all(b.bn3.weight.abs().sum() == 0 for stage in (model.layer1, model.layer4) for b in stage)
    assert model.bn1.weight.eq(1).all()
    model = resnet18(EMBED_DIM, zero_init_residual=False)
    assert all(b.bn2.weight.eq(1).all() for b in model.layer1)


def test_resnet_trunk_param_counts_match_torchvision():
    # torchvision resnet50 / resnet18 totals minus their 1000-way fc layers.
    assert _trunk_params(resnet50(EMBED_DIM)) == 23_508_032
    assert _trunk_params(resnet18(EMBED_DIM)) == 11_176_512


def test_vit_base_trunk_param_count():
    assert _trunk_params(vit_base(EMBED_DIM, image_size=224, patch_size=16)) == 85_798_656


def test_mlp_output_independent_of_batch_split():
    torch.manual_seed(0)
    model = build_backbone("mlp", EMBED_DIM, input_dim=64)
    x = torch.randn(6, 64)
    torch.testing.assert_close(model(x), torch.cat([model(x[:2]), model(x[2:])]))


def test_unknown_backbone_names_valid_choices():
    with pytest.raises(ValueError, match="resnet51.*resnet50"):
        build_backbone("resnet51", EMBED_DIM)


def test_vit_rejects_bad_sizes():
    with pytest.raises(ValueError, match="divisible"):
        vit_tiny(EMBED_DIM, image_size=30, patch_size=8)
    model = vit_tiny(EMBED_DIM, image_size=32, patch_size=8)
    with pytest.raises(ValueError, match="32x32"):
        model(torch.randn(1, 3, 64, 64))


def test_ignored_patch_size_warns():
    with pytest.warns(UserWarning, match="patch_size"):
        build_backbone("mlp", EMBED_DIM, patch_size=8)


def test_param_groups_for_decay_split():
    model = vit_tiny(EMBED_DIM, image_size=32, patch_size=8)
    skip = no_weight_decay_param_names(model)
    assert {"cls_token", "pos_embed", "norm.weight", "neck.bias", "blocks.0.attn.qkv.bias"} <= skip
    assert "blocks.0.attn.qkv.weight" not in skip and "patch_embed.weight" not in skip

    groups = param_groups_for_decay(model, weight_decay=0.05)
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.05 and not decay.get("exclude_from_trust", False)
    assert no_decay["weight_decay"] == 0.0 and no_decay["exclude_from_trust"] is True
    assert all(p.ndim > 1 for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_backbone_from_config_builds_what_the_config_names():
    from hydrahead.config import Config, apply_overrides
    from hydrahead.models import WTACRSLinear, backbone_from_config

    cfg = apply_overrides(
        Config(),
        ["model.backbone=vit_tiny", "model.embed_dim=24", "data.image_size=32", "model.wta_crs_keep=0.5"],
    )
    model = backbone_from_config(cfg)
    assert any(isinstance(module, WTACRSLinear) for module in model.modules())
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 24)
    mlp = backbone_from_config(apply_overrides(Config(), ["model.input_dim=12", "model.depth=3", "model.embed_dim=8"]))
    assert mlp(torch.randn(5, 12)).shape == (5, 8)
    assert sum(isinstance(m, torch.nn.Linear) for m in mlp.modules()) == 4  # depth 3 hidden layers + the neck
