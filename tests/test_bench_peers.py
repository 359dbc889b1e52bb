"""The peer in the published benchmark, pytorch_optimizer.SAM, computes funcsam's update.

bench.report times funcsam's steps against ``pytorch_optimizer.SAM`` (PyPI, the ``bench`` extra);
the ratios only mean something if both take the same step. Skipped where the package is missing.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

import funcsam
from helpers import (adapter_steps, assert_trees_close, bn_convnet, classification_batches, mlp, params_and_buffers,
                     reference_sam_sgd)

pytorch_optimizer = pytest.importorskip("pytorch_optimizer")

HYPER = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
RHO = 0.05


def peer_steps(model, batches):
    """Params and buffers after ``pytorch_optimizer.SAM`` over torch.optim.SGD, as its docstring uses
    it (a backward at w, then ``step(closure)``)."""
    model = copy.deepcopy(model)
    optimizer = pytorch_optimizer.SAM(model.parameters(), torch.optim.SGD, rho=RHO, **HYPER)
    adapter_steps(model, optimizer, batches, "davda54_closure")
    return params_and_buffers(model)


def funcsam_steps(model, batches, keep_first_pass_bn: bool):
    """Params and buffers after ``funcsam.SAM`` over torch.optim.SGD, davda54's first/second step."""
    model = copy.deepcopy(model)
    optimizer = funcsam.SAM(model.parameters(), torch.optim.SGD, rho=RHO, model=model if keep_first_pass_bn else None,
                            **HYPER)
    adapter_steps(model, optimizer, batches, "first_second")
    return params_and_buffers(model)


def test_peer_takes_the_hand_written_sam_step_and_funcsams():
    model, batches = mlp(), classification_batches(2, 16, (6,))
    peer, _ = peer_steps(model, batches)
    ours, _ = funcsam_steps(model, batches, keep_first_pass_bn=False)
    assert_trees_close(peer, reference_sam_sgd(model, batches, rho=RHO, **HYPER), atol=1e-6)
    assert_trees_close(peer, ours, atol=1e-6)


def test_peer_keeps_the_batchnorm_update_of_the_pass_at_w_plus_e():
    """The one difference: the peer's BatchNorm running statistics move in both passes. funcsam's
    ``model=`` keeps the first pass's, which after one step are an SGD step's (one forward at w)."""
    model, batches = bn_convnet(), classification_batches(1, 8, (3, 8, 8))
    peer_params, peer_buffers = peer_steps(model, batches)
    both_params, both_buffers = funcsam_steps(model, batches, keep_first_pass_bn=False)
    first_params, first_buffers = funcsam_steps(model, batches, keep_first_pass_bn=True)
    sgd = copy.deepcopy(model)
    F.cross_entropy(sgd(batches[0][0]), batches[0][1])  # the running statistics of one forward at w
    one_forward = params_and_buffers(sgd)[1]
    assert_trees_close(peer_params, both_params, atol=1e-6)
    assert_trees_close(peer_params, first_params, atol=1e-6)  # training-mode BatchNorm ignores them
    assert_trees_close(peer_buffers, both_buffers, atol=1e-6)
    assert_trees_close(first_buffers, one_forward, atol=1e-7)
    assert not torch.allclose(peer_buffers["1.running_mean"], one_forward["1.running_mean"], atol=1e-4)


def test_bench_peer_step_follows_the_bench_funcsam_step():
    """bench.steps' peer variant and funcsam's first/second-step variant: the same losses step after step."""
    from bench.steps import PEERS, VARIANTS

    model, (batch,) = mlp(), classification_batches(1, 16, (6,))
    peer, ours = VARIANTS[PEERS[0]](model, batch), VARIANTS["SAM(SGD) first/second step (eager)"](model, batch)
    losses = torch.tensor([[float(peer().detach()), float(ours().detach())] for _ in range(3)])
    torch.testing.assert_close(losses[:, 0], losses[:, 1], atol=1e-6, rtol=0)
    assert losses[2, 0] < losses[0, 0]  # it trains: the losses are of different parameters
