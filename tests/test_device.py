"""channels_last on the CPU: the optimised layout gives the NCHW results, to float rounding.

NHWC convolutions sum in another order, so results agree to ~1e-6 relative, not bit
for bit; these tests keep the fast layout tied to the plain NCHW reference.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.helpers import cpu_trainer
from vesselseg.device import to_channels_last
from vesselseg.families import network_config
from vesselseg.models import build_model
from vesselseg.params import ModelParams, TrainParams
from vesselseg.training.loop import Trainer

CL = torch.channels_last


def _conv_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    """Weights whose NCHW and NHWC layouts differ (more than one input channel and pixel)."""
    return [p for p in model.parameters() if p.ndim == 4 and p.shape[1] > 1 and p.shape[2] * p.shape[3] > 1]


@pytest.mark.parametrize("upsampling", ["bilinear", "transpose"])
def test_unet_in_channels_last_predicts_what_nchw_predicts(upsampling: str) -> None:
    torch.manual_seed(0)
    net = build_model(
        network_config(ModelParams(depth=2, base_channels=4, in_channels=3, upsampling=upsampling))
    ).eval()
    fast = copy.deepcopy(net)
    assert to_channels_last(fast)
    weights = _conv_weights(fast)
    assert weights and all(w.is_contiguous(memory_format=CL) and not w.is_contiguous() for w in weights)
    x = torch.rand(2, 3, 40, 36)
    with torch.inference_mode():
        ref, out = net(x), fast(x.contiguous(memory_format=CL))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_3d_net_is_left_in_its_layout() -> None:
    net = build_model(network_config(ModelParams(name="ipn", ipn={"channels": 4, "n_blocks": 2, "block": 12})))
    before = {k: (v.stride(), v.clone()) for k, v in net.state_dict().items()}
    assert not to_channels_last(net)
    assert all(v.stride() == before[k][0] and torch.equal(v, before[k][1]) for k, v in net.state_dict().items())


def _trainer(net: torch.nn.Module, config: dict, channels_last: bool) -> Trainer:
    params = TrainParams(batch_size=4, lr=1e-2, threads=1, device="cpu", channels_last=channels_last)
    return cpu_trainer(net, config, params, loss="bce+dice")


def test_training_step_in_channels_last_matches_nchw() -> None:
    """train.channels_last is on by default on the CPU: three steps equal the NCHW steps."""
    torch.manual_seed(0)
    config = network_config(ModelParams(depth=2, base_channels=4, dropout=0.0))
    net = build_model(config)
    fast, ref = _trainer(copy.deepcopy(net), config, True), _trainer(copy.deepcopy(net), config, False)
    assert fast.channels_last and not ref.channels_last
    assert all(w.is_contiguous(memory_format=CL) and not w.is_contiguous() for w in _conv_weights(fast.raw_model))
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.rand(4, 1, 16, 16, generator=g)
        y = (torch.rand(4, 1, 16, 16, generator=g) > 0.7).float()
        m = torch.ones_like(y)
        a, b = fast.train_step(x, y, m), ref.train_step(x, y, m)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    for (name, p), q in zip(fast.raw_model.named_parameters(), ref.raw_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
