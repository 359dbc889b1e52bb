"""bench.memory: a step's peak memory from torch's allocator statistics (the profiler's on the CPU)."""

import pytest
import torch
import torch.nn as nn

from bench.memory import copies_over, footprint_cpu, parameter_bytes
from bench.steps import PEERS, VARIANTS, peer_installed

MIB = 2**20
SLACK = 4096  # the profiler also sees a few small allocations of its own and of torch's


def test_footprint_counts_what_the_step_holds_and_its_transient_peak():
    held = {}

    def make_step():
        held["state"] = torch.zeros(MIB // 4)  # 1 MiB held from the building on

        def step():
            transient = torch.ones(MIB // 2)  # 2 MiB, freed when the step returns
            held["state"].add_(transient[: MIB // 4])

        return step

    peak, _ = footprint_cpu(make_step)
    assert 3 * MIB <= peak <= 3 * MIB + SLACK


@pytest.mark.parametrize("replace_first, expected", [(False, 2 * MIB), (True, 1 * MIB)])
def test_footprint_sees_the_previous_step_freed(replace_first, expected):
    """A functional carry: the new state beside the old one until the old is dropped (frees of the
    warm-up steps' blocks must count, or the second case would read 2 MiB too)."""
    carry = {}

    def make_step():
        carry["state"] = torch.zeros(MIB // 4)

        def step():
            if replace_first:
                del carry["state"]
            new = torch.ones(MIB // 4)
            carry["state"] = new

        return step

    peak, _ = footprint_cpu(make_step)
    assert expected <= peak <= expected + SLACK


def activation_bound_convnet():
    """Activations (16 x 32 x 16 x 16 floats a layer) far above the 38 KiB of parameters: every SGD-like
    step peaks in the backward pass, where SAM holds just the saved w more."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    return model, (torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,)))


def test_sam_steps_hold_one_parameter_copy_more_than_sgd():
    model, batch = activation_bound_convnet()
    names = ["torch.optim.SGD (eager)", "SAMSGD (eager)", "SAM(SGD) first/second step (eager)"]
    names += PEERS[:1] if peer_installed() else []
    table = copies_over({name: (lambda name=name: VARIANTS[name](model, batch)) for name in names}, names[0],
                        parameter_bytes(model), "cpu")
    assert table[names[0]]["copies_over_sgd"] == 0
    assert table[names[0]]["copies"] > 20  # the activations: the peak is in the backward pass
    for name in names[1:]:
        assert table[name]["copies_over_sgd"] == pytest.approx(1.0, abs=0.05), name


def test_eager_sam_step_holds_w_plus_e_and_the_modules_own_parameters():
    """Eager sam_step at its peak (the second backward): w + e, and the module make_loss_fn keeps (its own
    parameters, which model.to("meta") frees); neither g nor a separate e."""
    model, batch = activation_bound_convnet()
    names = ["torch.optim.SGD (eager)", "sam_step (eager)"]
    table = copies_over({name: (lambda name=name: VARIANTS[name](model, batch)) for name in names}, names[0],
                        parameter_bytes(model), "cpu")
    assert table[names[1]]["copies_over_sgd"] == pytest.approx(2.0, abs=0.1)  # it held 4.0 before
