import logging
import re
from pathlib import Path

import httpx2
import numpy as np
import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import HfHubHTTPError

from pcaa_hf import PCAAForSemanticSegmentation, PCAAImageProcessor
from pcaa_hf.publishing import model_cards
from pcaa_hf.publishing.hub import HubPublisher, write_export
from pcaa_hf.publishing.model_cards import default_template, render_model_card
from pcaa_testing import randomise_weights, small_config

NAMES = ["road", "sky", "car", "person", "tree"]
ID2LABEL = dict(enumerate(NAMES))
REPO_ID = "someone/pcaa-test"
MEAN_IOU = 0.6123456789012345
CITATION = re.search(r"```bibtex\n(.*?)```", (Path(__file__).parents[1] / "README.md").read_text(), re.S).group(1)
PAPER = ("https://openaccess.thecvf.com/content/CVPR2022/html/"
         "Liu_Partial_Class_Activation_Attention_for_Semantic_Segmentation_CVPR_2022_paper.html")

EVALUATION = {"dataset": "cityscapes", "split": "validation", "num_images": 500, "mode": "slide",
              "crop_size": [768, 768], "stride": [512, 512], "scales": [1.0], "flip": False}
RECIPE = {"learning_rate": 0.01, "momentum": 0.9, "weight_decay": 1e-4, "crop_size": [768, 768], "max_steps": 60000}
TRAINING = {"steps": 60000, "total_batch_size": 8, "processes": 2, "mixed_precision": "bf16",
            "wall_time_seconds": 3723.4, "hardware": "2 CPU cores"}

# (template, config settings, data set type) for every template.
TEMPLATES = [
    ("pcaa_r50_cityscapes.md", dict(backbone_depth=50), "cityscapes"),
    ("pcaa_r101_cityscapes.md", dict(backbone_depth=101), "cityscapes"),
    ("pcaa_r101_ade20k.md", dict(backbone_depth=101, multi_grid=True), "ade20k"),
    ("pcaa_generic.md", dict(backbone_depth=18), "cityscapes"),
    ("baseline_generic.md", dict(backbone_depth=50, decode_head_type="ocr"), "cityscapes"),
]


def fake_metrics():
    """Measured-looking metrics in which "sky" is absent from the split (NaN), as `ConfusionMatrix.compute` gives."""
    return {
        "mean_iou": np.float64(MEAN_IOU),
        "mean_accuracy": np.float64(0.7),
        "overall_accuracy": np.float64(0.9),
        "per_category_iou": np.array([0.9, np.nan, 0.5, 0.4, 0.612345]),
        "per_category_accuracy": np.array([0.95, np.nan, 0.6, 0.5, 0.7]),
        "mean_iou_absent_as_zero": np.float64(0.48),
        "num_images": 500,
    }


def real_data(dataset_type):
    return {"dataset": dataset_type, "dataset_type": dataset_type, "source": f"/data/{dataset_type}",
            "train_images": 2975, "validation_images": 500}


def render(template, settings, data, metrics=None, evaluation=EVALUATION):
    return render_model_card(model_cards.MODEL_CARDS_FOLDER / template, repo_id=REPO_ID,
                             config=small_config(num_labels=len(NAMES), **settings), id2label=ID2LABEL,
                             metrics=metrics, evaluation=evaluation, recipe=RECIPE, data=data, training=TRAINING)


def metric_values(card):
    """{metric type: value} of the card's model-index, read back from its text."""
    data = ModelCard(str(card)).data
    return {result.metric_type: result.metric_value for result in data.eval_results or []}


def has_nan(text):
    return re.search(r"\bnan\b", text, re.IGNORECASE) is not None


