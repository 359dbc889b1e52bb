"""The documentation: the site builds with warnings as errors, and the README runs as written."""

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import funcsam
import train.cifar10 as cifar10

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def fenced_blocks(text: str, language: str) -> list[str]:
    """The bodies of the ```language blocks of a Markdown text, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None,
                    reason='mkdocs is not installed: pip install -e ".[docs]" (the dev extra includes it)')
def test_site_builds_strict_and_documents_every_public_name(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # mkdocs-material's banner, not a build warning
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr

    anchors = set()
    for page in (site / "reference").rglob("*.html"):
        anchors |= set(re.findall(r'id="(funcsam[\w.]*)"', page.read_text()))

    def entries(name):  # funcsam.NAME, or NAME under the module that defines it or a package above it
        obj = getattr(funcsam, name)
        if isinstance(obj, type(funcsam)):
            return {obj.__name__}  # a submodule, on its own page
        parts = obj.__module__.split(".")
        return {f"funcsam.{name}"} | {".".join(parts[:n] + [name]) for n in range(1, len(parts) + 1)}

    missing = [name for name in funcsam.__all__ if not anchors & entries(name)]
    assert not missing, f"funcsam.__all__ names without an entry in docs/reference/: {missing}"


def test_readme_top_commands_are_complete():
    """The README's two commands: a fresh venv, an install with an extra that exists, then the job."""
    lines = [line for line in fenced_blocks(README, "bash")[0].splitlines() if line and not line.startswith("#")]
    pyproject = (ROOT / "pyproject.toml").read_text()
    jobs = []
    for line in lines:
        prefix = re.match(r'python3 -m venv \.venv && \. \.venv/bin/activate && pip install -e "\.\[(\w+)\]" && ', line)
        assert prefix, line
        assert re.search(rf"^{prefix.group(1)} = \[", pyproject, flags=re.MULTILINE), f"no such extra: {line}"
        jobs.append(line[prefix.end():])
    assert len(jobs) == 2, lines
    demo, tests = jobs
    assert demo.startswith("python -m train.cifar10 ")
    cifar10.parse_args(shlex.split(demo)[3:])  # exits 2 on a flag the trainer no longer takes
    assert tests == "python -m pytest -q"
    assert "python -m pytest -q" in (ROOT / ".ci" / "run").read_text()
    assert fenced_blocks(README, "bash")[0] in fenced_blocks((ROOT / "docs" / "getting-started.md").read_text(), "bash")


def test_readme_links_reach_docs_pages():
    """The README links to docs/*.md relatively, so that they work on GitHub without a deployed site."""
    targets = re.findall(r"\]\((docs/[^)#]*)(?:#[^)]*)?\)", README)
    assert targets
    assert [target for target in targets if not (ROOT / target).exists()] == []


def test_readme_python_snippets_run_in_order():
    # What the README's snippets take as given: "model is your torch.nn.Module and loader an
    # iterable of (inputs, targets) batches", and the run length AE-SAM's schedule needs.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    loader = [(torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))) for _ in range(2)]
    namespace = {"model": model, "loader": loader, "epochs": 1, "steps_per_epoch": len(loader)}

    snippets = fenced_blocks(README, "python")
    assert len(snippets) >= 4, "the three smallest usages and a mode example"
    for index, snippet in enumerate(snippets):
        exec(compile(snippet, f"README.md python block {index + 1}", "exec"), namespace)
    assert bool(torch.isfinite(namespace["out"].loss))
