"""funcsam.integrations.huggingface: SAMTrainer's steps against the same SAM steps written out by hand."""

from __future__ import annotations

import copy
import functools
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import TrainingArguments, get_linear_schedule_with_warmup  # noqa: E402
from transformers.modeling_outputs import SequenceClassifierOutput  # noqa: E402

import funcsam  # noqa: E402
from funcsam.integrations.huggingface import SAMTrainer  # noqa: E402

from helpers import (  # noqa: E402
    adamw_by_hand, assert_trees_close, launch_gloo_ranks, params_and_buffers, reference_sam,
)
from test_examples_plain import load_example  # noqa: E402

BATCH = 4  # per micro-batch


class TinyClassifier(nn.Module):
    """A transformers-style model: ``forward(x, labels)`` returns an output with ``.loss``."""

    def __init__(self, seed: int = 0, dropout: float = 0.0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Dropout(dropout), nn.Linear(8, 3))

    def forward(self, x, labels=None):
        logits = self.net(x)
        return SequenceClassifierOutput(loss=F.cross_entropy(logits, labels), logits=logits)


def examples(count: int, seed: int = 1) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(6, generator=generator), "labels": torch.randint(0, 3, (), generator=generator)}
            for _ in range(count)]


def token_examples(count: int, seed: int = 1) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 32, (5,), generator=generator),
             "labels": torch.randint(0, 3, (), generator=generator)} for _ in range(count)]


def windows(data: list[dict], steps: int, accumulation: int, batch: int = BATCH) -> list[list[dict]]:
    """The micro-batches of each optimizer step, in the order of the Trainer's sequential sampler."""
    batches = [{key: torch.stack([example[key] for example in data[i:i + batch]]) for key in data[0]}
               for i in range(0, steps * accumulation * batch, batch)]
    return [batches[i:i + accumulation] for i in range(0, len(batches), accumulation)]


def training_args(tmp_path, **overrides) -> TrainingArguments:
    settings = dict(output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no",
                    dataloader_num_workers=0, max_steps=3, per_device_train_batch_size=BATCH, disable_tqdm=True,
                    train_sampling_strategy="sequential", learning_rate=0.05, weight_decay=0.1, max_grad_norm=0.0)
    return TrainingArguments(**{**settings, **overrides})


def trainer_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """The Trainer's AdamW groups for these models: decay on weights, none on biases."""
    named = list(model.named_parameters())
    return [{"params": [p for n, p in named if "bias" not in n], "weight_decay": weight_decay},
            {"params": [p for n, p in named if "bias" in n], "weight_decay": 0.0}]


def sam_by_hand(model, steps, *, rho, lr, groups, schedule, max_grad_norm=0.0, adaptive=False, sam_eps=1e-12,
                autocast_dtype=None, loss_scale=None, takes_sam=lambda step: True, base=torch.optim.AdamW):
    """SAM with gradient accumulation, written out with torch.autograd, one tensor at a time::

        g = sum_i grad(L_i(w) / K);  e = rho g / (||g|| + eps)  (ASAM: rho T^2 g / (||T g|| + eps), T = |w|)
        g_sam = sum_i grad(L_i(w + e) / K);  w <- w;  clip g_sam;  the base step (AdamW);  lr schedule

    ``groups(model)`` gives the base optimizer's param groups, ``schedule(optimizer)`` the lr scheduler. With
    ``loss_scale`` each micro-batch's loss is multiplied by it and the gradient by its float64 inverse
    (GradScaler's arithmetic). Returns the params of a trained copy of ``model``.
    """
    model = copy.deepcopy(model)
    params = list(model.parameters())
    optimizer = base(groups(model), lr=lr)  # AdamW's defaults are the Trainer's: betas (0.9, 0.999), eps 1e-8
    scheduler = schedule(optimizer)
    inverse = None if loss_scale is None else 1.0 / loss_scale

    def gradient(window):
        total = [torch.zeros_like(p) for p in params]
        for micro_batch in window:
            with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
                loss = model(**micro_batch).loss.float() / len(window)
            grads = torch.autograd.grad(loss if loss_scale is None else loss * loss_scale, params)
            total = [t + g for t, g in zip(total, grads)]
        return total if inverse is None else [t * torch.tensor(inverse, dtype=torch.float64).float() for t in total]

    for step, window in enumerate(steps):
        g = gradient(window)
        if takes_sam(step):
            with torch.no_grad():
                w = [p.clone() for p in params]
                scale = [p.abs() if adaptive else torch.ones_like(p) for p in params]
                norm = torch.sqrt(sum(((t * gi) ** 2).sum() for t, gi in zip(scale, g)))
                for p, t, gi in zip(params, scale, g):
                    p.add_(rho * t * t * gi / (norm + sam_eps))
            g = gradient(window)
            with torch.no_grad():
                for p, wi in zip(params, w):
                    p.copy_(wi)
        for p, gi in zip(params, g):
            p.grad = gi
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return params_and_buffers(model)[0]