@pytest.mark.parametrize("template, settings, dataset_type", TEMPLATES)
def test_every_template_renders_the_measured_figures(template, settings, dataset_type):
    card = render(template, settings, real_data(dataset_type), fake_metrics())
    text = str(card)
    data = ModelCard(text).data
    assert data.library_name == "transformers" and data.pipeline_tag == "image-segmentation"
    assert data.license == "apache-2.0" and {"pcaa", "semantic-segmentation"} <= set(data.tags)
    assert metric_values(card) == {"mean_iou": MEAN_IOU, "mean_accuracy": 0.7, "overall_accuracy": 0.9}
    assert all(result.task_type == "image-segmentation" and result.dataset_split == "validation"
               for result in data.eval_results)
    assert data.model_name == REPO_ID

    for index, name in enumerate(NAMES):
        row = f"| {index} | {name} | " + ("n/a | n/a |" if name == "sky" else "")
        assert row in text
    assert "| 4 | tree | 61.23 | 70.00 |" in text
    assert not has_nan(text)
    assert "| mIoU | 61.23 |" in text
    assert "counted as 0 (the authors' convention) | 48.00 |" in text

    assert "import pcaa_hf" in text
    assert f'AutoModelForSemanticSegmentation.from_pretrained("{REPO_ID}")' in text
    assert f'pipeline("image-segmentation", model="{REPO_ID}", trust_remote_code=True)' in text
    assert CITATION in text
    assert PAPER in text and "https://github.com/lsa1997/PCAA" in text
    assert "500 images of the validation split" in text and "sliding windows of 768x768" in text
    assert "| weight_decay | 0.0001 |" in text and "| wall time | 1 h 02 min (3723 s) |" in text
    assert "Generated data" not in text


def test_paper_setting_templates_state_the_paper_recipe():
    r50 = str(render("pcaa_r50_cityscapes.md", dict(backbone_depth=50), real_data("cityscapes")))
    r101 = str(render("pcaa_r101_cityscapes.md", dict(backbone_depth=101), real_data("cityscapes")))
    ade = str(render("pcaa_r101_ade20k.md", dict(backbone_depth=101, multi_grid=True), real_data("ade20k")))
    for text in (r50, r101, ade):
        assert "SGD, learning rate 0.01, momentum 0.9, weight decay 1e-4, poly decay power 0.9" in text
        assert "SyncBatchNorm" in text
    assert "| iterations | 60k (the authors' ResNet-50 Cityscapes script) |" in r50
    assert "60k in the authors' ResNet-50 Cityscapes script" in r101
    assert "| batch size (total) | 8 |" in r101 and "768x768" in r101
    assert "| iterations | 150k |" in ade and "| batch size (total) | 16 |" in ade and "short side 512" in ade


def test_real_data_sets_are_named_in_the_metadata():
    cityscapes = ModelCard(str(render("pcaa_r50_cityscapes.md", dict(backbone_depth=50), real_data("cityscapes"),
                                      fake_metrics()))).data
    ade = ModelCard(str(render("pcaa_r101_ade20k.md", dict(backbone_depth=101, multi_grid=True),
                               real_data("ade20k"), fake_metrics()))).data
    assert cityscapes.datasets == ["cityscapes"] and cityscapes.eval_results[0].dataset_type == "cityscapes"
    assert ade.datasets == ["scene_parse_150"] and ade.eval_results[0].dataset_name == "ADE20K"
    hub = {"dataset": "someone/scenes", "dataset_type": "datasets", "source": "someone/scenes"}
    assert ModelCard(str(render("pcaa_generic.md", {}, hub))).data.datasets == ["someone/scenes"]


def test_generic_card_says_when_the_data_is_generated():
    data = {"dataset": "synthetic-cityscapes", "dataset_type": "cityscapes", "source": "data/cityscapes",
            "train_images": 40, "validation_images": 12, "generated": True}
    card = render("pcaa_generic.md", dict(backbone_depth=18), data, fake_metrics())
    text = str(card)
    assert "Generated data, not real photographs" in text and "`data/cityscapes`" in text
    assert "synthetic-data" in card.data.tags and card.data.datasets is None
    result = ModelCard(text).data.eval_results[0]
    assert "generated" in result.dataset_name and result.dataset_type != "cityscapes"
    assert "small variant for quick runs" in text


def test_an_unevaluated_model_says_so_and_has_no_results():
    for template, settings, dataset_type in TEMPLATES:
        card = render(template, settings, real_data(dataset_type), metrics=None)
        text = str(card)
        assert "not evaluated" in text.lower()
        assert "model-index" not in card.data.to_yaml() and not ModelCard(text).data.eval_results
        assert "| 0 | road |" not in text and not has_nan(text)


