"""bench/bench_modes.py's split runs: --seed-list and --no-timing in several processes, --merge after."""

import dataclasses
import json

import pytest
import torch

from bench.bench_modes import SETTINGS, merged_runs


def partial(path, seeds, setting=SETTINGS["digits"], keys=("base", "sam"), dataset="digits"):
    runs = {key: [dict(seed=seed, test_acc=0.5 + seed / 100, top_eigenvalue=float(seed)) for seed in seeds]
            for key in keys}
    settings = dataclasses.asdict(setting) | dict(seed_list=list(seeds), seeds=len(seeds))
    path.write_text(json.dumps(dict(dataset=dataset, partial=True, settings=settings, runs=runs)))
    return str(path)


def test_merge_joins_the_runs_of_disjoint_seeds_in_seed_order(tmp_path):
    name, setting, seeds, runs = merged_runs([partial(tmp_path / "a.json", [2]), partial(tmp_path / "b.json", [0, 1])])
    assert (name, setting, seeds) == ("digits", SETTINGS["digits"], [0, 1, 2])
    assert [run["seed"] for run in runs["sam"]] == [0, 1, 2]
    assert list(runs) == ["base", "sam"]


@pytest.mark.parametrize("second, match", [
    (dict(seeds=[1, 2]), "a seed occurs in two files"),
    (dict(seeds=[1], setting=dataclasses.replace(SETTINGS["digits"], lr=0.05)), "another data set or setting"),
    (dict(seeds=[1], dataset="synthetic"), "another data set or setting"),
])
def test_merge_refuses_files_that_do_not_belong_together(tmp_path, second, match):
    first = partial(tmp_path / "a.json", [0, 1])
    with pytest.raises(SystemExit, match=match):
        merged_runs([first, partial(tmp_path / "b.json", **second)])


def test_merge_refuses_a_finished_result(tmp_path):
    finished = tmp_path / "done.json"
    finished.write_text(json.dumps(dict(dataset="digits", settings={}, modes={})))
    with pytest.raises(SystemExit, match="finished result"):
        merged_runs([str(finished)])


def test_merge_with_no_timing_or_seed_list_is_refused(capsys):
    """Refused before anything else: in particular before main sets torch's thread count, which would
    leak into the rest of the test process."""
    from bench.bench_modes import main

    threads = torch.get_num_threads()
    for extra in (["--no-timing"], ["--seed-list", "0"]):
        with pytest.raises(SystemExit):
            main(["--merge", "a.json", *extra])
        assert "--merge takes its seeds from the files" in capsys.readouterr().err
    assert torch.get_num_threads() == threads