def linear_schedule(max_steps: int, warmup: int = 0):
    return lambda optimizer: get_linear_schedule_with_warmup(optimizer, warmup, max_steps)


CASES = {
    "plain": dict(),
    "accumulation2": dict(gradient_accumulation_steps=2),
    "clipping": dict(max_grad_norm=0.05),
    "bf16-accumulation2-clipping": dict(bf16=True, gradient_accumulation_steps=2, max_grad_norm=0.05),
}


@pytest.mark.parametrize("case", list(CASES))
def test_trainer_steps_match_sam_by_hand(tmp_path, case):
    settings = CASES[case]
    accumulation, max_grad_norm = settings.get("gradient_accumulation_steps", 1), settings.get("max_grad_norm", 0.0)
    model, data = TinyClassifier(), examples(3 * accumulation * BATCH)
    trainer = SAMTrainer(model=copy.deepcopy(model), args=training_args(tmp_path, **settings), train_dataset=data,
                         rho=0.1)
    trainer.train()

    by_hand = functools.partial(sam_by_hand, model, windows(data, 3, accumulation), lr=0.05,
                                groups=lambda m: trainer_groups(m, 0.1), schedule=linear_schedule(3),
                                autocast_dtype=torch.bfloat16 if settings.get("bf16") else None)
    expected = by_hand(rho=0.1, max_grad_norm=max_grad_norm)
    assert_trees_close(params_and_buffers(trainer.model)[0], expected, atol=1e-6)
    # The case tests what it says: SAM changes the steps, and so does the clipping where it is set.
    assert largest_difference(expected, by_hand(rho=0.0, max_grad_norm=max_grad_norm)) > 1e-4
    if max_grad_norm:
        assert largest_difference(expected, by_hand(rho=0.1, max_grad_norm=0.0)) > 1e-4


def largest_difference(a: dict, b: dict) -> float:
    return max(float((a[key] - b[key]).abs().max()) for key in a)


def test_own_asam_optimizer_and_warmup_scheduler_match_by_hand(tmp_path):
    model, data = TinyClassifier(), examples(3 * 2 * BATCH)
    trained = copy.deepcopy(model)
    optimizer = funcsam.SAM(trained.parameters(), torch.optim.AdamW, rho=0.5, adaptive=True, lr=0.05,
                            weight_decay=0.0, model=trained)
    scheduler = get_linear_schedule_with_warmup(optimizer, 1, 3)
    trainer = SAMTrainer(model=trained, args=training_args(tmp_path, gradient_accumulation_steps=2,
                                                           max_grad_norm=0.5),
                         train_dataset=data, optimizers=(optimizer, scheduler))
    trainer.train()

    assert trainer.sam_optimizer is optimizer and trainer.lr_scheduler is scheduler
    expected = sam_by_hand(model, windows(data, 3, 2), rho=0.5, lr=0.05, adaptive=True, max_grad_norm=0.5,
                           groups=lambda m: [{"params": list(m.parameters()), "weight_decay": 0.0}],
                           schedule=linear_schedule(3, warmup=1))
    assert_trees_close(params_and_buffers(trained)[0], expected, atol=1e-6)


