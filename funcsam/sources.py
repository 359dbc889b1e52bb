"""Where a step's gradients come from: one batch, micro-batches, or m-sharpness parts.

A source is the one plug of the pipeline that touches the batch. It evaluates the first pass at a
point (w, or MSAM's w + e) and, on SAM steps, the second pass at w + e_k for each of its units::

    OneBatch()          the batch at once                                      1 unit
    MicroBatches()      the batch is a list of micro-batches B_1 .. B_K, both passes accumulated,
                        g = sum_i (n_i / N) grad L_{B_i}                        1 unit
    MSharpness(m)       the batch cut into m equal parts, each perturbed by its own gradient
                        (Foret et al. 2020, section 4.1), two vmapped calls    m units
    TopK(k, per_example_loss)   K-SAM (Ni et al. 2022): both passes on the k examples of highest
                        loss at the point, found by a forward of the whole batch   1 unit
    SDS(k, per_example_loss)    ESAM's data selection (Du et al. 2022): the second pass on the k
                        examples whose loss rises most from w to w + e              1 unit

The perturbations a second pass receives are the step's own transients: a source may write w + e_k
into them in place (:func:`perturbed_point`) or drop them from the list once used, so that the pass
holds no parameter-sized copy beyond w + e.

Data-parallel replicas are the fourth source of gradients, and they compose with each of these:
``SAMOptions(grad_reduce=..., sam_sync=...)`` reduces what the source returns.

BatchNorm in training mode:
- ``OneBatch``: the first pass's running statistics are kept, the perturbed pass's discarded.
- ``MicroBatches``: each micro-batch is normalised with its own statistics; the first pass threads
  the running statistics through the micro-batches in order (``num_batches_tracked`` advances by K).
  For a mean-reduced loss without BatchNorm the step is the step on the concatenated batch.
- ``MSharpness``: each part is normalised with its own statistics ("ghost" BatchNorm); the returned
  running statistics are the mean over parts of each part's update (integer buffers: part 0's).
- ``TopK``: the selecting forward's statistics are discarded, the first pass's over the k kept.
- ``SDS``: as ``OneBatch`` (the selecting forwards' statistics are discarded).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence

import torch

from .batching import batch_size, stack_parts
from .hyperparameters import check_int
from .tree import PyTree, Tensor, flatten, unflatten

__all__ = ["FirstPass", "MSharpness", "MicroBatches", "OneBatch", "SDS", "TopK", "check_batch", "check_source",
           "top_k_examples"]

# gradient(leaves, buffers, batch) -> (grads, (loss, new_buffers, aux)): the engine's differentiated loss.
# gradient.params_of(leaves) rebuilds the params pytree, for a source that calls a function of it (TopK).
Gradient = Callable[[list, PyTree, Any], tuple]


class FirstPass(NamedTuple):
    """What a source's first pass gives the pipeline.

    Fields:
        units: one gradient list per perturbation unit (scaled, unreduced); ``[g]`` for one batch.
        loss: 0-dim, the loss at the point (mean over the batch).
        new_buffers: the buffers after the pass (see the module docstring).
        aux: the loss function's aux over the whole batch, in batch order.
        second_batch: what the source's second pass receives as its batch, where the source narrows
            it (TopK's k examples; SDS's batch with the losses at w); None: the step's batch.
    """

    units: list
    loss: Tensor
    new_buffers: PyTree
    aux: Any
    second_batch: Any = None


@dataclass(frozen=True)
class OneBatch:
    """The batch at once: ``sam_step``'s default source."""

    local = False  # the unit's gradient is the step's: reduced across replicas before perturbing (sam_sync global)

    def check(self, batch: Any) -> None:
        check_batch(batch)

    def first_pass(self, gradient: Gradient, point: list, buffers: PyTree, batch: Any) -> FirstPass:
        grads, (loss, new_buffers, aux) = gradient(point, buffers, batch)
        return FirstPass([grads], loss, new_buffers, aux)

    def second_pass(self, gradient: Gradient, leaves: list, perturbations: list, buffers: PyTree, batch: Any) -> list:
        return gradient(perturbed_point(leaves, perturbations[0]), buffers, batch)[0]


