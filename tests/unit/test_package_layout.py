"""How the package starts: module names that cannot shadow other packages, one console script per tool, and an
inference module free of DeepSpeed and training code."""
import configparser
import importlib
import importlib.machinery
import json
import os
import pkgutil
import subprocess
import sys

import pytest

from tests.helpers.paths import REPO_ROOT

PACKAGE_DIR = os.path.join(REPO_ROOT, "zvl_ds")


def _outside_paths():
    """sys.path without this checkout and the package folder: where installed and standard modules live."""
    ours = {os.path.realpath(REPO_ROOT), os.path.realpath(PACKAGE_DIR), os.path.realpath(os.getcwd())}
    return [p for p in sys.path if p and os.path.realpath(p) not in ours]


def importable_elsewhere(name: str) -> bool:
    """Whether ``import name`` would find something other than zvl_ds's own module of that name."""
    if name in sys.builtin_module_names or name in getattr(sys, "stdlib_module_names", ()):
        return True
    return importlib.machinery.PathFinder.find_spec(name, _outside_paths()) is not None


def test_the_check_sees_installed_and_standard_modules():
    assert importable_elsewhere("torch") and importable_elsewhere("webdataset")  # site-packages
    assert importable_elsewhere("json") and importable_elsewhere("sys")  # standard library and built-in
    assert not importable_elsewhere("zvl_ds_no_such_module_anywhere")


def test_no_top_level_module_is_named_like_another_importable_module():
    """``deepspeed zvl_ds/train.py`` puts zvl_ds/ first on sys.path: a module there named like an installed
    package (an ``evaluate.py`` next to Hugging Face's ``evaluate``) would be imported in its place."""
    names = [module.name for module in pkgutil.iter_modules([PACKAGE_DIR])]
    assert "train" in names and "data" in names  # modules and packages are both listed
    clashes = [name for name in names if importable_elsewhere(name)]
    assert clashes == [], f"zvl_ds/ modules named like installed or standard modules: {clashes}"


def test_no_module_edits_sys_path():
    offenders = []
    for root, _, files in os.walk(PACKAGE_DIR):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                with open(path, encoding="utf-8") as handle:
                    text = handle.read()
                if "sys.path.insert" in text or "sys.path[:]" in text or "sys.path.pop" in text or "E402" in text:
                    offenders.append(os.path.relpath(path, REPO_ROOT))
    assert offenders == []


def console_scripts():
    parser = configparser.ConfigParser()
    parser.read(os.path.join(REPO_ROOT, "setup.cfg"))
    lines = [line for line in parser["options.entry_points"]["console_scripts"].splitlines() if line.strip()]
    return dict((part.strip() for part in line.split("=", 1)) for line in lines)


def test_every_console_script_is_zvl_dash_its_module_and_runs_it_through_cli():
    scripts = console_scripts()
    assert {"zvl-train", "zvl-make-shards", "zvl-eval-retrieval", "zvl-export", "zvl-classify"} <= set(scripts)
    for script, target in scripts.items():
        module_name, function = target.split(":")
        assert function == "cli", target
        parts = module_name.split(".")
        tool = parts[-2] if parts[-1] == "__main__" else parts[-1]  # a package tool's command is its __main__
        assert script == "zvl-" + tool.replace("_", "-"), (script, target)
        module = importlib.import_module(module_name)
        assert callable(module.cli)
        with open(module.__file__, encoding="utf-8") as handle:
            assert 'if __name__ == "__main__":\n    sys.exit(cli())' in handle.read(), module_name


@pytest.mark.slow  # a fresh interpreter importing torch, timm and transformers: about 5 s
def test_inference_imports_no_deepspeed_and_no_training_code():
    # a fresh interpreter: this one has imported everything already. It also builds a model without adapters, which
    # must not import the optional peft (zvl_ds.model.adapters imports it only for a tower with lora)
    code = ("import sys, json, zvl_ds.model.inference; from zvl_ds.config import load_config; "
            "from zvl_ds.model.build import build_model; cfg = load_config(None, ['model.arch=tiny']); "
            "build_model(cfg.model, cfg.loss); print(json.dumps(sorted(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = set(json.loads(done.stdout.strip().splitlines()[-1]))
    assert "zvl_ds.model.inference" in loaded and "zvl_ds.model.dual_encoder" in loaded
    training = {"deepspeed", "zvl_ds.objective.step", "zvl_ds.runtime.engine", "zvl_ds.runtime.checkpoint",
                "zvl_ds.model.saved_run", "zvl_ds.runtime.optim", "zvl_ds.train", "zvl_ds.observe.monitor"}
    assert sorted(training & loaded) == []
    assert "peft" not in loaded


@pytest.mark.parametrize("name", ["load_model", "ZvlModel"])
def test_the_package_exposes_the_inference_api(name):
    import zvl_ds
    import zvl_ds.model.inference

    assert getattr(zvl_ds, name) is getattr(zvl_ds.model.inference, name)
    with pytest.raises(AttributeError):
        zvl_ds.no_such_name  # noqa: B018
