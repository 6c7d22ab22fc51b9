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

from pcaa_hf.model.image_processing_pcaa import (
    PCAAImageProcessor,
    decompression_bombs_refused,
    unreadable_image_message,
)

from .label_sets import ADE20K_LABELS, CITYSCAPES_ID_TO_TRAIN_ID, CITYSCAPES_LABELS, IGNORE_INDEX, label_maps

logger = logging.getLogger(__name__)

# Part of every cache key: bump it when the stored labels' meaning changes, so old caches are not reused.
DATA_FORMAT_VERSION = 1
EXIF_ORIENTATION = 0x0112
FEATURES = datasets.Features({"image": datasets.Image(), "label": datasets.Image()})
CITYSCAPES_SPLITS = {"train": "train", "validation": "val", "test": "test"}
ADE20K_SPLITS = {"train": "training", "validation": "validation"}
# File name endings of each layout, matched ignoring case (ADE20K images are also found as .JPG or .jpeg).
CITYSCAPES_SUFFIXES = (("_leftImg8bit.png",), ("_gtFine_labelIds.png",))
ADE20K_SUFFIXES = ((".jpg", ".jpeg"), (".png",))
# Sub-folders that give a folder's layout away, for a folder tree given as a `datasets` data set by mistake.
LAYOUT_FOLDERS = {"cityscapes": ("leftImg8bit", "gtFine"), "ade20k": ("images", "annotations")}
# Label column types that `datasets.Image()` can be cast from: images, or paths / encoded bytes of image files.
IMAGE_STORAGE_TYPES = ("string", "large_string", "binary", "large_binary")
# How a data set is given: the Cityscapes or ADE20K folder layout, or anything `load_segmentation_dataset` reads.
# The data set folders with a layout of their own (built by this module), and every type `open_dataset` opens.
FOLDER_LAYOUTS = ("cityscapes", "ade20k")
DATASET_TYPES = (*FOLDER_LAYOUTS, "datasets")


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


def open_stored(source):
    """PIL's image of a file path, or of a file's bytes (a `datasets.Image(decode=False)` value's "bytes")."""
    return Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)


def check_image(source):
    """
    Decode an image file (a path, or its bytes) whole, so that a damaged one is named now rather than failing when
    training reads it; its (width, height) and EXIF orientation. Raises `InvalidSampleError` naming it otherwise.
    """
    try:
        with decompression_bombs_refused():
            with open_stored(source) as image:
                if image.format == "PNG":
                    image.verify()  # every chunk's CRC, which decoding does not check; the file must be reopened
            with open_stored(source) as image:
                image.load()  # damaged compressed data passes the CRCs
                return image.size, image.getexif().get(EXIF_ORIENTATION, 1)
    except Exception as error:  # whatever PIL raises for a damaged file
        raise InvalidSampleError(unreadable_image_message(stored_name(source), error)) from error


def read_label(source):
    """The values of a label map file (a path, or its bytes)."""
    try:
        with decompression_bombs_refused(), open_stored(source) as label:
            return np.asarray(label)
    except Exception as error:
        raise InvalidSampleError(f"Cannot read label map {stored_name(source)}: {error}") from error