@dataclass(frozen=True)
class MicroBatches:
    """Gradient accumulation: ``batch`` is a non-empty sequence of micro-batches (e.g.
    ``funcsam.split_batch(batch, K)``), micro-batch i weighted by n_i / N (a mean-reduced loss).
    Memory holds one micro-batch's activations and two gradient-sized accumulators. The loss is the
    size-weighted mean, aux the micro-batches' auxes joined along dim 0 (0-dim leaves stacked)."""

    local = False

    def check(self, batch: Any) -> None:
        if isinstance(batch, (torch.Tensor, tuple, dict)) or not isinstance(batch, Sequence):
            raise TypeError("with source=funcsam.MicroBatches() the batch must be a list of batches, e.g. "
                            f"funcsam.split_batch((inputs, targets), K); got {type(batch).__name__}")
        if len(batch) == 0:
            raise ValueError("micro_batches is empty: pass at least one batch")
        for index, micro_batch in enumerate(batch):
            check_batch(micro_batch, f"micro_batches[{index}]")

    def first_pass(self, gradient: Gradient, point: list, buffers: PyTree, batch: Sequence) -> FirstPass:
        grads, losses, auxes, new_buffers = None, [], [], buffers
        for micro_batch, weight in zip(batch, _weights(batch)):
            micro_grads, (loss, new_buffers, aux) = gradient(point, new_buffers, micro_batch)
            grads = _accumulate(grads, micro_grads, weight)
            losses.append(loss * weight)
            auxes.append(aux)
        return FirstPass([grads], torch.stack(losses).sum(), new_buffers, _join_micro_batches(auxes))

    def second_pass(self, gradient: Gradient, leaves: list, perturbations: list, buffers: PyTree,
                    batch: Sequence) -> list:
        perturbed, grads = perturbed_point(leaves, perturbations[0]), None
        for micro_batch, weight in zip(batch, _weights(batch)):
            grads = _accumulate(grads, gradient(perturbed, buffers, micro_batch)[0], weight)
        return grads


@dataclass(frozen=True)
class MSharpness:
    """m-sharpness on one device: the batch's ``m`` equal contiguous parts each perturb with their
    own gradient, and the SAM gradient is the mean over parts::

        e_k = rho * g_k / (||g_k|| + eps),   g_sam = (1/m) sum_k grad L_{B_k}(w + e_k)

    ``m`` must divide the batch size. Both passes are ``torch.func.vmap`` calls over the parts, so
    the loss function must be vmappable (``funcsam.make_loss_fn`` is); random ops draw differently
    in each part. The step's ``grad_norm`` is the mean of the parts' norms; aux comes back in batch
    order, ``(B, ...)``. Under data parallelism every replica's parts perturb with their own
    gradients (the ``sam_sync="local"`` semantics). ``m=1`` is the plain step, without vmap."""

    m: int

    local = True

    def __post_init__(self):
        check_int("m", self.m, minimum=1, meaning="the number of m-sharpness parts, each B / m examples")

    def check(self, batch: Any) -> None:
        check_batch(batch)
        if self.m > 1:
            stack_parts(batch, self.m)  # raises when m does not divide the batch size

    def first_pass(self, gradient: Gradient, point: list, buffers: PyTree, batch: Any) -> FirstPass:
        if self.m == 1:
            return OneBatch().first_pass(gradient, point, buffers, batch)

        def one_part(part_buffers, part):
            return gradient(point, part_buffers, part)

        part_grads, (losses, part_new_buffers, part_aux) = torch.func.vmap(one_part, randomness="different")(
            _part_buffers(buffers, self.m), stack_parts(batch, self.m))
        units = [list(part) for part in zip(*[grad.unbind(0) for grad in part_grads])]
        return FirstPass(units, losses.mean(), _combine_part_buffers(part_new_buffers), _concatenate_parts(part_aux))

    def second_pass(self, gradient: Gradient, leaves: list, perturbations: list, buffers: PyTree, batch: Any) -> list:
        if self.m == 1:
            return OneBatch().second_pass(gradient, leaves, perturbations, buffers, batch)
        perturbed = [torch.stack(parts) for parts in zip(*perturbations)]  # (m, ...)
        perturbations.clear()  # the parts' e_k, now stacked: not held through the pass
        torch._foreach_add_(perturbed, leaves)

        def one_part(part_leaves, part_buffers, part):
            return gradient(part_leaves, part_buffers, part)[0]

        part_grads = torch.func.vmap(one_part, randomness="different")(
            perturbed, _part_buffers(buffers, self.m), stack_parts(batch, self.m))
        return [grad.mean(dim=0) for grad in part_grads]


