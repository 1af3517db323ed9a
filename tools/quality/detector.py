"""Score generated toy-world images: which concepts are present, checked by colour and shape.

A pixel belongs to a concept's colour when it is within ``COLOUR_RADIUS`` (RGB distance, [0, 1]
scale) of it and nearer to it than to any other concept colour. An object concept is present when
its colour's largest connected region is at least ``MIN_AREA`` pixels and has the concept's shape:

* disk: fills 0.6-0.92 of its bounding box, aspect ratio within 0.6-1.6;
* square: fills at least 0.8 of its bounding box, aspect ratio within 0.6-1.6;
* triangle: fills 0.3-0.7 of its bounding box;
* stripe: spans at least 80% of the width and is at most a third of the height tall.

The style concept is present when at least ``STYLE_FRACTION`` of the image has its colour.
``colour_only`` drops the shape checks (reported beside the shape-checked recall).

With regions, :func:`placement` checks an object concept against its region: placed when it is
present and at least ``PLACED_SHARE`` of its largest region lies inside; bleeding when ``MIN_AREA``
or more pixels of its colour lie outside.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .world import ALL_CONCEPTS, Concept

COLOUR_RADIUS = 0.22
MIN_AREA = 20
STYLE_FRACTION = 0.3
PLACED_SHARE = 0.8


@dataclass(frozen=True)
class Detection:
    present: frozenset[str]  # names of the concepts found
    colour_present: frozenset[str]  # names found by colour alone (no shape check)


def colour_masks(image: np.ndarray) -> dict[str, np.ndarray]:
    """Per concept, the pixels of its colour; ``image`` is ``[H, W, 3]`` in [0, 1]."""
    references = np.array([concept.colour for concept in ALL_CONCEPTS], dtype=np.float32)
    distances = np.linalg.norm(image[:, :, None, :] - references[None, None], axis=-1)
    nearest = distances.argmin(axis=-1)
    close = distances.min(axis=-1) <= COLOUR_RADIUS
    return {concept.name: close & (nearest == index) for index, concept in enumerate(ALL_CONCEPTS)}


def largest_region(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = ndimage.sum(mask, labels, index=range(1, count + 1))
    return labels == (1 + int(np.argmax(sizes)))


def has_shape(region: np.ndarray, shape: str) -> bool:
    rows, cols = np.nonzero(region)
    height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    fill = region.sum() / (height * width)
    aspect = width / height
    if shape == "stripe":
        return width >= 0.8 * region.shape[1] and height <= region.shape[0] / 3
    if shape == "disk":
        return 0.6 <= fill <= 0.92 and 0.6 <= aspect <= 1.6
    if shape == "square":
        return fill >= 0.8 and 0.6 <= aspect <= 1.6
    if shape == "triangle":
        return 0.3 <= fill <= 0.7
    raise ValueError(f"unknown shape {shape!r}")


def concept_found(concept: Concept, mask: np.ndarray, check_shape: bool) -> bool:
    if concept.is_style:
        return mask.mean() >= STYLE_FRACTION
    region = largest_region(mask)
    if region.sum() < MIN_AREA:
        return False
    return has_shape(region, concept.shape) if check_shape else True


def detect(image: np.ndarray) -> Detection:
    """Which concepts ``image`` (``[H, W, 3]``, values in [0, 1]) shows."""
    return detect_in(colour_masks(image.astype(np.float32)))


def detect_in(masks: dict[str, np.ndarray]) -> Detection:
    """Which concepts the per-concept colour ``masks`` (from :func:`colour_masks`) show."""
    present = frozenset(c.name for c in ALL_CONCEPTS if concept_found(c, masks[c.name], check_shape=True))
    colour_present = frozenset(c.name for c in ALL_CONCEPTS if concept_found(c, masks[c.name], check_shape=False))
    return Detection(present, colour_present)


def placement(mask: np.ndarray, concept: Concept, region: np.ndarray) -> tuple[bool, bool]:
    """``(placed, bleeds)`` of object ``concept``, whose colour covers ``mask`` (from
    :func:`colour_masks`), against its boolean ``[H, W]`` ``region``."""
    bleeds = int((mask & ~region).sum()) >= MIN_AREA
    if not concept_found(concept, mask, check_shape=True):
        return False, bleeds
    largest = largest_region(mask)
    return bool((largest & region).sum() >= PLACED_SHARE * largest.sum()), bleeds