def test_every_second_step_takes_sam_and_the_others_the_plain_step(tmp_path):
    model, data = TinyClassifier(), examples(3 * BATCH)
    trained = copy.deepcopy(model)
    optimizer = funcsam.SAM(trained.parameters(), torch.optim.AdamW, rho=0.1, lr=0.05, weight_decay=0.0,
                            mode=funcsam.every(2))
    SAMTrainer(model=trained, args=training_args(tmp_path), train_dataset=data, optimizers=(optimizer, None)).train()

    expected = sam_by_hand(model, windows(data, 3, 1), rho=0.1, lr=0.05, takes_sam=lambda step: step % 2 == 0,
                           groups=lambda m: [{"params": list(m.parameters()), "weight_decay": 0.0}],
                           schedule=linear_schedule(3))
    assert_trees_close(params_and_buffers(trained)[0], expected, atol=1e-6)


def test_tiny_bert_steps_match_sam_by_hand(tmp_path):
    config = transformers.BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=8, num_labels=3,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model, data = transformers.BertForSequenceClassification(config), token_examples(3 * BATCH)
    # SGD: the hand-written e rounds differently from funcsam's by an ulp, and Adam's m / sqrt(v) blows
    # that up to 1e-4 on the embedding rows whose gradient is almost zero (SGD: 1e-8; rho = 0: equal).
    args = training_args(tmp_path, optim="sgd", weight_decay=0.0, max_grad_norm=1.0)
    trainer = SAMTrainer(model=copy.deepcopy(model), args=args, train_dataset=data, rho=0.1)
    trainer.train()

    expected = sam_by_hand(model, windows(data, 3, 1), rho=0.1, lr=0.05, max_grad_norm=1.0, base=torch.optim.SGD,
                           groups=lambda m: [{"params": list(m.parameters()), "weight_decay": 0.0}],
                           schedule=linear_schedule(3))
    assert_trees_close(params_and_buffers(trainer.model)[0], expected, atol=1e-6)


def fp16_trainer_on_the_cpu(tmp_path, model, data, optimizer, init_scale: float, **settings) -> SAMTrainer:
    """A Trainer with fp16=True whose accelerator holds a CPU GradScaler and autocasts to fp16, as it
    does on a GPU (accelerate gives the CPU no scaler: ``Accelerator(mixed_precision="fp16", cpu=True)``
    has ``scaler=None`` and runs in fp32). Set before ``train()``, which prepares the optimizer with it."""
    trainer = SAMTrainer(model=model, args=training_args(tmp_path, fp16=True, **settings), train_dataset=data,
                         optimizers=(optimizer, None))
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    trainer.accelerator.native_amp = True
    return trainer


def test_fp16_grad_scaler_steps_match_scaled_steps_by_hand(tmp_path):
    model, data = TinyClassifier(), examples(3 * 2 * BATCH)
    trained = copy.deepcopy(model)
    # eps comparable to ||g||: a climb from the still scaled gradient would move elsewhere.
    optimizer = funcsam.SAM(trained.parameters(), torch.optim.AdamW, rho=0.1, eps=0.5, lr=0.05, weight_decay=0.0)
    trainer = fp16_trainer_on_the_cpu(tmp_path, trained, data, optimizer, 2.0 ** 10, gradient_accumulation_steps=2,
                                      max_grad_norm=0.05)
    trainer.train()

    assert trainer.accelerator.scaler.get_scale() == 2.0 ** 10  # no overflow, no growth yet
    expected = sam_by_hand(model, windows(data, 3, 2), rho=0.1, lr=0.05, sam_eps=0.5, max_grad_norm=0.05,
                           autocast_dtype=torch.float16, loss_scale=2.0 ** 10,
                           groups=lambda m: [{"params": list(m.parameters()), "weight_decay": 0.0}],
                           schedule=linear_schedule(3))
    assert_trees_close(params_and_buffers(trained)[0], expected, atol=1e-6)