@dataclass(frozen=True)
class TopK:
    """K-SAM (Ni et al. 2022, "K-SAM: Sharpness-Aware Minimization at the Speed of SGD", arXiv
    2210.12864): both SAM gradients on the ``k`` examples of highest loss at the point::

        l_i   = per_example_loss(w)_i            i = 1 .. B, one forward of the whole batch, no gradient
        K     = the k indices of the largest l_i (torch.topk; ties to the lower index)
        g     = grad L_K(w),   e = rho * g / (||g|| + eps),   g_sam = grad L_K(w + e)

    A step costs a forward of B and two forward-backward passes of k (SAM: two of B). Counted in
    forwards of B, a backward as two: 1 + 6k/B, against SGD's 3 and SAM's 6 (k = B/4: 2.5).
    The step's ``loss`` is the mean of l over the whole batch and ``aux`` the selecting forward's
    (the logits of all B examples, for accuracy); ``grad_norm`` is ||g|| of the k. A one-pass step
    (rho 0, a schedule's base step) also trains on the k.

    ``per_example_loss(params, buffers, batch) -> (losses, (new_buffers, aux))`` with ``losses`` of
    shape ``(B,)``: ``funcsam.make_loss_fn(model, lambda logits, y: F.cross_entropy(logits, y,
    reduction="none"))``; the step's own ``loss_fn`` (mean-reduced) computes both passes on the k.
    The batch is a pytree of tensors with a leading batch dimension. In the optimizers, select the
    examples yourself with :func:`top_k_examples` before ``optimizer.step(closure)``."""

    k: int
    per_example_loss: Callable

    local = False

    def __post_init__(self):
        check_selection(self, "the number of highest-loss examples both SAM passes use")

    def check(self, batch: Any) -> None:
        check_selection_batch(self, batch)

    def first_pass(self, gradient: Gradient, point: list, buffers: PyTree, batch: Any) -> FirstPass:
        losses, aux = per_example_losses(self.per_example_loss, gradient.params_of(point), buffers, batch)
        selected = top_k_examples(batch, losses, self.k)
        grads, (_, new_buffers, _) = gradient(point, buffers, selected)
        return FirstPass([grads], losses.detach().float().mean(), new_buffers, aux, selected)

    def second_pass(self, gradient: Gradient, leaves: list, perturbations: list, buffers: PyTree, batch: Any) -> list:
        return OneBatch().second_pass(gradient, leaves, perturbations, buffers, batch)


