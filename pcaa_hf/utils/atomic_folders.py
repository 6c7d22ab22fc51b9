"""Folders written so that a reader never sees them half-written and a failure never loses the previous version.

Files are written under a temporary name or in a staging folder, flushed to disk (`os.fsync`), then renamed into
place: after a crash or power loss a folder is either its old or its new self. A manifest (`manifest.json`: every
file's size and SHA-256) lets a reader check later that nothing was truncated or changed since.
"""

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from safetensors import SafetensorError

MANIFEST = "manifest.json"


def sync_file(path):
    """Flush `path` (a file or a folder's entries) from the page cache to the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def sync_folder(folder):
    """Flush every file under `folder`, then the folders themselves (their entries: the files' names)."""
    for root, _, files in os.walk(folder, topdown=False):
        for name in files:
            sync_file(os.path.join(root, name))
        sync_file(root)


def write_bytes_durably(path, data):
    """Write `data` to `path` and flush it to disk. Failures (a full disk: ENOSPC) are `OSError`s naming `path`."""
    with open(path, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def remove_interrupted_writes(output):
    """
    Clean up after a process killed inside `write_folder_atomically(..., output)`: its staging folders are removed;
    a previous version moved aside is put back when `output` itself is missing (killed between the two renames),
    removed otherwise. Returns the names of the folders removed or restored.
    """
    output = Path(output)
    cleaned = []
    for leftover in sorted(output.parent.glob(f".{output.name}.new.*")):
        shutil.rmtree(leftover, ignore_errors=True)
        cleaned.append(leftover.name)
    for previous in sorted(output.parent.glob(f".{output.name}.old.*")):
        if output.exists():
            shutil.rmtree(previous, ignore_errors=True)
        else:
            os.replace(previous, output)
        cleaned.append(previous.name)
    return cleaned


def write_error(output, error, outcome="it was left as it was"):
    """
    An `OSError` (with the cause's errno) saying that writing `output` failed, why, and what `outcome` the reader
    can count on; safetensors reports a full disk as its own error type, which becomes this too.
    """
    code = getattr(error, "errno", None)
    if code is None and (found := re.search(r"os error (\d+)", str(error))):
        code = int(found[1])
    failure = OSError(f"Could not write {output} ({error}); {outcome}.")
    failure.errno = code  # set after: OSError(code, message) would print "[Errno 28]" before the message
    return failure


def write_folder_atomically(write, output, overwrite=False):
    """
    Call `write(folder)` on a fresh sibling folder of `output` (it writes and checks the contents), flush it to disk,
    then move the result into place. With `overwrite`, an existing non-empty `output` is replaced only once the new
    folder is complete; if anything fails, `output` is left as it was and the staging folder is removed: a failure to
    write (a full disk) is an `OSError` naming `output` and the cause. Returns the resolved `output` path.
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
        sync_folder(staging)
        if output.exists():
            previous = Path(tempfile.mkdtemp(prefix=f".{output.name}.old.", dir=output.parent))
            os.replace(output, previous)
        os.replace(staging, output)
        sync_file(output.parent)
    except BaseException as error:
        if previous is not None and not output.exists():
            os.replace(previous, output)
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, (OSError, SafetensorError)):
            raise write_error(output, error) from error
        raise
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)
    return output


def write_json_atomically(path, data):
    """Write `data` as indented JSON to `path` through a partial file flushed to disk and renamed into place."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    try:
        write_bytes_durably(partial, (json.dumps(data, indent=2) + "\n").encode())
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(path)
    sync_file(path.parent)


def file_digest(path):
    """The SHA-256 of a file's contents, as hex."""
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def write_manifest(folder):
    """Record the size and SHA-256 of every file in `folder` (subfolders included) in `folder/manifest.json`."""
    folder = Path(folder)
    files = {str(path.relative_to(folder)): {"size": path.stat().st_size, "sha256": file_digest(path)}
             for path in sorted(folder.rglob("*")) if path.is_file() and path.name != MANIFEST}
    write_bytes_durably(folder / MANIFEST, (json.dumps({"files": files}, indent=2) + "\n").encode())


def manifest_problems(folder):
    """
    What makes `folder` differ from its manifest, one line each naming the file ([] when it is intact): a missing
    or unreadable manifest, a missing file, another size or content, a file the manifest does not list.
    """
    folder = Path(folder)
    try:
        listed = json.loads((folder / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return [f"{folder / MANIFEST} is missing"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return [f"{folder / MANIFEST} is unreadable ({error})"]
    if not (isinstance(listed, dict) and all(isinstance(entry, dict) and {"size", "sha256"} <= entry.keys()
                                             for entry in listed.values())):
        return [f"{folder / MANIFEST} does not list files with their size and sha256"]
    problems = []
    for name, expected in listed.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif path.stat().st_size != expected["size"]:
            problems.append(f"{path} has {path.stat().st_size} bytes instead of {expected['size']} (truncated?)")
        elif file_digest(path) != expected["sha256"]:
            problems.append(f"{path} has other contents than when it was written (checksum mismatch)")
    unlisted = [path for path in sorted(folder.rglob("*"))
                if path.is_file() and path.name != MANIFEST and str(path.relative_to(folder)) not in listed]
    problems += [f"{path} is not in the manifest (added later)" for path in unlisted]
    return problems
