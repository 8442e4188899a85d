"""SLN on D2SA for the released PyTorch weights (D2SA.pth), evaluated as the release.

``configs/d2sa.py`` plus the release's preprocessing and post-processing
(``configs/release.py`` lists the six fields). The converted checkpoint stays a
flag (``--config.init_from=DIR``):

  python scripts/convert_checkpoint.py --pth D2SA.pth --config=configs/d2sa.py --output ckpt/d2sa
  python main.py --config=configs/d2sa_release.py --workdir=runs/d2sa_release \
      --mode=evaluate --config.init_from=ckpt/d2sa
"""

import ml_collections

from configs import d2sa, release


def get_config() -> ml_collections.ConfigDict:
  return release.apply(d2sa.get_config())