@dataclass(frozen=True)
class SDS:
    """ESAM's sharpness-sensitive data selection (Du et al. 2022, "Efficient Sharpness-aware
    Minimization for Improved Training of Neural Networks", ICLR 2022, arXiv 2110.03141, section
    3.2): the first pass on the whole batch, the second on the ``k`` examples whose loss the
    perturbation raises most::

        g     = grad L_B(w),   e = rho * g / (||g|| + eps)           the whole batch, as OneBatch
        r_i   = l_i(w + e) - l_i(w)                                  two forwards of B, no gradient
        K     = the k indices of the largest r_i,   g_sam = grad L_K(w + e)

    The paper keeps the examples with r_i above a threshold set so that a fraction gamma of the
    batch passes (its 0.5): that is k = gamma * B here. A step costs, in forwards of B (a backward
    as two), 3 + 2 + 3k/B against SAM's 6 (k = B/2: 6.5; the selection pays off only where a
    backward costs much more than two forwards, or with a smaller k). ESAM's other half, the
    stochastic weight perturbation, is not part of it. ``per_example_loss`` is as for :class:`TopK`;
    the step's loss, aux and statistics are the first pass's, over the whole batch."""

    k: int
    per_example_loss: Callable

    local = False

    def __post_init__(self):
        check_selection(self, "the number of examples the second SAM pass uses, those whose loss rises most")

    def check(self, batch: Any) -> None:
        check_selection_batch(self, batch)

    def first_pass(self, gradient: Gradient, point: list, buffers: PyTree, batch: Any) -> FirstPass:
        first = OneBatch().first_pass(gradient, point, buffers, batch)
        losses, _ = per_example_losses(self.per_example_loss, gradient.params_of(point), buffers, batch)
        return first._replace(second_batch=(batch, losses))

    def second_pass(self, gradient: Gradient, leaves: list, perturbations: list, buffers: PyTree,
                    batch_and_losses: tuple) -> list:
        batch, losses_at_w = batch_and_losses
        perturbed = perturbed_point(leaves, perturbations[0])
        losses_at_w_plus_e, _ = per_example_losses(self.per_example_loss, gradient.params_of(perturbed), buffers, batch)
        selected = top_k_examples(batch, losses_at_w_plus_e - losses_at_w, self.k)
        return gradient(perturbed, buffers, selected)[0]


def perturbed_point(leaves: list, perturbation: list) -> list:
    """w + e, written into e's own tensors where they are laid out as w: the pipeline's e is a
    transient of the step that nothing reads after the second pass begins, so w + e costs no
    parameter-sized copy beside it (e + w is w + e bit for bit). An e laid out otherwise (the
    gradient of a weight stored contiguous but computed in channels_last) is replaced in the list by
    a new w + e in w's layout, so that the second pass sees the first pass's strides (a compiled
    loss function would recompile for other strides) and that e is freed."""
    if all(e.stride() == w.stride() for e, w in zip(perturbation, leaves)):
        torch._foreach_add_(perturbation, leaves)
        return perturbation
    for index, (w, e) in enumerate(zip(leaves, perturbation)):  # each e freed as its w + e replaces it
        perturbation[index] = e.add_(w) if e.stride() == w.stride() else torch.add(w, e)
    return perturbation


def check_selection(source: TopK | SDS, meaning: str) -> None:
    """A selecting source's fields: ``k`` an int >= 1, ``per_example_loss`` callable."""
    check_int("k", source.k, minimum=1, meaning=meaning)
    if not callable(source.per_example_loss):
        raise TypeError("per_example_loss must be callable as per_example_loss(params, buffers, batch) -> "
                        "(losses of shape (B,), (new_buffers, aux)), e.g. funcsam.make_loss_fn(model, "
                        "lambda logits, y: F.cross_entropy(logits, y, reduction='none'))")


def check_selection_batch(source: TopK | SDS, batch: Any) -> None:
    check_batch(batch)
    size = batch_size(batch)
    if source.k > size:
        raise ValueError(f"{type(source).__name__}(k={source.k}) needs batches of at least k examples, got a batch "
                         f"of {size}: choose k <= {size}")


def per_example_losses(per_example_loss: Callable, params: PyTree, buffers: PyTree, batch: Any) -> tuple[Tensor, Any]:
    """``(losses, aux)`` of ``per_example_loss`` without gradients, checked to be one loss per example."""
    with torch.no_grad():
        losses, (_, aux) = per_example_loss(params, buffers, batch)
    size = batch_size(batch)
    if not (isinstance(losses, torch.Tensor) and losses.shape == (size,)):
        got = f"shape {tuple(losses.shape)}" if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise ValueError(f"per_example_loss must return one loss per example, a tensor of shape ({size},), got "
                         f"{got}: build it with a criterion that does not reduce (reduction='none')")
    return losses, aux


