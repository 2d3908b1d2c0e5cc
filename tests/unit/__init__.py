"""Single-process tests: no process group, no launcher (a few run a command line once in a subprocess)."""
