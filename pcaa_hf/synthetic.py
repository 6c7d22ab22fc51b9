"""Generated street scenes and indoor/outdoor scenes in the Cityscapes and ADE20K folder layouts, for tests and demos.

The scenes are learnable (each class has its own colour family and texture) but not trivial (colours are jittered per
image, textures are noisy, objects overlap and vary in size and position). Labels use the real ids of each data set:
Cityscapes `*_gtFine_labelIds.png` values (including ids that map to 255, such as "ego vehicle" and "static") and
ADE20K annotation values 0-150 (0 = "other").
"""

from pathlib import Path

import numpy as np
from PIL import Image

# Cityscapes label ids and the colour each class is drawn around.
CITYSCAPES_SCENE_COLOURS = {
    "unlabeled": (0, (20, 20, 20)),
    "ego vehicle": (1, (40, 40, 50)),
    "static": (4, (110, 90, 60)),
    "road": (7, (128, 64, 128)),
    "sidewalk": (8, (230, 170, 200)),
    "building": (11, (90, 90, 90)),
    "pole": (17, (200, 200, 80)),
    "vegetation": (21, (60, 140, 40)),
    "sky": (23, (90, 150, 230)),
    "person": (24, (220, 40, 70)),
    "car": (26, (20, 30, 160)),
}

CITIES = {"train": ("aachen", "bochum"), "val": ("frankfurt",), "test": ("berlin",)}


def textured(shape, colour, rng, jitter=25.0, noise=18.0, stripes=0.0):
    """An (H, W, 3) float image around `colour`: a per-image colour jitter, pixel noise and optional stripes."""
    height, width = shape
    base = np.asarray(colour, dtype=np.float32) + rng.normal(0, jitter, 3)
    image = base + rng.normal(0, noise, (height, width, 3)).astype(np.float32)
    if stripes:
        rows = np.arange(height, dtype=np.float32)[:, None, None]
        image = image + stripes * np.sin(rows * rng.uniform(0.3, 0.8))
    return image


def paint(image, labels, mask, colour, label, rng, **texture):
    mask = np.broadcast_to(mask, labels.shape)
    image[mask] = textured(image.shape[:2], colour, rng, **texture)[mask]
    labels[mask] = label