def test_non_finite_means_are_left_out_of_the_metadata():
    metrics = fake_metrics()
    metrics["mean_accuracy"] = np.float64(np.nan)
    card = render("pcaa_generic.md", {}, real_data("cityscapes"), metrics)
    assert metric_values(card) == {"mean_iou": MEAN_IOU, "overall_accuracy": 0.9}
    assert "| mAcc (mean class accuracy) | n/a |" in str(card) and not has_nan(str(card))


def test_without_the_authors_figure_it_is_derived_from_the_per_class_iou():
    metrics = fake_metrics()
    del metrics["mean_iou_absent_as_zero"], metrics["num_images"]
    text = str(render("pcaa_generic.md", {}, real_data("cityscapes"), metrics))
    assert f"counted as 0 (the authors' convention) | {100 * (0.9 + 0.5 + 0.4 + 0.612345) / 5:.2f} |" in text
    assert "500 images of the validation split" in text  # the count from `evaluation`


def test_mismatched_classes_are_refused():
    metrics = fake_metrics()
    metrics["per_category_iou"] = metrics["per_category_iou"][:4]
    with pytest.raises(ValueError, match="per_category_iou"):
        render("pcaa_generic.md", {}, real_data("cityscapes"), metrics)
    with pytest.raises(ValueError, match="id2label"):
        render_model_card(None, repo_id=REPO_ID, config=small_config(num_labels=6), id2label=ID2LABEL)


def test_default_template_picks_the_paper_settings_or_the_generic_card():
    def chosen(dataset_type, **settings):
        return default_template(small_config(**{"hidden_size": 512, **settings}), dataset_type).name

    assert chosen("cityscapes", backbone_depth=50) == "pcaa_r50_cityscapes.md"
    assert chosen("cityscapes", backbone_depth=101) == "pcaa_r101_cityscapes.md"
    assert chosen("ade20k", backbone_depth=101, multi_grid=True) == "pcaa_r101_ade20k.md"
    assert chosen("ade20k", backbone_depth=101) == "pcaa_generic.md"
    assert chosen("cityscapes", backbone_depth=18) == "pcaa_generic.md"
    assert chosen("datasets", backbone_depth=50) == "pcaa_generic.md"
    assert chosen(None, backbone_depth=50) == "pcaa_generic.md"
    # Not the paper's head or grid: not the paper's configuration.
    assert chosen("cityscapes", backbone_depth=50, output_stride=16) == "pcaa_generic.md"
    assert chosen("cityscapes", backbone_depth=50, hidden_size=64) == "pcaa_generic.md"
    assert chosen("cityscapes", backbone_depth=101, multi_grid=True) == "pcaa_generic.md"
    assert chosen("cityscapes", backbone_depth=50, bins=[(2, 2), (4, 4)]) == "pcaa_generic.md"


@pytest.mark.parametrize("head, name, paper, bibtex_key, authors_model", [
    ("fcn", "FCN", "Fully Convolutional Networks for Semantic Segmentation", "long2015fully", "basenet"),
    ("aspp", "DeepLabV3 (ASPP)", "Rethinking Atrous Convolution", "chen2017rethinking", "deeplabv3"),
    ("non_local", "Non-local", "Non-local Neural Networks", "wang2018non", "nlnet"),
    ("ocr", "OCR", "Object-Contextual Representations for Semantic Segmentation", "yuan2020object", "ocrnet"),
])
def test_a_baseline_card_names_its_head_and_cites_its_paper_and_pcaas(head, name, paper, bibtex_key, authors_model):
    config = small_config(hidden_size=512, backbone_depth=50, decode_head_type=head)
    assert default_template(config, "cityscapes").name == "baseline_generic.md"
    card = render_model_card(None, repo_id=REPO_ID, config=config, id2label=ID2LABEL, metrics=fake_metrics(),
                             evaluation=EVALUATION, recipe=RECIPE, data=real_data("cityscapes"))
    text = str(card)
    assert f"# {name}, ResNet-50, Cityscapes: {REPO_ID}" in text
    assert paper in text and re.search(rf"@(inproceedings|article){{{bibtex_key},", text)
    assert CITATION in text and f"networks/{authors_model}.py" in text and f'decode_head_type="{head}"' in text
    assert authors_model in ModelCard(text).data.tags
    assert "region focal loss" not in text and "Partial Class Activation Attention" in text
    assert ("soft object regions" in text) == (head == "ocr")


