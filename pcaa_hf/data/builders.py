"""Cityscapes, ADE20K and any image/label data set as `datasets.DatasetDict`s with train-id labels.

Every builder returns splits with two `datasets.Image()` columns: `image` (decoded lazily from the original file)
and `label` (a PNG of train ids, 255 = ignored, computed once and kept in the Arrow cache). The label names travel in
each split's `info.description` (read them with `label_names`). Building again with the same files reuses the cache.
"""

import io
import json
import logging
import warnings
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

from pcaa_hf.model.image_processing_pcaa import PCAAImageProcessor

from .label_sets import ADE20K_LABELS, CITYSCAPES_ID_TO_TRAIN_ID, CITYSCAPES_LABELS, IGNORE_INDEX, label_maps

logger = logging.getLogger(__name__)

# Part of every cache key: bump it when the stored labels' meaning changes, so old caches are not reused.
DATA_FORMAT_VERSION = 1
EXIF_ORIENTATION = 0x0112
FEATURES = datasets.Features({"image": datasets.Image(), "label": datasets.Image()})
CITYSCAPES_SPLITS = {"train": "train", "validation": "val", "test": "test"}
ADE20K_SPLITS = {"train": "training", "validation": "validation"}
# How a data set is given: the Cityscapes or ADE20K folder layout, or anything `load_segmentation_dataset` reads.
DATASET_TYPES = ("cityscapes", "ade20k", "datasets")


class InvalidSampleError(ValueError):
    """An image or label file that cannot be used: unreadable, truncated, or with invalid label values."""


def describe(id2label, source):
    """The `info.description` of a split: a JSON record of the label names, the ignore index and the source."""
    return json.dumps({"id2label": {str(k): v for k, v in id2label.items()}, "ignore_index": IGNORE_INDEX,
                       "source": source})


def label_names(dataset):
    """`id2label` of a split built here (or of any split of a `DatasetDict`)."""
    if isinstance(dataset, datasets.DatasetDict):
        dataset = next(iter(dataset.values()))
    try:
        return {int(k): v for k, v in json.loads(dataset.info.description)["id2label"].items()}
    except (TypeError, ValueError, KeyError) as error:
        raise ValueError("This data set carries no label names; build it with pcaa_hf.data.builders.") from error


def check_image(path):
    """Decode enough of an image file to know it is whole; raise `InvalidSampleError` naming it otherwise."""
    try:
        with Image.open(path) as image:
            if image.format == "PNG":
                image.verify()  # checks every chunk's CRC without decompressing
            else:
                image.load()
    except Exception as error:
        raise InvalidSampleError(f"Cannot read image {path}: {error}") from error


def read_label(path):
    try:
        with Image.open(path) as label:
            return np.asarray(label)
    except Exception as error:
        raise InvalidSampleError(f"Cannot read label map {path}: {error}") from error