def test_fp16_overflow_skips_the_step_with_the_weights_back_at_w(tmp_path):
    model, data = TinyClassifier(), examples(3 * BATCH)
    trained = copy.deepcopy(model)
    optimizer = funcsam.SAM(trained.parameters(), torch.optim.AdamW, rho=0.1, lr=0.05)
    # 2^24 overflows fp16's backward on every step: all three are skipped, the scale backs off each time.
    trainer = fp16_trainer_on_the_cpu(tmp_path, trained, data, optimizer, 2.0 ** 24, max_grad_norm=1.0)
    trainer.train()

    assert trainer.accelerator.scaler.get_scale() == 2.0 ** 21
    assert trainer.accelerator.optimizer_step_was_skipped
    for name, p in trained.named_parameters():
        assert torch.equal(p, dict(model.named_parameters())[name]), name
    assert not any(optimizer.base_optimizer.state.values())


def test_both_passes_draw_their_own_dropout_mask(tmp_path):
    model = TinyClassifier(dropout=0.5)
    masks = []
    model.net[2].register_forward_hook(lambda module, inputs, output: masks.append(output == 0))
    SAMTrainer(model=model, args=training_args(tmp_path, max_steps=1), train_dataset=examples(BATCH), rho=0.1).train()

    assert len(masks) == 2 and masks[0].any() and masks[1].any()
    assert not torch.equal(masks[0], masks[1])


def test_the_replayed_pass_leaves_batchnorm_statistics_of_the_pass_at_w(tmp_path):
    class WithBatchNorm(TinyClassifier):
        def __init__(self):
            super().__init__()
            self.norm = nn.BatchNorm1d(6)

        def forward(self, x, labels=None):
            return super().forward(self.norm(x), labels)

    model, data = WithBatchNorm(), examples(BATCH)
    SAMTrainer(model=model, args=training_args(tmp_path, max_steps=1), train_dataset=data, rho=0.1).train()

    x = torch.stack([example["x"] for example in data])
    expected_mean = 0.9 * torch.zeros(6) + 0.1 * x.mean(dim=0)  # one update, from the pass at w only
    torch.testing.assert_close(model.norm.running_mean, expected_mean, atol=1e-7, rtol=0.0)
    assert int(model.norm.num_batches_tracked) == 1


@pytest.mark.parametrize("optimizer, problem", [
    (lambda params: funcsam.SAMSGD(params, lr=0.1), "takes a funcsam.SAM"),
    (lambda params: torch.optim.AdamW(params), "takes a funcsam.SAM"),
    (lambda params: funcsam.SAM(params, torch.optim.AdamW, max_grad_norm=1.0), "TrainingArguments\\(max_grad_norm"),
    (lambda params: funcsam.SAM(params, torch.optim.AdamW, mode=funcsam.GSAM(alpha=0.1)), "changes the direction"),
    (lambda params: funcsam.SAM(params, torch.optim.SGD, lr=0.1, momentum=0.9, mode=funcsam.MSAM()),
     "changes the direction"),
], ids=["samsgd", "plain_adamw", "sam_clipping", "gsam", "msam"])
def test_optimizers_the_trainer_cannot_step_are_refused_by_name(tmp_path, optimizer, problem):
    model = TinyClassifier()
    with pytest.raises((TypeError, ValueError), match=problem):
        SAMTrainer(model=model, args=training_args(tmp_path), train_dataset=examples(BATCH),
                   optimizers=(optimizer(model.parameters()), None))


def test_rho_beside_an_own_sam_optimizer_is_refused(tmp_path):
    model = TinyClassifier()
    optimizer = funcsam.SAM(model.parameters(), torch.optim.AdamW, rho=0.05)
    with pytest.raises(ValueError, match="set them in funcsam.SAM"):
        SAMTrainer(model=model, args=training_args(tmp_path), train_dataset=examples(BATCH),
                   optimizers=(optimizer, None), rho=0.1)


def test_built_optimizer_wraps_the_trainers_adamw_with_its_groups(tmp_path):
    trainer = SAMTrainer(model=TinyClassifier(), args=training_args(tmp_path, adam_epsilon=1e-6), rho=0.2,
                         train_dataset=examples(BATCH))
    base = trainer.create_optimizer()

    assert base is trainer.sam_optimizer.base_optimizer and type(base) is torch.optim.AdamW
    assert [group["weight_decay"] for group in base.param_groups] == [0.1, 0.0]
    assert all(group["eps"] == 1e-6 and group["rho"] == 0.2 and math.isclose(group["lr"], 0.05)
               for group in base.param_groups)


