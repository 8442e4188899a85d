"""The predict modes' output per image: its COCO results JSON and its
picture (``sln_jax.visualization.pictures``), and how image files are found
and named.
"""

from __future__ import annotations

import json
import re
from typing import Mapping, Sequence

import numpy as np

from sln_jax import files
from sln_jax.evaluation.results import detections_to_results
from sln_jax.visualization import pictures

# Files the predict modes read as images (by suffix, any case).
IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.tif', '.tiff', '.webp', '.ppm')


def image_id_of(stem: str, fallback: int) -> int:
  """The image id of a predicted file: the trailing digits of its stem
  (COCO names), else ``fallback``."""
  digits = re.search(r'(\d+)$', stem)
  return int(digits.group(1)) if digits else fallback


# --------------------------------------------------------------- pictures
def render_prediction(
    image: np.ndarray, results: Sequence[dict], score_threshold: float = 0.0
) -> np.ndarray:
  """(H', W', 3) uint8 picture of one image's COCO ``results`` with ``score
  >= score_threshold`` (``pictures.prediction_picture``: enlarged to at
  least ``draw.MIN_LONG_SIDE`` pixels, captioned, legend underneath)."""
  return pictures.prediction_picture(image, results, score_threshold)


def draw_prediction(
    image: np.ndarray, results: Sequence[dict], path: str, score_threshold: float = 0.0
) -> None:
  """Writes ``render_prediction(image, results, score_threshold)`` to
  ``path`` (PNG, atomic)."""
  picture = render_prediction(image, results, score_threshold)
  with files.atomic_output_file(path, 'wb') as f:
    pictures.save_png(picture, f)


def write_prediction(
    image_id: int,
    dets: Mapping[str, np.ndarray],
    image_scale: Sequence[float],
    image: np.ndarray,
    json_path: str,
    png_path: str,
    **kwargs,
) -> int:
  """Writes one image's COCO results (``detections_to_results(image_id,
  dets, image_scale, image.shape[:2], **kwargs)``) to ``json_path`` and its
  picture to ``png_path`` (both atomic); returns the number of results."""
  results = detections_to_results(image_id, dets, image_scale, image.shape[:2], **kwargs)
  write_results_and_picture(results, image, json_path, png_path, kwargs.get('score_threshold', 0.0))
  return len(results)


def write_results_and_picture(
    results: Sequence[dict],
    image: np.ndarray,
    json_path: str,
    png_path: str,
    score_threshold: float = 0.0,
) -> None:
  """Writes one image's COCO ``results`` to ``json_path`` and their picture
  over ``image`` to ``png_path`` (both atomic); ``score_threshold`` is the
  one the results were kept at (the picture's caption says it)."""
  with files.atomic_output_file(json_path) as f:
    json.dump(list(results), f)
  draw_prediction(image, results, png_path, score_threshold)
