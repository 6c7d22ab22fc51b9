import json
import logging
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from huggingface_hub import ModelCard
from huggingface_hub.errors import EntryNotFoundError
from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation, pipeline
from transformers.utils import hub as transformers_hub
from transformers.utils import logging as transformers_logging

from pcaa_hf import PCAAForSemanticSegmentation, PCAAImageProcessor, PCAASegmentationPipeline
from pcaa_hf.model import REMOTE_CODE_FILES
from pcaa_testing import SMALL_PCAA_LABELS, run_without_the_package, small_config, small_labelled_model

NAMES = list(SMALL_PCAA_LABELS)


@pytest.fixture
def model_and_processor():
    """The model and processor saved in the session fixture `small_pcaa_folder`, in memory (tests may change them)."""
    return small_labelled_model(), PCAAImageProcessor()


@pytest.fixture
def image():
    return PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (61, 83, 3), dtype=np.uint8))


def expected_class_map(model, processor, image):
    inputs = processor(image, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    upsampled = F.interpolate(logits, size=(image.height, image.width), mode="bilinear", align_corners=False)
    return upsampled[0].argmax(0).numpy()


def check_pipeline_result(result, class_map):
    masks = {entry["label"]: np.array(entry["mask"]) > 0 for entry in result}
    assert all(entry["score"] is None for entry in result)
    present = sorted(NAMES[k] for k in np.unique(class_map))
    assert sorted(masks) == present  # one entry per predicted class, named by the config
    coverage = np.sum([mask.astype(int) for mask in masks.values()], axis=0)
    assert (coverage == 1).all()  # the masks tile the image
    for name, mask in masks.items():
        assert np.array_equal(mask, class_map == NAMES.index(name))


class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def transformers_log():
    handler = Records()
    root = logging.getLogger("transformers")
    root.addHandler(handler)
    yield handler.messages
    root.removeHandler(handler)


def test_pipeline_from_a_folder(small_pcaa_folder, model_and_processor, image, transformers_log):
    segmenter = pipeline("image-segmentation", model=str(small_pcaa_folder))
    assert isinstance(segmenter.model, PCAAForSemanticSegmentation) and not segmenter.model.training
    assert isinstance(segmenter.image_processor, PCAAImageProcessor)
    result = segmenter(image)
    check_pipeline_result(result, expected_class_map(*model_and_processor, image))
    assert all(entry["mask"].size == image.size and entry["mask"].mode == "L" for entry in result)
    assert not [m for m in transformers_log if "not supported" in m]


def test_pipeline_from_objects_and_a_batch(model_and_processor, image, transformers_log):
    model, processor = model_and_processor
    segmenter = pipeline("image-segmentation", model=model, image_processor=processor)
    flipped = image.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)
    results = segmenter([image, flipped])
    assert len(results) == 2
    check_pipeline_result(results[0], expected_class_map(model, processor, image))
    check_pipeline_result(results[1], expected_class_map(model, processor, flipped))
    assert not [m for m in transformers_log if "not supported" in m]


def test_pcaa_pipeline_class_puts_the_model_in_eval_mode(model_and_processor, image):
    model, processor = model_and_processor
    model.train()
    statistics = model.backbone.stem[0].norm.running_mean.clone()
    segmenter = pipeline("image-segmentation", model=model, image_processor=processor,
                         pipeline_class=PCAASegmentationPipeline)
    assert not model.training
    check_pipeline_result(segmenter(image), expected_class_map(model, processor, image))
    assert torch.equal(model.backbone.stem[0].norm.running_mean, statistics)


def test_pcaa_pipeline_keeps_16_bit_depth_and_alpha(model_and_processor, tmp_path):
    model, processor = model_and_processor
    segmenter = pipeline("image-segmentation", model=model, image_processor=processor,
                         pipeline_class=PCAASegmentationPipeline)
    deep = PIL.Image.fromarray((np.random.default_rng(4).random((40, 56)) * 65535).astype(np.uint16))
    alpha = PIL.Image.fromarray(np.random.default_rng(5).integers(0, 255, (40, 56, 4), dtype=np.uint8))
    for index, image in enumerate((deep, alpha)):
        image.save(tmp_path / f"{index}.png")
        for source in (image, str(tmp_path / f"{index}.png")):
            check_pipeline_result(segmenter(source), expected_class_map(model, processor, image))


def test_a_model_left_in_training_mode_is_reported(model_and_processor, image):
    model, processor = model_and_processor
    handler = Records()
    logging.getLogger("pcaa_hf").addHandler(handler)
    transformers_logging.get_logger("pcaa_hf.model.modeling_pcaa").warning_once.cache_clear()
    try:
        pipeline("image-segmentation", model=model.train(), image_processor=processor)(image)
    finally:
        logging.getLogger("pcaa_hf").removeHandler(handler)
    assert any("Call model.eval()" in message for message in handler.messages)


