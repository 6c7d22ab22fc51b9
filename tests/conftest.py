"""
Settings for every test, the `slow` marker, and session fixtures shared by test files.

The session fixtures are built once per run, on first use, and are read-only for the tests: a test that writes into
one works on `pcaa_testing.writable_copy(<fixture>, tmp_path / ...)`. A test that changes one anyway fails at its
teardown, naming the fixture. Their parameters are in pcaa_testing (CITYSCAPES_TREE, ADE20K_TREE, SMALL_PCAA_*).
"""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from pcaa_testing import ADE20K_TREE, CITYSCAPES_TREE, save_small_pcaa, tree_fingerprint


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a longer test (deselect with -m 'not slow')")


# name -> (folder, fingerprint when built) of each session fixture built so far.
_READ_ONLY_FIXTURES = {}


def _read_only(name, folder):
    _READ_ONLY_FIXTURES[name] = (folder, tree_fingerprint(folder))
    return folder


@pytest.fixture(autouse=True)
def _session_fixtures_stay_unchanged(request):
    """After each test, check that the session fixtures it used are as they were built."""
    yield
    for name in request.fixturenames:
        if name in _READ_ONLY_FIXTURES:
            folder, fingerprint = _READ_ONLY_FIXTURES[name]
            assert tree_fingerprint(folder) == fingerprint, (
                f"this test changed the session fixture {name} ({folder}); write into "
                f"pcaa_testing.writable_copy({name}, tmp_path / ...) instead")


@pytest.fixture(scope="session")
def cityscapes_tree(tmp_path_factory):
    """Generated Cityscapes tree (leftImg8bit/, gtFine/ labelIds): 4 train, 2 val, 1 test frames of 128x64, seed 0."""
    from pcaa_hf.data.synthetic import write_cityscapes_tree

    root = tmp_path_factory.mktemp("cityscapes_tree")
    write_cityscapes_tree(root, **CITYSCAPES_TREE)
    return _read_only("cityscapes_tree", root)


@pytest.fixture(scope="session")
def ade20k_tree(tmp_path_factory):
    """Generated ADE20K tree under <tree>/ADEChallengeData2016: 3 training, 2 validation images of ~96x64, seed 0."""
    from pcaa_hf.data.synthetic import write_ade20k_tree

    root = tmp_path_factory.mktemp("ade20k_tree")
    write_ade20k_tree(root, **ADE20K_TREE)
    return _read_only("ade20k_tree", root)


@pytest.fixture(scope="session")
def small_pcaa_folder(tmp_path_factory):
    """Saved small PCAA (small_labelled_model(): 5 named labels, randomised weights, seed 3) + PCAAImageProcessor()."""
    folder = save_small_pcaa(tmp_path_factory.mktemp("small_pcaa") / "pcaa-model")
    return _read_only("small_pcaa_folder", folder)
