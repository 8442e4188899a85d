"""Exports SLN's inference program as one file (``.sln``) that runs without
the training stack (``sln_jax.exported`` loads and runs it).

The file is a zip archive:

  header.json    what the host needs around the program (:func:`header`)
  program.bin    ``jax.export`` serialisation of ``SLN.infer`` (detection,
                 NMS and the layered mask head, all on the device) for batch
                 1 and the config's canvas, lowered for every platform in
                 ``platforms`` (default CPU and CUDA)
  variables.npz  the model variables, one array per '/'-joined Flax path

The program takes (variables, image (1, S, S, 3) uint8, glm_image (1, G, G,
3) uint8, image_shape (1, 2) float32) and returns ``SLN.infer``'s dict. The
variables travel as an argument, not as constants, so one program serves
any weights of the same config.
"""

from __future__ import annotations

import io
import json
from typing import Any, Mapping, Sequence
import zipfile

import flax
from flax import traverse_util
import jax
from jax import export as jax_export
import jax.numpy as jnp
import numpy as np

from sln_jax import files
from sln_jax.exported import FORMAT, VERSION
from sln_jax.training.step import make_infer_fn

PLATFORMS = ('cpu', 'cuda')


def header(config, platforms: Sequence[str]) -> dict:
  """The JSON header of an export of ``config``."""
  return {
      'format': FORMAT,
      'version': VERSION,
      'canvas': int(config.input.image_size),
      'glm_size': int(config.model.glm.image_size),
      'resize_mode': str(config.input.resize_mode),
      'batch': 1,
      'num_layers': int(config.model.num_layers),
      'layer_activation': str(config.model.get('layer_activation', 'sigmoid')),
      'score_threshold': float(config.predict.score_threshold),
      'mask_threshold': float(config.eval.mask_threshold),
      'mask_paste': str(config.eval.mask_paste),
      'platforms': list(platforms),
      'jax_version': jax.__version__,
  }


def plain_variables(variables: Mapping) -> dict:
  """{'params', 'batch_stats'} as nested plain dicts of numpy arrays (no
  Flax containers, which a process without Flax could not rebuild)."""
  tree = flax.core.unfreeze(dict(variables))
  return jax.tree.map(np.asarray, {k: tree[k] for k in ('params', 'batch_stats') if k in tree})


def export_bytes(model: Any, variables: Mapping, config, platforms=PLATFORMS) -> bytes:
  """The ``.sln`` archive of ``model`` (an ``SLN``) with ``variables``."""
  plain = plain_variables(variables)
  s, g = int(config.input.image_size), int(config.model.glm.image_size)
  infer = make_infer_fn(model)

  def program(v, image, glm_image, image_shape):
    return infer(v, {'image': image, 'glm_image': glm_image, 'image_shape': image_shape})

  specs = (
      jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), plain),
      jax.ShapeDtypeStruct((1, s, s, 3), jnp.uint8),
      jax.ShapeDtypeStruct((1, g, g, 3), jnp.uint8),
      jax.ShapeDtypeStruct((1, 2), jnp.float32),
  )
  exported = jax_export.export(jax.jit(program), platforms=tuple(platforms))(*specs)
  flat = traverse_util.flatten_dict(plain, sep='/')
  arrays = io.BytesIO()
  np.savez(arrays, **flat)
  out = io.BytesIO()
  with zipfile.ZipFile(out, 'w', zipfile.ZIP_DEFLATED) as z:
    z.writestr('header.json', json.dumps(header(config, platforms), indent=1))
    z.writestr('program.bin', bytes(exported.serialize()))
    z.writestr('variables.npz', arrays.getvalue())
  return out.getvalue()


def write_export(path: str, model: Any, variables: Mapping, config, platforms=PLATFORMS) -> int:
  """Writes the archive to ``path`` atomically; returns its size in bytes."""
  data = export_bytes(model, variables, config, platforms)
  with files.atomic_output_file(path, 'wb') as f:
    f.write(data)
  return len(data)
