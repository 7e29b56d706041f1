"""The docs pages' promises: every ```python block runs (in order, one namespace per page) and
every relative link, anchors included, points at something that exists."""
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted((ROOT / "docs").glob("*.md"))
NEEDS = {"integrations.md": ["transformers", "accelerate"]}    # optional extras a page's examples import


def blocks(text):
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path):
    return {slug(h) for h in re.findall(r"^#+ (.+)$", path.read_text(), flags=re.M)}


def test_every_page_has_a_runnable_example_or_is_the_design_map():
    for page in PAGES:
        assert blocks(page.read_text()) or page.name in ("design.md", "distributed.md"), page.name


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_page_examples_run(page, capsys):
    for module in NEEDS.get(page.name, []):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (pip install -e '.[test]')")
    namespace = {}
    for i, code in enumerate(blocks(page.read_text())):
        exec(compile(code, f"{page.name} example {i + 1}", "exec"), namespace)


@pytest.mark.parametrize("page", [ROOT / "README.md", *PAGES], ids=["README.md", *(p.name for p in PAGES)])
def test_links_resolve(page):
    for target in re.findall(r"\]\(([^)#\s]*)(#[^)\s]*)?\)", page.read_text()):
        path, anchor = target
        if path.startswith(("http://", "https://")):
            continue
        where = (page.parent / path).resolve() if path else page
        assert where.exists(), f"{page.name}: {path} does not exist"
        if anchor and where.suffix == ".md":
            assert anchor[1:] in anchors(where), f"{page.name}: no heading for {path}{anchor}"


def test_readme_stays_short():
    assert len((ROOT / "README.md").read_text().encode()) < 12_000
