"""Class names of the data sets the paper uses, in train-id order, and their label conventions."""

IGNORE_INDEX = 255  # the label value every loss, transform and data set here ignores

CITYSCAPES_LABELS = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation", "terrain",
    "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)

# The official Cityscapes table (cityscapesscripts' labels.py): label id -> train id, 255 for the ignored classes.
CITYSCAPES_ID_TO_TRAIN_ID = {
    0: 255, 1: 255, 2: 255, 3: 255, 4: 255, 5: 255, 6: 255, 7: 0, 8: 1, 9: 255, 10: 255, 11: 2, 12: 3, 13: 4, 14: 255,
    15: 255, 16: 255, 17: 5, 18: 255, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15,
    29: 255, 30: 255, 31: 16, 32: 17, 33: 18,
}

# ADE20K SceneParsing (ADEChallengeData2016) after "reduce labels": annotation value v > 0 is class v - 1.
ADE20K_LABELS = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet", "sidewalk",
    "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water", "painting", "sofa",
    "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp",
    "bathtub", "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter", "sand",
    "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table",
    "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower",
    "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight",
    "booth", "television receiver", "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator",
    "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer",
    "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher",
    "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier",
    "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)

LABEL_SETS = {"cityscapes": CITYSCAPES_LABELS, "ade20k": ADE20K_LABELS}

# PCAAImageProcessor settings for each data set's raw files and the paper's evaluation: Cityscapes frames at full
# resolution with gtFine label ids mapped to train ids; ADE20K images rescaled to fit 2048x512 with reduced labels.
IMAGE_PROCESSOR_SETTINGS = {
    "cityscapes": {"label_map": CITYSCAPES_ID_TO_TRAIN_ID},
    "ade20k": {"do_resize": True, "size": {"longest_edge": 2048, "shortest_edge": 512}, "do_reduce_labels": True},
}


def label_maps(names):
    """`id2label` and `label2id` for a sequence of class names."""
    id2label = dict(enumerate(names))
    return id2label, {name: index for index, name in id2label.items()}