def test_accelerate_example_takes_sam_adamw_steps_by_hand():
    model = load_example("accelerate_sam").main(["--cpu", "--steps", "3", "--batch-size", "16"])

    toy = load_example("toy_task")
    inputs, targets = toy.make_data(0)
    expected, _ = reference_sam(toy.make_model(0), toy.batches(inputs, targets, 16, 3, 0), rho=0.05, max_grad_norm=1.0,
                                descend=adamw_by_hand(lr=3e-3, weight_decay=0.01, lr_factor=lambda step: 1 - step / 3))
    assert_trees_close(params_and_buffers(model)[0], expected, atol=1e-6)


def per_replica_sam_by_hand(model, batches, *, replicas, rho, max_grad_norm, descend):
    """SAM with each replica's own perturbation, written out with torch.autograd (BatchNorm-free models)::

        e_r = rho g_r / (||g_r|| + 1e-12),  g_r = grad L_r(w) on replica r's contiguous rows
        g_sam = mean_r grad L_r(w + e_r), clipped to max_grad_norm; descend(step, name, p, g_sam, state)
    """
    model = copy.deepcopy(model)
    names, params = zip(*model.named_parameters())
    states = {name: {} for name in names}

    def gradient(inputs, targets):
        return torch.autograd.grad(F.cross_entropy(model(inputs), targets), params)

    for step, (inputs, targets) in enumerate(batches):
        g_sam = [torch.zeros_like(p) for p in params]
        for replica_inputs, replica_targets in zip(inputs.chunk(replicas), targets.chunk(replicas)):
            g = gradient(replica_inputs, replica_targets)
            with torch.no_grad():
                w = [p.clone() for p in params]
                norm = torch.sqrt(sum((gi ** 2).sum() for gi in g))
                for p, gi in zip(params, g):
                    p.add_(rho * gi / (norm + 1e-12))
            g_sam = [total + gi / replicas for total, gi in zip(g_sam, gradient(replica_inputs, replica_targets))]
            with torch.no_grad():
                for p, wi in zip(params, w):
                    p.copy_(wi)
        with torch.no_grad():
            norm = torch.sqrt(sum((gi ** 2).sum() for gi in g_sam))
            for name, p, gi in zip(names, params, g_sam):
                descend(step, name, p, gi * min(1.0, max_grad_norm / (float(norm) + 1e-6)), states[name])
    return params_and_buffers(model)[0]


TWO_PROCESS_RUNS = {"global": [], "local": ["--local-perturbation"]}  # accelerate example runs, by the flags added
TWO_PROCESS_EXAMPLE = ["--cpu", "--steps", "3", "--batch-size", "8"]  # 8 rows per process: global batches of 16


def train_on_each_process(out_dir: str) -> None:
    """What each of the two gloo processes runs: the accelerate example both ways, then a SAMTrainer
    with accumulation 2 and clipping (each process takes every other micro-batch of 4)."""
    out_dir = Path(out_dir)
    example = load_example("accelerate_sam")
    for name, flags in TWO_PROCESS_RUNS.items():
        example.main(TWO_PROCESS_EXAMPLE + flags + ["--save", str(out_dir / name)])
    args = training_args(out_dir / "trainer", gradient_accumulation_steps=2, max_grad_norm=0.05)
    trainer = SAMTrainer(model=TinyClassifier(), args=args, train_dataset=examples(3 * 2 * 2 * BATCH), rho=0.1)
    trainer.train()
    if trainer.is_world_process_zero():
        torch.save(trainer.model.state_dict(), out_dir / "trainer.pt")


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp("two_processes")
    code = f"import test_integration_hf; test_integration_hf.train_on_each_process({str(out_dir)!r})"
    tests = Path(__file__).resolve().parent
    failures = []
    for _ in range(2):  # one retry: a full-suite run once failed this launch's setup and never again alone
        ranks = launch_gloo_ranks([sys.executable, "-c", code], 2, timeout=180,
                                  extra_env={"PYTHONPATH": f"{tests.parent}:{tests}"})
        if all(rank.returncode == 0 for rank in ranks):
            if failures:
                warnings.warn(f"the two-process launch failed once, then ran: {failures[0]}")
            return out_dir
        failures.append([rank.stderr[-2000:] for rank in ranks])
    raise AssertionError(f"the two-process launch failed twice: {failures}")


