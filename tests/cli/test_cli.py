"""The command line lives in ``cli/``: parsing imports nothing heavy, each subcommand's module is
imported only when it runs, and dependencies point one way (CLI -> app -> ...; only the CLI
imports ``bench/``)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("cli", "app", "models", "routing", "telemetry", "bench")
# who may import whom (top-level packages); tests import anything
ALLOWED_IMPORTERS = {"cli": {"cli"}, "app": {"cli", "app"}, "bench": {"cli", "bench"}}
HEAVY = ("bench", "models.build.pipeline", "models.build.train", "torch", "transformers", "optimum")


def imported_packages(path: Path) -> set[str]:
    """Top-level names that ``path`` imports (at any depth of the file, lazy imports too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_import_scan_sees_lazy_imports(tmp_path: Path) -> None:
    code = "import os\n\ndef f():\n    from bench.models import run_bench\n    import app.main\n"
    (tmp_path / "m.py").write_text(code, encoding="utf-8")
    assert imported_packages(tmp_path / "m.py") == {"os", "bench", "app"}


@pytest.mark.parametrize("target", sorted(ALLOWED_IMPORTERS))
def test_only_allowed_packages_import(target: str) -> None:
    offenders = sorted(
        str(path.relative_to(ROOT))
        for package in PACKAGES if package not in ALLOWED_IMPORTERS[target]
        for path in (ROOT / package).rglob("*.py")
        if target in imported_packages(path))
    assert not offenders, f"{target} is imported by {offenders}"


def loaded_after(code: str) -> list[str]:
    """The heavy modules a fresh interpreter has loaded after running ``code``."""
    probe = f"{code}\nimport sys\nprint('loaded:' + ','.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=120, check=True, cwd=ROOT)
    loaded = out.stdout.strip().splitlines()[-1].removeprefix("loaded:").split(",")
    return [m for m in loaded if any(m == h or m.startswith(f"{h}.") for h in HEAVY)]


def test_parser_imports_no_pipeline_and_serve_imports_no_build_or_bench_code() -> None:
    parsed = "from cli.main import build_parser\nargs = build_parser().parse_args({argv!r})\n"
    assert loaded_after(parsed.format(argv=["build", "--model", "x"])) == []
    assert loaded_after(parsed.format(argv=["bench", "models"])) == []
    serve = parsed.format(argv=["serve", "--port", "1"]) + (
        "import importlib\nassert args.module == 'cli.serve'\n"
        "importlib.import_module(args.module)\n")
    assert loaded_after(serve) == []
    # the probe can fail: the build subcommand's module does import the pipeline
    build = parsed.format(argv=["build"]) + (
        "import importlib\nimportlib.import_module(args.module)\n")
    assert "models.build.pipeline" in loaded_after(build)


def test_build_options_keep_the_pipeline_defaults() -> None:
    from cli import build
    from cli.main import build_parser
    from models.build.pipeline.build import BuildOptions

    def opts(*argv: str) -> BuildOptions:
        return build.options(build_parser().parse_args(["build", "--out", "x", *argv]))

    default = opts()
    assert (default.model, default.student) == (BuildOptions.model, BuildOptions.student)
    assert default.distill_steps == BuildOptions.distill_steps
    assert opts("--model", "/some/dir").student is None  # the shipped student fits one model
    assert opts("--model", "/some/dir", "--student", "/s").student == "/s"
    assert opts("--no-student").student is None
    assert opts("--distill-layers", "2", "--distill-steps", "9").distill_steps == 9


def test_show_reports_a_missing_ladder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cli.main import main

    assert main(["show", "--ladder", str(tmp_path)]) == 2
    assert "no ladder in" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["build"], ["bench", "route"]])
def test_build_and_bench_say_when_the_installation_has_no_build_code(argv: list[str]) -> None:
    """The runtime image's wheel leaves out ``models/build`` and ``bench/``: their subcommands
    exit 2 with one line instead of a traceback."""
    code = f"""
import sys
class NoBuildSide:
    def find_spec(self, name, path=None, target=None):
        if name == "models.build" or name == "bench":
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, NoBuildSide())
from cli.main import main
sys.exit(main({argv!r}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 2, out.stderr
    assert "has no build or benchmark code" in out.stderr
    assert "Traceback" not in out.stderr


def test_every_benchmark_names_the_machine_it_ran_on(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """The report's first line and the JSON carry the CPU, its ISA flags and onnxruntime's
    version: figures from different CPUs are not comparable."""
    import json

    import onnxruntime

    from cli.bench import _emit
    from models.runtime.host import cpu_name, isa_flags

    out = tmp_path / "figures.json"
    assert _emit({"x": 1}, lambda f: f"x = {f['x']}", str(out)) == 0
    first, second = capsys.readouterr().out.splitlines()[:2]
    assert first.startswith(f"host: {cpu_name()}") and onnxruntime.__version__ in first
    assert second == "x = 1"
    host = json.loads(out.read_text())["host"]
    assert host == {"cpu": cpu_name(), "isa_flags": isa_flags(),
                    "onnxruntime": onnxruntime.__version__}
