"""Loading chosen leaves of a checkpoint into a model's variables (``init_from``)."""

from __future__ import annotations

import dataclasses
import logging
from typing import Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from sln_jax.checkpoints.orbax_io import load_orbax
from sln_jax.checkpoints.torch_port import matches_any, set_path
from sln_jax.errors import UserError, listing


def _flatten(tree: Mapping, prefix: tuple = ()) -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


@dataclasses.dataclass
class LoadReport:
  """What ``partial_load`` did; names are 'collection/module/.../leaf'.

  ``loaded``: the model leaves loaded (each once, however many sources gave
  it); ``sources``: (directory, leaves loaded from it) in order.
  ``missing``, ``excluded`` and ``shape_mismatch`` together are the model's
  leaves that kept their initial values: ``missing`` the ones no source
  holds, ``excluded`` the ones a source holds but its regexes
  (init_patterns) leave out, ``shape_mismatch`` ('name (checkpoint shape) !=
  (model shape)') the ones every source holds with another shape.
  ``not_in_target``: checkpoint leaves the model lacks.
  """

  loaded: list = dataclasses.field(default_factory=list)
  missing: list = dataclasses.field(default_factory=list)
  excluded: list = dataclasses.field(default_factory=list)
  shape_mismatch: list = dataclasses.field(default_factory=list)
  not_in_target: list = dataclasses.field(default_factory=list)
  sources: list = dataclasses.field(default_factory=list)

  def not_loaded(self) -> list:
    """``missing``, ``excluded`` then ``shape_mismatch``: every model leaf
    left as it was."""
    return self.missing + self.excluded + self.shape_mismatch

  def skipped(self, limit: int = 5) -> list[str]:
    """'N kind: first names' for each non-empty kind of model leaf not loaded."""
    kinds = (
        ('absent from the checkpoint', self.missing),
        ('left out by init_patterns', self.excluded),
        ('with other shapes', self.shape_mismatch),
    )
    return [listing(title, names, limit) for title, names in kinds if names]

  def summary(self, limit: int = 5) -> str:
    """One line: counts, and the first ``limit`` names of each skipped kind."""
    parts = [f'loaded {len(self.loaded)} arrays']
    if len(self.sources) > 1:
      parts[0] += ' (' + ', '.join(f'{d}: {n}' for d, n in self.sources) + '; later ones win)'
    if self.not_loaded():
      parts.append(f'{len(self.not_loaded())} model arrays keep their initial values')
    parts += self.skipped(limit)
    if self.not_in_target:
      parts.append(listing('checkpoint arrays absent from the model', self.not_in_target, limit))
    return '; '.join(parts)


def partial_load(
    target_variables: Mapping,
    sources: Sequence[str | tuple[str, Sequence[str]]],
    report: LoadReport | None = None,
    strict: bool = False,
) -> dict:
  """Copies matching leaves of Orbax checkpoints into ``target_variables``.

  Args:
    target_variables: the model's variables ({'params', 'batch_stats', ...}).
    sources: checkpoint dirs, each either a path (every leaf) or
      (path, regexes): a leaf is taken when a regex is found (re.search) in
      its name 'params/backbone/C1_conv/kernel'. Applied in order (later
      ones win).
    report: optional ``LoadReport`` filled with what was loaded and skipped.
    strict: every model leaf must be loaded (evaluate / predict: nothing
      would train a leaf left at its initial value).

  Returns:
    New variables with the target's structure and dtypes (loaded leaves as
    jax arrays). Model leaves that no source holds with their shape keep
    their values and are listed in ``report.missing``, ``report.excluded``
    (held, but left out by the regexes) and ``report.shape_mismatch``
    (``report.summary()``: the counts and the first names); checkpoint
    leaves that the model lacks are skipped (``report.not_in_target``).

  Raises:
    UserError: a source that is unreadable or from which nothing was loaded;
      with ``strict``, any model leaf not loaded (field 'init_from', the
      sources as path, the first names of each kind).
  """

  report = LoadReport() if report is None else report
  flat = {coll: _flatten(tree) for coll, tree in target_variables.items()}
  loaded, mismatched, excluded, not_in_target = set(), {}, set(), set()
  directories = []
  for source in sources:
    directory, patterns = (source, ()) if isinstance(source, str) else (source[0], tuple(source[1]))
    directories.append(directory)
    ckpt = load_orbax(directory)
    count = 0
    for coll, tree in ckpt.items():
      for path, value in _flatten(tree).items():
        name = '/'.join((coll,) + path)
        target = flat.get(coll, {}).get(path)
        if patterns and not matches_any(patterns, name):
          if target is not None:
            excluded.add(name)
          continue
        if target is None:
          if name not in not_in_target:
            not_in_target.add(name)
            report.not_in_target.append(name)
        elif tuple(np.shape(value)) != tuple(np.shape(target)):
          mismatched[name] = f'{name} {tuple(np.shape(value))} != ' f'{tuple(np.shape(target))}'
        else:
          flat[coll][path] = jnp.asarray(value, dtype=target.dtype)
          if name not in loaded:
            report.loaded.append(name)
            loaded.add(name)
          count += 1
    report.sources.append((directory, count))
    if not count:
      raise UserError(
          'nothing loaded (no leaf matches ' f'{list(patterns) or "any"} with the model\'s shapes)',
          path=directory,
          field='init_from',
      )
  for coll in sorted(flat, key=lambda c: c != 'params'):  # params first
    for path in flat[coll]:
      name = '/'.join((coll,) + path)
      if name in loaded:
        continue
      if name in mismatched:
        report.shape_mismatch.append(mismatched[name])
      elif name in excluded:
        report.excluded.append(name)
      else:
        report.missing.append(name)
  if strict and report.not_loaded():
    total = sum(len(leaves) for leaves in flat.values())
    raise UserError(
        f"{len(report.not_loaded())} of the model's {total} arrays would keep "
        f'their random initial values ({"; ".join(report.skipped())}); '
        'evaluate and predict need a checkpoint of this model (the model.* '
        'settings it was converted or trained with)',
        path=','.join(directories),
        field='init_from',
    )
  logging.info('init_from: %s', report.summary())
  out = {}
  for coll, leaves in flat.items():
    out[coll] = {}
    for path, value in leaves.items():
      set_path(out[coll], path, value)
  return out