def stored_name(source):
    return "(stored in the data set)" if isinstance(source, bytes) else source


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
            size, orientation = check_image(image_path)
            label = TRAIN_ID_CONVERTERS[converter](read_label(label_path), label_path)
            if orientation != 1:
                raise InvalidSampleError(
                    f"Image {image_path} has EXIF orientation {orientation}: decoded upright, it would no longer "
                    f"line up with its label map {label_path}. Store it upright (orientation 1)."
                )
            if size != (label.shape[1], label.shape[0]):
                raise InvalidSampleError(
                    f"Image {image_path} is {size[0]}x{size[1]} but its label map {label_path} is "
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


def files_by_key(folder, suffixes, kind):
    """
    The files under `folder` whose names end with one of `suffixes` (any case), keyed by their path inside `folder`
    without that ending: the same name in two sub-folders (two cities) gives two keys. Two files with one key
    (x.jpg and x.jpeg) are refused.
    """
    files = {}
    for path in sorted(folder.rglob("*")):
        suffix = next((s for s in suffixes if path.name.lower().endswith(s.lower())), None)
        if suffix is None or not path.is_file():
            continue
        key = path.relative_to(folder).as_posix()[: -len(suffix)]
        if key in files:
            raise ValueError(f"{kind}: {files[key]} and {path} are the same example; keep one of them.")
        files[key] = path
    return files


def split_pairs(kind, folder, image_dir, label_dir, suffixes):
    """
    The (image, label) files of one split folder, matched by their paths inside `image_dir` and `label_dir` once
    `suffixes` (image endings, label endings) are removed.
    """
    for required in (image_dir, label_dir):
        if not required.is_dir():
            raise FileNotFoundError(f"{kind} split '{folder}' is missing: no folder {required}.")
    where = f"{kind} split '{folder}'"
    images, labels = (files_by_key(path, ends, where) for path, ends in zip((image_dir, label_dir), suffixes))
    if not images:
        endings = ", ".join(f"*{suffix}" for suffix in suffixes[0])
        raise FileNotFoundError(f"{where} has no {endings} images under {image_dir}.")
    return paired_files(images, labels, where)


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
        pairs = split_pairs("Cityscapes", folder, image_dir, label_dir, CITYSCAPES_SUFFIXES)
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
        pairs = split_pairs("ADE20K", folder, root / "images" / folder, root / "annotations" / folder,
                            ADE20K_SUFFIXES)
        splits[name] = build_split(pairs, "ade20k", id2label, f"ade20k:{root}", cache_dir, skip_invalid)
    return datasets.DatasetDict(splits)


def load_segmentation_dataset(path, image_column="image", label_column="label", id2label=None,
                              reduce_labels=False, label_map=None, skip_invalid=False, **load_kwargs):
    """
    Any data set with image and label columns: a folder written by `save_to_disk`, or anything `datasets.load_dataset`
    reads (a Hub name, "parquet" with `data_files=...`, ...). Columns are renamed to `image`/`label`; `id2label` is a
    dict, a JSON file, or an `id2label.json` beside a local data set. `reduce_labels` and `label_map` turn the labels
    into train ids once (cached by `datasets.map`). Every example is checked once (cached by `datasets.filter`): a
    single-channel label of its image's size, with values in `[0, len(id2label))` or 255 (after `label_map` and
    `reduce_labels`); a bad one raises `InvalidSampleError` naming it, or with `skip_invalid` is left out with a
    warning.
    """
    if load_kwargs.get("streaming"):
        raise ValueError("Streaming data sets are not supported: the transforms need random access (drop streaming).")
    local = Path(str(path))
    if (local / "dataset_dict.json").is_file() or (local / "dataset_info.json").is_file():
        loaded = datasets.load_from_disk(str(local))
    else:
        refuse_folder_layouts(local)
        loaded = datasets.load_dataset(str(path), **load_kwargs)
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({str(load_kwargs.get("split") or "train"): loaded})
    for split_name, split in loaded.items():
        for column in (image_column, label_column):
            if column not in split.column_names:
                raise KeyError(
                    f"Split '{split_name}' of {path} has no column '{column}' (columns: {split.column_names})."
                )
            check_image_column(split.features[column], column, f"Split '{split_name}' of {path}")
    loaded = loaded.rename_columns({c: n for c, n in ((image_column, "image"), (label_column, "label")) if c != n})
    loaded = loaded.select_columns(["image", "label"]).cast(FEATURES)
    id2label = read_id2label(id2label, local)

    def train_ids(label):
        if label_map:
            label = PCAAImageProcessor.apply_label_map(label, label_map)
        return PCAAImageProcessor.reduce_label(label) if reduce_labels else label

    checked = {}
    for split_name, split in loaded.items():
        where = f"split '{split_name}' of {path}"
        # The check decodes the files itself, to name the example of one that cannot be read.
        checked[split_name] = set_decoding(set_decoding(split, False).filter(
            ExampleCheck(where, label_column, len(id2label), train_ids, skip_invalid), with_indices=True,
            input_columns=["image", "label"], desc=f"Checking {where}",
        ), True)
    loaded = datasets.DatasetDict(checked)
    if reduce_labels or label_map:
        loaded = loaded.map(lambda example: {"label": {"bytes": encode_label(train_ids(np.asarray(example["label"]))),
                                                       "path": None}},
                            desc="Converting labels to train ids")
    for split in loaded.values():
        split.info.description = describe(id2label, f"dataset:{path}")
    return loaded


def set_decoding(split, decode):
    """`split` with its image columns decoded to PIL images, or left as stored ({"bytes", "path"}); no data copied."""
    for name in FEATURES:
        split = split.cast_column(name, datasets.Image(decode=decode))
    return split


def refuse_folder_layouts(folder):
    """A Cityscapes or ADE20K folder given as a `datasets` data set: say which data set type reads it."""
    roots = (folder, folder / "ADEChallengeData2016")
    for dataset_type, required in LAYOUT_FOLDERS.items():
        if any(all((root / name).is_dir() for name in required) for root in roots):
            raise ValueError(
                f"{folder} is a folder in the {dataset_type} layout ({'/, '.join(required)}/), not a `datasets` data "
                f"set: give its data set type as '{dataset_type}' (--dataset_type {dataset_type}) instead of "
                "'datasets'."
            )


def check_image_column(feature, column, where):
    """Refuse a column that cannot hold images (e.g. an image-classification data set's integer labels)."""
    storage = getattr(feature, "dtype", None)
    if not isinstance(feature, datasets.Image) and storage not in IMAGE_STORAGE_TYPES:
        raise ValueError(
            f"{where}: column '{column}' holds {feature!r}, not images; image and label columns must hold images "
            "(label maps: single-channel images of class ids, one per image, of its size)."
        )


class ExampleCheck:
    """
    `datasets.filter` function over (image, label, index): whether an example is usable (see
    `load_segmentation_dataset`) and whole; a bad example raises `InvalidSampleError` naming it, or with
    `skip_invalid` is dropped with a warning. Image and label come as stored: {"bytes", "path"}.
    """

    def __init__(self, where, label_column, num_labels, train_ids, skip_invalid):
        self.where, self.label_column, self.num_labels = where, label_column, num_labels
        self.train_ids, self.skip_invalid = train_ids, skip_invalid

    def __call__(self, image, label, index):
        try:
            self.check(image["bytes"] or image["path"], label["bytes"] or label["path"])
        except InvalidSampleError as error:
            if not self.skip_invalid:
                raise InvalidSampleError(f"Example {index} of {self.where}: {error}") from error
            warnings.warn(f"Skipping example {index} of {self.where}: {error}", stacklevel=2)
            return False
        return True

    def check(self, image, label):
        (width, height), _ = check_image(image)
        label = read_label(label)
        if label.ndim != 2:
            raise InvalidSampleError(
                f"column '{self.label_column}' holds colour images (this one: {label.shape}); label maps must be "
                "single-channel images of class ids (convert palette or RGB masks to ids first)."
            )
        if (height, width) != label.shape:
            raise InvalidSampleError(
                f"the image is {width}x{height} but its label map is {label.shape[1]}x{label.shape[0]}."
            )
        values = np.unique(self.train_ids(label))
        invalid = values[((values < 0) | (values >= self.num_labels)) & (values != IGNORE_INDEX)]
        if invalid.size:
            raise InvalidSampleError(
                f"label values {invalid[:10].tolist()} are neither class ids in [0, {self.num_labels}) nor the "
                f"ignore index {IGNORE_INDEX}."
            )


def open_dataset(dataset_type, path, skip_invalid=False, **load_kwargs):
    """
    The splits of the data set at `path` of one of `DATASET_TYPES`; `load_kwargs` go to `load_segmentation_dataset`.
    With `skip_invalid`, bad examples are left out with a warning instead of stopping.
    """
    if dataset_type == "cityscapes":
        return build_cityscapes(path, skip_invalid=skip_invalid)
    if dataset_type == "ade20k":
        return build_ade20k(path, skip_invalid=skip_invalid)
    if dataset_type == "datasets":
        return load_segmentation_dataset(path, skip_invalid=skip_invalid, **load_kwargs)
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
