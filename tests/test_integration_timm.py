"""timm models train with funcsam in both APIs, in fp32 and in a timm-style fp16 AMP loop, compiled too.

The drop-in ``funcsam.SAM(..., torch.optim.AdamW)`` (torch's AdamW, autograd through the module) and
the functional ``funcsam.sam_step`` (``funcsam.adamw``, ``torch.func`` through ``make_loss_fn``) are
two computations of the same steps: each is checked against the other, and the ViT's against
``reference_sam`` (SAM + AdamW written out with torch.autograd, no funcsam).

Why float64 (and fp16 over AdamW for one taken step only): on the first steps Adam's update
g / (sqrt(v) + eps) is nearly sign(g), so in a model of 10^5-10^6 weights the few whose gradient lies
within float32 rounding of zero (timm's zero-initialised last BatchNorm of each block, the attention's
key bias, which softmax cancels, and chance) move by +-lr in one computation and -+lr in the other:
measured in float32, 1e-4 to 4e-4 apart after 3 steps, whichever two of the three computations are
compared. In float64 that rounding is 10^9 times smaller.
"""

import copy
import os
import sys

import pytest
import torch
import torch._dynamo.testing

timm = pytest.importorskip("timm")

import funcsam  # noqa: E402
from helpers import (  # noqa: E402
    adamw_by_hand, adapter_steps, assert_trees_close, classification_batches, params_and_buffers, reference_sam,
    run_sam_step_with_base,
)

ADAMW = dict(lr=1e-3, weight_decay=0.05)


def resnet10t():
    torch.manual_seed(0)
    return timm.create_model("resnet10t", pretrained=False, num_classes=10).double()


def tiny_vit(depth: int = 2, dtype=torch.float64, **kwargs):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=8,
                             depth=depth, **kwargs).to(dtype)


def images(n_batches: int = 3, batch: int = 4, dtype=torch.float64):
    return [(x.to(dtype), y) for x, y in classification_batches(n_batches, batch, (3, 32, 32), classes=10)]


def drop_in(model, batches):
    """Params and buffers after ``funcsam.SAM(AdamW, model=model)`` in the closure style (a trained copy)."""
    model = copy.deepcopy(model)
    optimizer = funcsam.SAM(model.parameters(), torch.optim.AdamW, rho=0.05, model=model, **ADAMW)
    adapter_steps(model, optimizer, batches, "closure")
    return params_and_buffers(model)


def functional(model, batches, **kwargs):
    """Params and buffers after ``sam_step(base=funcsam.adamw(...))`` through ``make_loss_fn``."""
    base = funcsam.adamw(weight_decay=ADAMW["weight_decay"])
    params, buffers, _ = run_sam_step_with_base(model, batches, rho=0.05, lr=ADAMW["lr"], base=base, **kwargs)
    return params, buffers


def test_resnet10t_drop_in_equals_functional_with_batchnorm():
    """BatchNorm's statistics from the pass at w only, in both APIs (model= and make_loss_fn)."""
    model, batches = resnet10t(), images()
    params, buffers = drop_in(model, batches)
    expected_params, expected_buffers = functional(model, batches)
    assert_trees_close(params, expected_params, atol=1e-6)
    assert_trees_close(buffers, expected_buffers, atol=1e-6)
    assert (params["fc.weight"] - model.fc.weight).abs().max() > 1e-4  # it trained


def test_vit_drop_in_and_functional_equal_sam_written_by_hand():
    model, batches = tiny_vit(), images()
    expected, _ = reference_sam(model, batches, rho=0.05, descend=adamw_by_hand(**ADAMW))
    assert_trees_close(drop_in(model, batches)[0], expected, atol=1e-6)
    assert_trees_close(functional(model, batches)[0], expected, atol=1e-6)


