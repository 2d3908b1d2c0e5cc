"""README.md and the docs/ pages cannot drift from the code: the files their commands name exist, and their links
lead to pages and headings that exist (the commands' flags and config overrides, checked against each script's
--help: tests/e2e/test_readme.py).

Every page is checked the same way, so a command that moves from README.md to a docs page stays checked."""
import os
import re
import shlex

import pytest

from tests.helpers.docs_pages import COMMANDS, PAGES, README, README_COMMANDS, heading_anchors, page_text
from tests.helpers.paths import REPO_ROOT


def test_readme_has_commands():
    assert any("quickstart.sh" in c for c in README_COMMANDS)
    assert any("pytest" in c for c in README_COMMANDS)
    assert sum("-m zvl_ds." in c or "--module zvl_ds." in c for c in README_COMMANDS) >= 5  # the tools are modules


def test_every_docs_page_has_commands_checked_or_none_to_check():
    """The parametrized tests below see each page's commands: guard against a page whose blocks stop parsing."""
    pages_with_bash = [page for page in PAGES if "```bash" in page_text(page)]
    assert {page for page, _ in COMMANDS} == set(pages_with_bash)


@pytest.mark.parametrize("page,command", COMMANDS)
def test_files_named_by_commands_exist(page, command):
    for word in shlex.split(command):
        word = word.split("=", 1)[-1]
        if re.match(r"^(tools|configs|ds_configs|zvl_ds)/[\w./-]+\.(py|yaml|json)$", word) or word.endswith(".sh"):
            assert os.path.exists(os.path.join(REPO_ROOT, word)), f"{page} names {word}, which does not exist"


def test_test_command_is_what_ci_runs():
    ci = open(os.path.join(REPO_ROOT, ".ci", "run"), encoding="utf-8").read()
    test_command = next(c for c in README_COMMANDS if "pytest" in c)
    assert test_command in ci


def test_inference_example_is_the_tested_one():
    """The load_model example (README.md and the workflow page) is the inference module's docstring example, which
    tests/dist/test_export.py runs."""
    import zvl_ds.model.inference

    example = [line.strip() for line in zvl_ds.model.inference.__doc__.splitlines() if line.strip().startswith(
        ("import zvl_ds", "model = zvl_ds.load_model", "captions =", "image =", "scores =", "print("))]
    assert len(example) == 6
    pages = [page for page in PAGES if "zvl_ds.load_model(" in page_text(page)]
    assert README in pages and "docs/workflow.md" in pages
    for page in pages:
        for line in example:
            assert line in page_text(page), f"{page} lacks the tested example line: {line}"


@pytest.mark.parametrize("page", PAGES)
def test_links_lead_to_pages_and_headings_that_exist(page):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", page_text(page)):
        if re.match(r"^[a-z]+://", target):
            continue  # web links are not checked offline
        path, _, anchor = target.partition("#")
        linked = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        if not os.path.exists(os.path.join(REPO_ROOT, linked)):
            broken.append(f"{target} (no file {linked})")
        elif anchor and linked.endswith(".md") and anchor not in heading_anchors(linked):
            broken.append(f"{target} (no heading #{anchor} in {linked})")
    assert not broken, f"{page} has broken links: {broken}"


def test_readme_links_every_docs_page():
    unlinked = [page for page in PAGES[1:] if f"]({page})" not in page_text(README)]
    assert not unlinked, f"README.md does not link these docs pages: {unlinked}"


@pytest.mark.parametrize("page", PAGES[1:])
def test_docs_page_says_what_it_covers(page):
    """Each page opens with its title and a one-line statement of what it covers, so a reader knows at once."""
    lines = page_text(page).splitlines()
    assert lines[0].startswith("# ") and lines[1] == "" and lines[2].strip() and not lines[2].startswith("#"), (
        f"{page} must start with '# Title', a blank line, then a statement of what the page covers")
