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


def test_comments_point_inside_the_repository():
    """A contributor who clones the repository has docs/, not the documents the project grew from."""
    outside = re.compile(r"FIELD_NOTES|ALGORITHM\.md|STYLE\.md|\.\./shared|research code's pitfall")
    for f in [*(ROOT / "deltagrad_ray").rglob("*.py"), *(ROOT / "pipelines").rglob("*.py"),
              *(ROOT / "benchmarks").rglob("*.py")]:
        hit = outside.search(f.read_text())
        assert hit is None, f"{f.relative_to(ROOT)} cites {hit.group(0)!r}: cite docs/ instead"
    for rule in re.findall(r"docs/pitfalls\.md, rule (\d+)", "".join(
            f.read_text() for f in (ROOT / "deltagrad_ray").rglob("*.py"))):
        assert f"\n{rule}. **" in (ROOT / "docs" / "pitfalls.md").read_text(), f"docs/pitfalls.md has no rule {rule}"


def test_one_module_reads_the_environment():
    """Environment variables are read and set in deltagrad_ray/environment.py only (it says which)."""
    readers = sorted(str(f.relative_to(ROOT)) for f in (ROOT / "deltagrad_ray").rglob("*.py")
                     if re.search(r"os\.environ|getenv\(", f.read_text()))
    assert readers == ["deltagrad_ray/environment.py"], readers
