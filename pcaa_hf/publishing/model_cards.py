"""Model cards for trained PCAA models.

`render_model_card` fills one of the Jinja templates of `pcaa_hf.model_cards` (the repository's `model_cards/`
folder, shipped inside the package) with the facts of a run (configuration, data, recipe, training, evaluation and
measured metrics) and the metadata the Hub reads (`ModelCardData` with a `model-index` of the measured means).
"""

import logging
import math
import re
from importlib.resources import files
from pathlib import Path

import jinja2
import numpy as np
from huggingface_hub import EvalResult, ModelCard, ModelCardData

logger = logging.getLogger(__name__)

# The repository's model_cards/ folder: mapped onto this name by pyproject.toml, in a checkout and in a wheel.
MODEL_CARDS_FOLDER = Path(str(files("pcaa_hf.model_cards")))
GENERIC_TEMPLATE = "pcaa_generic.md"
BASELINE_TEMPLATE = "baseline_generic.md"

# What a card says about each baseline decode head (`PCAAConfig.decode_head_type`): its name, what it computes, the
# paper that introduced it and the authors' network file it reproduces.
BASELINE_CARD_FACTS = {
    "fcn": dict(
        name="FCN",
        authors_model="basenet",
        details="two 3x3 convolutions",
        description="The FCN baseline: two 3x3 convolutions (BatchNorm, ReLU) on the backbone's last feature map, "
                    "then the classifier; no context module.",
        paper_title="Fully Convolutional Networks for Semantic Segmentation",
        paper_url="https://openaccess.thecvf.com/content_cvpr_2015/html/Long_Fully_Convolutional_Networks_2015_CVPR_"
                  "paper.html",
        paper_reference="Long, Shelhamer, Darrell, CVPR 2015",
        citation="""@inproceedings{long2015fully,
  title     = {Fully Convolutional Networks for Semantic Segmentation},
  author    = {Long, Jonathan and Shelhamer, Evan and Darrell, Trevor},
  booktitle = {Proceedings of the IEEE Conference on Computer Vision and Pattern Recognition (CVPR)},
  pages     = {3431--3440},
  year      = {2015}
}""",
    ),
    "aspp": dict(
        name="DeepLabV3 (ASPP)",
        authors_model="deeplabv3",
        details="atrous spatial pyramid pooling",
        description="DeepLabV3's atrous spatial pyramid pooling: image-level pooling, a 1x1 convolution and 3x3 "
                    "convolutions at several dilation rates, run in parallel on the backbone's last feature map, "
                    "concatenated and fused by a 3x3 convolution before the classifier.",
        paper_title="Rethinking Atrous Convolution for Semantic Image Segmentation",
        paper_url="https://arxiv.org/abs/1706.05587",
        paper_reference="Chen, Papandreou, Schroff, Adam, arXiv 2017",
        citation="""@article{chen2017rethinking,
  title   = {Rethinking Atrous Convolution for Semantic Image Segmentation},
  author  = {Chen, Liang-Chieh and Papandreou, George and Schroff, Florian and Adam, Hartwig},
  journal = {arXiv preprint arXiv:1706.05587},
  year    = {2017}
}""",
    ),
    "non_local": dict(
        name="Non-local",
        authors_model="nlnet",
        details="one Non-local block",
        description="A Non-local block: every position attends to every other (embedded-Gaussian similarity of 1x1 "
                    "projections) and adds the attended features to its own, between two 3x3 convolutions; the "
                    "result is concatenated with the backbone feature and fused before the classifier.",
        paper_title="Non-local Neural Networks",
        paper_url="https://openaccess.thecvf.com/content_cvpr_2018/html/Wang_Non-Local_Neural_Networks_CVPR_2018_"
                  "paper.html",
        paper_reference="Wang, Girshick, Gupta, He, CVPR 2018",
        citation="""@inproceedings{wang2018non,
  title     = {Non-local Neural Networks},
  author    = {Wang, Xiaolong and Girshick, Ross and Gupta, Abhinav and He, Kaiming},
  booktitle = {Proceedings of the IEEE Conference on Computer Vision and Pattern Recognition (CVPR)},
  pages     = {7794--7803},
  year      = {2018}
}""",
    ),
    "ocr": dict(
        name="OCR",
        authors_model="ocrnet",
        details="object-contextual representations",
        description="Object-contextual representations: the auxiliary head's class scores, normalised over the "
                    "image, are soft object regions; each region's representation is the weighted sum of the "
                    "pixel features, and every pixel attends over the regions and concatenates the result with its "
                    "own feature before the classifier.",
        paper_title="Object-Contextual Representations for Semantic Segmentation",
        paper_url="https://www.ecva.net/papers/eccv_2020/papers_ECCV/html/3374_ECCV_2020_paper.php",
        paper_reference="Yuan, Chen, Wang, ECCV 2020",
        citation="""@inproceedings{yuan2020object,
  title     = {Object-Contextual Representations for Semantic Segmentation},
  author    = {Yuan, Yuhui and Chen, Xilin and Wang, Jingdong},
  booktitle = {European Conference on Computer Vision (ECCV)},
  pages     = {173--190},
  year      = {2020}
}""",
    ),
}

