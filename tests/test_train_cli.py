"""The trainer's command line: documented flags, the recipe's defaults, bad values refused."""

import pytest

import train.cifar10 as cifar10

FLAGS = ["--model", "--optim", "--rho", "--adaptive", "--api", "--epochs", "--batch-size", "--lr", "--momentum",
         "--weight-decay", "--nesterov", "--warmup-epochs", "--label-smoothing", "--cutout", "--compile", "--amp",
         "--device", "--dataset", "--synthetic-size", "--data-dir", "--out", "--resume", "--seed", "--limit-steps",
         "--sam-sync", "--sync-bn", "--m-sharpness", "--accumulate"]


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cifar10.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in FLAGS:
        assert flag in text, flag
    for model in ("resnet20", "resnet56", "wrn28_2", "wrn28_10", "resnext29_32x4d"):
        assert model in text


def test_defaults_are_the_original_recipe():
    args = cifar10.parse_args([])
    assert (args.model, args.optim, args.rho, args.api) == ("resnet20", "sam", 0.05, "functional")
    assert (args.epochs, args.batch_size, args.lr, args.momentum, args.weight_decay) == (200, 128, 0.1, 0.9, 5e-4)
    assert (args.warmup_epochs, args.nesterov, args.cutout, args.amp, args.compile) == (5, False, False, None, False)


def test_adamw_base_takes_the_adamw_recipe_unless_told_otherwise():
    args = cifar10.parse_args(["--base", "adamw"])
    assert (args.base, args.lr, args.weight_decay, args.betas) == ("adamw", 1e-3, 0.05, [0.9, 0.999])
    args = cifar10.parse_args(["--base", "adamw", "--lr", "3e-4", "--weight-decay", "0.1", "--betas", "0.8", "0.99"])
    assert (args.lr, args.weight_decay, args.betas) == (3e-4, 0.1, [0.8, 0.99])
    assert cifar10.parse_args(["--lr", "0.2"]).weight_decay == 5e-4  # sgd keeps its recipe


def test_late_sam_defaults_to_the_last_tenth_of_the_run():
    assert cifar10.parse_args(["--sam-mode", "late", "--epochs", "200"]).sam_start_epoch == 180
    assert cifar10.parse_args(["--sam-mode", "late", "--epochs", "3", "--warmup-epochs", "1"]).sam_start_epoch == 2


def test_bare_amp_means_bf16():
    assert cifar10.parse_args(["--amp"]).amp == "bf16"
    assert cifar10.parse_args(["--amp", "fp16"]).amp == "fp16"


@pytest.mark.parametrize("argv", [["--epochs", "0"], ["--lr", "0"], ["--limit-steps", "0"],
                                  ["--epochs", "3", "--warmup-epochs", "4"], ["--model", "resnet18"], ["--m-sharpness", "0"],
                                  ["--accumulate", "0"], ["--sam-sync", "both"], ["--base", "adam"],
                                  ["--base", "adamw", "--betas", "0.9", "1.0"], ["--base", "adamw", "--momentum", "0.9"],
                                  ["--base", "adamw", "--nesterov"], ["--betas", "nan", "0.9"], ["--sharpness-every", "-1"],
                                  ["--sharpness-images", "0"], ["--sam-mode", "fast"], ["--sam-mode", "every", "--sam-every", "0"],
                                  ["--looksam-alpha", "-0.1"], ["--gsam-alpha", "nan"], ["--epochs", "5", "--sam-start-epoch", "5"],
                                  ["--sam-mode", "every", "--optim", "sgd"], ["--sam-mode", "msam", "--momentum", "0"],
                                  ["--adaptive-delta", "1"], ["--compile-scope", "loss", "--m-sharpness", "2"],
                                  ["--compile-scope", "graph"]])
def test_bad_values_exit_2_with_a_reason(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cifar10.parse_args(argv)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("argv, reason", [(["--epochs", "x"], "argument --epochs: invalid int value: 'x'"),
                                          (["--epoch-count", "3"], "unrecognized arguments: --epoch-count 3"),
                                          (["--model", "resnet18"], "argument --model: invalid choice: 'resnet18'"),
                                          (["--rho", "-1"], "--rho must be a finite number >= 0, got -1.0")])
def test_a_bad_flag_gets_two_lines_not_the_usage(argv, reason, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cifar10.main(argv)
    assert exit_info.value.code == 2
    first, second = capsys.readouterr().err.splitlines()
    assert first.startswith(f"error: {reason}") and second == "run with --help for all flags"


def test_cuda_asked_for_without_a_gpu_is_a_usage_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cifar10.torch.cuda, "is_available", lambda: False)
    assert cifar10.main(["--device", "cuda", "--dataset", "synthetic", "--out", str(tmp_path)]) == 2
    assert "--device cpu" in capsys.readouterr().err


def test_a_compiler_failure_is_reported_without_a_traceback(tmp_path, capsys, monkeypatch):
    import torch._dynamo.exc

    def compiler_breaks(args):
        raise torch._dynamo.exc.InternalTorchDynamoError("IndexError: tuple index out of range")

    monkeypatch.setattr(cifar10, "train", compiler_breaks)
    assert cifar10.main(["--dataset", "synthetic", "--compile", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "Rerun without --compile" in err and "tuple index out of range" in err


@pytest.mark.parametrize("world, argv, names", [
    (1, ["--m-sharpness", "3"], ["--m-sharpness 3", "64"]),
    (1, ["--accumulate", "5"], ["--accumulate 5", "64"]),
    (1, ["--m-sharpness", "2", "--accumulate", "2"], ["--m-sharpness 2", "--accumulate 2"]),
    (1, ["--sync-bn", "--m-sharpness", "2"], ["--sync-bn", "--m-sharpness 2"]),
    (1, ["--api", "adapter", "--m-sharpness", "2"], ["--m-sharpness 2", "--api functional"]),
    (3, [], ["--batch-size 64", "3 processes"]),
    (2, ["--accumulate", "64"], ["--accumulate 64", "32 per process"]),
    (2, ["--m-sharpness", "2"], ["--m-sharpness 2", "--sam-sync local"]),
    (2, ["--api", "adapter", "--m-sharpness", "2", "--sam-sync", "local"], ["--m-sharpness 2", "--api functional"]),
])
def test_impossible_beyond_one_batch_combinations_exit_2_naming_the_flag(tmp_path, capsys, monkeypatch,
                                                                          world, argv, names):
    # WORLD_SIZE as torchrun sets it: the check runs before any process group is joined.
    if world > 1:
        monkeypatch.setenv("WORLD_SIZE", str(world))
    out = tmp_path / "run"
    assert cifar10.main(["--dataset", "synthetic", "--batch-size", "64", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    for name in names:
        assert name in err, (name, err)
    assert not out.exists()
