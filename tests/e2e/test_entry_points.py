"""Every way a user starts zvl_ds works: ``python zvl_ds/train.py`` (the launcher's script path, which puts zvl_ds/
first on sys.path), ``python -m zvl_ds.train`` and ``python -m zvl_ds.<tool>`` for every tool."""
import os
import subprocess
import sys

from tests.helpers.paths import REPO_ROOT
from tests.unit.test_package_layout import console_scripts

TIMEOUT_S = 300  # interpreters importing torch and DeepSpeed side by side on a shared 2-core machine


def _start(command):
    env = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _finish(process):
    try:
        out, err = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
    return process.returncode, out, err


def test_every_entry_point_answers_help():
    modules = [target.split(":")[0] for target in console_scripts().values()]
    commands = {"zvl_ds/train.py": [sys.executable, os.path.join("zvl_ds", "train.py"), "--help"]}
    commands.update({module: [sys.executable, "-m", module, "--help"] for module in modules})
    processes = {name: _start(command) for name, command in commands.items()}  # side by side: each is seconds
    for name, process in processes.items():
        code, out, err = _finish(process)
        assert code == 0, f"{name}: exit {code}\n{err[-2000:]}"
        assert "usage:" in out, name
        assert "Traceback" not in err, name


def test_train_script_path_reports_a_bad_config_with_exit_2():
    """Run by its path (as ``deepspeed zvl_ds/train.py`` does), train reaches its own error handling."""
    code, _, err = _finish(_start([sys.executable, os.path.join("zvl_ds", "train.py"), "--cfg", "no_such.yaml"]))
    assert code == 2, err[-2000:]
    assert "no_such.yaml" in err and "Traceback" not in err
