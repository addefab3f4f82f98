"""Networks, the model registry and model files (tiny sizes, CPU, one thread)."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from vesselseg.errors import DataError, ParamsError
from vesselseg.families import network_config
from vesselseg.models import (
    IPN,
    ResNetPatch,
    UNet,
    build_model,
    count_parameters,
    load_model,
    load_weights_into,
    save_model,
    valid_padding_predictor,
)
from vesselseg.models.ipn import depth_pool_factors
from vesselseg.models.resnet_patch import load_imagenet_weights
from vesselseg.models.unet import reflect_pad

torch.set_num_threads(1)


def _train_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """One Adam step; returns (loss, largest absolute parameter change)."""
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    out = model(x)
    stages = out if isinstance(out, tuple) else (out,)  # a W-Net returns every stage in training
    loss = sum(nn.functional.binary_cross_entropy_with_logits(o, target) for o in stages) / len(stages)
    opt.zero_grad()
    loss.backward()
    opt.step()
    change = max(float((p.detach() - b).abs().max()) for p, b in zip(model.parameters(), before, strict=True))
    return loss.item(), change


# -- U-Net ---------------------------------------------------------------------


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("upsampling", ["bilinear", "transpose"])
def test_unet_same_keeps_any_size(depth: int, upsampling: str) -> None:
    torch.manual_seed(0)
    model = UNet(depth=depth, base_channels=4, upsampling=upsampling, out_channels=2).eval()
    for h, w in [(37, 53), (16, 16), (9, 31)]:
        with torch.no_grad():
            y = model(torch.randn(2, 1, h, w))
        assert y.shape == (2, 2, h, w)


def test_unet_parameter_count_matches_hand_count() -> None:
    # depth 1, base 2, BN (convs without bias), bilinear:
    # inc 1->2: 18 + 4 (BN) + 36 + 4 = 62; down 2->4: 72 + 8 + 144 + 8 = 232;
    # up 1x1 4->2: 8 + 2 = 10; up double conv 4->2: 72 + 4 + 36 + 4 = 116; head 2->1: 3.
    model = UNet(in_channels=1, out_channels=1, depth=1, base_channels=2, dropout=0.0)
    assert model.n_params == count_parameters(model) == 62 + 232 + 10 + 116 + 3


def test_unet_kaiming_init() -> None:
    torch.manual_seed(0)
    model = UNet(depth=3, base_channels=16)
    w = model.downs[2][0].weight  # Conv2d(64 -> 128, 3x3): fan_out = 128 * 9
    expected = math.sqrt(2.0 / (128 * 9))
    assert abs(float(w.detach().std()) - expected) / expected < 0.05


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("upsampling", ["bilinear", "transpose"])
def test_unet_valid_size_arithmetic_matches_forward(depth: int, upsampling: str) -> None:
    model = UNet(depth=depth, base_channels=2, upsampling=upsampling, padding="valid", dropout=0.0).eval()
    step = 2**depth
    for want in (1, 7, 20):
        s_in = model.input_size_for(want)
        s_out = model.output_size(s_in)
        assert s_out >= want
        with torch.no_grad():
            y = model(torch.randn(1, 1, s_in, s_in + step))
        assert y.shape[-2:] == (s_out, model.output_size(s_in + step))
        assert model.output_size((s_in, s_in + step)) == tuple(y.shape[-2:])
        # minimal: the next smaller valid input gives a smaller output (or none)
        with contextlib.suppress(ValueError):
            assert model.output_size(s_in - step) < want
    with pytest.raises(ValueError, match="does not fit"):
        model.output_size(model.input_size_for(20) + 1)
    with pytest.raises(ValueError, match="input size"):
        model(torch.randn(1, 1, 7, 7))


def test_unet_valid_matches_original_paper_sizes() -> None:
    # Ronneberger et al. 2015, Fig. 1: 572x572 in, 388x388 out with 4 poolings.
    model = UNet(depth=4, base_channels=1, padding="valid")
    assert model.output_size(572) == 388
    assert model.input_size_for(388) == 572


@pytest.mark.parametrize("upsampling", ["bilinear", "transpose"])
def test_valid_padding_predictor_returns_input_size_and_is_centred(upsampling: str) -> None:
    torch.manual_seed(0)
    model = UNet(depth=2, base_channels=2, upsampling=upsampling, padding="valid", dropout=0.0).eval()
    predict = valid_padding_predictor(model)
    for h, w in [(37, 53), (5, 8), (64, 64)]:
        with torch.no_grad():
            assert predict(torch.randn(1, 1, h, w)).shape == (1, 1, h, w)
    # Centring: where the padding cannot reach, predictor(crop) must equal a plain
    # forward pass of the big image at the same pixels.  Pooling phases let a pixel
    # see up to 2**depth - 1 pixels beyond the margin, hence the wider exclusion.
    h = 64
    s_in = model.input_size_for(h)
    s_out = model.output_size(s_in)
    margin = (s_in - s_out) // 2
    before = margin + (s_out - h) // 2  # padding the predictor puts above the crop
    big_in = model.input_size_for(h + 2 * before + 8)
    z = torch.randn(1, 1, big_in, big_in)
    a = before + 4  # crop origin; a - before = 4 keeps the 2x2 pooling grid aligned
    with torch.no_grad():
        full = model(z)
        crop = predict(z[..., a : a + h, a : a + h])
    big_margin = (big_in - full.shape[-1]) // 2
    inner = slice(margin + 4, h - margin - 4)
    assert inner.stop - inner.start >= 8
    ref = full[..., a - big_margin : a - big_margin + h, a - big_margin : a - big_margin + h]
    torch.testing.assert_close(crop[..., inner, inner], ref[..., inner, inner])


def test_valid_padding_predictor_passes_same_models_through() -> None:
    model = UNet(depth=1, base_channels=2)
    assert valid_padding_predictor(model) is model


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"depth": 0}, "depth"),
        ({"upsampling": "nearest"}, "upsampling"),
        ({"padding": "full"}, "padding"),
        ({"dropout": 1.0}, "dropout"),
        ({"stacks": 0}, "stacks"),
    ],
)
def test_unet_rejects_bad_settings(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        UNet(**kwargs)


def test_wnet_is_two_unets_the_second_reading_image_and_probabilities() -> None:
    """stacks=2 (W-Net): stage 2 = a U-Net on [image, sigmoid(stage 1)], same shape otherwise."""
    kw = {"depth": 2, "base_channels": 4, "dropout": 0.0}
    torch.manual_seed(0)
    wnet = UNet(stacks=2, **kw).eval()
    torch.manual_seed(0)
    single = UNet(**kw).eval()
    assert wnet.n_params == single.n_params + UNet(in_channels=2, **kw).n_params
    # Stage 1 draws its weights first, exactly as a single U-Net does from the same seed:
    # stacking leaves every existing model (and the committed metrics) unchanged.
    stage1 = {k: v for k, v in wnet.state_dict().items() if not k.startswith("refine.")}
    assert stage1.keys() == single.state_dict().keys()
    assert all(torch.equal(v, single.state_dict()[k]) for k, v in stage1.items())
    x = torch.randn(2, 1, 20, 24)  # a multiple of 2**depth: no padding
    with torch.no_grad():
        y = wnet(x)
        expected = wnet.refine(torch.cat([x, torch.sigmoid(single(x))], dim=1))
    assert isinstance(y, torch.Tensor) and y.shape == (2, 1, 20, 24)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    # Any other size is padded once for both stages, so the second stage refines the
    # first one's own border predictions (what the exported graph computes too).
    odd = torch.randn(1, 1, 19, 23)
    with torch.no_grad():
        torch.testing.assert_close(wnet(odd), wnet(reflect_pad(odd, (0, 1, 0, 1)))[..., :19, :23], rtol=0, atol=0)


def test_wnet_in_training_returns_one_output_per_stage() -> None:
    torch.manual_seed(0)
    net = UNet(stacks=3, depth=1, base_channels=2, dropout=0.0, out_channels=2).train()
    outs = net(torch.randn(2, 1, 8, 8))
    assert isinstance(outs, tuple) and len(outs) == 3
    assert all(o.shape == (2, 2, 8, 8) for o in outs)
    net.eval()
    with torch.no_grad():
        final = net(torch.randn(1, 1, 8, 8))
    assert isinstance(final, torch.Tensor)
    # a two-class stage hands on its softmax class-1 probability: one extra channel
    assert net.refine is not None and net.refine.inc[0].in_channels == 2


def test_wnet_refuses_valid_padding() -> None:
    with pytest.raises(ValueError, match="stacks > 1 needs padding 'same'"):
        UNet(stacks=2, padding="valid")


# -- IPN -----------------------------------------------------------------------


@pytest.mark.parametrize(("depth", "n_blocks"), [(160, 3), (640, 5), (64, 3), (8, 3), (12, 2)])
def test_pool_factors_multiply_to_depth_when_possible(depth: int, n_blocks: int) -> None:
    f = depth_pool_factors(depth, n_blocks)
    assert len(f) == n_blocks and math.prod(f) == depth


def test_pool_factors_cover_prime_depth() -> None:
    f = depth_pool_factors(17, 3)
    assert len(f) == 3 and math.prod(f) >= 17


@pytest.mark.parametrize("d", [12, 17, 5])
def test_ipn_collapses_depth(d: int) -> None:
    model = IPN(channels=3, n_blocks=2, depth=12, out_channels=2).eval()
    with torch.no_grad():
        y = model(torch.randn(2, 1, d, 9, 11))
    assert y.shape == (2, 2, 9, 11)


def test_ipn_learns_a_projection() -> None:
    """A bright tube in a noisy slab: the loss must fall within a few steps."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    n, d, h, w = 4, 8, 12, 12
    vessels = torch.zeros(n, 1, h, w)
    for i in range(n):
        vessels[i, 0, 2 + 2 * i, :] = 1.0
        vessels[i, 0, :, 9 - i] = 1.0
    x = 0.3 * torch.randn(n, 1, d, h, w, generator=gen)
    x[:, :, 3:5] += 2.0 * vessels.unsqueeze(2)  # vessels live in slices 3-4
    model = IPN(channels=4, n_blocks=2, depth=d)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = nn.functional.binary_cross_entropy_with_logits(model(x), vessels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.6 * losses[0], losses
    # Beats the best constant prediction (the binary entropy of the vessel share),
    # so it must be reading the vessels out of the volume, not just learning a bias.
    f = float(vessels.mean())
    constant_best = -(f * math.log(f) + (1 - f) * math.log(1 - f))
    assert losses[-1] < 0.8 * constant_best, (losses[-1], constant_best)


# -- ResNet patch classifier ---------------------------------------------------


def test_resnet34_parameter_count_matches_torchvision() -> None:
    # torchvision's resnet34 has 21,797,672 parameters with a 1000-class fc (512*1000+1000);
    # ours has the same backbone and a 1-logit fc (512+1).
    model = ResNetPatch(in_channels=3)
    assert count_parameters(model) == 21_797_672 - 512 * 1000 - 1000 + 512 + 1
    keys = model.state_dict().keys()
    for k in (
        "conv1.weight",
        "bn1.running_var",
        "layer1.2.conv2.weight",
        "layer2.0.downsample.0.weight",
        "layer3.5.bn2.bias",
        "layer4.2.conv1.weight",
        "fc.weight",
    ):
        assert k in keys


def test_resnet_patch_shapes() -> None:
    model = ResNetPatch(width=2).eval()
    for p in (27, 32, 48):
        with torch.no_grad():
            assert model(torch.randn(3, 1, p, p)).shape == (3, 1)


def test_load_imagenet_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    rgb = ResNetPatch(in_channels=3, width=4)
    state = {f"module.{k}": v for k, v in rgb.state_dict().items() if not k.startswith("fc.")}
    state["module.fc.weight"] = torch.randn(1000, 32)
    state["module.fc.bias"] = torch.randn(1000)
    path = tmp_path / "resnet.pth"
    torch.save(state, path)

    grey = ResNetPatch(in_channels=1, width=4)
    fc_before = grey.fc.weight.detach().clone()
    skipped = load_imagenet_weights(grey, path)
    assert sorted(skipped) == ["fc.bias", "fc.weight"]
    torch.testing.assert_close(grey.conv1.weight, rgb.conv1.weight.sum(dim=1, keepdim=True))
    torch.testing.assert_close(grey.layer3[1].conv2.weight, rgb.layer3[1].conv2.weight)
    torch.testing.assert_close(grey.fc.weight, fc_before)

    with pytest.raises(DataError, match=r"resnet\.pth.*shape"):
        load_imagenet_weights(ResNetPatch(in_channels=3, width=8), path)
    del state["module.layer4.2.conv1.weight"]
    torch.save(state, path)
    with pytest.raises(DataError, match=r"missing 1 keys.*layer4\.2\.conv1\.weight"):
        load_imagenet_weights(ResNetPatch(in_channels=3, width=4), path)
    with pytest.raises(DataError, match="not found"):
        load_imagenet_weights(grey, tmp_path / "nope.pth")


# -- training steps --------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "x_shape", "y_shape"),
    [
        ({"name": "unet", "depth": 2, "base_channels": 4}, (2, 1, 24, 24), (2, 1, 24, 24)),
        ({"name": "unet", "depth": 2, "base_channels": 4, "stacks": 2}, (2, 1, 24, 24), (2, 1, 24, 24)),
        (
            {"name": "unet", "depth": 2, "base_channels": 4, "padding": "valid", "upsampling": "transpose"},
            (2, 1, 44, 44),
            (2, 1, 4, 4),
        ),
        ({"name": "ipn", "channels": 4, "n_blocks": 2, "depth": 8}, (2, 1, 8, 10, 10), (2, 1, 10, 10)),
        ({"name": "resnet_patch", "width": 2}, (4, 1, 27, 27), (4, 1)),
    ],
)
def test_one_training_step(config: dict, x_shape: tuple, y_shape: tuple) -> None:
    torch.manual_seed(0)
    model = build_model(config)
    x = torch.randn(*x_shape)
    target = (torch.rand(*y_shape) > 0.7).float()
    loss, change = _train_step(model, x, target)
    assert math.isfinite(loss)
    assert change > 0