# Hub data set ids of the real data sets, as the Hub's other Cityscapes / ADE20K segmentation cards name them.
HUB_DATASET_IDS = {"cityscapes": "cityscapes", "ade20k": "scene_parse_150"}
DATASET_NAMES = {"cityscapes": "Cityscapes", "ade20k": "ADE20K"}
HUB_ID_PATTERN = re.compile(r"^[\w.-]+/[\w.-]+$")

TRAINING_LABELS = {
    "steps": "optimiser steps",
    "total_batch_size": "total batch size (all processes)",
    "processes": "processes",
    "mixed_precision": "mixed precision",
    "wall_time_seconds": "wall time",
    "hardware": "hardware",
}
# Evaluation settings the summary sentence covers; window_batch_size changes speed, not the figures.
DESCRIBED_EVALUATION_KEYS = ("dataset", "split", "num_images", "mode", "crop_size", "stride", "scales", "flip",
                             "window_batch_size")
SECRET_ARGUMENT = re.compile(r"token|secret|password", re.IGNORECASE)
MEAN_METRICS = (
    ("mean_iou", "mIoU"),
    ("mean_accuracy", "mAcc"),
    ("overall_accuracy", "aAcc"),
)


def default_template(config, dataset_type):
    """
    The template for a configuration: the paper's three published settings (ResNet-50 or ResNet-101 on Cityscapes,
    ResNet-101 with multi-grid on ADE20K; output stride 8, a 512-wide head, one 4x4 grid) get their own card, other
    PCAA models the generic one, and the baseline heads theirs (which names the head and cites its paper).

    config: a `PCAAConfig`; dataset_type: "cityscapes", "ade20k", "datasets" or None (unknown).
    Raises `FileNotFoundError` when the template is missing (a broken installation).
    """
    # The paper's head and grid at output stride 8; anything else is not one of its configurations.
    paper_head = (getattr(config, "backbone_config", None) is None and config.output_stride == 8
                  and config.hidden_size == 512 and [tuple(g) for g in config.bins] == [(4, 4)])
    if config.decode_head_type != "pcaa":
        name = BASELINE_TEMPLATE
    elif paper_head and config.backbone_depth == 50 and not config.multi_grid and dataset_type == "cityscapes":
        name = "pcaa_r50_cityscapes.md"
    elif paper_head and config.backbone_depth == 101 and not config.multi_grid and dataset_type == "cityscapes":
        name = "pcaa_r101_cityscapes.md"
    elif paper_head and config.backbone_depth == 101 and config.multi_grid and dataset_type == "ade20k":
        name = "pcaa_r101_ade20k.md"
    else:
        name = GENERIC_TEMPLATE
    template = MODEL_CARDS_FOLDER / name
    if not template.is_file():
        raise FileNotFoundError(
            f"Model card template {template} not found: pcaa_hf.model_cards, installed from the repository's "
            "model_cards/ folder, lacks it. Reinstall pcaa_hf, or pass the path of a template to render_model_card."
        )
    return template


def backbone_name(config):
    """"ResNet-50" for the paper's backbone, the transformers backbone's type (e.g. "ConvNext") otherwise."""
    backbone_config = getattr(config, "backbone_config", None)
    if backbone_config is None:
        return f"ResNet-{config.backbone_depth}"
    return type(backbone_config).__name__.removesuffix("Config")


