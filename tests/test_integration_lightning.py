"""funcsam under Lightning's automatic optimization: each precision equals the same steps written by hand.

The hand loop is plain PyTorch with the same optimizer: a closure that zeroes, runs the forward under
the same autocast, scales the loss with the same kind of GradScaler and backpropagates, then
``optimizer.step(closure, grad_scaler=scaler)`` and ``scaler.update()``. Clipping is also checked
against ``reference_sam`` (SAM written out with torch.autograd, no funcsam).
"""

import copy
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

L = pytest.importorskip("lightning.pytorch")
from lightning.pytorch.plugins import MixedPrecision  # noqa: E402

import funcsam  # noqa: E402
from funcsam.integrations.lightning import SAMMixedPrecision, SAMPrecision, sam_precision  # noqa: E402
from helpers import adamw_by_hand, assert_trees_close, assert_trees_equal, reference_sam  # noqa: E402

QUIET = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
             enable_model_summary=False)
AUTOCAST = {"32-true": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def sgd(module):
    return funcsam.SAMSGD(module.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, rho=0.05, model=module)


def adamw(module, **kwargs):
    return funcsam.SAM(module.parameters(), torch.optim.AdamW, rho=0.1, lr=1e-2, weight_decay=0.05, model=module,
                       **kwargs)


def every_second_adamw(module):
    return adamw(module, mode=funcsam.every(2))


def torch_sgd(module):
    return torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)


def net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8, bias=False), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))


class Tiny(L.LightningModule):
    """``net()`` trained with ``make_optimizer(self)``; keeps the losses ``on_train_batch_end`` receives."""

    def __init__(self, make_optimizer):
        super().__init__()
        self.net, self.make_optimizer, self.losses = net(), make_optimizer, []

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        return F.cross_entropy(self.net(inputs), targets)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"])

    def configure_optimizers(self):
        return self.make_optimizer(self)


def dataset(n_batches: int = 3, batch: int = 4) -> torch.utils.data.TensorDataset:
    generator = torch.Generator().manual_seed(1)
    n = n_batches * batch
    return torch.utils.data.TensorDataset(torch.randn(n, 6, generator=generator),
                                          torch.randint(0, 3, (n,), generator=generator))


def loader(n_batches: int = 3) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(dataset(n_batches), batch_size=4, shuffle=False)


def fit(make_optimizer, *, max_steps: int = 3, **trainer_kwargs) -> Tiny:
    module = Tiny(make_optimizer)
    L.Trainer(max_steps=max_steps, **QUIET, **trainer_kwargs).fit(module, loader())
    return module


def by_hand(make_optimizer, precision: str, steps: int = 3, max_grad_norm=None):
    """``(model, losses at w, scaler)`` after ``steps`` hand-written steps of the same optimizer."""
    model = Tiny(make_optimizer)  # the same init; only its net and optimizer factory are used
    optimizer = make_optimizer(model)
    optimizer.max_grad_norm = max_grad_norm
    dtype = AUTOCAST[precision]
    scaler = torch.amp.GradScaler("cpu") if precision == "16-mixed" else None
    losses = []
    for inputs, targets in list(loader())[:steps]:
        def closure():
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None, cache_enabled=False):
                loss = F.cross_entropy(model.net(inputs), targets)
            optimizer.zero_grad()
            (loss if scaler is None else scaler.scale(loss)).backward()
            return loss.detach()
        losses.append(optimizer.step(closure, grad_scaler=scaler))
        if scaler is not None:
            scaler.update()
    return model, losses, scaler


def state(module) -> dict:
    return {**dict(module.net.named_parameters()), **dict(module.net.named_buffers())}


def test_lightnings_own_fp16_path_calls_step_without_the_closure():
    """The failure a user meets: MixedPrecision("16-mixed") runs the closure, then scaler.step(optimizer)."""
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(TypeError, match="needs a closure"):
        fit(sgd, plugins=[plugin])


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("make_optimizer", [sgd, adamw], ids=["SAMSGD", "SAM-AdamW"])
def test_plugin_equals_the_hand_loop(precision, make_optimizer):
    module = fit(make_optimizer, plugins=[sam_precision(precision, "cpu")])
    model, losses, scaler = by_hand(make_optimizer, precision)
    assert_trees_close(state(module), state(model), atol=1e-6)
    torch.testing.assert_close(torch.stack(module.losses), torch.stack(losses), atol=1e-6, rtol=0)  # at w
    assert module.optimizers().optimizer.steps_taken == 3
    if scaler is not None:
        assert module.trainer.precision_plugin.scaler.get_scale() == scaler.get_scale()


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_without_the_plugin_32_and_bf16_already_equal_the_hand_loop(precision):
    module = fit(sgd, precision=precision)
    model, _, _ = by_hand(sgd, precision)
    assert_trees_close(state(module), state(model), atol=1e-6)


