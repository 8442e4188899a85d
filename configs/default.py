"""Full SLN as released: ResNet-101 FPN + GLM (DeepLab v2), 1024x1024.

Every other config starts from this one. One tree, one source of truth: no
constant here is repeated in code. Stage names for ``train.stages``:
'heads' (FPN, RPN, box and mask heads), '4+' (ResNet stage 4 and up plus
heads), 'all' (every trainable parameter). BatchNorm statistics and the GLM
are never trained.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.init_from = ''  # Orbax checkpoint dir(s), comma-separated; see init_patterns
  c.init_patterns = ''  # optional regexes of Flax paths to load (comma-separated)

  # ---------------------------------------------------------------- data
  c.dataset = d = ml_collections.ConfigDict()
  d.name = 'cocoa'  # cocoa | cocoa_cls | d2sa | kins | synthetic
  d.data_dir = 'data/tfds'  # TFDS data_dir (prepared datasets live here)
  d.manual_dir = 'data/cocoa'  # raw annotations + images (TFDS manual_dir)
  d.train_split = 'train'
  d.eval_split = 'val'
  d.eval_annotations = ''  # GT json of the eval split ('' = derived from manual_dir)
  d.category_agnostic = True  # SLN: one foreground class
  d.synthetic = sy = ml_collections.ConfigDict()  # name='synthetic' only
  sy.image_size = 128  # side of the generated square images
  sy.num_train = 64
  sy.num_val = 16
  sy.seed = 0

  c.input = i = ml_collections.ConfigDict()
  i.image_size = 1024  # square canvas side, multiple of 64
  i.resize_mode = 'pad'  # 'pad' (keep aspect, pad bottom/right) | 'squash' (release QUIRK)
  i.max_instances = 100  # static padding of GT instances per image
  i.gt_mask_size = 64  # per-instance layered GT cropped to its box at this size
  i.random_flip = True
  i.box_jitter = 0.0  # release QUIRK: 1/15 of the box size
  i.shuffle_buffer = 256
  i.num_parallel_calls = 2  # tf.data threads (capped so XLA keeps the cores)
  i.prefetch = 2
  i.cache = False

  # ---------------------------------------------------------------- model
  c.model = m = ml_collections.ConfigDict()
  m.dtype = 'float32'  # compute dtype: float32 | bfloat16 (params/losses stay float32)
  m.mean_pixel = (123.7, 116.8, 103.9)
  m.num_classes = 2  # background + one foreground class (class-agnostic)
  m.num_layers = 1  # L: sem-dist layer channels (release: 1)
  # How the mask head's 1 + L channels become probabilities
  # (semdist.decode_layer_logits): 'sigmoid' (release: a sigmoid per layer
  # channel, amodal = sigmoid of their sum, channel 0 unused) | 'softmax'
  # (one softmax over outside / visible / occluded layers, channel 0 =
  # outside; docs/occlusion.md).
  m.layer_activation = 'sigmoid'
  # BatchNorm (backbone and heads; the GLM's is always frozen). False: frozen,
  # inference mode (release). True (Matterport's TRAIN_BN, for training from
  # scratch or large batches): batch statistics in training, shared by all
  # devices, scale/bias trained with their stage, running statistics updated.
  m.train_bn = False
  m.bn_momentum = 0.99  # running statistics: new = momentum * old + (1 - momentum) * batch

  m.backbone = b = ml_collections.ConfigDict()
  b.stage_sizes = (3, 4, 23, 3)  # ResNet-101
  b.width = 64  # stem / first stage width (bottleneck expansion 4)
  b.bn_eps = 1e-3

  m.fpn_channels = 256

  m.rpn = r = ml_collections.ConfigDict()
  r.anchor_scales = (32, 64, 128, 256, 512)  # one per level P2..P6
  r.anchor_ratios = (0.5, 1.0, 2.0)  # width / height
  r.anchor_stride = 1
  r.conv_channels = 512
  r.bbox_std = (0.1, 0.1, 0.2, 0.2)
  r.pre_nms_topk = 6000
  r.nms_threshold = 0.7
  r.legacy_nms_plus_one = (
      False  # release QUIRK: proposal NMS IoU in canvas pixels, +1 on every side
  )
  r.post_nms_topk_train = 1000
  r.post_nms_topk_test = 1000
  r.anchors_per_image = 256
  r.positive_iou = 0.7
  r.negative_iou = 0.3
  r.positive_fraction = 0.5

  m.roi = o = ml_collections.ConfigDict()
  o.rois_per_image = 100
  o.positive_ratio = 0.7  # up to 70 positives; negatives = positives * (1/0.7 - 1)
  o.fg_iou = 0.5
  o.bbox_std = (0.1, 0.1, 0.2, 0.2)
  o.pool_size = 7  # box head
  o.mask_pool_size = 16  # mask head input
  o.mask_size = 32  # mask head output
  o.aligned = False  # False: tf.image.crop_and_resize (release); True: detectron2 ROIAlign
  o.sampling_ratio = 1  # samples per bin per axis for aligned ROIAlign

  m.box_head_channels = 1024
  m.mask_head_channels = 256
  # Not in the release: the mask head's conv3 also sees the ROI-wide mean and
  # max of conv2's features (models/heads.MaskHead.roi_context).
  m.mask_head_context = False

  m.glm = g = ml_collections.ConfigDict()
  g.enabled = True
  g.stage_sizes = (3, 4, 23, 3)
  g.width = 64
  g.num_classes = 182  # COCO-Stuff
  g.atrous_rates = (6, 12, 18, 24)
  g.scales = (1.0, 0.5, 0.75)
  g.image_size = 513
  g.bn_eps = 1e-5
  g.legacy_pixel_boxes = False  # release QUIRK at inference: pixel-unit boxes into the GLM crop

  # Learnt global layering map (not in the release): a head on P2 classifies
  # how many objects cover each cell (0 .. num_classes - 2, the last class
  # = that many or more), trained by loss.layering_map, and its softmax is
  # cropped per ROI into the mask head's input (models/sln.py).
  m.layering_map = lm = ml_collections.ConfigDict()
  lm.enabled = False
  lm.num_classes = 4
  lm.channels = 64

  m.detection = t = ml_collections.ConfigDict()
  t.max_detections = 100
  t.min_confidence = 0.0
  t.nms_threshold = -1.0  # < 0: no NMS (release); e.g. 0.3 to enable
  t.round_boxes = False  # release QUIRK: boxes rounded to whole canvas pixels before the mask head

  # ---------------------------------------------------------------- losses
  c.loss = l = ml_collections.ConfigDict()
  l.rpn_class = 1.0
  l.rpn_bbox = 1.0
  l.head_class = 1.0
  l.head_bbox = 1.0
  l.layer = 1.0
  l.amodal = 1.0
  l.layering_map = 1.0  # used only with model.layering_map.enabled
  # Not a term: pos_weight of the occluded layers' (mask channels 2..L)
  # target pixels in the layer loss (losses.layer_loss). 1 = release.
  l.occluded_pos_weight = 1.0

  # ---------------------------------------------------------------- training
  c.train = tr = ml_collections.ConfigDict()
  tr.batch_size = 1  # global batch (split over devices)
  tr.optimizer = 'sgd'  # sgd (release) | adamw (Adam, decoupled weight decay)
  tr.momentum = 0.9  # sgd
  tr.adam_b1 = 0.9  # adamw
  tr.adam_b2 = 0.999  # adamw
  tr.weight_decay = 1e-4  # on every trained parameter but BatchNorm's (the release)
  tr.decay_biases = True  # False: kernels only (biases excluded too)
  tr.grad_clip_norm = 5.0
  tr.warmup_steps = 0
  # Release schedule: 2 epochs heads, 3 epochs 4+, 1 epoch all at LR/10; 2,500 steps/epoch.
  tr.stages = (('heads', 5000, 1e-3), ('4+', 7500, 1e-3), ('all', 2500, 1e-4))
  tr.num_steps = -1  # -1: sum of the stage lengths; otherwise truncates the schedule
  tr.log_every = 50
  tr.checkpoint_every = 1000
  tr.keep_checkpoints = 3
  tr.image_summary_every = 1000
  tr.reset_momentum_per_stage = True  # release: a new SGD (zero momentum) per stage
  # QUIRK: the release's set_trainable only ever freezes, so in one run its
  # '4+' and 'all' stages train no more than 'heads' did. True reproduces it.
  tr.legacy_sticky_freeze = False
  tr.device_prefetch = 2  # batches copied to the devices ahead of the running step

  # ---------------------------------------------------------------- eval / predict
  c.eval = e = ml_collections.ConfigDict()
  e.batch_size = 1
  e.protocol = 'coco'  # coco | amodalapi
  e.max_images = -1  # -1: the whole split; N: N images in all (the first of each process's shard)
  e.mask_threshold = 0.5
  # aligned (the targets' geometry) | bilinear (half-pixel: the release's
  # geometry) | release (QUIRK: min-max byte-scaled PIL resize,
  # evaluation.results.release_paste)
  e.mask_paste = 'aligned'
  # Processes turning detections into results (paste, RLE, depth order);
  # -1: none on a CPU backend, else CPUs - 2 (at most 16).
  e.host_workers = -1
  # After the detection evaluation, also the box-prompted protocol (C2F-Seg,
  # amodal SAM): masks of the ground-truth boxes, amodal / visible /
  # occluded-part mIoU over ground-truth objects (workdir/box_prompted.json;
  # sln_jax/evaluation/box_prompted.py).
  e.box_prompted = False
  # The HTML report (workdir/report/index.html; sln_jax/evaluation/report.py):
  # metric tables, precision-recall curves, depth order, and the pictures of
  # the report_images best and worst images by amodal IoU. Pictures and the
  # report's per-image numbers use detections with score >= report_score.
  e.report = True
  e.report_images = 6
  e.report_score = 0.5

  c.predict = p = ml_collections.ConfigDict()
  p.input_dir = ''
  p.output_dir = ''
  p.score_threshold = 0.5
  p.max_images = -1  # -1: every image in input_dir
  return c
