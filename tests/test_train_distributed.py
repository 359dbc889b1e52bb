"""The trainer on two gloo processes (started by the test on 127.0.0.1, as torchrun would start
them), and its m-sharpness and accumulation flags on one.

Two processes: only rank 0 prints and writes files; a job that crashed on every rank resumes from
rank 0's checkpoint and ends bit-for-bit where the uninterrupted job does (also ``--api adapter``
with ``--sam-sync local``, over DistributedDataParallel); ``--sam-sync global`` with ``--sync-bn``
follows the one-process run with the same seed, and the adapter's run follows the functional one;
impossible world sizes are refused with exit code 2 on every rank.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

import train.cifar10 as cifar10
from helpers import free_port, launch_gloo_ranks
from test_train_resume import assert_same_trajectory
from train.checkpoint import CHECKPOINT_NAME, load_checkpoint

WORLD = 2
TIMEOUT_S = 120
WORKER = Path(__file__).with_name("train_dp_worker.py")
REPO = Path(__file__).resolve().parents[1]


def tiny_args(out: Path, *extra: str) -> list[str]:
    # NCHW: the tiny model's 4- and 8-channel convolutions run about a third slower in channels_last
    # (the default, for real widths); test_train_loop checks that layout on its own.
    # 16 steps of 32 images (16 per process) per epoch: a few seconds for two processes.
    return ["--dataset", "synthetic", "--model", "tiny", "--synthetic-size", "512", "--batch-size", "32",
            "--epochs", "2", "--warmup-epochs", "1", "--device", "cpu", "--out", str(out),
            "--no-channels-last", *extra]


def launch(argv: list[str], crash_at_epoch: int | None = None) -> list[subprocess.CompletedProcess]:
    """Both ranks of ``python -m train.cifar10 ARGV`` to completion (or killed after TIMEOUT_S)."""
    crash = None if crash_at_epoch is None else str(crash_at_epoch)
    return launch_gloo_ranks([sys.executable, str(WORKER), *argv], WORLD, TIMEOUT_S, cwd=REPO,
                             extra_env={"CRASH_AT_EPOCH": crash})


def launch_in_sequence(*runs: list[str]) -> list[subprocess.CompletedProcess]:
    """Both ranks of several trainer runs, one after the other in the same two processes (one
    interpreter start for all of them; each run joins its own process group, on its own port)."""
    ports = []
    while len(ports) < len(runs) - 1:
        port = free_port()
        ports += [] if port in ports else [port]
    argv = [arg for index, run in enumerate(runs) for arg in ([] if index == 0 else ["--then"]) + run]
    return launch_gloo_ranks([sys.executable, str(WORKER), *argv], WORLD, TIMEOUT_S, cwd=REPO,
                             extra_env={"CRASH_AT_EPOCH": None, "THEN_PORTS": ",".join(map(str, ports))})


def assert_succeeded(ranks: list[subprocess.CompletedProcess]) -> None:
    for rank, done in enumerate(ranks):
        assert done.returncode == 0, f"rank {rank} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two-process runs shared by the tests below (each launch costs seconds)."""
    root = tmp_path_factory.mktemp("train_dp")
    ranks = {}
    # One interpreter start for both: the straight run is compared bit for bit with a resumed one
    # launched afresh below, which also checks that a run after another in the same process is clean.
    ranks["sync_bn"] = ranks["straight"] = launch_in_sequence(
        tiny_args(root / "sync_bn", "--sync-bn", "--sam-sync", "global"), tiny_args(root / "straight"))
    ranks["crashed"] = launch(tiny_args(root / "resumed"), crash_at_epoch=2)
    ranks["resumed"] = launch(tiny_args(root / "resumed", "--resume"))
    # --api adapter (DDP): global with --sync-bn; local straight, crashed at epoch 2, resumed.
    adapter = ("--api", "adapter")
    ranks["adapter"] = launch_in_sequence(
        tiny_args(root / "adapter_sync_bn", *adapter, "--sync-bn", "--sam-sync", "global"),
        tiny_args(root / "adapter_local", *adapter, "--sam-sync", "local"),
        tiny_args(root / "adapter_local_resumed", *adapter, "--sam-sync", "local", "--simulate-crash-at-epoch", "2"),
        tiny_args(root / "adapter_local_resumed", *adapter, "--sam-sync", "local", "--resume"),
    )
    return root, ranks