def test_default_template_names_a_missing_template_and_asks_for_a_path(monkeypatch, tmp_path):
    monkeypatch.setattr(model_cards, "MODEL_CARDS_FOLDER", tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="pass the path of a template"):
        default_template(small_config(), "cityscapes")


@pytest.fixture
def export_parts():
    config = small_config(id2label=ID2LABEL, label2id={name: index for index, name in ID2LABEL.items()})
    model = randomise_weights(PCAAForSemanticSegmentation(config), seed=5)
    card = render_model_card(None, repo_id=REPO_ID, config=config, id2label=ID2LABEL, metrics=fake_metrics(),
                             evaluation=EVALUATION, data=real_data("cityscapes"))
    return model, PCAAImageProcessor(), card


def snapshot(folder):
    return {path.name: path.read_bytes() for path in sorted(Path(folder).iterdir())}


def test_write_export_reloads_with_identical_weights(tmp_path, export_parts):
    model, processor, card = export_parts
    folder = write_export(tmp_path / "export", model, processor, card)
    names = set(snapshot(folder))
    assert {"README.md", "config.json", "model.safetensors", "preprocessor_config.json", "modeling_pcaa.py",
            "image_processing_pcaa.py"} <= names
    reloaded = PCAAForSemanticSegmentation.from_pretrained(folder)
    for key, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    assert reloaded.config.id2label == ID2LABEL
    assert ModelCard.load(folder / "README.md").data.eval_results[0].metric_value == MEAN_IOU


def test_a_failed_export_leaves_the_previous_one_untouched(tmp_path, export_parts, monkeypatch):
    model, processor, card = export_parts
    folder = write_export(tmp_path / "export", model, processor, card)
    before = snapshot(folder)
    newer = randomise_weights(PCAAForSemanticSegmentation(model.config), seed=6)

    def full_disk(path):
        raise OSError("No space left on device")

    monkeypatch.setattr(card, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_export(folder, newer, processor, card)
    assert snapshot(folder) == before
    assert [path.name for path in tmp_path.iterdir()] == ["export"]  # no half-written sibling left behind


class FakeHubApi:
    """The `HfApi` boundary of `HubPublisher`: records calls; raises `error` while `broken`."""

    def __init__(self, error=None):
        self.error = error
        self.created = []
        self.uploads = []
        self.upload_attempts = 0

    def create_repo(self, repo_id, repo_type=None, private=False, exist_ok=False, **kwargs):
        assert exist_ok
        self.created.append((repo_id, private))

    def upload_folder(self, repo_id, folder_path, path_in_repo=None, commit_message=None, repo_type=None, **kwargs):
        self.upload_attempts += 1
        if self.error is not None:
            raise self.error
        self.uploads.append((repo_id, folder_path, path_in_repo, commit_message, snapshot(folder_path)))


@pytest.fixture
def local_export(tmp_path):
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "pcaa"}')
    (folder / "README.md").write_text("# card\n")
    return folder


def test_push_creates_the_repository_once_and_uploads_the_folder(local_export):
    api = FakeHubApi()
    waits = []
    publisher = HubPublisher(REPO_ID, api=api, private=True, sleep=waits.append)
    assert publisher.push(local_export, "step 100")
    assert publisher.push(local_export, "step 200", path_in_repo="checkpoints/step-200")
    assert api.created == [(REPO_ID, True)]
    assert [upload[:4] for upload in api.uploads] == [
        (REPO_ID, str(local_export), None, "step 100"),
        (REPO_ID, str(local_export), "checkpoints/step-200", "step 200"),
    ]
    assert api.uploads[0][4] == snapshot(local_export) and waits == [] and publisher.retry_pending() == []


HUB_DOWN = HfHubHTTPError("503 Service Unavailable", response=httpx2.Response(
    503, request=httpx2.Request("POST", "https://huggingface.co/api/models/someone/pcaa-test/commit/main")))


@pytest.mark.parametrize("error", [ConnectionError("connection refused"), HUB_DOWN, OSError("DNS failure")],
                         ids=["connection", "http", "os"])
