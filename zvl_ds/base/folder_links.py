"""One rule for the folders zvl_ds reads files from (an image folder, a model folder): a file is read only where it
lies inside the folder once symbolic links are resolved. A link that leads out of the folder reads a file nobody
handed over (the data names the folder, not the machine), so it is refused unless the user opts in: make_shards's
``--allow-outside-images`` for images, ``model.allow_outside_files`` / ``--allow-outside-model-files`` /
``load_model(..., allow_outside_files=True)`` for model folders.

A Hugging Face cache snapshot (``models--org--name/snapshots/<revision>/``) is made of links into its repository's
``blobs/`` folder, which is how the hub leaves a download: those count as inside.
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple, Type

HUB_SNAPSHOTS = "snapshots"  # huggingface_hub's cache layout: <repo>/snapshots/<revision>/<file> -> <repo>/blobs/<id>
HUB_BLOBS = "blobs"


def _inside(real: str, root: str) -> bool:
    return os.path.commonpath([real, root]) == root


def folder_roots(folder: str) -> List[str]:
    """Where a folder's files may lead: the folder itself, and for a hub cache snapshot its repository's blobs."""
    root = os.path.realpath(folder)
    roots = [root]
    parent = os.path.dirname(root)
    if os.path.basename(parent) == HUB_SNAPSHOTS:
        roots.append(os.path.join(os.path.dirname(parent), HUB_BLOBS))
    return roots


def outside_target(path: str, folder: str, roots: Optional[Sequence[str]] = None) -> Optional[str]:
    """Where ``path`` really leads when that is outside ``folder`` (links resolved), else None."""
    real = os.path.realpath(path)
    return None if any(_inside(real, root) for root in (roots or folder_roots(folder))) else real


def links_leaving(folder: str) -> List[Tuple[str, str]]:
    """(entry, where it leads) for every entry under ``folder`` (sub-folders included, linked ones not entered) that
    is a symbolic link leading out of it; sorted by entry."""
    roots = folder_roots(folder)
    found = []
    for current, folders, files in os.walk(folder):
        for name in folders + files:
            path = os.path.join(current, name)
            if os.path.islink(path):
                target = outside_target(path, folder, roots)
                if target is not None:
                    found.append((path, target))
    return sorted(found)


def refuse_links_leaving(folder: str, opt_in: str, error_type: Type[Exception], where: str = "") -> None:
    """Raise ``error_type`` naming the first entry of ``folder`` that is a link leading out of it, and how the user
    accepts such links (``opt_in``)."""
    leaving = links_leaving(folder)
    if not leaving:
        return
    path, target = leaving[0]
    more = f" (and {len(leaving) - 1} more such link(s))" if len(leaving) > 1 else ""
    raise error_type(f"{where}{path} is a link to {target}, outside the model folder {folder}{more}: not read (a "
                     f"link may not lead out of a model folder; {opt_in} accepts it)")
