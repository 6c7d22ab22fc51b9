"""The package's house rules: the model folder is exactly the remote code, imports flow down the layers and never in
a cycle, and folders saved before the subpackage layout still load, with the package and as remote code."""

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import PIL.Image
import pytest
import torch
from transformers import AutoModelForSemanticSegmentation, pipeline

import pcaa_hf
from pcaa_hf import PCAAForSemanticSegmentation
from pcaa_hf.model import REMOTE_CODE_FILES

PACKAGE = Path(pcaa_hf.__file__).parent
# Bottom to top: a subpackage imports only from those before it (and itself).
LAYERS = ("utils", "model", "data", "inference", "evaluation", "conversion", "publishing", "training", "benchmarks",
          "cli")
SAVED_BEFORE_LAYOUT = Path(__file__).parent / "fixtures" / "saved_before_layout"


def imported_modules(path):
    """The pcaa_hf modules a file imports, as dotted names (relative imports resolved)."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names += [base] + [f"{base}.{alias.name}" for alias in node.names]
    return [name for name in names if name == "pcaa_hf" or name.startswith("pcaa_hf.")]


def layer_of(module):
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def test_every_subpackage_has_a_layer():
    subpackages = {path.parent.name for path in PACKAGE.glob("*/__init__.py")} - {"model_cards"}
    assert subpackages == set(LAYERS)
    assert [path.name for path in PACKAGE.glob("*.py")] == ["__init__.py"]


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda path: str(path.relative_to(PACKAGE)))
def test_imports_flow_down_the_layers(path):
    layer = layer_of(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts))
    if layer is None:
        return  # pcaa_hf/__init__.py: the public names, on top of everything
    for module in imported_modules(path):
        imported = layer_of(module)
        if module.startswith("pcaa_hf.model_cards"):
            imported = "publishing"  # package data, read by publishing.model_cards
        if imported is None:
            # Only `import pcaa_hf` (the Auto class registration); never the public names built on top.
            assert module == "pcaa_hf", f"{path.relative_to(PACKAGE)} imports {module} from the top level"
            continue
        assert LAYERS.index(imported) <= LAYERS.index(layer), f"{path.relative_to(PACKAGE)} imports {module} upward"


def test_the_model_folder_holds_exactly_the_remote_code_files():
    folder = PACKAGE / "model"
    assert {path.name for path in folder.glob("*.py")} - {"__init__.py"} == set(REMOTE_CODE_FILES)
    for name in REMOTE_CODE_FILES:  # relative imports within the folder only: they travel together
        imports = imported_modules(folder / name)
        assert all(module.startswith("pcaa_hf.model.") for module in imports), (name, imports)


# Run where pcaa_hf cannot be imported: the folder's own (pre-layout) code initialises, saves and runs the model.
OLD_CODE_SCRIPT = """
import importlib.abc, json, sys
import PIL.Image, torch

class BlockPCAA(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "pcaa_hf" or name.startswith("pcaa_hf."):
            raise ImportError("pcaa_hf is blocked in this process")

sys.meta_path.insert(0, BlockPCAA())
from transformers import AutoConfig, AutoModelForSemanticSegmentation, pipeline

folder = sys.argv[1]
config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
torch.manual_seed(0)
model = AutoModelForSemanticSegmentation.from_config(config, trust_remote_code=True).eval()
model.save_pretrained(folder)
torch.manual_seed(1)
pixel_values = torch.randn(2, 3, 72, 88)
with torch.no_grad():
    logits = model(pixel_values).logits
segments = pipeline("image-segmentation", model=folder, trust_remote_code=True)(PIL.Image.new("RGB", (88, 72), "gray"))
print(json.dumps({"module": type(model).__module__, "logits": logits.flatten().tolist(),
                  "labels": sorted(segment["label"] for segment in segments)}))
"""


def test_a_folder_saved_before_the_layout_loads_with_the_package_and_as_remote_code(tmp_path):
    folder = tmp_path / "pcaa-before-layout"
    shutil.copytree(SAVED_BEFORE_LAYOUT, folder)
    environment = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    completed = subprocess.run([sys.executable, "-c", OLD_CODE_SCRIPT, str(folder)], capture_output=True, text=True,
                               env=environment, cwd=tmp_path, timeout=600)
    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert report["module"].startswith("transformers_modules.")  # the folder's own code
    assert report["labels"]
    torch.manual_seed(1)
    pixel_values = torch.randn(2, 3, 72, 88)
    model = AutoModelForSemanticSegmentation.from_pretrained(folder)
    assert type(model) is PCAAForSemanticSegmentation  # the package's code, same weights
    with torch.no_grad():
        logits = model(pixel_values).logits
    torch.testing.assert_close(logits.flatten(), torch.tensor(report["logits"]), rtol=1e-5, atol=1e-5)
    segments = pipeline("image-segmentation", model=str(folder))(PIL.Image.new("RGB", (88, 72), "gray"))
    assert sorted(segment["label"] for segment in segments) == report["labels"]