def percent(value):
    """A fraction as a percentage with two decimals, or "n/a" when it is missing or not finite (absent classes)."""
    if value is None or not math.isfinite(float(value)):
        return "n/a"
    return f"{100 * float(value):.2f}"


def table_cell(value):
    """`value` as the text of one Markdown table cell (pipes escaped, NaN as "n/a")."""
    if isinstance(value, (bool, np.bool_)):
        text = "yes" if value else "no"
    elif value is None:
        text = "none"
    elif isinstance(value, (float, np.floating)):
        text = f"{float(value):g}" if math.isfinite(value) else "n/a"
    elif isinstance(value, (list, tuple)):
        text = "[" + ", ".join(table_cell(item) for item in value) + "]"
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(header, rows):
    """A Markdown table with the two-or-more-column `header` and `rows` of cell values."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(table_cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def size_text(size):
    """A (height, width) pair or a single side as "HxW"."""
    return "x".join(str(side) for side in size) if isinstance(size, (list, tuple)) else f"{size}x{size}"


def duration_text(seconds):
    """Seconds as "2 h 03 min (7380 s)" or "45 s"."""
    seconds = float(seconds)
    hours, rest = divmod(round(seconds), 3600)
    minutes, whole_seconds = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min ({seconds:.0f} s)"
    if minutes:
        return f"{minutes} min {whole_seconds:02d} s ({seconds:.0f} s)"
    return f"{seconds:.1f} s"


def recipe_table(recipe):
    """The training arguments as a Markdown table, in the order given, without credentials (a card is public)."""
    return markdown_table(("argument", "value"),
                          [(key, value) for key, value in recipe.items() if not SECRET_ARGUMENT.search(str(key))])


def training_table(training):
    """The `training` facts as a Markdown table, known keys with readable names, others under their own."""
    rows = []
    for key, value in training.items():
        if key == "wall_time_seconds" and value is not None:
            value = duration_text(value)
        rows.append((TRAINING_LABELS.get(key, key), value))
    return markdown_table(("", "value"), rows)


def evaluation_summary(evaluation):
    """One sentence describing how the figures were measured, from the `evaluation` dict (see render_model_card)."""
    parts = []
    if evaluation.get("mode") == "slide":
        window = f"sliding windows of {size_text(evaluation.get('crop_size', 768))}"
        if evaluation.get("stride") is not None:
            window += f" every {size_text(evaluation['stride'])} pixels"
        parts.append(window + ", logits averaged where windows overlap")
    elif evaluation.get("mode") == "whole":
        parts.append("whole images, one forward each")
    elif evaluation.get("mode") is not None:
        parts.append(f"inference mode {evaluation['mode']}")
    scales = [float(scale) for scale in evaluation.get("scales") or [1.0]]
    if scales == [1.0]:
        parts.append("single scale")
    else:
        parts.append("scales " + ", ".join(f"{scale:g}" for scale in scales) + " (logits averaged)")
    parts.append("with horizontal flip" if evaluation.get("flip") else "no flip")
    others = [f"{key} {table_cell(value)}" for key, value in evaluation.items() if key not in DESCRIBED_EVALUATION_KEYS]
    return "; ".join(parts + others) + "."


def dataset_facts(data, evaluation):
    """
    What the card says about the data: its display name, its identifier for the `model-index` (the Hub id where
    there is one), its Hub id for the `datasets` metadata (or None), whether it is generated, and the evaluated split.
    The evaluation is taken to use a split of the training data's source, so a generated data set keeps its
    "generated" mark even where `evaluation["dataset"]` names the layout it imitates.
    """
    data = data or {}
    evaluation = evaluation or {}
    dataset_type = data.get("dataset_type")
    source = data.get("source")
    generated = bool(data.get("generated"))
    name = data.get("dataset") or DATASET_NAMES.get(dataset_type) or evaluation.get("dataset") or "unnamed data set"
    identifier = re.sub(r"[^a-z0-9_.]+", "-", name.lower()).strip("-") or "custom"
    hub_id = None
    if not generated and dataset_type in HUB_DATASET_IDS:
        hub_id = identifier = HUB_DATASET_IDS[dataset_type]
        name = DATASET_NAMES[dataset_type]
    elif not generated and dataset_type == "datasets" and source and HUB_ID_PATTERN.match(str(source)) \
            and not Path(str(source)).expanduser().exists():
        hub_id = identifier = str(source)
    if generated:
        layout = f"{DATASET_NAMES.get(dataset_type, 'custom')} layout"
        name = f"{name} ({layout})" if "generated" in name.lower() else f"{name} (generated, {layout})"
        if "generated" not in identifier and "synthetic" not in identifier:
            identifier = f"generated-{identifier}"
    return {"name": name, "identifier": identifier, "hub_id": hub_id, "generated": generated,
            "split": evaluation.get("split", "validation")}


def mean_iou_absent_as_zero(metrics):
    """
    The authors' mIoU (classes absent from the split count as 0): given by `ConfusionMatrix.compute`, else derived
    from the per-class IoU, where exactly the absent classes are NaN.
    """
    if metrics.get("mean_iou_absent_as_zero") is not None:
        return metrics["mean_iou_absent_as_zero"]
    return float(np.nan_to_num(np.asarray(metrics["per_category_iou"], dtype=np.float64), nan=0.0).mean())


def per_class_table(metrics, id2label):
    """The per-class IoU and accuracy (%) as a Markdown table; NaN (class absent from the split) shows as "n/a"."""
    rows = []
    for index, (iou, accuracy) in enumerate(zip(metrics["per_category_iou"], metrics["per_category_accuracy"])):
        rows.append((index, id2label.get(index, str(index)), percent(iou), percent(accuracy)))
    return markdown_table(("id", "class", "IoU (%)", "accuracy (%)"), rows)


def evaluation_results(metrics, facts):
    """`EvalResult`s of the finite means, as fractions in [0, 1], for the card's `model-index`."""
    results = []
    for key, label in MEAN_METRICS:
        value = metrics.get(key)
        if value is None or not math.isfinite(float(value)):
            continue
        results.append(EvalResult(
            task_type="image-segmentation",
            task_name="Semantic Segmentation",
            dataset_type=facts["identifier"],
            dataset_name=facts["name"],
            dataset_split=facts["split"],
            metric_type=key,
            metric_name=label,
            metric_value=float(value),
        ))
    return results