@pytest.mark.slow
def test_accelerate_example_on_two_processes_perturbs_globally_or_per_replica(two_process_runs):
    toy = load_example("toy_task")
    inputs, targets = toy.make_data(0)
    global_batches = toy.batches(inputs, targets, 16, 3, 0)
    descend = functools.partial(adamw_by_hand, lr=3e-3, weight_decay=0.01, lr_factor=lambda step: 1 - step / 3)
    expected = {
        "global": reference_sam(toy.make_model(0), global_batches, rho=0.05, max_grad_norm=1.0, descend=descend())[0],
        "local": per_replica_sam_by_hand(toy.make_model(0), global_batches, replicas=2, rho=0.05, max_grad_norm=1.0,
                                         descend=descend()),
    }
    for name in TWO_PROCESS_RUNS:
        assert_trees_close(torch.load(two_process_runs / name), expected[name], atol=1e-6)
    assert largest_difference(expected["global"], expected["local"]) > 1e-6


@pytest.mark.slow
def test_trainer_on_two_processes_takes_sam_steps_on_the_global_batch(two_process_runs):
    # DDP averages the two processes' gradients: each micro-batch step is that of their 8 rows together.
    data = examples(3 * 2 * 2 * BATCH)
    expected = sam_by_hand(TinyClassifier(), windows(data, 3, 2, batch=2 * BATCH), rho=0.1, lr=0.05, max_grad_norm=0.05,
                           groups=lambda m: trainer_groups(m, 0.1), schedule=linear_schedule(3))
    assert_trees_close(torch.load(two_process_runs / "trainer.pt"), expected, atol=1e-6)


@pytest.mark.parametrize("choice", [[], ["--own-optimizer"]], ids=["rho", "own_optimizer"])
def test_trainer_example_trains_with_either_optimizer(tmp_path, choice):
    example = load_example("hf_trainer_sam")
    trainer = example.main(["--steps", "2", "--examples", "32", "--batch-size", "8", "--accumulation", "2",
                            "--output-dir", str(tmp_path), *choice])

    assert trainer.state.global_step == 2 and isinstance(trainer.sam_optimizer, funcsam.SAM)
    initial = dict(example.make_model(0).named_parameters())
    trained = dict(trainer.model.named_parameters())
    assert not any(torch.equal(trained[name], initial[name]) for name in initial if "classifier" in name)


def test_a_run_resumed_from_a_checkpoint_takes_the_same_steps(tmp_path):
    # An own SAM with a scheduler built on it: after the checkpoint's load_state_dict replaced the base
    # optimizer's param groups, the schedule must still reach the steps.
    model, data = TinyClassifier(), examples(3 * 2 * BATCH)

    def trainer(output_dir, **settings):
        trained = copy.deepcopy(model)
        optimizer = funcsam.SAM(trained.parameters(), torch.optim.AdamW, rho=0.1, lr=0.05)
        scheduler = get_linear_schedule_with_warmup(optimizer, 1, 3)
        args = training_args(tmp_path / output_dir, gradient_accumulation_steps=2, **settings)
        return SAMTrainer(model=trained, args=args, train_dataset=data, optimizers=(optimizer, scheduler))

    straight = trainer("straight")
    straight.train()
    trainer("resumed", save_strategy="steps", save_steps=2).train()
    resumed = trainer("resumed", save_strategy="steps", save_steps=2)
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-2"))

    assert resumed.state.global_step == 3
    assert_trees_close(params_and_buffers(resumed.model)[0], params_and_buffers(straight.model)[0], atol=1e-7)