def test_sam_precision_builds_the_plugin_of_each_precision():
    assert type(sam_precision("32-true")) is SAMPrecision
    bf16, fp16 = sam_precision("bf16-mixed", "cpu"), sam_precision("16-mixed", "cpu")
    assert isinstance(bf16, SAMMixedPrecision) and bf16.scaler is None
    assert isinstance(fp16.scaler, torch.amp.GradScaler)
    with pytest.raises(ValueError, match="'32-true', 'bf16-mixed' or '16-mixed'"):
        sam_precision("16-true")
    with pytest.raises(ValueError, match="takes no GradScaler"):
        sam_precision("32-true", scaler=torch.amp.GradScaler("cpu"))


def test_gradient_clip_val_clips_the_sam_gradient_as_reference_sam():
    """Independent of funcsam: SAM + AdamW written out with torch.autograd, the SAM gradient clipped."""
    clip = 0.05
    module = fit(adamw, plugins=[sam_precision("32-true")], gradient_clip_val=clip)
    unclipped = fit(adamw, plugins=[sam_precision("32-true")])
    batches = list(loader())
    params, buffers = reference_sam(net(), batches, rho=0.1, max_grad_norm=clip,
                                    descend=adamw_by_hand(lr=1e-2, weight_decay=0.05))
    assert_trees_close(state(module), {**params, **buffers}, atol=1e-6)
    assert (module.net[0].weight - unclipped.net[0].weight).abs().max() > 1e-4  # the clip was active
    assert module.optimizers().optimizer.max_grad_norm is None  # the Trainer's value was lent for the step only


def test_gradient_clip_val_under_fp16_equals_the_hand_loop_with_max_grad_norm():
    module = fit(sgd, plugins=[sam_precision("16-mixed", "cpu")], gradient_clip_val=0.05)
    model, _, _ = by_hand(sgd, "16-mixed", max_grad_norm=0.05)
    assert_trees_close(state(module), state(model), atol=1e-6)


def test_clipping_by_value_is_refused_and_nothing_moves():
    module = Tiny(sgd)
    before = copy.deepcopy(state(module))
    trainer = L.Trainer(max_steps=1, plugins=[sam_precision("32-true")], gradient_clip_val=0.1,
                        gradient_clip_algorithm="value", **QUIET)
    with pytest.raises(ValueError, match="global norm only"):
        trainer.fit(module, loader())
    assert_trees_equal(state(module), before)


def test_accumulation_is_refused_before_training_starts():
    module = Tiny(sgd)
    before = copy.deepcopy(state(module))
    trainer = L.Trainer(max_steps=2, plugins=[sam_precision("16-mixed", "cpu")], accumulate_grad_batches=2, **QUIET)
    with pytest.raises(ValueError, match="accumulate_grad_batches=2 .* manual optimization"):
        trainer.fit(module, loader())
    assert_trees_equal(state(module), before)


class AccumulatingInOneClosure(Tiny):
    """The recipe the accumulation error points to: manual optimization, every micro-batch in one closure."""

    def __init__(self, make_optimizer, micro_batches: int):
        super().__init__(make_optimizer)
        self.automatic_optimization, self.micro_batches = False, micro_batches

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        parts = [part for part in zip(*(tensor.chunk(self.micro_batches) for tensor in batch))]

        def closure():
            optimizer.zero_grad()
            total = 0.0
            for inputs, targets in parts:
                loss = F.cross_entropy(self.net(inputs), targets) / len(parts)
                self.manual_backward(loss)
                total = total + loss.detach()
            return total

        return optimizer.step(closure)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.losses.append(outputs)


