"""TFDS builders for amodal datasets: cocoa, cocoa_cls, d2sa, kins and synthetic.

Fully offline: every builder reads raw annotation JSON and images from
``manual_dir`` (``synthetic`` first generates them there when absent).
Construct builders with an explicit ``data_dir`` and
``download_config=tfds.download.DownloadConfig(manual_dir=...)``, or call
``build_dataset(config)`` which does both and prepares the dataset.

One example per image (images without instances are skipped and counted):
  image        encoded PNG/JPEG bytes as found on disk, decodes to (H, W, 3) uint8
  image_id     int64
  file_name    text, relative to the split's images directory
  height, width  int32, image pixels
  instances/   one entry per instance, in source order (N >= 1):
    layer_index  (N, H, W) uint8, zlib-compressed: ``semdist.layer_index_map``
                 (0 outside the amodal mask, 1 visible, k + 1 on layer k), so
                 amodal = index > 0 and visible = index == 1 are lossless
    bbox         (N, 4) float32, (y1, x1, y2, x2) image pixels of the amodal
                 mask; y2/x2 exclusive (last row/column + 1); zeros if empty
    depth_rank   (N,) int32, 0 = front-most
    occlude_rate (N,) float32
    is_stuff     (N,) bool
    category_id  (N,) int32
``info.metadata['num_instances'][split]`` lists N per example (in generation
order) so the input pipeline can report truncation to ``max_instances``
without reading the data. ``info.metadata['sources'][split]`` records the
annotation file it was built from (path, size, mtime, SHA-256):
``build_dataset`` refuses a prepared dataset whose manual_dir annotations
have changed since, instead of training on the old ones while evaluation
reads the new ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Iterator, Optional

from absl import logging
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from input_pipeline import readers, records, synthetic
from sln_jax import errors, semdist
from sln_jax import files as files_lib

VERSION = tfds.core.Version('1.0.0')


def boxes_from_masks(masks: np.ndarray) -> np.ndarray:
  """(N, H, W) bool -> (N, 4) float32 (y1, x1, y2, x2), y2/x2 exclusive.

  Empty masks give an all-zero box.
  """
  masks = np.asarray(masks, bool)
  n = masks.shape[0]
  boxes = np.zeros((n, 4), np.float32)
  rows, cols = masks.any(axis=2), masks.any(axis=1)
  for i in range(n):
    ys, xs = np.flatnonzero(rows[i]), np.flatnonzero(cols[i])
    if ys.size:
      boxes[i] = (ys[0], xs[0], ys[-1] + 1, xs[-1] + 1)
  return boxes


def encode_example(
    ann: records.ImageAnnotation, images_dir: str, annotations_path: str = ''
) -> dict:
  """One TFDS example (feature dict above) from an image's annotation.

  Raises:
    errors.UserError: the image file is missing or its size differs from the
      annotated (height, width).
  """
  rec = records.to_record(ann, images_dir)
  if not os.path.isfile(rec.image_path):
    raise errors.UserError(
        'image file not found (listed in ' f'{annotations_path or "the annotations"})',
        path=rec.image_path,
        field='file_name',
    )
  with Image.open(rec.image_path) as im:
    w, h = im.size
  if (h, w) != (rec.height, rec.width):
    raise records.AnnotationError(
        annotations_path or rec.image_path,
        f'images[id={rec.image_id}].height/width',
        f'annotated {rec.height}x{rec.width} but {rec.image_path} is {h}x{w}',
    )
  index = semdist.layer_index_map(rec.amodal, rec.occluded, rec.depth_rank)
  return {
      'image': rec.image_path,
      'image_id': np.int64(rec.image_id),
      'file_name': ann.file_name,
      'height': np.int32(rec.height),
      'width': np.int32(rec.width),
      'instances': {
          'layer_index': np.ascontiguousarray(index, np.uint8),
          'bbox': boxes_from_masks(rec.amodal),
          'depth_rank': rec.depth_rank.astype(np.int32),
          'occlude_rate': rec.occlude_rate.astype(np.float32),
          'is_stuff': rec.is_stuff.astype(bool),
          'category_id': rec.category_id.astype(np.int32),
      },
  }


def _features() -> tfds.features.FeaturesDict:
  tensor = tfds.features.Tensor
  return tfds.features.FeaturesDict(
      {
          'image': tfds.features.Image(shape=(None, None, 3)),
          'image_id': np.int64,
          'file_name': tfds.features.Text(),
          'height': np.int32,
          'width': np.int32,
          'instances': tfds.features.FeaturesDict(
              {
                  'layer_index': tensor(shape=(None, None, None), dtype=np.uint8, encoding='zlib'),
                  'bbox': tensor(shape=(None, 4), dtype=np.float32),
                  'depth_rank': tensor(shape=(None,), dtype=np.int32),
                  'occlude_rate': tensor(shape=(None,), dtype=np.float32),
                  'is_stuff': tensor(shape=(None,), dtype=np.bool_),
                  'category_id': tensor(shape=(None,), dtype=np.int32),
              }
          ),
      }
  )


class _AmodalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared logic. Subclasses set FORMAT (reader format) and SPLIT_FILES:
  {split: ((annotation json candidates, relative to manual_dir), images dir)}.
  The first existing candidate is used; splits without one are absent."""

  VERSION = VERSION
  FORMAT = ''
  SPLIT_FILES: dict = {}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=_features(),
        metadata=tfds.core.MetadataDict(),
        homepage='https://github.com/apchenstu/SLN-Amodal',
    )

  # TFDS's own lines around preparation announce download sizes ("Unknown
  # size" for a manual dataset); these say what is read and where it goes.
  def _log_download_bytes(self) -> None:
    print(
        f'preparing dataset {self.name} into {self.data_dir} (once; later runs reuse it)...',
        flush=True,
    )

  def _log_download_done(self) -> None:
    counts = ', '.join(
        f'{split} {info.num_examples}' for split, info in sorted(self.info.splits.items())
    )
    print(f'dataset {self.name} prepared: {counts} examples', flush=True)

  @classmethod
  def split_files(cls, manual_dir: str) -> dict:
    """{split: (annotation path, images dir)} for the splits present."""
    out = {}
    for split, (candidates, images) in cls.SPLIT_FILES.items():
      for rel in candidates:
        path = os.path.join(manual_dir, rel)
        if os.path.isfile(path):
          out[split] = (path, os.path.join(manual_dir, images))
          break
    return out

  @classmethod
  def expected_layout(cls) -> str:
    return '; '.join(f'{s}: {" or ".join(c)} + {d}/' for s, (c, d) in cls.SPLIT_FILES.items())

  def prepare_manual_dir(self, manual_dir: str) -> None:
    """Checks that ``manual_dir`` holds at least one split's annotations."""
    if not self.split_files(manual_dir):
      raise errors.UserError(
          f'no annotation files for dataset {self.name!r}; expected ' f'{self.expected_layout()}',
          path=manual_dir,
          field='dataset.manual_dir',
      )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    files = self.split_files(manual_dir)
    if not files:
      self.prepare_manual_dir(manual_dir)  # raises
    self.info.metadata.setdefault('num_instances', {})
    return {
        split: self._generate_examples(split, ann, images) for split, (ann, images) in files.items()
    }

  def _generate_examples(
      self, split: str, annotations_path: str, images_dir: str
  ) -> Iterator[tuple[Any, dict]]:
    stats = readers.ReadStats()
    anns = readers.load_annotations(self.FORMAT, annotations_path, images_dir, stats=stats)
    self.info.metadata.setdefault('sources', {})[split] = source_fingerprint(annotations_path)
    counts, skipped = [], stats.skipped_empty
    for ann in anns:
      if ann.num_instances == 0:
        skipped += 1
        continue
      counts.append(ann.num_instances)
      yield int(ann.image_id), encode_example(ann, images_dir, annotations_path)
    if skipped:
      logging.warning(
          '%s/%s: skipped %d images without instances (%s)',
          self.name,
          split,
          skipped,
          annotations_path,
      )
    self.info.metadata['num_instances'][split] = counts


