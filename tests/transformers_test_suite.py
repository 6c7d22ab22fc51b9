"""
transformers' shared test mixins (`ModelTesterMixin`, `ConfigTester`, `ImageProcessingTestMixin`, ...), taken from the
source distribution of the installed transformers version on the package registry, never from the Hub.

The sdist ships `tests/*.py` but not four modules they import; those are replaced by stand-ins (see `STAND_INS`).
The unpacked files are cached per version in `PCAA_TEST_CACHE` (default `~/.cache/pcaa_hf`), so the registry is asked
once per machine and version.
"""

import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import transformers

PACKAGE = "transformers_tests"

# The modules that transformers' tests/*.py import but its sdist leaves out (paths in the cache), with their stand-ins.
STAND_INS = {
    # Its export tests run transformers' exporters on every model; tests/test_export.py runs them on PCAA instead.
    f"{PACKAGE}/exporters/test_export.py": (
        "class ExportTesterMixin:\n"
        '    """Stand-in: the sdist lacks tests/exporters/test_export.py; see pcaa_hf\'s tests/test_export.py."""\n'
    ),
    # Only generative models mix it in; ModelTesterMixin merely checks that PCAA does not.
    f"{PACKAGE}/generation/test_utils.py": (
        "class GenerationTesterMixin:\n"
        '    """Stand-in: the sdist lacks tests/generation/test_utils.py (generate() tests, not for PCAA)."""\n'
    ),
    # Read only by ConfigTester.check_config_arguments_init, which returns early for configs with sub-configs (PCAA's).
    f"{PACKAGE}/utils/test_configuration_utils.py": (
        '"""Stand-in: the sdist lacks tests/utils/test_configuration_utils.py."""\n'
        "config_common_kwargs = {}\n"
    ),
    # Imported from `<tests>/../utils` by the image-processing tests: a Hub fixture URL -> a local copy when CI has
    # fetched one. Nothing is fetched here, so every URL stays as it is (and those few tests need the network).
    "utils/fetch_hub_objects_for_ci.py": (
        '"""Stand-in: the sdist lacks utils/fetch_hub_objects_for_ci.py."""\n\n\n'
        "def url_to_local_path(url):\n"
        "    return url\n"
    ),
}


def cache_root() -> Path:
    root = Path(os.environ.get("PCAA_TEST_CACHE", Path.home() / ".cache" / "pcaa_hf"))
    return root / f"transformers-{transformers.__version__}-tests"


def download_shared_tests(destination: Path) -> None:
    """Unpack `tests/*.py` of the installed version's sdist into `destination/PACKAGE`, with the stand-ins."""
    version = transformers.__version__
    destination.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=destination) as scratch:
        scratch = Path(scratch)
        command = [sys.executable, "-m", "pip", "download", f"transformers=={version}", "--no-binary", ":all:",
                   "--no-deps", "--quiet", "-d", str(scratch)]
        result = subprocess.run(command, capture_output=True, text=True)
        archives = list(scratch.glob("transformers-*.tar.gz"))
        if result.returncode != 0 or not archives:
            raise RuntimeError(f"Could not download the sdist of transformers {version} from the package registry "
                               f"(its tests/ hold the shared test mixins): {result.stderr.strip()}")
        package = scratch / PACKAGE
        package.mkdir()
        prefix = f"transformers-{version}/tests/"
        with tarfile.open(archives[0]) as archive:
            for member in archive.getmembers():
                name = member.name[len(prefix):] if member.name.startswith(prefix) else None
                if member.isfile() and name and "/" not in name and name.endswith(".py"):
                    (package / name).write_bytes(archive.extractfile(member).read())
        if not (package / "test_modeling_common.py").exists():
            raise RuntimeError(f"The sdist of transformers {version} has no tests/test_modeling_common.py.")
        (package / "__init__.py").write_text("")
        for relative, source in STAND_INS.items():
            path = scratch / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            (path.parent / "__init__.py").touch()
            path.write_text(source)
        # Renamed into place last, the package's presence means that everything is there (a `utils` without it is
        # left from an interrupted run).
        shutil.rmtree(destination / "utils", ignore_errors=True)
        (scratch / "utils").rename(destination / "utils")
        package.rename(destination / PACKAGE)


def import_shared_tests(module: str):
    """`transformers_tests.<module>` from the cache, downloading the sdist the first time."""
    root = cache_root()
    if not (root / PACKAGE / "test_modeling_common.py").exists():
        download_shared_tests(root)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module(f"{PACKAGE}.{module}")
