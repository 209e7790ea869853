"""House rules that are cheap to check mechanically."""

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ruff_is_clean():
    p = subprocess.run([sys.executable, "-m", "ruff", "check", "--quiet", str(ROOT)], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def test_core_imports_nothing_of_the_project_outside_core_and_no_io():
    for f in (ROOT / "deltagrad_ray" / "core").glob("*.py"):
        text = f.read_text()
        assert not re.search(r"^from \.\.(?!core)", text, re.M), f"{f.name} imports outside core"
        for banned in ("import ray", "pyarrow", "s3fs", "open(", "pickle", "torch.load"):
            assert banned not in text, f"{f.name} uses {banned!r}: the core is pure"


def test_no_pickle_loading_anywhere():
    for f in (ROOT / "deltagrad_ray").rglob("*.py"):
        text = f.read_text()
        assert "torch.load(" not in text and "pickle.load" not in text, f.name