def encode_label(train_ids):
    """A label map as PNG bytes: 8-bit, or 16-bit when some id exceeds 255."""
    if train_ids.size and (train_ids.min() < 0 or train_ids.max() > 65535):
        raise InvalidSampleError(f"Label values must lie in [0, 65535], got [{train_ids.min()}, {train_ids.max()}].")
    depth = np.uint8 if not train_ids.size or train_ids.max() <= 255 else np.uint16
    buffer = io.BytesIO()
    Image.fromarray(train_ids.astype(depth)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def cityscapes_train_ids(label, path):
    """gtFine label ids -> the 19 train ids (others 255), refusing values that are not Cityscapes ids."""
    if label.ndim != 2:
        raise InvalidSampleError(f"Label map {path} has shape {label.shape}; expected a single-channel label-id image.")
    invalid = np.setdiff1d(np.unique(label), list(CITYSCAPES_ID_TO_TRAIN_ID))
    if invalid.size:
        raise InvalidSampleError(f"Label map {path} holds values that are not Cityscapes label ids: {invalid[:10]}")
    return PCAAImageProcessor.apply_label_map(label, CITYSCAPES_ID_TO_TRAIN_ID)


def ade20k_train_ids(label, path):
    """ADE20K annotation values 0-150 -> reduced labels (0 -> 255, v -> v - 1)."""
    if label.ndim != 2:
        raise InvalidSampleError(f"Label map {path} has shape {label.shape}; expected a single-channel annotation.")
    if label.size and int(label.max()) > len(ADE20K_LABELS):
        raise InvalidSampleError(f"Label map {path} holds values above {len(ADE20K_LABELS)}: {int(label.max())}")
    return PCAAImageProcessor.reduce_label(label)


TRAIN_ID_CONVERTERS = {"cityscapes": cityscapes_train_ids, "ade20k": ade20k_train_ids}


def generate_examples(pairs, converter, skip_invalid, tables=None):
    """Rows of a split: the image by path (decoded lazily), the label as a PNG of train ids."""
    for image_path, label_path, *_ in pairs:
        try:
            check_image(image_path)
            label = TRAIN_ID_CONVERTERS[converter](read_label(label_path), label_path)
            with Image.open(image_path) as image:
                orientation = image.getexif().get(EXIF_ORIENTATION, 1)
                if orientation != 1:
                    raise InvalidSampleError(
                        f"Image {image_path} has EXIF orientation {orientation}: decoded upright, it would no longer "
                        f"line up with its label map {label_path}. Store it upright (orientation 1)."
                    )
                if image.size != (label.shape[1], label.shape[0]):
                    raise InvalidSampleError(
                        f"Image {image_path} is {image.size[0]}x{image.size[1]} but its label map {label_path} is "
                        f"{label.shape[1]}x{label.shape[0]}."
                    )
        except InvalidSampleError as error:
            if not skip_invalid:
                raise
            warnings.warn(f"Skipping a sample: {error}", stacklevel=2)
            continue
        yield {"image": str(image_path), "label": {"bytes": encode_label(label), "path": None}}


def build_split(pairs, converter, id2label, source, cache_dir, skip_invalid):
    # File sizes and modification times take part in the cache fingerprint: changed files are rebuilt.
    keyed = [(str(image), str(label), image.stat().st_size, image.stat().st_mtime_ns, label.stat().st_mtime_ns)
             for image, label in pairs]
    # The label tables and the format version take part too, since the generator is hashed by name, not content.
    tables = {"version": DATA_FORMAT_VERSION, "cityscapes": sorted(CITYSCAPES_ID_TO_TRAIN_ID.items()),
              "ade20k": len(ADE20K_LABELS)}
    try:
        split = datasets.Dataset.from_generator(
            generate_examples,
            gen_kwargs={"pairs": keyed, "converter": converter, "skip_invalid": skip_invalid, "tables": tables},
            features=FEATURES,
            cache_dir=None if cache_dir is None else str(cache_dir),
        )
    except datasets.exceptions.DatasetGenerationError as error:
        cause = error.__cause__ or error.__context__
        if isinstance(cause, InvalidSampleError):
            raise InvalidSampleError(str(cause)) from error
        raise
    split.info.description = describe(id2label, source)
    return split


def paired_files(images, labels, kind):
    """Match images and labels by key; refuse unmatched files, naming a few and counting all."""
    problems = []
    for what, missing in (("images without a label", sorted(set(images) - set(labels))),
                          ("labels without an image", sorted(set(labels) - set(images)))):
        if missing:
            names = ", ".join(str((images if what.startswith("images") else labels)[key]) for key in missing[:3])
            problems.append(f"{len(missing)} {what} (e.g. {names})")
    if problems:
        raise FileNotFoundError(f"{kind}: " + "; ".join(problems) + ".")
    return [(images[key], labels[key]) for key in sorted(images)]


def split_pairs(kind, folder, image_dir, label_dir, image_suffix, label_suffix):
    """The (image, label) files of one split folder, matched by name once the suffixes are removed."""
    for required in (image_dir, label_dir):
        if not required.is_dir():
            raise FileNotFoundError(f"{kind} split '{folder}' is missing: no folder {required}.")
    images = {p.name.removesuffix(image_suffix): p for p in image_dir.rglob(f"*{image_suffix}")}
    labels = {p.name.removesuffix(label_suffix): p for p in label_dir.rglob(f"*{label_suffix}")}
    if not images:
        raise FileNotFoundError(f"{kind} split '{folder}' has no *{image_suffix} images under {image_dir}.")
    return paired_files(images, labels, f"{kind} split '{folder}'")


def build_cityscapes(root, cache_dir=None, skip_invalid=False):
    """
    Cityscapes from its folder: `leftImg8bit/{train,val,test}/<city>/*_leftImg8bit.png` paired with
    `gtFine/<split>/<city>/*_gtFine_labelIds.png`, labels mapped to the 19 train ids (others 255). train and val are
    required, test is included when present. With `skip_invalid`, unreadable files and invalid label values are
    skipped with a warning instead of stopping the build.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"Cityscapes folder {root} does not exist.")
    id2label, _ = label_maps(CITYSCAPES_LABELS)
    splits = {}
    for name, folder in CITYSCAPES_SPLITS.items():
        image_dir, label_dir = root / "leftImg8bit" / folder, root / "gtFine" / folder
        if name == "test" and not (image_dir.is_dir() and label_dir.is_dir()):
            continue
        pairs = split_pairs("Cityscapes", folder, image_dir, label_dir, "_leftImg8bit.png", "_gtFine_labelIds.png")
        splits[name] = build_split(pairs, "cityscapes", id2label, f"cityscapes:{root}", cache_dir, skip_invalid)
    return datasets.DatasetDict(splits)


def build_ade20k(root, cache_dir=None, skip_invalid=False):
    """
    ADE20K (SceneParsing, `ADEChallengeData2016`): `images/{training,validation}/*.jpg` with
    `annotations/{training,validation}/*.png`, labels reduced (0 -> 255, v -> v - 1) to 150 classes. `root` is that
    folder or the folder containing it.
    """
    root = Path(root)
    if (root / "ADEChallengeData2016").is_dir():
        root = root / "ADEChallengeData2016"
    if not root.is_dir():
        raise FileNotFoundError(f"ADE20K folder {root} does not exist.")
    id2label, _ = label_maps(ADE20K_LABELS)
    splits = {}
    for name, folder in ADE20K_SPLITS.items():
        pairs = split_pairs("ADE20K", folder, root / "images" / folder, root / "annotations" / folder, ".jpg", ".png")
        splits[name] = build_split(pairs, "ade20k", id2label, f"ade20k:{root}", cache_dir, skip_invalid)
    return datasets.DatasetDict(splits)


def load_segmentation_dataset(path, image_column="image", label_column="label", id2label=None,
                              reduce_labels=False, label_map=None, **load_kwargs):
    """
    Any data set with image and label columns: a folder written by `save_to_disk`, or anything `datasets.load_dataset`
    reads (a Hub name, "parquet" with `data_files=...`, ...). Columns are renamed to `image`/`label`; `id2label` is a
    dict, a JSON file, or an `id2label.json` beside a local data set. `reduce_labels` and `label_map` turn the labels
    into train ids once (cached by `datasets.map`).
    """
    if load_kwargs.get("streaming"):
        raise ValueError("Streaming data sets are not supported: the transforms need random access (drop streaming).")
    local = Path(str(path))
    if (local / "dataset_dict.json").is_file() or (local / "dataset_info.json").is_file():
        loaded = datasets.load_from_disk(str(local))
    else:
        loaded = datasets.load_dataset(str(path), **load_kwargs)
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({str(load_kwargs.get("split") or "train"): loaded})
    for split_name, split in loaded.items():
        for column in (image_column, label_column):
            if column not in split.column_names:
                raise KeyError(
                    f"Split '{split_name}' of {path} has no column '{column}' (columns: {split.column_names})."
                )
    loaded = loaded.rename_columns({c: n for c, n in ((image_column, "image"), (label_column, "label")) if c != n})
    loaded = loaded.select_columns(["image", "label"]).cast(FEATURES)
    for split_name, split in loaded.items():
        if len(split) and np.asarray(split[0]["label"]).ndim != 2:
            raise ValueError(
                f"Split '{split_name}' of {path}: column '{label_column}' holds colour images; label maps must be "
                "single-channel images of class ids (convert palette or RGB masks to ids first)."
            )
    id2label = read_id2label(id2label, local)
    if reduce_labels or label_map:

        def to_train_ids(example):
            label = np.asarray(example["label"])
            if label_map:
                label = PCAAImageProcessor.apply_label_map(label, label_map)
            if reduce_labels:
                label = PCAAImageProcessor.reduce_label(label)
            return {"label": {"bytes": encode_label(label), "path": None}}

        loaded = loaded.map(to_train_ids, desc="Converting labels to train ids")
    for split in loaded.values():
        split.info.description = describe(id2label, f"dataset:{path}")
    return loaded


def open_dataset(dataset_type, path, **load_kwargs):
    """
    The splits of the data set at `path` of one of `DATASET_TYPES`; `load_kwargs` go to `load_segmentation_dataset`.
    """
    if dataset_type == "cityscapes":
        return build_cityscapes(path)
    if dataset_type == "ade20k":
        return build_ade20k(path)
    if dataset_type == "datasets":
        return load_segmentation_dataset(path, **load_kwargs)
    raise ValueError(f"The data set type must be one of {DATASET_TYPES}, got {dataset_type!r}.")


def select_split(splits, name, source, max_samples=None):
    """Split `name` of `splits` (read from `source`), cut to its first `max_samples` examples when given."""
    if name not in splits:
        raise ValueError(f"{source} has no split '{name}' (splits: {', '.join(splits)}).")
    split = splits[name]
    return split if max_samples is None else split.select(range(min(max_samples, len(split))))


def read_id2label(id2label, local_folder):
    """Label names from a dict, a JSON file, or the data set's own `id2label.json` (beside it, or in its Hub repo)."""
    if isinstance(id2label, dict):
        return {int(k): v for k, v in id2label.items()}
    if id2label is None and not local_folder.exists():
        from huggingface_hub import hf_hub_download

        try:
            id2label = hf_hub_download(str(local_folder), "id2label.json", repo_type="dataset")
        except Exception as error:
            raise FileNotFoundError(
                f"No label names: {local_folder} has no id2label.json on the Hub ({error}). Pass id2label as a dict "
                "or the path of a JSON file."
            ) from error
    candidate = Path(id2label) if id2label is not None else local_folder / "id2label.json"
    if not candidate.is_file():
        raise FileNotFoundError(
            f"No label names: {candidate} does not exist. Pass id2label as a dict or the path of a JSON file."
        )
    return {int(k): v for k, v in json.loads(candidate.read_text()).items()}