def test_vit_fp16_amp_loop_drop_in_equals_functional_loss_scaling():
    """A timm-style AMP loop (fp16 autocast, torch.amp.GradScaler) against sam_step's own loss scaling,
    which starts at the GradScaler's scale and backs off the same way: the first step overflows at
    2^16 and both skip it. Over SGD the two stay equal bit for bit (same fp16 gradients, same
    scaling). Over AdamW they are compared after the skipped step and one taken step: from there
    on, torch's AdamW and funcsam.adamw differ by a float32 rounding, which rounds some fp16
    activation the other way, and Adam's g / (sqrt(v) + eps) enlarges that where g is small
    (measured after a third step: 30% of the weights more than 1e-6 apart, at most 2e-3 = 2 lr)."""
    model, batches = tiny_vit(dtype=torch.float32), images(dtype=torch.float32)
    fp16 = dict(autocast_dtype=torch.float16)
    for make_optimizer, base, lr, steps in (
        (lambda m: funcsam.SAMSGD(m.parameters(), lr=0.01, momentum=0.9, rho=0.05), funcsam.sgd(momentum=0.9), 0.01, 3),
        (lambda m: funcsam.SAM(m.parameters(), torch.optim.AdamW, rho=0.05, **ADAMW),
         funcsam.adamw(weight_decay=ADAMW["weight_decay"]), ADAMW["lr"], 2),
    ):
        trained, scaler = copy.deepcopy(model), torch.amp.GradScaler("cpu")
        adapter_steps(trained, make_optimizer(trained), batches[:steps], "closure", scaler=scaler, **fp16)
        expected, _, _ = run_sam_step_with_base(model, batches[:steps], rho=0.05, lr=lr, base=base,
                                                loss_scale=funcsam.init_loss_scale(), **fp16)
        assert_trees_close(params_and_buffers(trained)[0], expected, atol=1e-6)
        assert scaler.get_scale() == 2.0 ** 15  # one overflow: the first step was skipped
        assert (expected["head.weight"] - model.head.weight).abs().max() > 1e-4  # a later step was taken
    fp32, _ = functional(model, batches[:2])
    assert max((expected[k] - fp32[k]).abs().max() for k in fp32) > 1e-5  # autocast was on


@pytest.mark.slow
def test_compiled_vit_sam_step_is_one_graph_equal_to_eager():
    """The whole functional step over a timm ViT captured by dynamo with fullgraph (no graph break) and
    traced by AOT autograd: one frame over steps whose lr and rho change, and the eager numbers.
    Backend aot_eager, not inductor: inductor's code generation took 96 s for this step on the shared
    2-core test machine (aot_eager: 10 s); it is the capture that a timm model could break."""
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    model, batches = tiny_vit(depth=1, dtype=torch.float32), images(n_batches=2, dtype=torch.float32)
    params, buffers = params_and_buffers(model)
    loss_fn = funcsam.make_loss_fn(model, torch.nn.functional.cross_entropy)
    base = funcsam.adamw(weight_decay=ADAMW["weight_decay"])
    compiled = torch.compile(funcsam.sam_step, fullgraph=True, backend=counter)
    results = {}
    for name, step in (("eager", funcsam.sam_step), ("compiled", compiled)):
        p, b, state = params, buffers, base.init(params)
        for index, batch in enumerate(batches):
            out = step(p, b, batch, loss_fn, torch.tensor(0.05 * (index + 1)), torch.tensor(1e-3 / (index + 1)),
                       state, base=base)
            p, b, state = out.params, out.buffers, out.momentum_state
        results[name] = p
    assert_trees_close(results["compiled"], results["eager"], atol=1e-6)
    assert counter.frame_count == 1


def test_vit_example_trains_in_both_apis_with_fp16(capsys):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
    try:
        from timm_vit_sam import main
    finally:
        sys.path.pop(0)
    tiny = ["--steps", "3", "--batch-size", "4", "--depth", "1", "--amp", "fp16"]
    functional_losses = main(tiny)
    optimizer_losses = main(tiny + ["--api", "optimizer"])
    assert len(functional_losses) == 3
    torch.testing.assert_close(torch.tensor(optimizer_losses), torch.tensor(functional_losses), atol=1e-5, rtol=0)
    assert "optimizer, amp=fp16" in capsys.readouterr().out


def test_trainer_takes_a_timm_model(tmp_path):
    from train import cifar10
    from train.checkpoint import CHECKPOINT_NAME, load_checkpoint

    argv = ["--dataset", "synthetic", "--model", "timm:test_vit,img_size=32", "--synthetic-size", "64",
            "--batch-size", "32", "--epochs", "1", "--limit-steps", "2", "--device", "cpu", "--no-channels-last",
            "--base", "adamw", "--out", str(tmp_path)]
    assert cifar10.main(argv) == 0
    saved = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    untrained = dict(timm.create_model("test_vit", pretrained=False, num_classes=10, img_size=32).named_parameters())
    assert saved["step"] == 2 and saved["params"].keys() == untrained.keys()


@pytest.mark.parametrize("model, reason", [("timm:no_such_net", "timm has no model 'no_such_net'"),
                                           ("timm:test_vit,img_size", "key=value pairs"),
                                           ("resnet18", "invalid choice: 'resnet18'")])
def test_trainer_refuses_a_model_it_cannot_build(model, reason, capsys):
    from train import cifar10

    with pytest.raises(SystemExit) as exit_info:
        cifar10.parse_args(["--model", model])
    assert exit_info.value.code == 2 and reason in capsys.readouterr().err
