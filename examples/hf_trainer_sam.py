"""SAM under the Hugging Face ``Trainer``: ``funcsam.integrations.huggingface.SAMTrainer``.

    python examples/hf_trainer_sam.py --steps 200 [--accumulation 2] [--bf16] [--own-optimizer]

A tiny BERT (built from a config, offline) learns a synthetic task: which of the tokens 1, 2, 3
occurs most often in a sequence of 8. ``SAMTrainer`` is a ``Trainer`` whose every optimizer step
takes SAM's two passes: after the Trainer's backward passes over the micro-batches at w, it climbs
to w + e, replays the same micro-batches there, comes back to w, and lets the Trainer clip
(``max_grad_norm``) and step with the gradient at w + e. Everything else is the Trainer's own:
the AdamW it builds from the arguments, the lr schedule, mixed precision, logging, checkpoints.
``--own-optimizer`` passes a ``funcsam.SAM`` of your own instead of ``rho=``.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

import funcsam
from funcsam.integrations.huggingface import SAMTrainer

VOCAB, LENGTH = 16, 8


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=16, help="per micro-batch")
    parser.add_argument("--accumulation", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="applied to the SAM gradient; 0: none")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--own-optimizer", action="store_true", help="pass a funcsam.SAM instead of rho=")
    parser.add_argument("--examples", type=int, default=2048)
    parser.add_argument("--output-dir", default=None, help="default: a temporary directory")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def make_dataset(examples: int, seed: int) -> list[dict]:
    """Token sequences, each labelled with which of the tokens 1, 2, 3 it holds most (ties: the lowest)."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (examples, LENGTH), generator=generator)
    counts = torch.stack([(tokens == token).sum(dim=1) for token in (1, 2, 3)], dim=1)
    return [{"input_ids": ids, "labels": label} for ids, label in zip(tokens, counts.argmax(dim=1))]


def make_model(seed: int) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=LENGTH, num_labels=3)
    return BertForSequenceClassification(config)


def main(argv: list[str] | None = None) -> SAMTrainer:
    """Train the tiny BERT; returns the trainer (``trainer.model``, ``trainer.state.log_history``)."""
    args = parse_args(argv)
    model = make_model(args.seed)
    with tempfile.TemporaryDirectory() as scratch:
        training_args = TrainingArguments(
            output_dir=args.output_dir or scratch, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=args.accumulation, learning_rate=args.lr, weight_decay=0.01,
            max_grad_norm=args.max_grad_norm, bf16=args.bf16, use_cpu=not torch.cuda.is_available(),
            logging_steps=max(1, args.steps // 4), save_strategy="no", report_to=[], dataloader_num_workers=0,
            seed=args.seed, disable_tqdm=True)
        if args.own_optimizer:
            # Any torch.optim class as the base; the Trainer steps it, clips for it and schedules it.
            optimizer = funcsam.SAM(model.parameters(), torch.optim.AdamW, rho=args.rho, lr=args.lr, weight_decay=0.01)
            sam = dict(optimizers=(optimizer, None))
        else:
            sam = dict(rho=args.rho)  # SAM over the AdamW the Trainer builds from training_args
        data = make_dataset(args.examples, args.seed)
        trainer = SAMTrainer(model=model, args=training_args, train_dataset=data, **sam)
        trainer.train()
    return trainer


if __name__ == "__main__":
    main()
