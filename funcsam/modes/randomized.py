"""RST: SAM on the steps a coin picks, the base step on the others; the coin is a hash of (seed, step).

Zhao, Zhang and Hu, "Randomized Sharpness-Aware Training for Boosting Computational Efficiency in
Deep Learning", arXiv 2203.09962. Each step t makes a Bernoulli trial with probability p_t: SAM
(two passes) on success, the base step (one pass) otherwise, so a run costs about (1 + mean p_t)
passes a step::

    u_t     = uniform_draw(seed, t)                            in [0, 1), a counter-based hash
    p_t     = p                                                RST(p): a constant scheduling function
    p_t     = p + (p_end - p) * min(t, T) / T                  RST(p, p_end=..., total_steps=T): linear
    take_t  = u_t < p_t

The paper studies several scheduling functions p(t) and finds rising ones (little SAM early, more
late) best for their cost; the linear one from ``p`` to ``p_end`` is implemented here. (Its G-RST
also scales the strength of the SAM term; pass a smaller rho for that.)

The draw is a pure function of (seed, t) on the host: no RNG state, so a resumed run, both APIs
and the trainer take the same steps, and a compiled step keeps its two graphs. Usage::

    mode  = funcsam.RST(p=0.5, seed=0)                                # or RST(0.1, p_end=0.9, total_steps=T)
    out   = funcsam.sam_step(..., mode=mode, take_sam=mode.takes_sam(t))
    sam   = funcsam.SAMSGD(model.parameters(), lr=0.1, rho=0.05, mode=mode)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..hyperparameters import check_int, is_finite_number
from .protocol import Mode, check_step

__all__ = ["RST", "uniform_draw"]

_MASK64 = (1 << 64) - 1
_GOLDEN_GAMMA = 0x9E3779B97F4A7C15  # SplitMix64's increment: 2^64 / the golden ratio, odd


def _splitmix64(x: int) -> int:
    """SplitMix64's output for the state ``x`` (Steele, Lea, Flood 2014; Vigna's splitmix64.c): the
    state advanced by the golden gamma, then a finaliser that mixes every bit (a bijection)."""
    x = (x + _GOLDEN_GAMMA) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def uniform_draw(seed: int, step: int) -> float:
    """A uniform number in [0, 1) that depends only on the ints ``seed`` and ``step`` (the 0-based step):
    the top 53 bits of output ``step`` of a SplitMix64 stream whose state starts at SplitMix64(seed).
    Counter-based, so any step is drawn in O(1) without the ones before it; the same on every machine
    and Python version (no ``hash()``, which is salted per process)."""
    check_seed(seed)
    check_step(step)
    state = (_splitmix64(seed & _MASK64) + step * _GOLDEN_GAMMA) & _MASK64
    return (_splitmix64(state) >> 11) * 2.0 ** -53


@dataclass(frozen=True)
class RST(Mode):
    """Randomized sharpness-aware training (module docstring).

    Fields:
        p: the probability of a SAM step, in [0, 1]; with ``p_end``, the probability at step 0.
        seed: an int (a negative one counts modulo 2^64); step t takes SAM if
            ``uniform_draw(seed, t) < p_t``.
        p_end: None (p every step) or the probability at step ``total_steps`` and after, in [0, 1].
        total_steps: T, an int >= 1, the steps over which p_t moves linearly from p to p_end
            (required with ``p_end``, refused without it).
    """

    p: float = 0.5
    seed: int = 0
    p_end: float | None = None
    total_steps: int | None = None

    two_halves = False  # the coin decides per step how many passes to take
    example = "funcsam.RST(p=0.5, seed=0)"

    def __post_init__(self):
        check_probability("p", self.p)
        check_seed(self.seed)
        if self.p_end is None:
            if self.total_steps is not None:
                raise ValueError("total_steps is only used with p_end (p_t moving from p to p_end over total_steps): "
                                 f"pass p_end too, e.g. funcsam.RST(p={self.p}, p_end=0.9, "
                                 f"total_steps={self.total_steps})")
            return
        check_probability("p_end", self.p_end)
        check_int("total_steps", self.total_steps, minimum=1,
                  meaning="the steps over which p_t moves linearly from p to p_end; required with p_end")

    def probability(self, step: int) -> float:
        """p_t, the probability that step ``step`` (0-based) takes SAM."""
        check_step(step)
        if self.p_end is None:
            return float(self.p)
        return float(self.p + (self.p_end - self.p) * min(step, self.total_steps) / self.total_steps)

    def takes_sam(self, step: int, state: Any = None) -> bool:
        """``uniform_draw(seed, step) < p_t``: a Python bool, the same for the same (seed, step)."""
        return uniform_draw(self.seed, step) < self.probability(step)


def check_probability(name: str, value: Any) -> None:
    if not (is_finite_number(value) and 0 <= value <= 1):
        raise ValueError(f"{name} must be a probability, a real number in [0, 1], got {value!r}")


def check_seed(seed: Any) -> None:
    check_int("seed", seed, minimum=-(2 ** 63), meaning="the RST coin's seed")