def test_saved_folder_carries_code_and_auto_map(small_pcaa_folder):
    names = {p.name for p in small_pcaa_folder.iterdir()}
    assert set(REMOTE_CODE_FILES) | {"config.json", "preprocessor_config.json", "model.safetensors"} == names
    config = json.loads((small_pcaa_folder / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_pcaa.PCAAConfig",
                                  "AutoModelForSemanticSegmentation": "modeling_pcaa.PCAAForSemanticSegmentation"}
    preprocessor = json.loads((small_pcaa_folder / "preprocessor_config.json").read_text())
    assert preprocessor["auto_map"] == {"AutoImageProcessor": "image_processing_pcaa.PCAAImageProcessor"}
    assert type(AutoImageProcessor.from_pretrained(small_pcaa_folder)) is PCAAImageProcessor
    assert type(AutoModelForSemanticSegmentation.from_pretrained(small_pcaa_folder)) is PCAAForSemanticSegmentation


def test_remote_code_loads_without_the_package(small_pcaa_folder, model_and_processor, image, tmp_path):
    image_path = tmp_path / "image.png"
    image.save(image_path)
    report = run_without_the_package(small_pcaa_folder, image_path, tmp_path)
    assert report["blocked"]
    assert report["model_module"].startswith("transformers_modules.")
    assert report["processor_module"].startswith("transformers_modules.")
    model, processor = model_and_processor
    with torch.no_grad():
        logits = model(**processor(image, return_tensors="pt")).logits
    assert torch.equal(torch.tensor(report["logits"]), logits.flatten())
    class_map = expected_class_map(model, processor, image)
    for name, mask in report["masks"].items():
        assert np.array_equal(np.array(mask) > 0, class_map == NAMES.index(name))
    assert report["not_supported"] == []


class FakeHubApi:
    """The `HfApi` boundary of `push_to_hub`: records what would be uploaded, talks to no server."""

    def __init__(self):
        self.repos = {}

    def create_repo(self, repo_id, private=None, token=None, exist_ok=False, **kwargs):
        self.repos.setdefault(repo_id, {})
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def create_branch(self, repo_id, branch, token=None, exist_ok=False, **kwargs):
        pass

    def create_commit(self, repo_id, operations, commit_message=None, **kwargs):
        for operation in operations:
            self.repos[repo_id][operation.path_in_repo] = Path(operation.path_or_fileobj).read_bytes()
        return type("CommitInfo", (), {"commit_message": commit_message})()


@pytest.fixture
def fake_hub(monkeypatch):
    api = FakeHubApi()
    monkeypatch.setattr(transformers_hub, "_hf_api", api)

    def no_card_yet(repo_id, *args, **kwargs):
        raise EntryNotFoundError(f"{repo_id} has no README.md yet")

    monkeypatch.setattr(ModelCard, "load", no_card_yet)
    return api


def test_push_to_hub_uploads_safetensors_configs_and_code_only(fake_hub, model_and_processor, image, tmp_path):
    model, processor = model_and_processor
    model.push_to_hub("someone/pcaa-test", commit_message="Upload PCAA")
    processor.push_to_hub("someone/pcaa-test")
    uploaded = fake_hub.repos["someone/pcaa-test"]
    assert set(uploaded) == set(REMOTE_CODE_FILES) | {"config.json", "preprocessor_config.json", "model.safetensors",
                                                      "README.md"}
    assert not [name for name in uploaded if name.endswith((".bin", ".pt", ".pth", ".pkl"))]

    remote = tmp_path / "remote"
    remote.mkdir()
    for name, content in uploaded.items():
        (remote / name).write_bytes(content)
    reloaded = AutoModelForSemanticSegmentation.from_pretrained(remote)
    reloaded_processor = AutoImageProcessor.from_pretrained(remote)
    with torch.no_grad():
        expected = model(**processor(image, return_tensors="pt")).logits
        observed = reloaded(**reloaded_processor(image, return_tensors="pt")).logits
    assert torch.equal(observed, expected)


def test_pcaa_pipeline_refuses_a_binary_model_clearly():
    model = PCAAForSemanticSegmentation(small_config(num_labels=1))
    with pytest.raises(ValueError, match="num_labels=1"):
        pipeline("image-segmentation", model=model, image_processor=PCAAImageProcessor(),
                 pipeline_class=PCAASegmentationPipeline)