def test_manual_optimization_accumulates_both_passes_over_every_micro_batch():
    """Two micro-batches of 2 per step, both passes over both: a hand loop doing the same (BatchNorm-free
    so that the micro-batches' statistics do not enter; the gradients are what is checked)."""
    def plain_sgd(module):
        return funcsam.SAMSGD(module.parameters(), lr=0.1, momentum=0.9, rho=0.05)

    module = AccumulatingInOneClosure(plain_sgd, micro_batches=2)
    module.net[1] = nn.Identity()
    model = copy.deepcopy(module)
    L.Trainer(max_steps=3, plugins=[sam_precision("32-true")], **QUIET).fit(module, loader())
    optimizer = plain_sgd(model)
    for inputs, targets in loader():
        def closure():
            optimizer.zero_grad()
            for part_inputs, part_targets in zip(inputs.chunk(2), targets.chunk(2)):
                (F.cross_entropy(model.net(part_inputs), part_targets) / 2).backward()
        optimizer.step(closure)
    assert_trees_close(state(module), state(model), atol=1e-6)


class SkippingTheSecondBatch(Tiny):
    def training_step(self, batch, batch_idx):
        return None if batch_idx == 1 else super().training_step(batch, batch_idx)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.losses.append(outputs.get("loss"))


def test_training_step_returning_none_skips_the_step_as_in_lightning():
    module = SkippingTheSecondBatch(sgd)
    L.Trainer(max_epochs=1, plugins=[sam_precision("16-mixed", "cpu")], **QUIET).fit(module, loader())
    model, scaler = Tiny(sgd), torch.amp.GradScaler("cpu")
    optimizer = sgd(model)
    for inputs, targets in [batch for index, batch in enumerate(loader()) if index != 1]:
        def closure():
            with torch.autocast("cpu", dtype=torch.float16, cache_enabled=False):
                loss = F.cross_entropy(model.net(inputs), targets)
            optimizer.zero_grad()
            scaler.scale(loss).backward()
            return loss
        optimizer.step(closure, grad_scaler=scaler)
        scaler.update()
    assert module.optimizers().optimizer.steps_taken == 2 and module.losses[1] is None
    assert_trees_close(state(module), state(model), atol=1e-6)


class CountingHooks(L.Callback):
    def __init__(self):
        self.before_optimizer_step = 0

    def on_before_optimizer_step(self, trainer, module, optimizer):
        self.before_optimizer_step += 1


def test_hooks_run_once_per_step_and_other_optimizers_step_as_usual():
    counter = CountingHooks()
    fit(sgd, plugins=[sam_precision("16-mixed", "cpu")], callbacks=[counter])
    assert counter.before_optimizer_step == 3  # not 6: once per SAM step, after the pass at w

    module = fit(torch_sgd, plugins=[sam_precision("32-true")])
    model = Tiny(torch_sgd)
    optimizer = torch_sgd(model)
    for inputs, targets in loader():
        optimizer.zero_grad()
        F.cross_entropy(model.net(inputs), targets).backward()
        optimizer.step()
    assert_trees_close(state(module), state(model), atol=1e-6)


def test_resuming_from_a_lightning_checkpoint_takes_the_same_steps(tmp_path):
    """fp16 with every(2): after resuming, steps_taken picks the right passes and the scaler its scale."""
    two_per_epoch = torch.utils.data.DataLoader(dataset(2), batch_size=4, shuffle=False)

    def trainer(epochs):
        return L.Trainer(max_epochs=epochs, plugins=[sam_precision("16-mixed", "cpu")], **QUIET)

    straight = Tiny(every_second_adamw)
    trainer(3).fit(straight, two_per_epoch)

    first = trainer(1)
    first.fit(Tiny(every_second_adamw), two_per_epoch)
    path = os.fspath(tmp_path / "sam.ckpt")
    first.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)
    assert saved["optimizer_states"][0]["funcsam"]["steps_taken"] == 2

    resumed = Tiny(every_second_adamw)
    trainer(3).fit(resumed, two_per_epoch, ckpt_path=path)
    assert resumed.optimizers().optimizer.steps_taken == straight.optimizers().optimizer.steps_taken == 6
    assert_trees_equal(state(resumed), state(straight))
    assert resumed.trainer.precision_plugin.scaler.get_scale() == straight.trainer.precision_plugin.scaler.get_scale()


def test_example_script_trains(capsys):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
    try:
        from lightning_sam import main
    finally:
        sys.path.pop(0)
    losses = main(["--precision", "16-mixed", "--max-steps", "12", "--samples", "256", "--batch-size", "32"])
    assert len(losses) == 12 and losses[-1] < losses[0]
    assert "16-mixed" in capsys.readouterr().out
