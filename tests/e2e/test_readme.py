"""README.md cannot drift from the code: its commands name real files, real flags and valid config keys."""
import functools
import os
import re
import shlex
import subprocess
import sys

import pytest

from tests.helpers.paths import REPO_ROOT
from zvl_ds.config import load_config

README = os.path.join(REPO_ROOT, "README.md")


def readme_text():
    with open(README, encoding="utf-8") as handle:
        return handle.read()


def shell_commands():
    """Every command line in the README's ```bash blocks (continuations joined, comments dropped)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", readme_text(), flags=re.S):
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


@functools.lru_cache(maxsize=None)
def help_text(script):
    command = [sys.executable, "-m", script] if not script.endswith(".py") else [sys.executable, script]
    done = subprocess.run(command + ["--help"], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert done.returncode == 0, f"{script} --help failed: {done.stderr[-1000:]}"
    return done.stdout


COMMANDS = shell_commands()


def test_readme_has_commands():
    assert any("quickstart.sh" in c for c in COMMANDS)
    assert any("pytest" in c for c in COMMANDS)
    assert sum("-m zvl_ds." in c or "--module zvl_ds." in c for c in COMMANDS) >= 5  # the tools are modules


@pytest.mark.parametrize("command", COMMANDS)
def test_files_named_by_commands_exist(command):
    for word in shlex.split(command):
        word = word.split("=", 1)[-1]
        if re.match(r"^(tools|configs|ds_configs|zvl_ds)/[\w./-]+\.(py|yaml|json)$", word) or word.endswith(".sh"):
            assert os.path.exists(os.path.join(REPO_ROOT, word)), f"README names {word}, which does not exist"


@pytest.mark.parametrize("command", [c for c in COMMANDS if script_of(shlex.split(c))[0]])
def test_flags_and_config_overrides_are_real(command):
    script, args = script_of(shlex.split(command))
    usage = help_text(script)
    for arg in args:
        if arg.startswith("--"):
            flag = arg.split("=", 1)[0]
            assert flag in usage, f"{script} has no flag {flag} (README: {command})"
    overrides = [a for a in args if re.match(r"^[a-z_]+(\.[a-z_0-9]+)*=", a)]
    if "--cfg" in args:
        cfg_path = os.path.join(REPO_ROOT, args[args.index("--cfg") + 1])
        load_config(cfg_path, overrides)  # raises on an unknown key or a bad value
    elif script == "zvl_ds.config" and args:
        load_config(os.path.join(REPO_ROOT, args[0]), args[1:])


def test_config_command_runs_as_written():
    command = next(c for c in COMMANDS if "-m zvl_ds.config" in c)
    done = subprocess.run([sys.executable] + shlex.split(command)[1:], capture_output=True, text=True, cwd=REPO_ROOT,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "batch_size: 4096" in done.stdout


def test_test_command_is_what_ci_runs():
    ci = open(os.path.join(REPO_ROOT, ".ci", "run"), encoding="utf-8").read()
    test_command = next(c for c in COMMANDS if "pytest" in c)
    assert test_command in ci


def test_inference_example_is_the_tested_one():
    """The README's load_model example is the export module's docstring example, which test_export runs."""
    import zvl_ds.export.model_folder

    example = [line.strip() for line in zvl_ds.export.model_folder.__doc__.splitlines() if line.strip().startswith(
        ("import zvl_ds", "model = zvl_ds.load_model", "captions =", "image =", "scores =", "print("))]
    assert len(example) == 6
    text = readme_text()
    for line in example:
        assert line in text, f"README lacks the tested example line: {line}"
