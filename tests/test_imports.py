"""`import funcsam` stays light: it imports none of the frameworks its integrations serve."""

import subprocess
import sys

import pytest

FRAMEWORKS = ("lightning", "pytorch_lightning", "transformers", "accelerate", "timm", "torchvision", "mkdocs")


@pytest.mark.slow
def test_import_funcsam_imports_no_framework():
    probe = (
        "import sys, funcsam\n"
        f"loaded = sorted(name for name in {FRAMEWORKS!r} if name in sys.modules)\n"
        "print(','.join(loaded))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import funcsam imported {out.stdout.strip()}"
