"""FSDP2 (``fully_shard``, DTensor) in SAM and SAMSGD: exact to one process, checkpoints that reshard, faults.

One two-rank gloo job (tests/fsdp_worker.py) trains every configuration and saves what each rank
computed; each test here compares one of them with a reference computed in this process: the same
optimizer over ``Replicas`` of the model, each rank's part of the batch forwarded by its own
replica and the losses averaged (so the gradient is FSDP2's average and BatchNorm sees what each
rank sees). The one-process optimizers are themselves checked against hand-written SAM elsewhere.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn as nn

import funcsam
from funcsam import sharding
from helpers import assert_trees_close, launch_gloo_ranks, mlp

sys.path.insert(0, os.path.dirname(__file__))
import fsdp_worker as worker  # noqa: E402  (its configurations and training loop are the references' too)

TIMEOUT_S = 240
EXACT = 1e-6
BF16 = 2e-3  # the bf16 policy against an fp32 run (measured 6.6e-4 after 5 steps; per-rank norms give 6e-3)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("fsdp")
    script = os.path.join(os.path.dirname(__file__), "fsdp_worker.py")
    done = launch_gloo_ranks([sys.executable, script, str(out_dir)], worker.WORLD, TIMEOUT_S)
    for rank, process in enumerate(done):
        assert process.returncode == 0, f"rank {rank} failed:\n{process.stdout}\n{process.stderr[-4000:]}"
    results = [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(worker.WORLD)]
    return out_dir, results


def one_process(config: str, steps: int | None = None, start: int = 0, setup=None):
    """``config`` on one process, ``steps`` steps from batch ``start``: ``(params, replica buffers, optimizer)``.
    ``setup(model, optimizer)`` runs before the steps (a checkpoint load)."""
    kind = worker.CONFIGS[config][0]
    model = worker.Replicas(worker.build_model(kind))
    replicas = model.replicas
    optimizer = worker.build_optimizer(config, model.parameters(), model)
    if setup is not None:
        setup(replicas[0], optimizer)
    batches = worker.global_batches(kind)[start:None if steps is None else start + steps]
    worker.train(config, model, optimizer, batches, worker.make_scaler(config))
    params = {name: p.detach().clone() for name, p in replicas[0].named_parameters()}
    buffers = [{name: b.detach().clone() for name, b in replica.named_buffers()} for replica in replicas]
    return params, buffers, optimizer


@pytest.mark.slow
@pytest.mark.parametrize("config", list(worker.CONFIGS))
def test_sharded_run_matches_one_process(ranks, config):
    _, results = ranks
    params, buffers, optimizer = one_process(config)
    tolerance = BF16 if worker.CONFIGS[config][4].get("bf16_policy") else EXACT
    for rank, result in enumerate(results):
        got = result["configs"][config]
        assert_trees_close(got["params"], params, atol=tolerance, rtol=tolerance)
        assert_trees_close(got["buffers"], buffers[rank], atol=tolerance, rtol=tolerance)
        assert got["steps_taken"] == optimizer.steps_taken == worker.STEPS


@pytest.mark.slow
def test_every_sharded_run_moved_the_params(ranks):
    """The comparisons above mean something: every run trained, and the bf16 and fp16 runs differ from fp32."""
    _, results = ranks
    start = {name: p.detach() for name, p in worker.build_model("mlp").named_parameters()}
    for config, (kind, *_rest) in worker.CONFIGS.items():
        if kind == "mlp":
            moved = max((results[0]["configs"][config]["params"][n] - start[n]).abs().max() for n in start)
            assert moved > 1e-3, config
    for low, fp32 in (("samsgd_bf16_policy", "samsgd_closure"), ("sgd_fp16_scaler", "sgd_closure")):
        a, b = results[0]["configs"][low]["params"], results[0]["configs"][fp32]["params"]
        assert max((a[n] - b[n]).abs().max() for n in a) > 10 * EXACT, low  # the low precision ran


@pytest.mark.slow
def test_each_reduction_is_one_all_reduce(ranks):
    _, results = ranks
    for result in results:
        assert result["all_reduces"] == worker.ALL_REDUCES


@pytest.mark.slow
@pytest.mark.parametrize("config", worker.CHECKPOINTS)
def test_checkpoint_resumes_exactly_on_two_ranks(ranks, config):
    _, results = ranks
    for result in results:
        run = result["checkpoints"][config]
        assert run["steps_after_load"] == worker.SAVED_AT
        for name, value in run["uninterrupted"].items():
            assert torch.equal(run["resumed"][name], value), name


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP's note that it loads in one process
@pytest.mark.parametrize("config", worker.CHECKPOINTS)
def test_checkpoint_saved_on_two_ranks_resumes_on_one(ranks, config):
    """dcp.load into a plain one-process model and optimizer (resharding 2 -> 1), then the last steps."""
    import torch.distributed.checkpoint as dcp

    from funcsam.checkpoint import load_sharded_state_dict, sharded_state_dict

    out_dir, results = ranks
    loaded = {}

    def load(model, optimizer):
        state = sharded_state_dict(model, optimizer)
        dcp.load(state, checkpoint_id=str(out_dir / f"checkpoint_{config}"))
        load_sharded_state_dict(model, optimizer, state)
        loaded["steps"] = optimizer.steps_taken

    params, _, optimizer = one_process(config, start=worker.SAVED_AT, setup=load)
    assert loaded["steps"] == worker.SAVED_AT and optimizer.steps_taken == worker.STEPS
    assert_trees_close(params, results[0]["checkpoints"][config]["uninterrupted"], atol=EXACT, rtol=EXACT)
    uninterrupted, _, _ = one_process(config)  # and so the one-process run that never stopped
    assert_trees_close(params, uninterrupted, atol=EXACT, rtol=EXACT)


@pytest.mark.slow
def test_plain_state_dict_of_sharded_state_is_refused_on_another_sharding(ranks):
    _, results = ranks
    refusals = results[0]["mismatched_load"]
    for target in ("plain", "one_rank_mesh"):
        assert "is a DTensor over a mesh of 2 rank(s)" in refusals[target], refusals[target]
        assert "torch.distributed.checkpoint" in refusals[target]
        assert refusals[target + "_unchanged"] is True
    for result in results:  # and the other way: one process's plain state for sharded params
        refusal = result["mismatched_load"]["sharded_gets_plain"]
        assert "is a plain tensor, its parameter a DTensor over a mesh of 2 rank(s)" in refusal, refusal
        assert result["mismatched_load"]["sharded_gets_plain_unchanged"] is True


@pytest.mark.slow
def test_a_mix_of_sharded_and_plain_params_is_refused(ranks):
    _, results = ranks
    message = results[0]["mismatched_load"]["mixed_params"]
    assert "4 of the optimizer's 8 parameters are sharded" in message and "fully_shard" in message, message


@pytest.mark.slow
def test_rank_whose_closure_raises_comes_back_to_w_and_the_other_rank_times_out(ranks):
    _, results = ranks
    failing, waiting = results[0]["closure_raises"], results[1]["closure_raises"]
    assert failing["error"] == "RuntimeError: the closure failed at w + e" and failing["back_at_w"]
    assert waiting["error"] is not None and "Timed out" in waiting["error"], waiting["error"]
    assert waiting["back_at_w"] and waiting["seconds"] < 60


def test_fsdp1_params_are_refused_with_a_pointer_to_fully_shard():
    """FSDP1 cannot be built without an accelerator; its mark on the params (flat or use_orig_params views)
    is what SAM reads, set here as FSDP1 sets it."""
    from torch.distributed.fsdp._common_utils import _set_fsdp_flattened

    model = mlp()
    _set_fsdp_flattened(model[0].weight)
    for build in (lambda: funcsam.SAMSGD(model.parameters(), lr=0.1, rho=0.05),
                  lambda: funcsam.SAM(model.parameters(), torch.optim.SGD, lr=0.1, model=model)):
        with pytest.raises(TypeError, match=r"FSDP1.*fully_shard"):
            build()


def test_checkpoint_helpers_refuse_what_they_cannot_handle():
    from funcsam.checkpoint import load_sharded_state_dict, sharded_state_dict

    model = mlp()
    with pytest.raises(TypeError, match="funcsam.SAM or funcsam.SAMSGD"):
        sharded_state_dict(model, torch.optim.SGD(model.parameters(), lr=0.1))
    optimizer = funcsam.SAMSGD(model.parameters(), lr=0.1, momentum=0.9, rho=0.05, mode=funcsam.LookSAM(k=2))
    state = sharded_state_dict(model, optimizer)
    assert set(state["funcsam"]["looksam_g_v"]["g_v"]) == {name for name, _ in model.named_parameters()}
    with pytest.raises(ValueError, match="keys model, optimizer, funcsam"):
        load_sharded_state_dict(model, optimizer, {"model": state["model"]})
    state["funcsam"]["looksam_g_v"]["g_v"]["0.weight"] = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="does not fit a parameter"):
        load_sharded_state_dict(model, optimizer, state)
    other = mlp(seed=1)
    with pytest.raises(ValueError, match="not parameters of model"):
        sharded_state_dict(other, optimizer)


def test_reductions_of_plain_leaves_are_unchanged_outside_shards():
    leaves = [torch.randn(3, 2), torch.randn(5)]
    assert not sharding.uses_shards(leaves)
    expected = torch.sqrt(sum((leaf ** 2).sum() for leaf in leaves))
    torch.testing.assert_close(funcsam.global_norm(leaves), expected)
