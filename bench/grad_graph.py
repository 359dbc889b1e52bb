"""Why a step compiled whole is slower in NCHW: the gradient graph alone, against torch.compile(model).

    python -m bench.grad_graph [--rounds 9] [--profile]

Times one forward + backward of ResNet-20 (batch 128, no optimizer), interleaved, medians:

- ``compile(model)``: ``torch.compile(model)``, ``loss.backward()`` (AOTAutograd makes a forward
  and a backward graph);
- ``compile(func.grad)``: ``torch.compile`` of ``torch.func.grad`` of the loss function, one graph
  holding forward and backward, as inside a compiled ``sam_step``;

each over NCHW storage, over NCHW storage computing in channels_last (``make_loss_fn(memory_format=
torch.channels_last)``), and over channels_last storage. ``--profile`` adds, per variant, the time
per step in convolution kernels and in inductor's generated kernels (``torch.profiler`` with
``cpp.enable_kernel_profile``), where the difference lies.
"""

from __future__ import annotations

import argparse
import collections
import copy
import statistics
import time

import torch
import torch.nn.functional as F

import funcsam
from bench.steps import make_problem


def compiled_model_gradient(model, batch):
    model = copy.deepcopy(model)
    forward = torch.compile(model)

    def step():
        for p in model.parameters():
            p.grad = None
        F.cross_entropy(forward(batch[0]), batch[1]).backward()

    return step


def compiled_func_grad(model, batch, memory_format=None):
    model = copy.deepcopy(model)
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    loss_fn = funcsam.make_loss_fn(model, F.cross_entropy, memory_format=memory_format)

    def gradient(params, buffers, batch):
        return torch.func.grad(lambda p: loss_fn(p, buffers, batch)[0])(params)

    compiled = torch.compile(gradient, fullgraph=True)
    return lambda: compiled(params, buffers, batch)


def kernel_times(step, steps: int = 3) -> dict[str, float]:
    """ms per step in convolution kernels, inductor's generated kernels, and everything else."""
    with torch.profiler.profile() as prof:
        for _ in range(steps):
            step()
    totals = collections.Counter()
    for event in prof.key_averages():
        name = event.key
        kind = ("generated" if "cpp_fused" in name or "triton_" in name else
                "convolution" if "conv" in name or "mkldnn" in name else "other")
        totals[kind] += event.self_cpu_time_total / 1e3 / steps
    return dict(totals)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--profile", action="store_true", help="also split each variant's time by kernel kind")
    args = parser.parse_args(argv)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 16)
    torch._inductor.config.cpp.enable_kernel_profile = args.profile

    nchw, nhwc = make_problem(), make_problem(channels_last=True)
    variants = {
        "compile(model), NCHW": compiled_model_gradient(*nchw),
        "compile(func.grad), NCHW": compiled_func_grad(*nchw),
        "compile(func.grad), NCHW stored, computed channels_last": compiled_func_grad(
            *nchw, memory_format=torch.channels_last),
        "compile(model), channels_last": compiled_model_gradient(*nhwc),
        "compile(func.grad), channels_last": compiled_func_grad(*nhwc),
    }
    for name, step in variants.items():
        started = time.perf_counter()
        step(), step()
        print(f"  warm-up {name}: {time.perf_counter() - started:.1f} s", flush=True)
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, step in variants.items():
            started = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - started)
    base = statistics.median(times["compile(model), NCHW"])
    print(f"\ntorch {torch.__version__}, threads {torch.get_num_threads()}, ResNet-20, batch 128, "
          f"forward + backward, {args.rounds} interleaved rounds")
    print("\n| gradient | median ms | × compile(model), NCHW |\n| --- | ---: | ---: |")
    for name, t in times.items():
        print(f"| {name} | {1000 * statistics.median(t):.1f} | {statistics.median(t) / base:.3f} |")
    if args.profile:
        print("\n| gradient | convolution ms | generated kernels ms | other ms |\n| --- | ---: | ---: | ---: |")
        for name, step in variants.items():
            split = kernel_times(step)
            print(f"| {name} | {split.get('convolution', 0):.1f} | {split.get('generated', 0):.1f} | "
                  f"{split.get('other', 0):.1f} |")


if __name__ == "__main__":
    main()