def render_model_card(template_path, *, repo_id, config, id2label, metrics=None, evaluation=None, recipe=None,
                      data=None, training=None):
    """
    Render a model card from a Jinja template (see `default_template`) and the facts of one run.

    template_path: the Markdown/Jinja template; None picks `default_template(config, data["dataset_type"])`.
    repo_id: the Hub repository ("owner/name") the card is for; also the usage snippet's model id.
    config: the model's `PCAAConfig` (backbone_depth, output_stride, multi_grid, bins, hidden_size, num_labels).
    id2label: class index -> name, one entry per class (int or str keys).
    metrics: the evaluation dict of `pcaa_hf.evaluation.metrics` (`mean_iou`, `mean_accuracy`, `overall_accuracy`
        as fractions, `per_category_iou`, `per_category_accuracy` arrays that may hold NaN, optionally
        `mean_iou_absent_as_zero` and `num_images`); None when the model was not evaluated: the card says so and
        carries no results.
    evaluation: how the metrics were measured: {"dataset", "split", "num_images", "mode" ("slide"/"whole"),
        "crop_size", "stride", "scales", "flip", ...}; other keys are listed as they are.
    recipe: the training arguments, shown as a table in the order given.
    data: {"dataset": name, "dataset_type": "cityscapes" | "ade20k" | "datasets", "source": folder or Hub id,
        "train_images": n, "validation_images": m, "generated": True when the images are generated (synthetic,
        e.g. by scripts/make_synthetic_cityscapes.py) rather than the real data set}.
    training: facts of the run: {"steps", "total_batch_size", "processes", "mixed_precision", "wall_time_seconds",
        "hardware", ...}.

    The metadata's `model-index` holds mIoU, mAcc and aAcc as fractions in [0, 1] exactly as measured (non-finite
    values are left out); the card's text shows them in %.
    Returns a `huggingface_hub.ModelCard`.
    """
    data = data or {}
    id2label = {int(index): str(name) for index, name in id2label.items()}
    if sorted(id2label) != list(range(config.num_labels)):
        raise ValueError(f"id2label must name the classes 0..{config.num_labels - 1}, got ids {sorted(id2label)}.")
    if template_path is None:
        template_path = default_template(config, data.get("dataset_type"))
    facts = dataset_facts(data, evaluation)

    results = {}
    eval_results = None
    if metrics is not None:
        for key in ("per_category_iou", "per_category_accuracy"):
            if len(metrics[key]) != config.num_labels:
                raise ValueError(f"metrics['{key}'] has {len(metrics[key])} values for {config.num_labels} classes.")
        results = {key: percent(metrics.get(key)) for key, _ in MEAN_METRICS}
        results["mean_iou_absent_as_zero"] = percent(mean_iou_absent_as_zero(metrics))
        results["num_images"] = metrics.get("num_images") or (evaluation or {}).get("num_images")
        results["per_class_table"] = per_class_table(metrics, id2label)
        eval_results = evaluation_results(metrics, facts) or None

    head_type = config.decode_head_type
    tags = ["pcaa", "semantic-segmentation", "vision", "pytorch"]
    if head_type != "pcaa":
        tags.append(BASELINE_CARD_FACTS[head_type]["authors_model"])
    if facts["generated"]:
        tags.append("synthetic-data")
    elif data.get("dataset_type") in HUB_DATASET_IDS:
        tags.append(data["dataset_type"])
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-segmentation",
        license="apache-2.0",
        tags=tags,
        datasets=[facts["hub_id"]] if facts["hub_id"] else None,
        metrics=["mean_iou"] if eval_results else None,  # the `evaluate` metric that gives all three means
        model_name=repo_id,
        eval_results=eval_results,
    )
    variables = dict(
        repo_id=repo_id,
        backbone=backbone_name(config),
        backbone_depth=config.backbone_depth,
        output_stride=config.output_stride,
        multi_grid=config.multi_grid,
        bins=", ".join(size_text(list(grid)) for grid in config.bins),
        hidden_size=config.hidden_size,
        head=dict(BASELINE_CARD_FACTS.get(head_type, {}), type=head_type),
        transformers_backbone=getattr(config, "backbone_config", None) is not None,
        auxiliary_head=config.use_auxiliary_head,
        auxiliary_loss_weight=config.auxiliary_loss_weight,
        use_ohem=config.use_ohem,
        num_labels=config.num_labels,
        dataset_name=facts["name"],
        dataset_type=data.get("dataset_type"),
        data_source=data.get("source"),
        generated=facts["generated"],
        train_images=data.get("train_images"),
        validation_images=data.get("validation_images"),
        recipe_table=recipe_table(recipe) if recipe else None,
        training_table=training_table(training) if training else None,
        evaluation_summary=evaluation_summary(evaluation) if evaluation else None,
        evaluation_split=facts["split"],
        evaluated=metrics is not None,
        results=results,
    )
    return ModelCard(render_template(template_path, card_data=card_data.to_yaml(), **variables))


def render_template(template_path, **variables):
    """
    The text of the Jinja template at `template_path` filled with `variables`, as `ModelCard.from_template` renders
    it, except that a name the template uses but no variable defines is an error rather than an empty string. It may
    include templates of its own folder or of `MODEL_CARDS_FOLDER` (`{% include "_shared_sections.md" %}`). A broken
    template is a ValueError naming the file, the line and Jinja's message.
    """
    template_path = Path(template_path)
    loader = jinja2.FileSystemLoader([template_path.parent, MODEL_CARDS_FOLDER])
    try:
        environment = jinja2.Environment(loader=loader, undefined=jinja2.StrictUndefined)
        return environment.from_string(template_path.read_text(encoding="utf-8")).render(**variables)
    except jinja2.TemplateError as error:
        line = f", line {error.lineno}" if getattr(error, "lineno", None) else ""
        name = f"{template_path}" if getattr(error, "name", None) in (None, template_path.name) else (
            f"{template_path} (in {error.name})")
        raise ValueError(f"model card template {name}{line}: {type(error).__name__}: {error.message}") from None


__all__ = ["default_template", "render_model_card"]