def top_k_examples(batch: Any, losses: Tensor, k: int) -> Any:
    """The ``k`` examples of ``batch`` with the largest ``losses`` (shape ``(B,)``), in decreasing
    loss order: every leaf indexed along dim 0 with ``torch.topk(losses, k).indices``. K-SAM's
    selection; with the optimizers, compute the losses without gradients and step on the result."""
    check_int("k", k, minimum=1, meaning="the number of examples to keep")
    if k > losses.shape[0]:
        raise ValueError(f"k={k} is more than the batch's {losses.shape[0]} examples")
    indices = torch.topk(losses.detach(), k).indices
    leaves, spec = flatten(batch)
    return unflatten(spec, [leaf.index_select(0, indices.to(leaf.device)) for leaf in leaves])


Source = OneBatch | MicroBatches | MSharpness | TopK | SDS


def check_source(source: Any) -> Source:
    """``source`` (None is :class:`OneBatch`), or a TypeError naming the choices. Any object with
    ``check``, ``first_pass``, ``second_pass`` and ``local`` as these classes have them plugs in too."""
    if source is None:
        return OneBatch()
    if all(hasattr(source, name) for name in ("check", "first_pass", "second_pass", "local")):
        return source
    raise TypeError("source must be None (one batch), funcsam.MicroBatches(), funcsam.MSharpness(m), "
                    "funcsam.TopK(k, per_example_loss) or funcsam.SDS(k, per_example_loss), "
                    f"got {type(source).__name__} {source!r:.80}")


def check_batch(batch: Any, what: str = "batch") -> None:
    """An empty batch would give a NaN mean loss with zero gradients: refuse it by name."""
    for leaf in flatten(batch)[0]:
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0 and leaf.shape[0] == 0:
            raise ValueError(f"{what} is empty (a tensor of shape {tuple(leaf.shape)}): every step needs at least one example")


def _weights(micro_batches: Sequence) -> list[float]:
    sizes = [batch_size(micro_batch) for micro_batch in micro_batches]
    return [size / sum(sizes) for size in sizes]


def _accumulate(total: list[Tensor] | None, grads: list[Tensor], weight: float) -> list[Tensor]:
    """``total + weight * grads`` (just ``weight * grads`` for the first micro-batch), out of place."""
    if total is None:
        return torch._foreach_mul(grads, weight)
    return torch._foreach_add(total, grads, alpha=weight)


def _join_micro_batches(auxes: list) -> Any:
    """The micro-batches' auxes joined along dim 0 (``(n_i, ...)`` leaves) or stacked (0-dim leaves)."""
    specs = {flatten(aux)[1] for aux in auxes}
    if len(specs) != 1:
        raise ValueError("loss_fn returned aux values of different structures for different micro-batches")
    joined = [torch.stack(parts) if parts[0].dim() == 0 else torch.cat(parts)
              for parts in zip(*[flatten(aux)[0] for aux in auxes])]
    return unflatten(specs.pop(), joined)


def _part_buffers(buffers: PyTree, m: int) -> PyTree:
    """A copy of every buffer per part, stacked on dim 0: BatchNorm writes its updates into the
    buffers it is given, and an unbatched buffer cannot receive a batched update under vmap."""
    leaves, spec = flatten(buffers)
    return unflatten(spec, [leaf.expand(m, *leaf.shape).clone() for leaf in leaves])


def _combine_part_buffers(part_buffers: PyTree) -> PyTree:
    """The mean over parts of floating leaves (running statistics), part 0's value of the others."""
    leaves, spec = flatten(part_buffers)
    return unflatten(spec, [leaf.mean(dim=0) if leaf.is_floating_point() else leaf[0] for leaf in leaves])


def _concatenate_parts(part_aux: Any) -> Any:
    """Per-part outputs ``(m, B/m, ...)`` back to ``(B, ...)``; leaves with no per-example dim stay ``(m,)``."""
    leaves, spec = flatten(part_aux)
    return unflatten(spec, [leaf.reshape(leaf.shape[0] * leaf.shape[1], *leaf.shape[2:]) if leaf.dim() >= 2 else leaf
                            for leaf in leaves])
