"""The documentation speaks of the repository itself: every relative link and every cited file
of README.md, CHANGELOG.md, docs/*.md and benchmarks/README.md resolves inside the repository
(anchors included), the generated pages are current, and no project file points outside it."""

import re
import subprocess
from pathlib import Path

import pytest

from lgtm_ds.config import dump_configuration_md

ROOT = Path(__file__).resolve().parents[2]
PAGES = [
    ROOT / "README.md",
    ROOT / "CHANGELOG.md",
    ROOT / "benchmarks" / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
]
LINK = re.compile(r"\]\(([^)\s]+)\)")
# `lgtm_ds/methods/naive.py`, `configs/examples/glue_sst2.yaml`, `tests/unit/test_docs.py`
CITED = re.compile(
    r"`((?:lgtm_ds|kernels|launch|configs|ds_configs|tests|docs|benchmarks|\.ci)/[\w./-]+)`"
)


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {_slug(h) for h in re.findall(r"^#+ (.+)$", page.read_text(), re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_and_cited_files_resolve(page):
    text = page.read_text()
    bad = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not ours to check
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists() or ROOT not in (dest, *dest.parents):
            bad.append(f"link {target!r}: no such file in the repository")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"link {target!r}: no heading with that anchor in {dest.name}")
    for cited in CITED.findall(text):
        if "*" not in cited and not (ROOT / cited.rstrip(".")).exists():
            bad.append(f"cited file {cited!r} does not exist")
    assert not bad, f"{page.relative_to(ROOT)}:\n" + "\n".join(bad)


def test_configuration_page_is_generated_from_the_schema():
    assert (ROOT / "docs" / "configuration.md").read_text() == dump_configuration_md(), (
        "docs/configuration.md is out of date with the schema; regenerate it: "
        "python -m lgtm_ds.config --markdown > docs/configuration.md"
    )


def test_no_project_file_points_outside_the_repository():
    outside = "../" + "shared"  # (spelled in two parts: this file is a project file too)
    method_doc = "lgtm-" + "method.md"
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if listed.returncode == 0:
        files = listed.stdout.split()
    else:  # not a git checkout (an exported tree): every file but the environments and outputs
        skip = {".git", ".venv", ".torch_extensions", "outputs", "wandb", "build"}
        files = [
            str(p.relative_to(ROOT))
            for p in ROOT.rglob("*")
            if not skip & set(p.relative_to(ROOT).parts) and "egg-info" not in str(p)
        ]
    hits = []
    for name in files:
        path = ROOT / name
        if not path.is_file() or path.suffix in (".png", ".pt", ".csv"):
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for needle in (outside, method_doc):
            if needle in text:
                hits.append(f"{name}: {needle}")
    assert not hits, "the method document is docs/algorithm.md:\n" + "\n".join(hits)
