"""Where the repository is, for tests that read its files or run its entry points."""
import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
