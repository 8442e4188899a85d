"""Runs an exported SLN (``.sln``, written by ``sln_jax.export``) without the
training stack: jax, numpy, PIL and pycocotools, nothing of Flax, Optax,
Orbax, TensorFlow or ``sln_jax.models``.

  model = exported.load('model.sln')
  results = model.predict(image)   # (H, W, 3) uint8 -> COCO results

``predict`` preprocesses as ``--mode=predict`` (``sln_jax.preprocess``),
runs the exported program and turns its detections into the same COCO
results (amodal ``segmentation``, ``visible_mask``, ``depth_layer``) with
the header's score threshold and mask paste.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any, Sequence
import zipfile

import jax
from jax import export as jax_export
import numpy as np

from sln_jax import preprocess
from sln_jax.errors import UserError
from sln_jax.evaluation import render
from sln_jax.evaluation.results import detections_to_results

FORMAT = 'sln-exported'
VERSION = 1
MEMBERS = ('header.json', 'program.bin', 'variables.npz')


def _unflatten(flat: dict) -> dict:
  tree: dict = {}
  for key, value in flat.items():
    node = tree
    *parents, leaf = key.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


class ExportedModel:
  """A loaded ``.sln`` archive: ``header`` (dict), ``infer`` and ``predict``."""

  def __init__(self, path: str, header: dict, program: Any, variables: dict):
    self.path = path
    self.header = header
    self._program = program
    self._call = jax.jit(program.call)  # traced once, then cached
    self._variables = jax.tree.map(jax.numpy.asarray, variables)

  @property
  def canvas(self) -> int:
    return int(self.header['canvas'])

  def infer(self, canvas: np.ndarray, glm_image: np.ndarray, image_shape: np.ndarray) -> dict:
    """The exported ``SLN.infer`` on one preprocessed image.

    Args:
      canvas: (S, S, 3) uint8; glm_image: (G, G, 3) uint8; image_shape: (2,)
        valid (h, w) in the canvas.

    Returns:
      ``SLN.infer``'s outputs for the image as numpy (batch axis removed).
    """
    s, g = self.canvas, int(self.header['glm_size'])
    if np.shape(canvas) != (s, s, 3) or np.shape(glm_image) != (g, g, 3):
      raise UserError(
          f'the program takes a {s}x{s} canvas and a {g}x{g} GLM image, got '
          f'{np.shape(canvas)} and {np.shape(glm_image)}',
          path=self.path,
          field='canvas',
      )
    out = self._call(
        self._variables,
        np.asarray(canvas, np.uint8)[None],
        np.asarray(glm_image, np.uint8)[None],
        np.asarray(image_shape, np.float32).reshape(1, 2),
    )
    return {k: np.asarray(v)[0] for k, v in out.items()}

  def predict(self, image: np.ndarray, image_id: int = 0) -> list[dict]:
    """COCO results for one (H, W, 3) uint8 RGB image."""
    h = self.header
    canvas, shape, scale, glm = preprocess.preprocess_image(
        image, self.canvas, h['resize_mode'], int(h['glm_size'])
    )
    dets = self.infer(canvas, glm, shape)
    return detections_to_results(
        image_id,
        dets,
        scale,
        np.shape(image)[:2],
        score_threshold=float(h['score_threshold']),
        mask_threshold=float(h['mask_threshold']),
        mask_paste=str(h['mask_paste']),
    )

  def write_prediction(
      self, image: np.ndarray, image_id: int, json_path: str, png_path: str
  ) -> int:
    """Writes ``predict``'s results and their picture as ``--mode=predict``
    does; returns the number of results."""
    results = self.predict(image, image_id)
    render.write_results_and_picture(
        results, image, json_path, png_path, float(self.header['score_threshold'])
    )
    return len(results)


def _header(path: str, data: bytes) -> dict:
  try:
    header = json.loads(data)
  except ValueError as err:
    raise UserError(f'header.json is not JSON ({err})', path=path, field='header.json') from None
  if not isinstance(header, dict) or header.get('format') != FORMAT:
    raise UserError(f'not an exported SLN (format is not {FORMAT!r})', path=path, field='format')
  if header.get('version') != VERSION:
    raise UserError(
        f'format version {header.get("version")!r}; this reader reads {VERSION}',
        path=path,
        field='version',
    )
  for key in ('canvas', 'glm_size', 'resize_mode', 'score_threshold', 'mask_threshold'):
    if key not in header:
      raise UserError('missing', path=path, field=f'header.{key}')
  return header


def load(path: str) -> ExportedModel:
  """Reads a ``.sln`` archive; a file that is not one is a UserError naming
  the file and what is wrong."""
  try:
    with zipfile.ZipFile(path) as z:
      names = set(z.namelist())
      missing = [m for m in MEMBERS if m not in names]
      if missing:
        raise UserError(
            f'not an exported SLN: no {", ".join(missing)}', path=path, field=missing[0]
        )
      header = _header(path, z.read('header.json'))
      program_bytes = z.read('program.bin')
      arrays = z.read('variables.npz')
  except FileNotFoundError:
    raise UserError('no such file', path=path) from None
  except zipfile.BadZipFile:
    raise UserError('not an exported SLN (not a zip archive)', path=path) from None
  try:
    program = jax_export.deserialize(bytearray(program_bytes))
  except Exception as err:  # noqa: BLE001 - any decoding failure is a bad file
    raise UserError(
        f'program.bin does not deserialize ({type(err).__name__})', path=path, field='program.bin'
    ) from None
  with np.load(io.BytesIO(arrays), allow_pickle=False) as npz:
    variables = _unflatten({k: npz[k] for k in npz.files})
  s, g = int(header['canvas']), int(header['glm_size'])
  shapes = [tuple(a.shape) for a in program.in_avals[-3:]]
  if shapes != [(1, s, s, 3), (1, g, g, 3), (1, 2)]:
    raise UserError(
        f'header says a {s}x{s} canvas (GLM {g}x{g}) but the program takes {shapes[:2]}',
        path=path,
        field='canvas',
    )
  platform = jax.default_backend()
  if platform not in program.platforms:
    raise UserError(
        f'exported for {", ".join(program.platforms)}, not for this {platform} backend',
        path=path,
        field='platforms',
    )
  return ExportedModel(path, header, program, variables)


def input_images(paths: Sequence[str]) -> list[str]:
  """Image files named by ``paths`` (files, or directories: their image
  files, sorted)."""
  out = []
  for p in paths:
    if os.path.isdir(p):
      out += [
          os.path.join(p, n)
          for n in sorted(os.listdir(p))
          if os.path.splitext(n)[1].lower() in render.IMAGE_SUFFIXES
      ]
    elif os.path.isfile(p):
      out.append(p)
    else:
      raise UserError('no such file or directory', path=p)
  return out
