"""configs/{cocoa,cocoa_cls,d2sa,kins}.py: valid configs, and COCOA-cls is
configs/cocoa.py made class-aware over COCO's sparse category ids."""

import importlib
import os

import pytest

from input_pipeline import readers
from sln_jax import config_checks
from tests.config_tree import flat

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures', 'annotations')


@pytest.mark.parametrize('name', ['cocoa', 'cocoa_cls', 'd2sa', 'kins'])
def test_dataset_config_passes_validation(name):
  config_checks.check_config(importlib.import_module(f'configs.{name}').get_config())


def test_cocoa_cls_is_cocoa_with_classes():
  cocoa = flat(importlib.import_module('configs.cocoa').get_config())
  cls = flat(importlib.import_module('configs.cocoa_cls').get_config())
  assert set(cls) == set(cocoa)
  changed = {k: v for k, v in cls.items() if v != cocoa[k]}
  assert changed == {
      'dataset.name': 'cocoa_cls',
      'dataset.category_agnostic': False,
      'model.num_classes': 91,
  }
  # Category ids are class indices (0 = background): every COCO id fits.
  cats = readers.load_categories('cocoa_cls', os.path.join(FIXTURES, 'cocoa_cls_tiny.json'))
  assert max(c['id'] for c in cats) == 90 < cls['model.num_classes']
  assert 'cocoa_cls' in readers.FORMATS
