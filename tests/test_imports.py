"""Every module imports cleanly, and alignkit.losses pulls in nothing heavier than torch."""

import importlib
import importlib.util
import pkgutil
import subprocess
import sys

import alignkit


def all_modules() -> list[str]:
    return [m.name for m in pkgutil.walk_packages(alignkit.__path__, "alignkit.")]


def test_every_module_imports():
    names = all_modules()
    assert "alignkit.cli" in names and "alignkit.train.loop" in names
    has_label_extra = all(importlib.util.find_spec(m) for m in ("sqlalchemy", "starlette"))
    for name in names:
        if name.startswith("alignkit.label.") and not has_label_extra:
            continue  # the optional 'label' extra (pip install -e .[label]); .ci/run installs it
        importlib.import_module(name)


def test_losses_import_only_torch():
    code = (
        "import sys, alignkit.losses, pkgutil, importlib\n"
        "for m in pkgutil.walk_packages(alignkit.losses.__path__, 'alignkit.losses.'):\n"
        "    importlib.import_module(m.name)\n"
        "heavy = [m for m in ('transformers', 'peft', 'accelerate', 'yaml', 'matplotlib') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
