"""Data-parallel SAM with two gloo processes on this CPU, against one process and a hand computation.

The test starts two ranks of tests/dp_worker.py on 127.0.0.1 (a free port, bounded time), twice:
once from scratch and once resuming from the checkpoint rank 0 wrote, as after a restart.
"""

import copy
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import funcsam
import funcsam.distributed as fd
from helpers import assert_trees_close, bn_convnet, launch_gloo_ranks, mlp, params_and_buffers, reference_sam_sgd

sys.path.insert(0, os.path.dirname(__file__))
import dp_worker  # noqa: E402  (the worker's data and hyperparameters are the reference's too)

WORLD = 2
TIMEOUT_S = 120


def _launch(out_dir, phase):
    """Run both ranks of ``phase`` to completion (or kill them), as torchrun would start them."""
    worker = os.path.join(os.path.dirname(__file__), "dp_worker.py")
    ranks = launch_gloo_ranks([sys.executable, worker, str(out_dir), phase], WORLD, TIMEOUT_S)
    for rank, done in enumerate(ranks):
        assert done.returncode == 0, f"rank {rank} of {phase!r} failed:\n{done.stdout}\n{done.stderr}"
    return [torch.load(out_dir / f"{phase}_rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("dp")
    first = _launch(out_dir, "first")
    files_after_first = sorted(os.listdir(out_dir))
    resumed = _launch(out_dir, "resume")
    return out_dir, first, resumed, files_after_first


def _shards(batch):
    return [funcsam.shard_batch(batch, rank, WORLD) for rank in range(WORLD)]


def _hand_local_sam(model, batches, rho, lr, momentum, weight_decay):
    """SAM with per-replica perturbations, written out with torch.autograd one shard at a time:
    e_r = rho g_r / ||g_r||, g_sam = mean_r grad L_r(w + e_r), then torch.optim.SGD's update."""
    model = copy.deepcopy(model)
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    for batch in batches:
        sam_grads = [torch.zeros_like(p) for p in params]
        for inputs, targets in _shards(batch):
            g = torch.autograd.grad(F.cross_entropy(model(inputs), targets), params)
            norm = torch.sqrt(sum((gi ** 2).sum() for gi in g))
            with torch.no_grad():
                e = [rho * gi / (norm + 1e-12) for gi in g]
                for p, ei in zip(params, e):
                    p.add_(ei)
            g_sam = torch.autograd.grad(F.cross_entropy(model(inputs), targets), params)
            with torch.no_grad():
                for p, ei, total, gi in zip(params, e, sam_grads, g_sam):
                    p.sub_(ei)
                    total.add_(gi / WORLD)
        for p, g in zip(params, sam_grads):
            p.grad = g
        optimizer.step()
    return {k: v.detach() for k, v in model.named_parameters()}


def _one_process(batches, n_steps):
    return reference_sam_sgd(mlp(), batches[:n_steps], rho=dp_worker.RHO, lr=dp_worker.LR, **dp_worker.HYPER)


@pytest.mark.slow
def test_global_sync_equals_one_process_on_the_full_batch(runs):
    _, first, _, _ = runs
    expected = _one_process(dp_worker.global_batches(), 2)
    for rank in range(WORLD):
        assert_trees_close(first[rank]["global_two_steps"], expected, atol=1e-5)


@pytest.mark.slow
def test_local_sync_equals_hand_computed_per_replica_perturbation(runs):
    _, first, _, _ = runs
    expected = _hand_local_sam(mlp(), dp_worker.global_batches()[:3], dp_worker.RHO, dp_worker.LR, **dp_worker.HYPER)
    global_sync = _one_process(dp_worker.global_batches(), 3)
    assert not torch.allclose(expected["0.weight"], global_sync["0.weight"], atol=1e-5), "local must differ from global"
    for rank in range(WORLD):
        assert_trees_close(first[rank]["local"], expected, atol=1e-5)


@pytest.mark.slow
def test_accumulated_step_with_global_sync_equals_one_process(runs):
    _, first, _, _ = runs
    expected = _one_process(dp_worker.global_batches(), 2)
    for rank in range(WORLD):
        assert_trees_close(first[rank]["accumulated_global"], expected, atol=1e-5)


@pytest.mark.slow
def test_m_sharpness_across_ranks_equals_one_process_with_world_times_m_parts(runs):
    _, first, _, _ = runs
    model = mlp()
    params, buffers = params_and_buffers(model)
    loss_fn = funcsam.make_loss_fn(model, F.cross_entropy)
    state = funcsam.init_momentum(params)
    for batch in dp_worker.global_batches()[:2]:
        out = funcsam.m_sharpness_sam_step(params, buffers, batch, loss_fn, dp_worker.RHO, dp_worker.LR, state,
                                           m=2 * WORLD, **dp_worker.HYPER)
        params, buffers, state = out.params, out.buffers, out.momentum_state
    for rank in range(WORLD):
        assert_trees_close(first[rank]["m_sharpness_local"], params, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(dp_worker.MODE_RUNS))
def test_modes_across_ranks_equal_their_one_process_reference(runs, name):
    """GSAM under global sync is one process on the global batch; AE-SAM under local sync is one
    process whose m-sharpness parts are the replicas (its statistics see the reduced ||g||);
    LookSAM with m-sharpness on each replica is one process with world x m parts."""
    _, first, _, _ = runs
    mode, _, _, one_process_parts = dp_worker.MODE_RUNS[name]
    source = None if one_process_parts is None else funcsam.MSharpness(one_process_parts)
    expected = dp_worker.run_mode(mode(), dp_worker.global_batches(), source)
    for rank in range(WORLD):
        assert_trees_close(first[rank][name], expected, atol=1e-5)


@pytest.mark.slow
def test_non_finite_first_gradient_on_one_rank_skips_the_step_on_every_rank(runs):
    _, first, _, _ = runs
    params, _ = params_and_buffers(mlp())
    for rank in range(WORLD):
        assert not first[rank]["non_finite"]["finite"]
        assert_trees_close(first[rank]["non_finite"]["params"], params, atol=0)


@pytest.mark.slow
def test_batchnorm_statistics_stay_per_replica(runs):
    _, first, _, _ = runs
    mean0 = first[0]["bn_local_buffers"]["1.running_mean"]
    mean1 = first[1]["bn_local_buffers"]["1.running_mean"]
    assert not torch.allclose(mean0, mean1)


@pytest.mark.slow
def test_sync_batchnorm_with_global_sync_equals_one_process_on_the_full_batch(runs):
    _, first, _, _ = runs
    model = bn_convnet()
    params, buffers = params_and_buffers(model)
    loss_fn = funcsam.make_loss_fn(model, F.cross_entropy)
    state = funcsam.init_momentum(params)
    for batch in dp_worker.bn_global_batches():
        out = funcsam.sam_step(params, buffers, batch, loss_fn, dp_worker.RHO, dp_worker.LR, state, **dp_worker.HYPER)
        params, buffers, state = out.params, out.buffers, out.momentum_state
    for rank in range(WORLD):
        got_params, got_buffers = first[rank]["sync_bn"]
        assert_trees_close(got_params, params, atol=1e-5)
        assert_trees_close(got_buffers, buffers, atol=1e-5)


def test_sync_batchnorm_is_plain_batchnorm_in_one_process():
    model = bn_convnet()
    converted = fd.convert_sync_batchnorm(copy.deepcopy(model))
    assert isinstance(converted[1], fd.SyncBatchNorm)
    assert dict(converted.named_parameters()).keys() == dict(model.named_parameters()).keys()
    assert dict(converted.named_buffers()).keys() == dict(model.named_buffers()).keys()
    inputs = torch.randn(8, 3, 6, 6)
    torch.testing.assert_close(converted(inputs), model(inputs))
    assert_trees_close(params_and_buffers(converted)[1], params_and_buffers(model)[1], atol=0)


@pytest.mark.slow
def test_only_rank_zero_writes_checkpoint_and_metrics(runs):
    out_dir, first, _, files_after_first = runs
    assert files_after_first == ["checkpoint.pt", "first_rank0.pt", "first_rank1.pt", "metrics.jsonl"]
    assert [run["is_main"] for run in first] == [True, False]
    with open(out_dir / "metrics.jsonl") as f:
        assert len(f.readlines()) == 1


@pytest.mark.slow
def test_every_rank_resumes_from_rank_zero_checkpoint(runs):
    _, _, resumed, _ = runs
    expected = _one_process(dp_worker.global_batches(), dp_worker.STEPS)
    for rank in range(WORLD):
        assert_trees_close(resumed[rank]["global_resumed"], expected, atol=1e-5)


def test_shard_batch_takes_contiguous_rows_and_rejects_indivisible_world_size():
    x, y = torch.arange(12).reshape(6, 2), torch.arange(6)
    xs, ys = funcsam.shard_batch((x, y), 1, 3)
    assert torch.equal(xs, x[2:4]) and torch.equal(ys, y[2:4])
    with pytest.raises(ValueError, match="batch size 6 is not divisible by the number of processes"):
        funcsam.shard_batch((x, y), 0, 4)
    with pytest.raises(ValueError, match="rank must be in"):
        funcsam.shard_batch((x, y), 3, 3)


def test_helpers_need_an_initialised_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="not initialised"):
        fd.all_reduce_mean()
    with pytest.raises(RuntimeError, match="not initialised"):
        fd.local_shard((torch.zeros(4),))
    assert fd.is_main_process()


def test_buckets_group_by_dtype_and_respect_the_cap():
    grads = [torch.zeros(256), torch.zeros(256, dtype=torch.float64), torch.zeros(256), torch.zeros(256)]
    assert fd._buckets(grads, None) == [[0, 2, 3], [1]]
    assert fd._buckets(grads, 2048) == [[0, 2], [3], [1]]
