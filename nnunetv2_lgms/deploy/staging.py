"""Write a folder's content next to it and move it into place only when complete, so that a failure (an error, a
killed process) never leaves a half-written output behind in the place the user named."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def _default_dir_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


@contextlib.contextmanager
def staged(target: Path, replace: bool) -> Iterator[Path]:
    """Yield an empty staging folder beside ``target``. When the block succeeds, ``target`` becomes the staging
    folder's content: the whole folder is swapped in (``replace=True``, an existing ``target`` is deleted) or its
    entries are moved into ``target`` (``replace=False``, same-named entries replaced, others kept). When the block
    raises, the staging folder is deleted and ``target`` is untouched."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        yield staging
        staging.chmod(_default_dir_mode())  # mkdtemp makes it private; the result is an ordinary folder
        if not target.exists():
            staging.rename(target)
        elif replace:
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            target.rename(old / "previous")
            staging.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            for item in staging.iterdir():
                destination = target / item.name
                if destination.is_dir() and not destination.is_symlink():
                    shutil.rmtree(destination)
                os.replace(item, destination)
            staging.rmdir()
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
