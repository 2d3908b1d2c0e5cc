"""``python tools/make_shards.py ...``: the shard writer as the workflow's first command names it, from the
repository root. The same tool as ``python -m zvl_ds.make_shards`` (``--help`` for its options); this script only
calls it, so zvl_ds must be installed (``bash tools/install.sh``)."""
import sys

try:
    from zvl_ds.make_shards import cli
except ModuleNotFoundError as error:
    missing = "zvl_ds is not installed" if error.name == "zvl_ds" else f"zvl_ds needs {error.name}, which is missing"
    print(f"error: {missing} in this Python ({sys.executable}). Install it with `bash tools/install.sh`, then run "
          f"`.venv/bin/python tools/make_shards.py ...` (or `python -m zvl_ds.make_shards ...` in that environment).",
          file=sys.stderr)
    sys.exit(2)

if __name__ == "__main__":
    sys.exit(cli())
