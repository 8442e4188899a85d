"""configs/*_release.py: the base dataset config with exactly the release's
pre- and post-processing fields changed, and a config that passes validation."""

import importlib

import pytest

from sln_jax import config_checks
from tests.config_tree import flat

# The fields the README's "Using the released PyTorch weights" passes on the
# base config (init_from stays a flag: the user's converted directory).
RELEASE_FIELDS = {
    'input.resize_mode': 'squash',
    'model.glm.legacy_pixel_boxes': True,
    'model.detection.round_boxes': True,
    'model.rpn.legacy_nms_plus_one': True,
    'eval.mask_paste': 'release',
    'eval.protocol': 'amodalapi',
}


@pytest.mark.parametrize('base', ['cocoa', 'd2sa'])
def test_release_config_changes_exactly_the_release_fields(base):
  base_flat = flat(importlib.import_module(f'configs.{base}').get_config())
  release_flat = flat(importlib.import_module(f'configs.{base}_release').get_config())
  assert set(release_flat) == set(base_flat)  # no field added or dropped
  changed = {k: v for k, v in release_flat.items() if v != base_flat[k]}
  assert changed == RELEASE_FIELDS
  assert {k: type(release_flat[k]) for k in changed} == {
      k: type(v) for k, v in RELEASE_FIELDS.items()
  }


@pytest.mark.parametrize('name', ['cocoa_release', 'd2sa_release'])
def test_release_config_passes_validation(name):
  config_checks.check_config(importlib.import_module(f'configs.{name}').get_config())
