"""pytest-benchmark view of the same steps: ``pytest bench -k eager --benchmark-only``.

Not part of the test suite (``testpaths = tests``); for ratios from interleaved runs use
``python -m bench.report``.
"""

import pytest

from bench.steps import PEERS, VARIANTS, make_problem, peer_installed


@pytest.fixture(scope="module")
def problem():
    return make_problem()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_step(benchmark, problem, name):
    if name in PEERS and not peer_installed():
        pytest.skip("pytorch_optimizer is not installed (pip install -e '.[bench]')")
    step = VARIANTS[name](*problem)
    step()  # compile / warm up outside the timing
    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
