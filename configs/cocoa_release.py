"""SLN on COCOA for the released PyTorch weights (COCOA.pth), evaluated as the release.

``configs/cocoa.py`` plus the release's preprocessing and post-processing
(``configs/release.py`` lists the six fields). The converted checkpoint stays a
flag (``--config.init_from=DIR``):

  python scripts/convert_checkpoint.py --pth COCOA.pth --config=configs/cocoa.py --output ckpt/cocoa
  python main.py --config=configs/cocoa_release.py --workdir=runs/cocoa_release \
      --mode=evaluate --config.init_from=ckpt/cocoa
"""

import ml_collections

from configs import cocoa, release


def get_config() -> ml_collections.ConfigDict:
  return release.apply(cocoa.get_config())
