import logging
import os

import pytest

import zvl_ds  # noqa: F401  (applies the torchvision shim before any test imports timm or transformers)

# zvl_ds itself imports only torch; these must be set before a test imports transformers or DeepSpeed
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# A test's kind is the folder it lives in, so a new file is marked by where it is put.
KIND_BY_FOLDER = {"unit": pytest.mark.unit, "dist": pytest.mark.dist, "e2e": pytest.mark.e2e}
# every multi-process and end-to-end test starts fresh interpreters that import torch and DeepSpeed (about 4 s of
# CPU each, before any work): none of them fits the fast subset
SLOW_FOLDERS = {"dist", "e2e"}
TESTS_ROOT = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(config, items):
    for item in items:
        folder = os.path.relpath(str(item.path), TESTS_ROOT).split(os.sep)[0]
        if folder not in KIND_BY_FOLDER:
            raise pytest.UsageError(f"{item.nodeid}: tests live in tests/unit, tests/dist or tests/e2e "
                                    f"(the folder is the test's kind)")
        item.add_marker(KIND_BY_FOLDER[folder])
        if folder in SLOW_FOLDERS:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _restore_zvl_ds_logger():
    """A test that calls an entry point's main() in-process lets it configure the ``zvl_ds`` logger (its own
    handlers, no propagation); later tests that read log records through caplog need it as it was."""
    logger = logging.getLogger("zvl_ds")
    handlers, propagate, level = list(logger.handlers), logger.propagate, logger.level
    yield
    logger.handlers[:] = handlers
    logger.propagate = propagate
    logger.setLevel(level)


# CI (.ci/run) sets this: there a test skipped because a package does not import (pytest.importorskip) fails
# instead, since tools/install.sh --test installs every test dependency and a missing one is a broken install.
REQUIRE_TEST_DEPS = os.environ.get("ZVL_REQUIRE_TEST_DEPS") == "1"


def _missing_dependency(report) -> str:
    """The skip message of a report skipped by ``pytest.importorskip``, else ""."""
    if not report.skipped or not isinstance(report.longrepr, tuple):
        return ""
    message = str(report.longrepr[2])
    return message if "could not import" in message else ""


def _fail_missing_dependency(report) -> None:
    message = _missing_dependency(report)
    if REQUIRE_TEST_DEPS and message:
        report.outcome = "failed"
        report.longrepr = (f"{message}: a test dependency is missing and ZVL_REQUIRE_TEST_DEPS=1 (CI); "
                           "install them with bash tools/install.sh --test")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_missing_dependency(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield  # a module-level importorskip skips the whole file at collection
    _fail_missing_dependency(outcome.get_result())
