"""The JSON side of the annotation readers: files, typed fields, images.

Loads an annotation file (malformed JSON names the line and column), reads
typed fields with errors naming their JSON path, validates the ``images``
list (and, given an images directory, each image file and its size), groups
flat COCO-style ``annotations`` per image, reads the ``categories`` list and
counts what a reader returns in a ``ReadStats``. Every problem raises
``records.AnnotationError(path, field, message)``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Optional

from PIL import Image

from input_pipeline import records
from input_pipeline.records import AnnotationError


@dataclasses.dataclass
class ReadStats:
  """Counts filled in by a reader (pass one in via ``stats=``)."""

  num_images: int = 0  # images returned
  num_instances: int = 0  # instances returned
  skipped_empty: int = 0  # images without instances (skipped unless kept)


def load_json(path: str) -> dict:
  """Reads a JSON object; malformed JSON names the line and column."""
  try:
    with open(path, 'r', encoding='utf-8') as f:
      text = f.read()
  except FileNotFoundError:
    raise AnnotationError(path, '', 'annotation file not found') from None
  except (OSError, UnicodeDecodeError) as err:
    raise AnnotationError(path, '', f'cannot read: {err}') from None
  try:
    data = json.loads(text)
  except json.JSONDecodeError as err:
    raise AnnotationError(
        path, 'json', f'malformed JSON at line {err.lineno} column ' f'{err.colno}: {err.msg}'
    ) from None
  if not isinstance(data, dict):
    raise AnnotationError(path, 'json', 'top level must be a JSON object')
  return data


def get(obj: Any, key: str, path: str, where: str, kind=None) -> Any:
  """``obj[key]``, raising AnnotationError naming ``where.key`` if absent."""
  field = f'{where}.{key}' if where else key
  if not isinstance(obj, dict) or key not in obj:
    raise AnnotationError(path, field, 'required key is missing')
  value = obj[key]
  if kind is not None and not is_kind(value, kind):
    raise AnnotationError(
        path, field, f'expected {kind_name(kind)}, got ' f'{type(value).__name__}'
    )
  return value


def is_kind(value: Any, kind) -> bool:
  """isinstance with JSON's meaning: bools are not numbers, floats are finite."""
  if kind is int:
    return isinstance(value, int) and not isinstance(value, bool)
  if kind is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
  return isinstance(value, kind)


def kind_name(kind) -> str:
  return {
      int: 'an integer',
      float: 'a number',
      list: 'a list',
      dict: 'an object',
      str: 'a string',
  }.get(kind, str(kind))


@dataclasses.dataclass
class ImageEntry:
  """One entry of the file's ``images`` list."""

  index: int  # position in the file's ``images`` list
  image_id: int
  file_name: str
  height: int
  width: int


def read_images(data: dict, path: str) -> list[ImageEntry]:
  """Validates the ``images`` list (ids unique, sizes positive)."""
  out, seen = [], set()
  for k, img in enumerate(get(data, 'images', path, '', list)):
    where = f'images[{k}]'
    image_id = get(img, 'id', path, where, int)
    file_name = get(img, 'file_name', path, where, str)
    height = get(img, 'height', path, where, int)
    width = get(img, 'width', path, where, int)
    if height <= 0 or width <= 0:
      raise AnnotationError(
          path, f'{where}.height', f'image {file_name} has ' f'non-positive size {height}x{width}'
      )
    if image_id in seen:
      raise AnnotationError(path, f'{where}.id', f'duplicate image id {image_id}')
    seen.add(image_id)
    out.append(ImageEntry(k, image_id, file_name, height, width))
  return out


def check_image_file(img: ImageEntry, images_dir: Optional[str], path: str):
  """The image must exist in ``images_dir`` with the annotated size."""
  if images_dir is None:
    return
  field = f'images[{img.index}].file_name'
  full = os.path.join(images_dir, img.file_name)
  if not os.path.isfile(full):
    raise AnnotationError(path, field, f'image file {img.file_name} not found ' f'in {images_dir}')
  try:
    with Image.open(full) as im:
      width, height = im.size
  except OSError as err:
    raise AnnotationError(path, field, f'cannot read image {full}: ' f'{err}') from None
  if (height, width) != (img.height, img.width):
    raise AnnotationError(
        path,
        f'images[{img.index}].height',
        f'{img.height}x{img.width} '
        f'(height x width) disagrees with image file {img.file_name} '
        f'({height}x{width})',
    )


def group_annotations(
    data: dict, path: str, images: list[ImageEntry]
) -> dict[int, list[tuple[int, dict]]]:
  """image id -> [(index in ``annotations``, annotation)] in file order."""
  ids = {img.image_id for img in images}
  groups: dict[int, list] = {}
  for k, ann in enumerate(get(data, 'annotations', path, '', list)):
    image_id = get(ann, 'image_id', path, f'annotations[{k}]', int)
    if image_id not in ids:
      raise AnnotationError(
          path, f'annotations[{k}].image_id', f'no image with id {image_id} in "images"'
      )
    groups.setdefault(image_id, []).append((k, ann))
  return groups


def category_names(data: dict) -> dict:
  """category id -> name from ``categories`` (lenient: what is readable)."""
  cats = data.get('categories')
  if not isinstance(cats, list):
    return {}
  return {c.get('id'): str(c.get('name', '')) for c in cats if isinstance(c, dict)}


def read_categories(data: dict, path: str) -> list[dict]:
  """The ``categories`` list as [{'id', 'name'}] sorted by id (strict: every
  entry an object with an integer id, unique, and a string name)."""
  out, seen = [], set()
  for k, cat in enumerate(get(data, 'categories', path, '', list)):
    where = f'categories[{k}]'
    if not isinstance(cat, dict):
      raise AnnotationError(path, where, f'expected an object, got {type(cat).__name__}')
    cat_id = get(cat, 'id', path, where, int)
    name = get(cat, 'name', path, where, str)
    if cat_id in seen:
      raise AnnotationError(path, f'{where}.id', f'duplicate category id {cat_id}')
    seen.add(cat_id)
    out.append({'id': cat_id, 'name': name})
  return sorted(out, key=lambda c: c['id'])


def flat_instances(path: str, keep_empty: bool = False):
  """Reads a flat COCO-style file (one annotation per instance).

  Returns ([(image, [(index in ``annotations``, annotation)])] for the images
  that have annotations (all images with ``keep_empty``), category id -> name,
  number of images without any).
  """
  data = load_json(path)
  images = read_images(data, path)
  groups = group_annotations(data, path, images)
  per_image = [
      (img, groups.get(img.image_id, []))
      for img in images
      if keep_empty or groups.get(img.image_id)
  ]
  empty = sum(1 for img in images if not groups.get(img.image_id))
  return per_image, category_names(data), empty


def empty_record(img: ImageEntry, images_dir: Optional[str], path: str) -> records.ImageAnnotation:
  """The record of an image without instances (its file checked)."""
  check_image_file(img, images_dir, path)
  return records.ImageAnnotation(img.image_id, img.file_name, img.height, img.width, [], [])


def finish(out: list, stats: Optional[ReadStats], skipped: int) -> list:
  """Adds ``out``'s counts to ``stats`` and returns ``out``."""
  if stats is not None:
    stats.num_images += len(out)
    stats.num_instances += sum(a.num_instances for a in out)
    stats.skipped_empty += skipped
  return out
