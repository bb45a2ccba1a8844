"""Packaging and hygiene: install names, lean core import, layer direction, no unsafe loading."""
import re
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = {"dmquant": "dmquant", "pipelines": "dmquant.pipelines", "calibration": "dmquant.calibration",
           "eval": "dmquant.eval"}


def test_every_package_folder_is_installed():
    """pyproject lists packages explicitly (the folder mapping needs it): none may be forgotten."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set()
    for folder, name in LIBRARY.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([name, *rel.parts]) if rel.parts else name)
    assert found == listed


def test_imports_from_any_directory(tmp_path):
    code = "import dmquant, dmquant.pipelines, dmquant.calibration, dmquant.eval; print(dmquant.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip().startswith(str(ROOT / "dmquant"))


def test_core_import_is_lean():
    """`import dmquant` needs only torch: diffusers/transformers load in the pipeline layer."""
    code = ("import sys, dmquant; heavy = [m for m in ('diffusers', 'transformers', 'torchmetrics', 'scipy') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_no_pickle_loading_in_library():
    bad = re.compile(r"\bpickle\b|torch\.load\((?![^)]*weights_only=True)")
    offenders = [str(p) for folder in LIBRARY for p in (ROOT / folder).rglob("*.py") if bad.search(p.read_text())]
    assert offenders == []


def test_readme_and_ci_use_the_same_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "make demo" in readme and "make test" in ci
