"""The files around an evaluation besides its scores: a JSON label map for the labels it reads, and its predictions
written as PNGs, one per image, named after the image files."""

import json
from pathlib import Path

import datasets
from PIL import Image

from pcaa_hf.data.label_sets import CITYSCAPES_LABELS
from pcaa_hf.inference.visualisation import cityscapes_label_ids, colourise, palette_for


def read_label_map(path):
    """{raw label value: train id} from a JSON file {"26": 13, ...} (e.g. Cityscapes label ids to train ids)."""
    return {int(raw): int(train_id) for raw, train_id in json.loads(Path(path).read_text()).items()}


def prediction_names(split):
    """One file stem per image: the image file's stem where files are known and their stems unique."""
    sources = split.cast_column("image", datasets.Image(decode=False))["image"]
    stems = [Path(source["path"]).stem if source.get("path") else None for source in sources]
    if None in stems or len(set(stems)) != len(stems):
        return [f"{index:06d}" if stem is None else f"{index:06d}_{stem}" for index, stem in enumerate(stems)]
    return stems


class PredictionWriter:
    """
    An `on_prediction` callback of `evaluate_segmentation` writing each prediction of `split` (its examples'
    indices) as a PNG named after its image (`prediction_names`): with `palette`, in the label set's colours to
    `output_dir/predictions/`; with `cityscapes_label_ids`, as Cityscapes label ids, the test server's format, to
    `output_dir/cityscapes_label_ids/` (for the 19 Cityscapes classes only). The folders are made at once.
    """

    def __init__(self, output_dir, split, id2label, *, palette=True, cityscapes_label_ids=False):
        if cityscapes_label_ids and tuple(id2label[i] for i in sorted(id2label)) != CITYSCAPES_LABELS:
            raise ValueError("Cityscapes label ids (the test server's format) need the 19 Cityscapes classes.")
        self.names = prediction_names(split)
        self.palette = palette_for(id2label)
        self.palette_dir = Path(output_dir) / "predictions" if palette else None
        self.label_id_dir = Path(output_dir) / "cityscapes_label_ids" if cityscapes_label_ids else None
        for folder in (self.palette_dir, self.label_id_dir):
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True)

    def __call__(self, index, prediction):
        if self.palette_dir is not None:
            colourise(prediction, self.palette).save(self.palette_dir / f"{self.names[index]}.png")
        if self.label_id_dir is not None:
            Image.fromarray(cityscapes_label_ids(prediction)).save(self.label_id_dir / f"{self.names[index]}.png")


__all__ = ["PredictionWriter", "prediction_names", "read_label_map"]
