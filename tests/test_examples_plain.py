"""The plain-loop examples, run in-process on tiny settings, against SAM + SGD written out by hand."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from helpers import assert_trees_close, params_and_buffers, reference_sam_sgd

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str):
    """The module ``examples/<name>.py`` (its directory on sys.path, as when the script runs)."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    return importlib.import_module(name)


def expected_params(steps: int, batch_size: int):
    """The examples' SAMSGD settings (lr 0.05, momentum 0.9, weight decay 5e-4, rho 0.05), by hand."""
    toy = load_example("toy_task")
    inputs, targets = toy.make_data(0)
    return reference_sam_sgd(toy.make_model(0), toy.batches(inputs, targets, batch_size, steps, 0), rho=0.05,
                             lr=0.05, momentum=0.9, weight_decay=5e-4)


def test_plain_closure_example_takes_samsgd_steps():
    model = load_example("plain_closure").main(["--steps", "4", "--batch-size", "16"])
    assert_trees_close(params_and_buffers(model)[0], expected_params(4, 16), atol=1e-6)


def test_plain_functional_example_with_micro_batches_takes_the_whole_batch_step():
    # A BatchNorm-free model with a mean loss: accumulating 4 micro-batches is the step on the batch.
    model = load_example("plain_functional").main(["--steps", "4", "--batch-size", "16", "--accumulation", "4"])
    assert_trees_close(params_and_buffers(model)[0], expected_params(4, 16), atol=1e-6)


def test_plain_examples_learn_the_toy_task(capsys):
    toy = load_example("toy_task")
    inputs, targets = toy.make_data(0)
    before = toy.accuracy(toy.make_model(0), inputs, targets)
    model = load_example("plain_functional").main(["--steps", "60"])
    assert toy.accuracy(model, inputs, targets) > max(0.7, before + 0.3)
    assert "train accuracy" in capsys.readouterr().out