# -- registry and model files ----------------------------------------------------

CONFIGS = [
    {"name": "unet", "depth": 2, "base_channels": 4, "dropout": 0.2, "upsampling": "transpose"},
    {"name": "unet", "depth": 1, "base_channels": 2, "stacks": 2},
    {"name": "ipn", "channels": 3, "n_blocks": 2, "depth": 6},
    {"name": "resnet_patch", "width": 2, "layers": [1, 1, 1, 1]},
]
INPUTS = [(1, 1, 19, 23), (1, 1, 16, 16), (1, 1, 6, 7, 9), (2, 1, 16, 16)]


@pytest.mark.parametrize(("config", "shape"), list(zip(CONFIGS, INPUTS, strict=True)))
def test_save_load_roundtrip(tmp_path: Path, config: dict, shape: tuple) -> None:
    torch.manual_seed(0)
    model = build_model(config)
    with torch.no_grad():
        target = torch.zeros_like(model.eval()(torch.randn(*shape)))
    _train_step(model, torch.randn(*shape), target)  # BN stats move
    model.eval()
    path = tmp_path / "models" / "model.pt"
    save_model(path, model, config, extra={"best_epoch": 3, "val_dice": 0.5, "params": {"train.lr": 1e-3}})
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no temporary leftovers
    again = tmp_path / "again.pt"
    save_model(again, model, config, extra={"best_epoch": 3, "val_dice": 0.5, "params": {"train.lr": 1e-3}})
    assert again.read_bytes() == path.read_bytes()  # DVC compares hashes: equal models, equal files
    loaded, meta = load_model(path)
    assert not loaded.training
    assert meta["config"] == config and meta["extra"]["best_epoch"] == 3
    assert meta["format"] == "vesselseg-model/1"
    x = torch.randn(*shape)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_build_model_from_params_section() -> None:
    from vesselseg.params import Params

    model = build_model(network_config(Params().model))
    assert isinstance(model, UNet) and model.depth == 3


