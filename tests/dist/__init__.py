"""Multi-process tests: real gloo workers (tests.helpers.dist_utils) and torchrun, checked against one process."""
