"""The trainer's --fsdp (FSDP2 under torchrun, --api adapter): a run crashed and resumed ends where
the uninterrupted one does, bit for bit; the combinations it cannot run are refused."""

import sys
from pathlib import Path

import pytest
import torch

import train.cifar10 as cifar10
from helpers import launch_gloo_ranks
from test_train_resume import assert_same_trajectory
from train.checkpoint import CHECKPOINT_NAME, load_checkpoint

WORKER = Path(__file__).with_name("train_fsdp_worker.py")
REPO = Path(__file__).resolve().parents[1]
# LookSAM over AdamW: the base state and LookSAM's g_v (per parameter) both sharded, both checkpointed;
# channels_last (the default) too, whose NHWC weights fully_shard cannot take as they are.
FSDP_ARGS = ["--dataset", "synthetic", "--model", "tiny", "--synthetic-size", "512", "--batch-size", "32",
             "--epochs", "2", "--warmup-epochs", "1", "--limit-steps", "4", "--device", "cpu",
             "--api", "adapter", "--fsdp", "--base", "adamw", "--sam-mode", "looksam", "--sam-every", "2"]


@pytest.mark.slow
def test_fsdp_run_crashed_and_resumed_ends_where_the_uninterrupted_one_does(tmp_path):
    ranks = launch_gloo_ranks([sys.executable, str(WORKER), str(tmp_path), *FSDP_ARGS], 2, 180, cwd=REPO)
    for rank, done in enumerate(ranks):
        assert done.returncode == 0, f"rank {rank} failed:\n{done.stdout}\n{done.stderr[-4000:]}"
    assert_same_trajectory(tmp_path / "straight", tmp_path / "resumed")
    saved = load_checkpoint(tmp_path / "straight" / CHECKPOINT_NAME)
    assert saved["args"]["fsdp"] is True and saved["args"]["world_size"] == 2
    params = saved["params"]
    g_v = saved["optimizer"]["sam_adamw"]["funcsam"]["looksam_g_v"]
    # Whole tensors of the parameters' full shapes (gathered from the shards), and LookSAM has measured g_v.
    shapes = [tuple(p.shape) for p in params.values()]
    assert [tuple(t.shape) for t in g_v.values()] == shapes
    assert any(bool(t.abs().sum() > 0) for t in g_v.values())


@pytest.mark.parametrize("extra, refused", [
    ([], "one process"),
    (["--compile"], "--compile"),
    (["--accumulate", "2"], "--accumulate 2"),
    (["--sam-sync", "local"], "--sam-sync local"),
    (["--sync-bn"], "--sync-bn"),
])
def test_fsdp_refuses_what_it_cannot_run(tmp_path, capsys, extra, refused):
    code = cifar10.main([*FSDP_ARGS, "--out", str(tmp_path / "run"), *extra])
    assert code == 2
    message = capsys.readouterr().err
    assert "--fsdp cannot run with" in message and refused in message, message
    assert not (tmp_path / "run").exists()


def test_fsdp_needs_the_adapter_api(tmp_path, capsys):
    argv = [a for a in FSDP_ARGS if a not in ("--api", "adapter")]
    assert cifar10.main([*argv, "--out", str(tmp_path / "run")]) == 2
    assert "--api functional" in capsys.readouterr().err
    assert torch.distributed.is_initialized() is False
