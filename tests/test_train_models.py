"""The trainer's networks: published parameter counts, shapes, and a few real SAM steps each."""

import pytest
import torch
import torch.nn.functional as F

import funcsam
from train.config import parse_args
from train.steppers import TrainState, make_functional_step, zero_totals
from train.models import MODELS, PUBLISHED_PARAMS, BasicBlock, build_model, count_parameters


@pytest.mark.parametrize("name", list(PUBLISHED_PARAMS))
def test_parameter_count_within_5_percent_of_published(name):
    count = count_parameters(build_model(name, 10))
    assert abs(count / PUBLISHED_PARAMS[name] - 1) < 0.05, f"{name}: {count} parameters"


def test_option_a_shortcut_subsamples_and_zero_pads_channels():
    block = BasicBlock(16, 32, stride=2)
    x = torch.randn(2, 16, 8, 8)
    skip = block.shortcut(x)
    assert skip.shape == (2, 32, 4, 4)
    torch.testing.assert_close(skip[:, 8:24], x[:, :, ::2, ::2], rtol=0, atol=0)
    assert skip[:, :8].abs().sum() == 0 and skip[:, 24:].abs().sum() == 0


@pytest.mark.parametrize("name", list(MODELS))
def test_two_sam_steps_of_every_model(name):
    """The trainer's own step function on each network: logits per class, finite loss, moved weights."""
    torch.manual_seed(0)
    num_classes = 100 if name == "resnet20" else 10  # one CIFAR-100 head too
    model = build_model(name, num_classes)
    batch = 2 if name == "wrn28_10" else 4  # WRN-28-10 is 36M parameters: keep the CPU test short
    args = parse_args(["--model", name])
    step = make_functional_step(model, args, F.cross_entropy, torch.zeros(3), torch.ones(3))
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    state = TrainState(params, buffers, funcsam.init_momentum(params), None)
    totals = zero_totals(torch.device("cpu"))
    images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, num_classes, (batch,))
    augmentation = (torch.full((batch, 2), 4), torch.zeros(batch, dtype=torch.bool), torch.zeros(batch, 2, dtype=torch.int64))
    for _ in range(2):
        state, totals = step(state, totals, images, labels, *augmentation, torch.tensor(0.05), torch.tensor(0.05), True)
    assert model(torch.zeros(batch, 3, 32, 32)).shape == (batch, num_classes)
    assert torch.isfinite(totals.loss_sum) and totals.diverged_steps == 0
    assert int(state.momentum_state.count) == 2
    moved = [k for k in params if not torch.equal(params[k], state.params[k])]
    assert len(moved) == len(params)
