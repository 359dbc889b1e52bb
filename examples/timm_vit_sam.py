"""A timm ViT trained with SAM over AdamW (Chen et al. 2021: SAM lets ViTs train without heavy augmentation).

    python examples/timm_vit_sam.py --steps 60
    python examples/timm_vit_sam.py --compile --amp bf16          # the whole SAM step compiled
    python examples/timm_vit_sam.py --api optimizer --amp fp16     # drop-in funcsam.SAM with a GradScaler

--api functional: ``funcsam.sam_step`` over ``funcsam.make_loss_fn(model, ...)`` with ``base=funcsam.adamw``
(pure: compiles whole, fp16 loss scaling carried as state). --api optimizer: ``funcsam.SAM(params,
torch.optim.AdamW)`` in a timm-style AMP loop; the one change from timm's own loop is that the
optimizer takes the closure and the scaler (``optimizer.step(closure, grad_scaler=scaler)``, then
``scaler.update()``), where timm's ``NativeScaler`` would call ``scaler.step(optimizer)``.
The data: CIFAR-shaped images, each class a fixed random pattern plus noise.
"""

from __future__ import annotations

import argparse

import timm
import torch
import torch.nn.functional as F

import funcsam

AUTOCAST = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}


def tiny_vit(depth: int, classes: int) -> torch.nn.Module:
    """timm's ViT-Ti (width 192, 3 heads) cut to ``depth`` blocks, for 32x32 images in 4x4 patches."""
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=classes, img_size=32,
                             patch_size=4, depth=depth)


def pattern_batches(steps: int, batch_size: int, classes: int, device: str, seed: int = 0) -> list:
    generator = torch.Generator().manual_seed(seed)
    patterns = torch.randn(classes, 3, 32, 32, generator=generator)
    batches = []
    for _ in range(steps):
        labels = torch.randint(0, classes, (batch_size,), generator=generator)
        images = patterns[labels] + 2.0 * torch.randn(batch_size, 3, 32, 32, generator=generator)
        batches.append((images.to(device), labels.to(device)))
    return batches


def train_functional(model, batches, args) -> list[float]:
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = {name: b.detach() for name, b in model.named_buffers()}
    loss_fn = funcsam.make_loss_fn(model, F.cross_entropy, autocast_dtype=AUTOCAST[args.amp])
    base = funcsam.adamw(weight_decay=args.weight_decay)
    state = base.init(params)
    loss_scale = funcsam.init_loss_scale() if args.amp == "fp16" else None
    step = torch.compile(funcsam.sam_step) if args.compile else funcsam.sam_step
    rho, lr = torch.tensor(args.rho), torch.tensor(args.lr)  # tensors: a new value would not recompile
    losses = []
    for batch in batches:
        out = step(params, buffers, batch, loss_fn, rho, lr, state, base=base, loss_scale=loss_scale)
        params, buffers, state, loss_scale = out.params, out.buffers, out.momentum_state, out.loss_scale
        losses.append(float(out.loss))
    with torch.no_grad():  # the trained weights back into the module
        for name, p in model.named_parameters():
            p.copy_(params[name])
    return losses


def train_optimizer(model, batches, args) -> list[float]:
    optimizer = funcsam.SAM(model.parameters(), torch.optim.AdamW, rho=args.rho, lr=args.lr,
                            weight_decay=args.weight_decay)
    device = batches[0][0].device.type
    dtype = AUTOCAST[args.amp]
    scaler = torch.amp.GradScaler(device) if args.amp == "fp16" else None
    losses = []
    for inputs, targets in batches:
        def closure():  # called twice a step: at w, then at w + e
            optimizer.zero_grad()
            with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
                loss = F.cross_entropy(model(inputs), targets)
            (loss if scaler is None else scaler.scale(loss)).backward()
            return loss

        losses.append(float(optimizer.step(closure, grad_scaler=scaler)))
        if scaler is not None:
            scaler.update()
    return losses


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--api", default="functional", choices=["functional", "optimizer"])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--depth", type=int, default=2, help="transformer blocks (ViT-Ti has 12)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--amp", default=None, choices=["bf16", "fp16"], help="autocast; fp16 with loss scaling")
    parser.add_argument("--compile", action="store_true", help="torch.compile the whole SAM step (--api functional)")
    args = parser.parse_args(argv)
    if args.compile and args.api != "functional":
        parser.error("--compile compiles funcsam.sam_step: use it with --api functional (the optimizer's "
                     "closure runs loss.backward(), which a compiled graph cannot hold)")
    return args


def main(argv: list[str] | None = None) -> list[float]:
    """Train, print the first and last loss at w, and return every step's."""
    args = parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    classes = 10
    model = tiny_vit(args.depth, classes).to(device)
    batches = pattern_batches(args.steps, args.batch_size, classes, device)
    train = train_functional if args.api == "functional" else train_optimizer
    losses = train(model, batches, args)
    print(f"ViT depth {args.depth} + AdamW + SAM ({args.api}, amp={args.amp}, compile={args.compile}): "
          f"loss at w {losses[0]:.3f} -> {losses[-1]:.3f} after {len(losses)} steps")
    return losses


if __name__ == "__main__":
    main()
