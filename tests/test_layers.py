"""Layers point one way: the library imports neither pipelines nor benchmarks, the store has no
import cycle, the pipelines are thin entry points over the library's jobs, their local configs are
the jobs' defaults, and the wheel holds the library only."""

from __future__ import annotations

import ast
import importlib
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "deltagrad_ray"
JOBS = ("train", "bulk_erasure", "jackknife", "conformal")


def _imports(path: pathlib.Path) -> list[str]:
    """Absolute names of the modules a file imports (relative imports resolved)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            out += [base] + [f"{base}.{a.name}" for a in node.names]
    return out


def test_the_library_imports_neither_pipelines_nor_benchmarks():
    offenders = [f"{p.relative_to(ROOT)} imports {name}" for p in LIBRARY.rglob("*.py") for name in _imports(p)
                 if name.split(".")[0] in ("pipelines", "benchmarks", "tests")]
    assert offenders == []


# docs/architecture.md, "Layers": a unit imports its own layer or lower ones only
LAYERS = {"core": 0, "environment": 0, "store": 1, "stats": 1, "datasets": 1, "progress": 1,
          "distributed": 2, "results": 2, "report": 2, "baselines": 2, "api": 3, "many": 3, "runtime": 3,
          "erasure": 4, "sklearn": 4, "jobs": 5, "demo": 6, "cli": 7, "__init__": 7}


def _unit(path: pathlib.Path) -> str:
    return path.relative_to(LIBRARY).with_suffix("").parts[0]


def test_imports_follow_the_layers():
    """Every import of the library (module level and inside functions) points to its own layer or a
    lower one, and the units' import graph has no cycle."""
    graph: dict[str, set[str]] = {}
    offenders = []
    for p in LIBRARY.rglob("*.py"):
        u = _unit(p)
        assert u in LAYERS, f"{p.relative_to(ROOT)}: unit {u!r} is in no layer of docs/architecture.md"
        for name in _imports(p):
            parts = name.split(".")
            if parts[0] != "deltagrad_ray" or len(parts) < 2 or parts[1] not in LAYERS or parts[1] == u:
                continue
            graph.setdefault(u, set()).add(parts[1])
            if LAYERS[parts[1]] > LAYERS[u]:
                offenders.append(f"{p.relative_to(ROOT)} (layer {LAYERS[u]}) imports {name} (layer {LAYERS[parts[1]]})")
    assert offenders == []

    def reaches(a, b, seen=()):
        return any(n == b or (n not in seen and reaches(n, b, (*seen, n))) for n in graph.get(a, ()))
    assert sorted(f"{a} <-> {b}" for a in graph for b in graph[a] if reaches(b, a)) == []


def test_the_cli_goes_through_the_public_modules():
    """docs/architecture.md: the CLI parses, calls the library's public modules (api, many, erasure,
    jobs, …) and prints; it reaches past them into no store, core or distributed module."""
    offenders = [name for name in _imports(LIBRARY / "cli.py")
                 if name.split(".")[:2] in (["deltagrad_ray", "store"], ["deltagrad_ray", "core"],
                                            ["deltagrad_ray", "distributed"])]
    assert offenders == []


def test_only_the_store_reads_and_writes_files_in_storage_formats():
    """Parquet/Arrow and the S3 filesystem are the storage layer's (docs/architecture.md)."""
    offenders = [f"{p.relative_to(ROOT)} imports {name}" for p in LIBRARY.rglob("*.py")
                 if _unit(p) != "store" for name in _imports(p)
                 if name.split(".")[0] in ("pyarrow", "s3fs", "fsspec", "botocore", "boto3")]
    assert offenders == []


def test_the_store_has_no_import_cycle():
    store = {p.stem: p for p in (LIBRARY / "store").glob("*.py") if p.stem != "__init__"}
    graph = {name: {i.split(".")[2] for i in _imports(p) if i.startswith("deltagrad_ray.store.")
                    and len(i.split(".")) > 2 and i.split(".")[2] in store and i.split(".")[2] != name}
             for name, p in store.items()}

    def reaches(a, b, seen=()):
        return any(n == b or (n not in seen and reaches(n, b, (*seen, n))) for n in graph[a])
    cycles = sorted(f"{a} <-> {b}" for a in graph for b in graph[a] if reaches(b, a))
    assert cycles == []
    assert "location" not in graph["s3"]  # s3 is the lower layer: location builds on it


@pytest.mark.parametrize("name", JOBS)
def test_each_pipeline_is_a_thin_entry_point(name):
    tree = ast.parse((ROOT / "pipelines" / f"{name}.py").read_text())
    defined = [n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    assert defined == [], f"pipelines/{name}.py defines {defined}: that belongs in deltagrad_ray/jobs/{name}.py"
    module = importlib.import_module(f"pipelines.{name}")
    job = importlib.import_module(f"deltagrad_ray.jobs.{name}")
    assert module.run is job.run and module.SCHEMA is job.SCHEMA


@pytest.mark.parametrize("name", JOBS)
def test_local_configs_are_the_jobs_defaults(name):
    """pipelines/configs/<name>.yaml (what `python -m pipelines.<name>` users start from) and the
    defaults the demo builds in code are the same config."""
    from deltagrad_ray.jobs.config import check
    job = importlib.import_module(f"deltagrad_ray.jobs.{name}")
    local = yaml.safe_load((ROOT / "pipelines" / "configs" / f"{name}.yaml").read_text())
    assert local == job.defaults("demo-output")
    check(local, job.SCHEMA)  # and valid


@pytest.mark.slow
def test_the_wheel_holds_the_library_only(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for item in ("pyproject.toml", "README.md", "deltagrad_ray", "pipelines", "benchmarks"):
        copy = shutil.copytree if (ROOT / item).is_dir() else shutil.copy
        copy(ROOT / item, src / item, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                         if (ROOT / item).is_dir() else {}))
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    top = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert top == {"deltagrad_ray", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}
    names = zipfile.ZipFile(wheel).namelist()
    assert "deltagrad_ray/jobs/bulk_erasure.py" in names and "deltagrad_ray/demo.py" in names


def test_pipelines_and_benchmarks_run_from_the_repository_root():
    for module in ("pipelines.bulk_erasure", "benchmarks.store"):
        p = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
        assert p.returncode == 0 and "usage:" in p.stdout, (module, p.stderr[-1000:])
    p = subprocess.run([sys.executable, "-m", "pipelines.bulk_erasure", "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert "--wait" in p.stdout
