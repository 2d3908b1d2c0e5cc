"""The documentation pages (README.md and docs/*.md) and the shell commands in their ```bash blocks, for the tests
that keep the pages true to the code (tests/unit/test_readme.py, tests/e2e/test_readme.py)."""
import functools
import os
import re

from tests.helpers.paths import REPO_ROOT

README = "README.md"


def documentation_pages():
    """README.md and every docs/*.md page, relative to the repository root."""
    docs = os.path.join(REPO_ROOT, "docs")
    return [README] + sorted(f"docs/{name}" for name in os.listdir(docs) if name.endswith(".md"))


PAGES = documentation_pages()


@functools.lru_cache(maxsize=None)
def page_text(page):
    with open(os.path.join(REPO_ROOT, page), encoding="utf-8") as handle:
        return handle.read()


def shell_commands(page):
    """Every command line in a page's ```bash blocks (continuations joined, comments dropped)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", page_text(page), flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                commands.append(line)
    return commands


def script_of(words):
    """The Python script or module a command runs, and the arguments it passes to it."""
    for index, word in enumerate(words):
        if word.endswith(".py"):
            return word, words[index + 1:]
        if word in ("-m", "--module") and index + 1 < len(words) and words[index + 1].startswith("zvl_ds"):
            return words[index + 1], words[index + 2:]
    return None, []


# (page, command) pairs over every page; the test ids name the page, so a failure says where the command is
COMMANDS = [(page, command) for page in PAGES for command in shell_commands(page)]
README_COMMANDS = shell_commands(README)


def heading_anchors(page):
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"```.*?```", "", page_text(page), flags=re.S)  # a '#' comment in a code block is no heading
    anchors = set()
    for heading in re.findall(r"^#+ (.+)$", text, flags=re.M):
        anchors.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return anchors
