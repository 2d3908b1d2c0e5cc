"""Pin the environment this interpreter runs in: the lock files that tools/regenerate_constraints.sh writes.

    python tools/pin_environment.py --root . --constraints constraints.txt --wheel-list tools/gpu_report_requirements.txt
    python tools/pin_environment.py --compare OLD.txt NEW.txt       # the versions that moved between two locks

``constraints.txt`` pins every installed distribution (torch without its local build label). The wheel list is the
dependency closure of the package's ``install_requires`` plus ``open_clip_torch`` (what ``python -m zvl_ds.bench
gpu-report`` runs), at the very versions of ``constraints.txt``; torch, torchvision, triton and ``nvidia-*`` are
the GPU machine's own and left out. ``tests/unit/test_gpu_report.py`` checks the two files against each other.
"""
from __future__ import annotations

import argparse
import configparser
import importlib.metadata as metadata
import os
import sys
from typing import Dict, Iterable, Set

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

# the GPU machine brings its own CUDA builds of these
GPU_MACHINE_OWN = {"torch", "torchvision", "triton"}
# not part of the environment being pinned: the installer, and the project itself (installed editable)
NOT_PINNED = {"pip", "zvl-ds"}

CONSTRAINTS_HEADER = """\
# The full lock of the tested environment: every package the project, its extras and its tests install, pinned.
# tools/install.sh and CI install against it, so a fresh clone tests what was tested whatever the registry has
# released since. Written by tools/regenerate_constraints.sh from the hand pins of tools/constraints.in (torch,
# torchvision, deepspeed); regenerate deliberately, run the tests, and commit. `pip install -e .` alone still
# resolves the newest releases for users who want them.
"""

WHEEL_LIST_HEADER = """\
# The packages tools/gpu_report.sh needs on a GPU machine beyond torch and torchvision: zvl_ds's own
# requirements, OpenCLIP's training loop (open_clip_torch) and every dependency they pull in, at the versions of
# constraints.txt. tools/gpu_report_bundle.sh downloads them as wheels. Written by tools/regenerate_constraints.sh
# (tools/pin_environment.py); tests/unit/test_gpu_report.py checks it against constraints.txt.
"""


def installed_versions() -> Dict[str, str]:
    """canonical name -> version of every distribution this interpreter imports (local build labels dropped).

    A venv that sees the system's site-packages can hold two copies of one package: the first on ``sys.path``
    (the venv's own) is the one imported, and the one pinned."""
    versions: Dict[str, str] = {}
    for dist in metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        if name not in NOT_PINNED:
            versions.setdefault(name, dist.version.split("+")[0])
    return versions


def install_requires(root: str) -> list:
    """The requirement names of setup.cfg's ``install_requires``."""
    parser = configparser.ConfigParser()
    parser.read(os.path.join(root, "setup.cfg"), encoding="utf-8")
    lines = [line.strip() for line in parser["options"]["install_requires"].splitlines() if line.strip()]
    return [Requirement(line).name for line in lines]


def dependency_closure(roots: Iterable[str], skip: Set[str]) -> Set[str]:
    """Every distribution that ``roots`` need, by the installed metadata (markers evaluated here, no extras)."""
    found: Set[str] = set()
    stack = [canonicalize_name(name) for name in roots]
    while stack:
        name = stack.pop()
        if name in found or name in skip or name.startswith("nvidia-"):
            continue
        found.add(name)
        for line in metadata.distribution(name).requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                stack.append(canonicalize_name(requirement.name))
    return found


def read_pins(path: str) -> Dict[str, str]:
    """canonical name -> version of a file of ``name==version`` lines (comments and blank lines skipped)."""
    pins = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.split("#", 1)[0].strip()
            if line:
                name, _, version = line.partition("==")
                pins[canonicalize_name(name)] = version.strip()
    return pins


def write_pins(path: str, header: str, pins: Dict[str, str]) -> None:
    body = "".join(f"{name}=={pins[name]}\n" for name in sorted(pins))
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(header + body)
    os.replace(temporary, path)


def compare(old_path: str, new_path: str) -> None:
    old, new = read_pins(old_path), read_pins(new_path)
    moved = [f"  {name}: {old[name]} -> {new[name]}" for name in sorted(old.keys() & new.keys()) if old[name] != new[name]]
    added = [f"  {name}=={new[name]}" for name in sorted(new.keys() - old.keys())]
    removed = [f"  {name}=={old[name]}" for name in sorted(old.keys() - new.keys())]
    for title, lines in (("moved", moved), ("added", added), ("removed", removed)):
        print(f"{title}: {len(lines)}")
        print("\n".join(lines)) if lines else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    parser.add_argument("--constraints")
    parser.add_argument("--wheel-list")
    parser.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"))
    args = parser.parse_args(argv)
    if args.compare:
        compare(*args.compare)
        return 0
    versions = installed_versions()
    if args.constraints:
        write_pins(args.constraints, CONSTRAINTS_HEADER, versions)
        print(f"{args.constraints}: {len(versions)} packages pinned")
    if args.wheel_list:
        closure = dependency_closure(install_requires(args.root) + ["open_clip_torch"], GPU_MACHINE_OWN)
        write_pins(args.wheel_list, WHEEL_LIST_HEADER, {name: versions[name] for name in closure})
        print(f"{args.wheel_list}: {len(closure)} packages")
    return 0


if __name__ == "__main__":
    sys.exit(main())