class Cocoa(_AmodalBuilder, skip_registration=True):
  """COCOA (amodal COCO 2014)."""

  name = 'cocoa'
  FORMAT = 'cocoa'
  SPLIT_FILES = {
      s: ((f'annotations/COCO_amodal_{s}2014.json',), f'{s}2014') for s in ('train', 'val', 'test')
  }
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Place COCOA in manual_dir (the release's layout):
    annotations/COCO_amodal_{train,val,test}2014.json
    {train,val,test}2014/<file_name>   (the COCO 2014 images they list)
  Splits whose annotation file is missing are left out."""


class CocoaCls(_AmodalBuilder, skip_registration=True):
  """COCOA-cls (COCOA with COCO classes, from the D2SA authors)."""

  name = 'cocoa_cls'
  FORMAT = 'cocoa_cls'
  SPLIT_FILES = {
      s: (
          (
              f'annotations/COCO_amodal_{s}2014_with_classes.json',
              f'COCOA_annotations_detectron/COCO_amodal_{s}2014_with_classes.json',
          ),
          f'{s}2014',
      )
      for s in ('train', 'val')
  }
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Place COCOA-cls in manual_dir (next to COCOA, which shares the images):
    annotations/COCO_amodal_{train,val}2014_with_classes.json
      (or COCOA_annotations_detectron/ as unpacked from the release)
    {train,val}2014/<file_name>   (the COCO 2014 images they list)
  Splits whose annotation file is missing are left out."""


class D2sa(_AmodalBuilder, skip_registration=True):
  """D2S amodal (MVTec)."""

  name = 'd2sa'
  FORMAT = 'd2sa'
  SPLIT_FILES = {
      'train': (
          ('annotations/D2S_amodal_training_rot0.json', 'annotations/D2S_amodal_train.json'),
          'images',
      ),
      'val': (
          ('annotations/D2S_amodal_validation.json', 'annotations/D2S_amodal_val.json'),
          'images',
      ),
      'test': (('annotations/D2S_amodal_test.json',), 'images'),
  }
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Place D2S amodal (MVTec D2S, amodal annotations) in manual_dir:
    annotations/D2S_amodal_training_rot0.json  (or D2S_amodal_train.json) -> train
    annotations/D2S_amodal_validation.json     (or D2S_amodal_val.json)   -> val
    annotations/D2S_amodal_test.json (optional, with ground truth)        -> test
    images/<file_name>"""


class Kins(_AmodalBuilder, skip_registration=True):
  """KINS (KITTI instance segmentation, amodal)."""

  name = 'kins'
  FORMAT = 'kins'
  SPLIT_FILES = {
      'train': (
          ('annotations/update_train_2020.json', 'annotations/instances_train.json'),
          'training/image_2',
      ),
      'test': (
          ('annotations/update_test_2020.json', 'annotations/instances_val.json'),
          'testing/image_2',
      ),
  }
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Place KINS in manual_dir (KITTI object images + KINS annotations):
    annotations/update_train_2020.json (or instances_train.json) -> train
    annotations/update_test_2020.json  (or instances_val.json)   -> test
    (the 2020 release, 8 classes, or the original one, 7 classes)
    training/image_2/<file_name>, testing/image_2/<file_name>
  KINS has no separate validation split: evaluate on 'test'."""


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
  """Generated scenes: image side, images per split and seed."""

  image_size: int = 128
  num_train: int = 64
  num_val: int = 16
  seed: int = 0


def synthetic_config(image_size: int, num_train: int, num_val: int, seed: int) -> SyntheticConfig:
  """A SyntheticConfig named after its parameters (its TFDS directory)."""
  return SyntheticConfig(
      name=f's{image_size}_train{num_train}_val{num_val}_seed{seed}',
      image_size=image_size,
      num_train=num_train,
      num_val=num_val,
      seed=seed,
  )


class Synthetic(_AmodalBuilder, skip_registration=True):
  """Synthetic amodal scenes in the COCOA schema (input_pipeline.synthetic)."""

  name = 'synthetic'
  FORMAT = 'cocoa'
  BUILDER_CONFIGS = [synthetic_config(128, 64, 16, 0)]
  SPLIT_FILES = {
      s: ((f'annotations/COCO_amodal_{s}2014.json',), f'{s}2014') for s in ('train', 'val')
  }
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Nothing to download: build_dataset() generates the scenes into manual_dir
  (COCOA layout: annotations/COCO_amodal_{train,val}2014.json, {train,val}2014/)
  when it holds no annotations, and records the parameters in
  sln_synthetic.json."""
  PARAMS_FILE = 'sln_synthetic.json'

  def prepare_manual_dir(self, manual_dir: str) -> None:
    """Generates the scenes when absent; refuses a manual_dir generated with
    other parameters (it would silently mix datasets)."""
    cfg = self.builder_config
    params = dict(
        image_size=cfg.image_size, num_train=cfg.num_train, num_val=cfg.num_val, seed=cfg.seed
    )
    marker = os.path.join(manual_dir, self.PARAMS_FILE)
    if self.split_files(manual_dir):
      if os.path.isfile(marker):
        with open(marker) as f:
          found = json.load(f)
        if found != params:
          raise errors.UserError(
              f'generated with {found}, config asks for {params}; remove the '
              'directory or choose another dataset.manual_dir',
              path=marker,
              field='dataset.synthetic',
          )
      return
    if os.path.isdir(manual_dir) and os.listdir(manual_dir):
      raise errors.UserError(
          'not empty but holds no synthetic annotations; refusing to generate into it',
          path=manual_dir,
          field='dataset.manual_dir',
      )
    logging.info('generating synthetic dataset %s into %s', params, manual_dir)
    with files_lib.atomic_output_dir(manual_dir) as tmp:
      synthetic.generate_dataset(
          tmp,
          splits={'train': cfg.num_train, 'val': cfg.num_val},
          image_size=cfg.image_size,
          seed=cfg.seed,
      )
      with open(os.path.join(tmp, self.PARAMS_FILE), 'w') as f:
        json.dump(params, f)


BUILDERS = {
    'cocoa': Cocoa,
    'cocoa_cls': CocoaCls,
    'd2sa': D2sa,
    'kins': Kins,
    'synthetic': Synthetic,
}


def make_builder(config) -> _AmodalBuilder:
  """The (unprepared) builder for ``config.dataset``."""
  d = config.dataset
  if d.name not in BUILDERS:
    raise errors.UserError(
        f'unknown dataset {d.name!r}; one of ' f'{sorted(BUILDERS)}', field='dataset.name'
    )
  kwargs = {}
  if d.name == 'synthetic':
    s = d.synthetic
    kwargs['config'] = synthetic_config(
        int(s.image_size), int(s.num_train), int(s.num_val), int(s.seed)
    )
  return BUILDERS[d.name](data_dir=os.path.abspath(d.data_dir), **kwargs)


def source_fingerprint(path: str) -> dict:
  """What identifies an annotation file: its name, size, mtime and SHA-256."""
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 22), b''):
      digest.update(block)
  stat = os.stat(path)
  return {
      'file': os.path.basename(path),
      'size': stat.st_size,
      'mtime_ns': stat.st_mtime_ns,
      'sha256': digest.hexdigest(),
  }


def _same_source(recorded: dict, path: str) -> bool:
  """Whether ``path`` is the file ``recorded`` describes (size and mtime
  first; the hash only when the mtime moved, e.g. after a copy)."""
  stat = os.stat(path)
  if stat.st_size != recorded.get('size'):
    return False
  if stat.st_mtime_ns == recorded.get('mtime_ns'):
    return True
  return source_fingerprint(path)['sha256'] == recorded.get('sha256')


def check_sources(builder: _AmodalBuilder, manual_dir: str) -> None:
  """Raises a UserError when a prepared dataset's annotation files in
  ``manual_dir`` differ from those it was built from (an edited, replaced
  or newly added split file). A manual_dir that is gone, or a dataset whose
  metadata records no sources, is not checked."""
  recorded = builder.info.metadata.get('sources')
  if not recorded or not os.path.isdir(manual_dir):
    return
  present = builder.split_files(manual_dir)
  changed = [
      f'{split}: {os.path.basename(path)} ' + ('is new' if split not in recorded else 'has changed')
      for split, (path, _) in sorted(present.items())
      if split not in recorded or not _same_source(recorded[split], path)
  ]
  if changed:
    raise errors.UserError(
        f'the dataset prepared in {builder.data_dir} was built from other annotation '
        f'files than those now in {manual_dir} ({"; ".join(changed)}); remove '
        f'{builder.data_dir} to rebuild it, or set dataset.data_dir to a new directory',
        path=manual_dir,
        field='dataset.manual_dir',
    )


def build_dataset(config, builder: Optional[_AmodalBuilder] = None):
  """Prepares ``config.dataset`` (no-op when already prepared).

  Args:
    config: the full config; uses dataset.{name, data_dir, manual_dir} (and
      dataset.synthetic for the synthetic builder).
    builder: optional builder to prepare instead of ``make_builder(config)``.

  Returns:
    The prepared builder (``builder.as_dataset(split)``).

  Raises:
    errors.UserError: manual_dir lacks the raw files (naming the path), an
      annotation / image problem found while preparing, or a prepared dataset
      whose annotation files have changed since (``check_sources``).
  """
  builder = builder or make_builder(config)
  manual_dir = os.path.abspath(config.dataset.manual_dir)
  if builder.is_prepared():
    check_sources(builder, manual_dir)
    return builder
  builder.prepare_manual_dir(manual_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder
