"""Folders written so that a reader never sees them half-written and a failure never loses the previous version."""

import json
import os
import shutil
import tempfile
from pathlib import Path


def write_folder_atomically(write, output, overwrite=False):
    """
    Call `write(folder)` on a fresh sibling folder of `output` (it writes and checks the contents), then move the
    result into place. With `overwrite`, an existing non-empty `output` is replaced only once the new folder is
    complete; if anything fails, `output` is left as it was. Returns the resolved `output` path.
    """
    output = Path(output).resolve()
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"{output} exists and is not a folder.")
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise FileExistsError(f"{output} exists and is not empty; choose another output folder or overwrite it.")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.new.", dir=output.parent))
    previous = None
    try:
        # mkdtemp creates the folder private (0700); give it the permissions a plain mkdir would.
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)
        write(staging)
        if output.exists():
            previous = Path(tempfile.mkdtemp(prefix=f".{output.name}.old.", dir=output.parent))
            os.replace(output, previous)
        os.replace(staging, output)
    except BaseException:
        if previous is not None and not output.exists():
            os.replace(previous, output)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)
    return output


def write_json_atomically(path, data):
    """Write `data` as indented JSON to `path` through a partial file renamed into place."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=2) + "\n")
    partial.replace(path)