def test_a_failing_upload_is_retried_then_kept_pending_without_raising(local_export, caplog, error):
    api = FakeHubApi(error=error)
    waits = []
    publisher = HubPublisher(REPO_ID, api=api, attempts=3, wait_seconds=2.0, sleep=waits.append)
    before = snapshot(local_export)
    with caplog.at_level(logging.WARNING, logger="pcaa_hf.publishing.hub"):
        assert publisher.push(local_export, "step 100") is False
    assert api.upload_attempts == 3 and waits == [2.0, 4.0]
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert REPO_ID in warnings[0] and str(local_export) in warnings[0] and type(error).__name__ in warnings[0]
    assert snapshot(local_export) == before

    assert publisher.retry_pending() == [(local_export, "step 100", None)]  # still down
    assert api.upload_attempts == 6 and waits == [2.0, 4.0, 2.0, 4.0]
    api.error = None
    assert publisher.retry_pending() == []
    assert [upload[:4] for upload in api.uploads] == [(REPO_ID, str(local_export), None, "step 100")]
    assert publisher.retry_pending() == [] and len(api.uploads) == 1
    assert snapshot(local_export) == before


def test_a_failing_create_repo_is_retried_on_the_next_attempt(local_export):
    class FlakyCreate(FakeHubApi):
        def create_repo(self, repo_id, **kwargs):
            if not self.created:
                self.created.append("failed")
                raise ConnectionError("reset by peer")
            super().create_repo(repo_id, **kwargs)

    api = FlakyCreate()
    waits = []
    assert HubPublisher(REPO_ID, api=api, sleep=waits.append).push(local_export, "step 1")
    assert api.created == ["failed", (REPO_ID, False)] and len(api.uploads) == 1 and waits == [2.0]


def test_a_newer_push_to_the_same_place_replaces_the_pending_one(tmp_path, local_export):
    api = FakeHubApi(error=ConnectionError("offline"))
    publisher = HubPublisher(REPO_ID, api=api, attempts=1, sleep=lambda seconds: None)
    assert not publisher.push(local_export, "step 100")
    api.error = None
    newer = tmp_path / "newer"
    newer.mkdir()
    (newer / "config.json").write_text("{}")
    assert publisher.push(newer, "step 200")
    assert publisher.retry_pending() == []
    assert [upload[3] for upload in api.uploads] == ["step 200"]  # step 100's older files never go over it


def test_a_pending_upload_of_a_deleted_folder_is_dropped(local_export, caplog):
    api = FakeHubApi(error=ConnectionError("offline"))
    publisher = HubPublisher(REPO_ID, api=api, attempts=1)
    assert not publisher.push(local_export, "checkpoint 100", path_in_repo="checkpoints/checkpoint-100")
    for path in local_export.iterdir():
        path.unlink()
    local_export.rmdir()
    api.error = None
    with caplog.at_level(logging.WARNING, logger="pcaa_hf.publishing.hub"):
        assert publisher.retry_pending() == []
    assert api.upload_attempts == 1 and publisher.pending == {}
    assert any("no longer exists" in record.getMessage() for record in caplog.records)


def test_the_default_api_is_an_hf_api_with_the_token():
    publisher = HubPublisher(REPO_ID, token="hf_not_a_real_token")
    assert isinstance(publisher.api, HfApi) and publisher.api.token == "hf_not_a_real_token"
    with pytest.raises(ValueError, match="attempts"):
        HubPublisher(REPO_ID, api=FakeHubApi(), attempts=0)


@pytest.mark.parametrize(("text", "expected"), [
    ("# {{ repo_id }\n", r"line 1: TemplateSyntaxError: unexpected '}'"),
    ("# {{ repo_id }}\n{% if evaluated %}\n", r"TemplateSyntaxError: Unexpected end of template"),
    ("# {{ repo_idd }}\n", r"UndefinedError: 'repo_idd' is undefined"),  # was rendered as an empty string
])
def test_a_broken_template_is_named_with_jinjas_message(tmp_path, text, expected):
    template = tmp_path / "card.md"
    template.write_text(text)
    with pytest.raises(ValueError, match=rf"model card template {re.escape(str(template))}.*{expected}"):
        render_model_card(template, repo_id=REPO_ID, config=small_config(num_labels=5), id2label=ID2LABEL)