def test_build_model_errors() -> None:
    with pytest.raises(ParamsError, match=r"model\.name.*'unte'.*did you mean 'unet'"):
        build_model({"name": "unte"})
    with pytest.raises(ParamsError, match=r"model\.name: missing"):
        build_model({"depth": 3})
    with pytest.raises(ParamsError, match=r"model\.base_channel:.*did you mean 'base_channels'"):
        build_model({"name": "unet", "base_channel": 8})
    with pytest.raises(ParamsError, match="upsampling"):
        build_model({"name": "unet", "upsampling": "nearest"})


def test_load_model_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"missing\.pt: model file not found"):
        load_model(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(DataError, match=r"junk\.pt: not a vesselseg model file"):
        load_model(junk)
    bare = tmp_path / "bare.pt"
    torch.save(UNet(depth=1, base_channels=2).state_dict(), bare)
    with pytest.raises(DataError, match=r"bare\.pt: not a vesselseg model file.*bare state dict"):
        load_model(bare)


def test_checkpoint_from_another_architecture(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    save_model(path, UNet(depth=2, base_channels=4), {"name": "unet", "depth": 2, "base_channels": 4})
    # resuming/fine-tuning into a different network
    with pytest.raises(DataError, match=r"model\.pt: weights do not match this UNet.*unexpected \(e\.g\. downs\.1\."):
        load_weights_into(UNet(depth=1, base_channels=4), path)
    with pytest.raises(
        DataError,
        match=r"model\.pt: weights do not match.*other shapes.*inc\.0\.weight \(4, 1, 3, 3\) vs \(8, 1, 3, 3\)",
    ):
        load_weights_into(UNet(depth=2, base_channels=8), path)
    # a file whose config does not describe its weights (edited or mixed up)
    obj = torch.load(path, weights_only=True)
    obj["config"] = {"name": "ipn", "channels": 4, "n_blocks": 2, "depth": 8}
    torch.save(obj, path)
    with pytest.raises(DataError, match=r"weights do not match the architecture in its own config.*blocks\.0"):
        load_model(path)


def test_save_model_refuses_unstorable_extra(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"extra\.when"):
        save_model(tmp_path / "m.pt", UNet(depth=1, base_channels=2), {"name": "unet"}, extra={"when": object()})
    assert not (tmp_path / "m.pt").exists()
