"""End-to-end tests: train.py and the tools run under their launchers as a user runs them, and the commands of
README.md and docs/."""