def street_scene(width, height, rng):
    """One Cityscapes-like frame: (H, W, 3) uint8 image and (H, W) uint8 label ids."""
    image = np.zeros((height, width, 3), dtype=np.float32)
    labels = np.zeros((height, width), dtype=np.uint8)
    rows = np.arange(height)[:, None]
    cols = np.arange(width)[None, :]
    ids = CITYSCAPES_SCENE_COLOURS

    horizon = int(height * rng.uniform(0.35, 0.5))
    paint(image, labels, rows < horizon, ids["sky"][1], ids["sky"][0], rng, noise=8.0)
    skyline = horizon - (rng.uniform(0.1, 0.3) * height * (1 + np.sin(cols / width * rng.uniform(3, 9)))).astype(int)
    paint(image, labels, (rows >= skyline) & (rows < horizon), ids["building"][1], ids["building"][0], rng,
          stripes=20.0)
    for _ in range(rng.integers(1, 4)):  # trees in front of the buildings
        centre_x, radius = rng.uniform(0, width), rng.uniform(0.05, 0.15) * width
        centre_y = horizon - rng.uniform(0, 0.15) * height
        tree = (cols - centre_x) ** 2 + ((rows - centre_y) * 1.5) ** 2 < radius**2
        paint(image, labels, tree, ids["vegetation"][1], ids["vegetation"][0], rng, noise=35.0)

    ground = rows >= horizon
    # The road is a trapezoid widening towards the camera; sidewalks flank it.
    spread = (rows - horizon) / max(height - horizon, 1)
    centre = width * rng.uniform(0.4, 0.6)
    half_road = width * (0.05 + 0.45 * spread)
    road = ground & (np.abs(cols - centre) < half_road)
    paint(image, labels, ground & ~road, ids["sidewalk"][1], ids["sidewalk"][0], rng)
    paint(image, labels, road, ids["road"][1], ids["road"][0], rng, noise=12.0)

    for _ in range(rng.integers(1, 5)):  # cars on the road, bigger when closer
        y = rng.uniform(horizon + 0.1 * (height - horizon), height * 0.9)
        size = 0.04 * width + 0.25 * width * (y - horizon) / max(height - horizon, 1)
        x = centre + rng.uniform(-0.8, 0.8) * width * (0.05 + 0.45 * (y - horizon) / max(height - horizon, 1))
        car = (np.abs(cols - x) < size / 2) & (rows > y - size * 0.45) & (rows < y)
        paint(image, labels, car, ids["car"][1], ids["car"][0], rng)
    for _ in range(rng.integers(1, 6)):  # people on the sidewalks
        y = rng.uniform(horizon + 0.05 * height, height * 0.95)
        tall = 0.05 * height + 0.3 * height * (y - horizon) / max(height - horizon, 1)
        x = rng.choice([rng.uniform(0, width * 0.2), rng.uniform(width * 0.8, width)])
        person = (np.abs(cols - x) < tall * 0.15) & (rows > y - tall) & (rows < y)
        paint(image, labels, person, ids["person"][1], ids["person"][0], rng)
    for _ in range(rng.integers(0, 3)):  # poles and unlabelled clutter (static: mapped to 255)
        x = rng.uniform(0, width)
        pole = (np.abs(cols - x) < max(1, width // 200)) & (rows > horizon - 0.2 * height) & (rows < height * 0.8)
        paint(image, labels, pole, ids["pole"][1], ids["pole"][0], rng, noise=10.0)
        static = (np.abs(cols - rng.uniform(0, width)) < 0.03 * width) & (np.abs(rows - rng.uniform(
            horizon, height)) < 0.03 * height)
        paint(image, labels, static, ids["static"][1], ids["static"][0], rng)
    hood = rows > height * rng.uniform(0.9, 0.95)  # the ego vehicle's bonnet, as in every Cityscapes frame
    paint(image, labels, hood, ids["ego vehicle"][1], ids["ego vehicle"][0], rng, noise=5.0)
    return np.clip(image, 0, 255).astype(np.uint8), labels


def write_cityscapes_tree(output, num_train=8, num_val=4, num_test=0, size=(512, 256), seed=0):
    """
    Write `leftImg8bit/<split>/<city>/*_leftImg8bit.png` and `gtFine/<split>/<city>/*_gtFine_labelIds.png` under
    `output`. Returns the number of frames written per split.
    """
    rng = np.random.default_rng(seed)
    output = Path(output)
    counts = {}
    for split, number in (("train", num_train), ("val", num_val), ("test", num_test)):
        for index in range(number):
            city = CITIES[split][index % len(CITIES[split])]
            stem = f"{city}_{index:06d}_000019"
            image, labels = street_scene(size[0], size[1], rng)
            if split == "test":  # like the real test split, whose public labels carry no information
                labels[:] = 0
            image_dir, label_dir = output / "leftImg8bit" / split / city, output / "gtFine" / split / city
            image_dir.mkdir(parents=True, exist_ok=True)
            label_dir.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(image_dir / f"{stem}_leftImg8bit.png")
            Image.fromarray(labels).save(label_dir / f"{stem}_gtFine_labelIds.png")
        counts[split] = number
    return counts


def mixed_scene(width, height, rng, num_classes=150):
    """One ADE20K-like image: regions of 3-8 random classes (annotation values 1..150, 0 = other) in a Voronoi layout."""
    palette = np.random.default_rng(1234).integers(30, 226, (num_classes + 1, 3))  # one colour family per class
    classes = rng.choice(np.arange(1, num_classes + 1), size=rng.integers(3, 9), replace=False)
    seeds = rng.uniform(0, 1, (len(classes) * 2, 2)) * (height, width)
    owners = np.concatenate([classes, classes])
    rows, cols = np.mgrid[0:height, 0:width]
    distances = (rows[..., None] - seeds[:, 0]) ** 2 + (cols[..., None] - seeds[:, 1]) ** 2
    labels = owners[distances.argmin(-1)].astype(np.uint8)
    image = np.zeros((height, width, 3), dtype=np.float32)
    for value in np.unique(labels):
        paint(image, labels, labels == value, palette[value], value, rng, noise=20.0,
              stripes=15.0 * (value % 3 == 0))
    other = rng.random((height // 16 + 1, width // 16 + 1)) < 0.05  # a few "other" (0) blocks
    labels[np.kron(other, np.ones((16, 16), dtype=bool))[:height, :width]] = 0
    return np.clip(image, 0, 255).astype(np.uint8), labels


def write_ade20k_tree(output, num_train=8, num_val=4, size=(256, 192), seed=0):
    """Write `ADEChallengeData2016/{images,annotations}/{training,validation}/` under `output` (JPEG images, PNG labels)."""
    rng = np.random.default_rng(seed)
    root = Path(output) / "ADEChallengeData2016"
    counts = {}
    for split, prefix, number in (("training", "ADE_train", num_train), ("validation", "ADE_val", num_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for index in range(number):
            width = int(size[0] * rng.uniform(0.8, 1.2))  # ADE20K images vary in size
            image, labels = mixed_scene(width, size[1], rng)
            Image.fromarray(image).save(root / "images" / split / f"{prefix}_{index + 1:08d}.jpg", quality=95)
            Image.fromarray(labels).save(root / "annotations" / split / f"{prefix}_{index + 1:08d}.png")
        counts[split] = number
    return counts
