"""funcsam.SAM and funcsam.SAMSGD under DistributedDataParallel on two gloo processes, against one process.

One spawned job (tests/ddp_worker.py) runs every configuration (optimizer x call style x mode x
sam_sync) for 4 steps and saves what each rank ended with; each test recomputes its reference here,
in one process, with the pure step ``funcsam.sam_step``:

    sam_sync="global"   sam_step on the global batch (DDP averages both passes)
    sam_sync="local"    sam_step with source=funcsam.MSharpness(2) on the global batch: the two
                        replicas are the two m-sharpness parts (each perturbs with its own gradient)
"""

import os
import sys

import pytest
import torch
import torch.nn.functional as F

import funcsam
from helpers import assert_trees_close, launch_gloo_ranks, mlp, params_and_buffers

sys.path.insert(0, os.path.dirname(__file__))
import ddp_worker  # noqa: E402  (the worker's data, modes and hyperparameters are the reference's too)

WORLD = 2
TIMEOUT_S = 150
TOLERANCE = 1e-6  # float32: a mean of two half-batch means against one mean, over 4 steps


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ddp")
    worker = os.path.join(os.path.dirname(__file__), "ddp_worker.py")
    done = launch_gloo_ranks([sys.executable, worker, str(out_dir)], WORLD, TIMEOUT_S)
    for rank, process in enumerate(done):
        assert process.returncode == 0, f"rank {rank} failed:\n{process.stdout}\n{process.stderr}"
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


def one_process_reference(mode_name: str, sync: str, n_steps: int = ddp_worker.STEPS) -> dict:
    """``n_steps`` of the pure step on the global batches, the replicas as m-sharpness parts for "local"."""
    mode_factory, adaptive = ddp_worker.MODES[mode_name]
    mode = funcsam.modes.check_mode(mode_factory())
    model = mlp()
    params, buffers = params_and_buffers(model)
    loss_fn = funcsam.make_loss_fn(model, F.cross_entropy)
    base = funcsam.sgd(**ddp_worker.HYPER)
    state = mode.init_state(base, params)
    source = funcsam.MSharpness(WORLD) if sync == "local" else None
    rho = ddp_worker.ASAM_RHO if adaptive else ddp_worker.RHO
    for step, batch in enumerate(ddp_worker.global_batches()[:n_steps]):
        out = funcsam.sam_step(params, buffers, batch, loss_fn, rho, ddp_worker.LR, state, base=base, mode=mode,
                               take_sam=mode.takes_sam(step, state), source=source, adaptive=adaptive)
        params, buffers, state = out.params, out.buffers, out.momentum_state
    return params


CONFIGURATIONS = list(ddp_worker.configurations())


@pytest.mark.slow
@pytest.mark.parametrize("optimizer,style,mode,sync", CONFIGURATIONS,
                         ids=[ddp_worker.config_name(*c) for c in CONFIGURATIONS])
def test_ddp_optimizer_equals_the_one_process_reference(ranks, optimizer, style, mode, sync):
    expected = one_process_reference(mode, sync)
    for rank in range(WORLD):
        assert_trees_close(ranks[rank][ddp_worker.config_name(optimizer, style, mode, sync)], expected,
                           atol=TOLERANCE, rtol=TOLERANCE)


@pytest.mark.slow
def test_local_perturbation_differs_from_global(ranks):
    """The two references are far apart compared with the tolerance, so each test above can tell them apart."""
    local, global_ = one_process_reference("sam", "local"), one_process_reference("sam", "global")
    assert (local["0.weight"] - global_["0.weight"]).abs().max() > 100 * TOLERANCE
    assert (ranks[0]["samsgd-closure-sam-local"]["0.weight"] - global_["0.weight"]).abs().max() > 100 * TOLERANCE


@pytest.mark.slow
def test_inner_module_as_model_works_under_global_perturbation(ranks):
    expected = one_process_reference("sam", "global")
    for rank in range(WORLD):
        assert_trees_close(ranks[rank]["inner_module_global"], expected, atol=TOLERANCE, rtol=TOLERANCE)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["samsgd-closure", "sam-first_second", "sam-davda54_closure"])
def test_non_finite_first_gradient_on_one_replica_skips_the_step_on_every_replica(ranks, case):
    """Rank 1's own first gradient is NaN, its gradient at w + e finite (ddp_worker.FmaxLinear): without
    the verdict riding on DDP's reduction, rank 0 would step and rank 1 skip."""
    initial = params_and_buffers(ddp_worker.FmaxLinear())[0]
    for rank in range(WORLD):
        got = ranks[rank]["non_finite"][case]
        assert not got["finite"], f"rank {rank} stepped"
        assert_trees_close(got["params"], initial, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("case,message", [
    ("local_first_synced", "inside `with model.no_sync()"),
    ("global_first_unsynced", "pass sam_sync='local'"),
    ("second_unsynced", "the parameters were put back at w"),
])
def test_backward_synchronised_against_sam_sync_is_refused_with_params_at_w(ranks, case, message):
    initial = params_and_buffers(mlp())[0]
    for rank in range(WORLD):
        got = ranks[rank]["wrong_sync"][case]
        assert message in got["message"]
        assert_trees_close(got["params"], initial, atol=0)


@pytest.mark.slow
def test_raising_closure_on_one_rank_restores_w_and_the_other_rank_times_out(ranks):
    initial = params_and_buffers(mlp())[0]
    assert ranks[1]["raising_closure"]["message"] == "ValueError: closure failed on rank 1"
    assert ranks[0]["raising_closure"]["message"].startswith("RuntimeError")
    assert "Timed out" in ranks[0]["raising_closure"]["message"]
    for rank in range(WORLD):
        assert_trees_close(ranks[rank]["raising_closure"]["params"], initial, atol=0)


@pytest.mark.slow
def test_compiled_step_traces_the_hook_as_functional_collectives_without_a_graph_break(ranks):
    """fullgraph=True raised on any graph break; the graph holds the functional all-reduce and its wait."""
    expected = one_process_reference("sam", "global", n_steps=2)
    for rank in range(WORLD):
        got = ranks[rank]["compiled_hook"]
        assert "_c10d_functional.all_reduce" in got["ops"] and "_c10d_functional.wait_tensor" in got["ops"]
        assert_trees_close(got["params"], expected, atol=TOLERANCE, rtol=TOLERANCE)


def test_local_perturbation_needs_the_ddp_wrapper():
    model = mlp()
    with pytest.raises(ValueError, match=r"needs the DDP wrapper as model= \(model=ddp_model, not ddp_model.module\)"):
        funcsam.SAMSGD(model.parameters(), lr=0.1, model=model, sam_sync="local")
    with pytest.raises(ValueError, match="got no model"):
        funcsam.SAM(model.parameters(), torch.optim.SGD, lr=0.1, sam_sync="local")
    with pytest.raises(ValueError, match="sam_sync must be 'global'"):
        funcsam.SAMSGD(model.parameters(), lr=0.1, sam_sync="replica")
