"""SAM in PyTorch Lightning: funcsam's optimizer in configure_optimizers, funcsam's precision plugin.

    python examples/lightning_sam.py --precision 16-mixed --max-steps 20
    python examples/lightning_sam.py --optimizer adamw --precision bf16-mixed --clip 1.0

Two lines differ from plain Lightning: ``configure_optimizers`` returns ``funcsam.SAMSGD`` or
``funcsam.SAM(..., torch.optim.AdamW)``, and the Trainer takes ``plugins=[sam_precision(...)]``
instead of ``precision=...`` (fp16's GradScaler path would otherwise call ``step()`` without the
closure SAM needs). ``model=self`` keeps BatchNorm's statistics from the pass at w only.
The data: Gaussian inputs labelled by a random linear teacher, so the loss has somewhere to go.
"""

from __future__ import annotations

import argparse

import lightning.pytorch as L
import torch
import torch.nn as nn
import torch.nn.functional as F

import funcsam
from funcsam.integrations.lightning import sam_precision


class Classifier(L.LightningModule):
    def __init__(self, features: int, classes: int, optimizer: str, lr: float, rho: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, classes))
        self.optimizer, self.lr, self.rho = optimizer, lr, rho
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        return F.cross_entropy(self.net(inputs), targets)  # called twice a step: at w, then at w + e

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))  # the loss at w: the plugin hands on the first pass's output

    def configure_optimizers(self):
        if self.optimizer == "sgd":
            return funcsam.SAMSGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4, rho=self.rho,
                                  model=self)
        return funcsam.SAM(self.parameters(), torch.optim.AdamW, rho=self.rho, lr=self.lr, weight_decay=0.05,
                           model=self)


def teacher_data(samples: int, features: int, classes: int, seed: int = 0) -> torch.utils.data.TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(samples, features, generator=generator)
    teacher = torch.randn(features, classes, generator=generator)
    return torch.utils.data.TensorDataset(inputs, (inputs @ teacher).argmax(dim=1))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed", "16-mixed"])
    parser.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"],
                        help="funcsam.SAMSGD (momentum 0.9) or funcsam.SAM over torch.optim.AdamW")
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=None, help="default: 0.1 for sgd, 3e-3 for adamw")
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--clip", type=float, default=0.0, help="gradient_clip_val: clips the SAM gradient")
    parser.add_argument("--samples", type=int, default=2048)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[float]:
    """Train, print the first and last loss at w, and return every step's."""
    args = parse_args(argv)
    torch.manual_seed(0)
    features, classes = 20, 4
    lr = args.lr if args.lr is not None else (0.1 if args.optimizer == "sgd" else 3e-3)
    model = Classifier(features, classes, args.optimizer, lr, args.rho)
    data = torch.utils.data.DataLoader(teacher_data(args.samples, features, classes), batch_size=args.batch_size,
                                       shuffle=True, drop_last=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    trainer = L.Trainer(
        accelerator=device, devices=1, max_steps=args.max_steps, gradient_clip_val=args.clip or None,
        plugins=[sam_precision(args.precision, device)],  # instead of precision=args.precision
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model, data)
    print(f"{args.optimizer} + SAM, {args.precision}: loss at w {model.losses[0]:.3f} -> {model.losses[-1]:.3f} "
          f"after {len(model.losses)} steps")
    return model.losses


if __name__ == "__main__":
    main()
