"""README.md and the docs/ pages cannot drift from the code: their commands name real files, real flags and valid
config keys, and their links lead to pages and headings that exist.

Every page is checked the same way, so a command that moves from README.md to a docs page stays checked."""
import functools
import os
import re
import shlex
import subprocess
import sys

import pytest

from tests.helpers.paths import REPO_ROOT
from tests.helpers.processes import child_env
from zvl_ds.config import load_config

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


# scripts whose flags belong to a subcommand, which has its own --help (clip_benchmark's `eval`)
SUBCOMMANDS = {"zvl_ds.run_clip_benchmark": ("eval", "build")}


@functools.lru_cache(maxsize=None)
def help_text(script, subcommand=None):
    command = [sys.executable, "-m", script] if not script.endswith(".py") else [sys.executable, script]
    command += [subcommand] if subcommand else []
    # run by its path, a script has its own folder first on sys.path, not the checkout: PYTHONPATH makes it import
    # this checkout's zvl_ds even where the environment's editable install points at another copy
    env = dict(child_env(), PYTHONPATH=os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")])))
    done = subprocess.run(command + ["--help"], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120, env=env)
    assert done.returncode == 0, f"{script} --help failed: {done.stderr[-1000:]}"
    return done.stdout


# (page, command) pairs over every page; the test ids name the page, so a failure says where the command is
COMMANDS = [(page, command) for page in PAGES for command in shell_commands(page)]
README_COMMANDS = shell_commands(README)


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


@functools.lru_cache(maxsize=None)
def tiny_model_source(kind):
    """A tiny checkpoint folder of ``kind`` (tools/make_tiny_checkpoint.py), standing in for the reader's own."""
    import tempfile

    from tools.tiny_checkpoints import write_tiny_checkpoint

    return write_tiny_checkpoint(kind, os.path.join(tempfile.mkdtemp(prefix="readme_"), kind))


def with_tiny_model_source(override):
    """``model.hf_folder=PATH`` of a folder the reader holds (which this machine has not): a tiny one of the kind
    the docs' commands name."""
    key, _, value = override.partition("=")
    if key == "model.hf_folder" and not os.path.isdir(value):
        return f"{key}={tiny_model_source('hf_siglip' if 'siglip' in value.lower() else 'hf_clip')}"
    return override


@pytest.mark.parametrize("page,command", [(p, c) for p, c in COMMANDS if script_of(shlex.split(c))[0]])
def test_flags_and_config_overrides_are_real(page, command):
    script, args = script_of(shlex.split(command))
    usage = help_text(script, args[0] if args and args[0] in SUBCOMMANDS.get(script, ()) else None)
    for arg in args:
        if arg.startswith("--"):
            flag = arg.split("=", 1)[0]
            assert flag in usage, f"{script} has no flag {flag} ({page}: {command})"
    overrides = [with_tiny_model_source(a) for a in args if re.match(r"^[a-z_]+(\.[a-z_0-9]+)*=", a)]
    cfg_option = next((option for option in ("--cfg", "--cfg-path") if option in args), None)  # LAVIS's name too
    if cfg_option:
        cfg_path = os.path.join(REPO_ROOT, args[args.index(cfg_option) + 1])
        load_config(cfg_path, overrides)  # raises on an unknown key or a bad value
    elif script == "zvl_ds.config" and args and not args[0].startswith("--"):
        load_config(os.path.join(REPO_ROOT, args[0]), args[1:])


def test_config_command_runs_as_written():
    page, command = next((p, c) for p, c in COMMANDS if "-m zvl_ds.config configs/" in c)
    done = subprocess.run([sys.executable] + shlex.split(command)[1:], capture_output=True, text=True, cwd=REPO_ROOT,
                          timeout=120)
    assert done.returncode == 0, f"{page}: {done.stderr}"
    assert "batch_size: 4096" in done.stdout


def test_test_command_is_what_ci_runs():
    ci = open(os.path.join(REPO_ROOT, ".ci", "run"), encoding="utf-8").read()
    test_command = next(c for c in README_COMMANDS if "pytest" in c)
    assert test_command in ci


def test_inference_example_is_the_tested_one():
    """The load_model example (README.md and the workflow page) is zvl_ds.model.inference's docstring example, which
    test_export runs."""
    import zvl_ds.model.inference

    example = [line.strip() for line in zvl_ds.model.inference.__doc__.splitlines() if line.strip().startswith(
        ("import zvl_ds", "model = zvl_ds.load_model", "captions =", "image =", "scores =", "print("))]
    assert len(example) == 6
    pages = [page for page in PAGES if "zvl_ds.load_model(" in page_text(page)]
    assert README in pages and "docs/workflow.md" in pages
    for page in pages:
        for line in example:
            assert line in page_text(page), f"{page} lacks the tested example line: {line}"


def heading_anchors(page):
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"```.*?```", "", page_text(page), flags=re.S)  # a '#' comment in a code block is no heading
    anchors = set()
    for heading in re.findall(r"^#+ (.+)$", text, flags=re.M):
        anchors.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return anchors


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