@pytest.mark.slow
def test_only_rank_zero_prints_and_writes(runs):
    root, ranks = runs
    assert_succeeded(ranks["straight"])
    assert sorted(p.name for p in (root / "straight").iterdir()) == \
        ["args.json", CHECKPOINT_NAME, "metrics.jsonl", "summary.json"]
    rank0, rank1 = ranks["straight"]
    assert "epoch 2/2" in rank0.stdout + rank0.stderr
    assert rank1.stdout == "" and "epoch" not in rank1.stderr
    summary = json.loads((root / "straight" / "summary.json").read_text())
    assert summary["processes"] == WORLD
    assert json.loads((root / "straight" / "args.json").read_text())["world_size"] == WORLD
    rows = [json.loads(line) for line in (root / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and rows[-1]["step"] == 32


@pytest.mark.slow
def test_every_rank_resumes_after_a_crash_and_ends_as_the_uninterrupted_run(runs):
    root, ranks = runs
    for rank, done in enumerate(ranks["crashed"]):
        assert done.returncode != 0 and "simulated crash" in done.stderr, f"rank {rank}: {done.stderr}"
    assert_succeeded(ranks["resumed"])
    assert "resuming" in ranks["resumed"][0].stderr
    # Rank 1 resumed too: had it started afresh, its gradients (averaged into rank 0's) would differ.
    assert_same_trajectory(root / "straight", root / "resumed")


@pytest.mark.slow
def test_global_sync_with_sync_bn_matches_one_process(runs, tmp_path):
    """Two processes x 16 images = one process x 32 images, up to float32 summation order: the
    gradient is a mean of two half-batch means (all-reduced) instead of one mean, and the BatchNorm
    statistics are combined from per-rank (mean, var, n). After 32 SAM steps with momentum those
    round-off differences measured at most 1.2e-6 (abs, a running variance; 6e-7 relative): 1e-5
    leaves an 8x margin for other CPUs' kernels, and is the library tests' tolerance."""
    root, ranks = runs
    assert_succeeded(ranks["sync_bn"])
    assert cifar10.main(tiny_args(tmp_path / "one")) == 0
    two, one = load_checkpoint(root / "sync_bn" / CHECKPOINT_NAME), load_checkpoint(tmp_path / "one" / CHECKPOINT_NAME)
    assert two["step"] == one["step"] == 32
    for key in ("params", "buffers"):
        for name, value in one[key].items():
            torch.testing.assert_close(two[key][name], value, rtol=1e-5, atol=1e-5, msg=f"{key} {name}")
    rows_two = [json.loads(line) for line in (root / "sync_bn" / "metrics.jsonl").read_text().splitlines()]
    rows_one = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(rows_two, rows_one):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)  # every process's images counted
        assert a["train_acc"] == b["train_acc"] and a["test_acc"] == b["test_acc"]


@pytest.mark.slow
def test_adapter_on_ddp_with_sync_bn_follows_the_functional_run(runs):
    """--api adapter under torchrun: SAMSGD over DistributedDataParallel, funcsam's SyncBatchNorm under
    plain autograd, against the functional API's two-process run (its all-reduce hook, SyncBatchNorm
    under torch.func). Same math, other summation order: after 32 steps they measured 7e-8 apart
    (params) and 5e-7 (a running variance); 1e-5 is the tolerance of the one-process comparison above."""
    root, ranks = runs
    assert_succeeded(ranks["adapter"])
    adapter, functional = (load_checkpoint(root / name / CHECKPOINT_NAME) for name in ("adapter_sync_bn", "sync_bn"))
    assert adapter["step"] == functional["step"] == 32
    for key in ("params", "buffers"):
        for name, value in functional[key].items():
            torch.testing.assert_close(adapter[key][name], value, rtol=1e-5, atol=1e-5, msg=f"{key} {name}")


@pytest.mark.slow
def test_adapter_with_local_perturbation_resumes_as_the_uninterrupted_run(runs):
    root, ranks = runs
    assert_succeeded(ranks["adapter"])
    assert "simulated crash at the start of epoch 2" in ranks["adapter"][1].stderr
    assert "resuming" in ranks["adapter"][0].stderr
    assert json.loads((root / "adapter_local" / "args.json").read_text())["sam_sync"] == "local"
    assert_same_trajectory(root / "adapter_local", root / "adapter_local_resumed")


@pytest.mark.slow
def test_world_size_not_dividing_the_batch_exits_2_on_every_rank(tmp_path):
    ranks = launch(tiny_args(tmp_path / "run", "--batch-size", "33"))
    assert [done.returncode for done in ranks] == [2, 2]
    assert "--batch-size 33" in ranks[0].stderr and "2 processes" in ranks[0].stderr
    assert ranks[1].stderr == ""  # reported once, by rank 0
    assert all("Traceback" not in done.stderr for done in ranks)
    assert not (tmp_path / "run").exists()


# --- m-sharpness and accumulation on one process ----------------------------------------------


def test_accumulate_threads_batchnorm_statistics_through_the_micro_batches(tmp_path):
    assert cifar10.main(tiny_args(tmp_path / "acc", "--accumulate", "4", "--limit-steps", "3")) == 0
    saved = load_checkpoint(tmp_path / "acc" / CHECKPOINT_NAME)
    assert saved["step"] == 6
    assert int(saved["buffers"]["bn1.num_batches_tracked"]) == 6 * 4  # one BatchNorm update per micro-batch
    assert all(torch.isfinite(p).all() for p in saved["params"].values())


def test_m_sharpness_takes_another_path_than_whole_batch_sam(tmp_path):
    assert cifar10.main(tiny_args(tmp_path / "m", "--m-sharpness", "4", "--limit-steps", "3")) == 0
    assert cifar10.main(tiny_args(tmp_path / "sam", "--limit-steps", "3")) == 0
    m, sam = (load_checkpoint(tmp_path / name / CHECKPOINT_NAME) for name in ("m", "sam"))
    assert int(m["buffers"]["bn1.num_batches_tracked"]) == 6  # parts advance the counter once per step
    assert all(torch.isfinite(p).all() for p in m["params"].values())
    assert not torch.allclose(m["params"]["fc.weight"], sam["params"]["fc.weight"])


@pytest.mark.parametrize("change", [["--accumulate", "2"], ["--m-sharpness", "2"], ["--sync-bn"]])
def test_checkpoint_with_other_beyond_one_batch_flags_is_refused(tmp_path, capsys, change):
    out = tmp_path / "run"
    assert cifar10.main(tiny_args(out, "--epochs", "1", "--warmup-epochs", "0", "--limit-steps", "1")) == 0
    capsys.readouterr()
    assert cifar10.main(tiny_args(out, "--epochs", "1", "--warmup-epochs", "0", "--limit-steps", "1",
                                  *change, "--resume")) == 2
    err = capsys.readouterr().err
    assert "different run" in err and change[0] in err and "Traceback" not in err


def test_checkpoint_of_another_number_of_processes_is_refused(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert cifar10.main(tiny_args(out, "--epochs", "1", "--warmup-epochs", "0", "--limit-steps", "1")) == 0
    before = (out / CHECKPOINT_NAME).read_bytes()
    capsys.readouterr()
    # As if under torchrun with 2 processes; the refusal comes before any collective is needed.
    two = cifar10.funcsam.distributed.DataParallel(0, 2, 0, torch.device("cpu"))
    monkeypatch.setattr(cifar10.funcsam.distributed, "init_data_parallel", lambda *args, **kwargs: two)
    assert cifar10.main(tiny_args(out, "--epochs", "1", "--warmup-epochs", "0", "--limit-steps", "1", "--resume")) == 2
    err = capsys.readouterr().err
    assert "1 process(es), this one has 2" in err and "--nproc_per_node 1" in err and "Traceback" not in err
    assert (out / CHECKPOINT_NAME).read_bytes() == before


def test_checkpoint_from_before_these_flags_resumes_as_one_process(tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = tiny_args(out, "--limit-steps", "1")
    real_plan = cifar10.make_epoch_plan

    def crash_in_epoch_two(num_samples, seed, epoch, device):
        if epoch == 1:
            raise RuntimeError("simulated crash")
        return real_plan(num_samples, seed, epoch, device)

    monkeypatch.setattr(cifar10, "make_epoch_plan", crash_in_epoch_two)
    with pytest.raises(RuntimeError, match="simulated crash"):
        cifar10.main(args)
    monkeypatch.undo()
    saved = load_checkpoint(out / CHECKPOINT_NAME)
    for key in ("sam_sync", "sync_bn", "m_sharpness", "accumulate", "world_size"):
        del saved["args"][key]
    torch.save(saved, out / CHECKPOINT_NAME)
    assert cifar10.main(args + ["--resume"]) == 0
    assert load_checkpoint(out / CHECKPOINT_NAME)["epoch"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("flag", [["--m-sharpness", "2"], ["--accumulate", "2"]])
def test_compiled_parts_compile_once_and_never_recompile(tmp_path, flag):
    """m-sharpness (vmap over parts) and accumulation (a loop over micro-batches) stay one
    fullgraph step whose graph survives a learning rate that changes every step."""
    torch._dynamo.reset()
    counters.clear()
    out = tmp_path / "run"
    assert cifar10.main(tiny_args(out, "--compile", *flag, "--epochs", "3", "--limit-steps", "2")) == 0
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])  # train step + eval step
    assert not counters["graph_break"], dict(counters["graph_break"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len({r["lr"] for r in rows}) == 3 and all(r["train_loss"] == r["train_loss"] for r in rows)
