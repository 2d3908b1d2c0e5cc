"""The environment of a child process that a test starts (an entry point, torchrun, the deepspeed launcher)."""
import os
import shutil
import subprocess

from tests.helpers.paths import REPO_ROOT


def child_env():
    """This process's environment for a child: offline (no hub), on the CPU, one thread per process, unbuffered
    output, without a rank of its own (the child's launcher sets RANK and WORLD_SIZE), and importing zvl_ds from
    this checkout (a script run by its path otherwise finds whichever zvl_ds is installed)."""
    path = os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH", "")) if p)
    variables = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                     DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    variables.pop("RANK", None)
    variables.pop("WORLD_SIZE", None)
    return variables


def run_side_by_side(commands, timeout, **options):
    """Run every command of ``{key: command}`` at once (each is mostly an interpreter's start-up, which the two
    cores share better than a queue of them) and return ``{key: subprocess.CompletedProcess}`` with text output.
    A command still running after ``timeout`` seconds is killed and returns what it printed."""
    started = {key: subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **options)
               for key, command in commands.items()}
    finished = {}
    for key, process in started.items():
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
        finished[key] = subprocess.CompletedProcess(process.args, process.returncode, out, err)
    return finished


def ssh_to_localhost_works():
    """pdsh and passwordless ssh to localhost, which a multi-node (hostfile) launch on one machine needs; CI sets them
    up (tools/ci_ssh_localhost.sh), a developer's machine may not have them."""
    if not shutil.which("pdsh") or not shutil.which("ssh"):
        return False
    for host in ("localhost", "127.0.0.1"):
        probe = subprocess.run(["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o",
                                "ConnectTimeout=5", host, "true"], capture_output=True, timeout=30)
        if probe.returncode != 0:
            return False
    return True
