"""The README and docs/ stay true to the code: a short README, links that resolve inside the
repository, every setting and every metric the code defines documented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from app.settings import Settings
from telemetry.metrics import Metrics

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
REQUIRED = ("architecture", "api", "ladder", "routing-and-energy", "deploy", "benchmarks",
            "validation")


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings."""
    out = set()
    for line in page.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            title = re.sub(r"[^\w\- ]", "", title)
            out.add(title.replace(" ", "-"))
    return out


def test_the_readme_is_short_and_the_docs_pages_exist() -> None:
    assert len((ROOT / "README.md").read_text().splitlines()) <= 220
    for name in REQUIRED:
        assert (ROOT / "docs" / f"{name}.md").is_file(), name


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_stay_inside_the_repository_and_resolve(page: Path) -> None:
    for target in LINK.findall(page.read_text()):
        if target.startswith(("http://localhost", "https://localhost")):
            continue
        assert not target.startswith(("http:", "https:", "/")), f"{page.name}: {target}"
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.is_relative_to(ROOT), f"{page.name} links outside the repository: {target}"
        assert linked.exists(), f"{page.name}: {target} does not exist"
        if anchor and linked.suffix == ".md":
            assert anchor in anchors(linked), f"{page.name}: no heading #{anchor} in {path}"


def test_every_setting_is_documented() -> None:
    text = (ROOT / "docs" / "api.md").read_text()
    names = [n for n in Settings.model_fields if n != "cuda_visible_devices"]
    missing = [n for n in names if f"`GREENROUTE_{n.upper()}`" not in text]
    assert not missing, f"settings missing from docs/api.md: {missing}"


def test_every_metric_is_in_the_contract() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    registry = CollectorRegistry()
    Metrics(registry, ["full"], ["cpu"])
    names = {m.name.removeprefix("greenroute_") for m in registry.collect()}
    assert names
    missing = sorted(n for n in names if not re.search(rf"`{n}(_total)?[{{`]", text))
    assert not missing, f"metrics missing from docs/architecture.md: {missing}"
