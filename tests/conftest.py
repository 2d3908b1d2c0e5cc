import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(__file__))  # tests/dist_utils.py and friends

import zvl_ds  # noqa: E402,F401  (applies the torchvision shim before timm/transformers are imported)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
