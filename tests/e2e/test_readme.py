"""README.md and the docs/ pages cannot drift from the code: their commands' flags are real (each script's --help)
and their config overrides are valid config keys (the files the commands name and the pages' links:
tests/unit/test_readme.py).

Every page is checked the same way, so a command that moves from README.md to a docs page stays checked."""
import functools
import os
import re
import shlex
import subprocess
import sys

import pytest

from tests.helpers.docs_pages import COMMANDS, script_of
from tests.helpers.paths import REPO_ROOT
from tests.helpers.processes import child_env, run_side_by_side
from zvl_ds.config import load_config

HELP_TIMEOUT_S = 300  # interpreters importing torch and DeepSpeed side by side on a shared 2-core machine


# scripts whose flags belong to a subcommand, which has its own --help (clip_benchmark's `eval`)
SUBCOMMANDS = {"zvl_ds.run_clip_benchmark": ("eval", "build")}


def help_target(script, args):
    """(script,) or (script, subcommand): what prints the --help that lists a command's flags."""
    return (script, args[0]) if args and args[0] in SUBCOMMANDS.get(script, ()) else (script,)


def help_command(target):
    script, *subcommand = target
    return ([sys.executable, "-m", script] if not script.endswith(".py") else [sys.executable, script]) + subcommand


@functools.lru_cache(maxsize=None)
def help_results():
    """``--help`` of every script the pages' commands run, side by side: {help_target: finished process}."""
    # run by its path, a script has its own folder first on sys.path, not the checkout: PYTHONPATH makes it import
    # this checkout's zvl_ds even where the environment's editable install points at another copy
    env = dict(child_env(), PYTHONPATH=os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")])))
    targets = sorted({help_target(*script_of(shlex.split(command))) for _, command in COMMANDS
                      if script_of(shlex.split(command))[0]})
    return run_side_by_side({target: help_command(target) + ["--help"] for target in targets}, HELP_TIMEOUT_S,
                            cwd=REPO_ROOT, env=env)


def help_text(target):
    done = help_results()[target]
    assert done.returncode == 0, f"{' '.join(target)} --help failed: {done.stderr[-1000:]}"
    return done.stdout


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
    usage = help_text(help_target(script, args))
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
