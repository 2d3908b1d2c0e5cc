"""The test suite, a package so that tests import their helpers as ``tests.helpers.<module>``.

Kinds live in folders, and tests/conftest.py marks each test by its folder: ``unit/`` (one process),
``dist/`` (real processes: gloo workers, torchrun), ``e2e/`` (the entry points and tools run as a user runs
them, and the commands of README.md and docs/). ``helpers/`` holds what several tests share.
"""
