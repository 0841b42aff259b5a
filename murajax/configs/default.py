"""The paper's recipe (Rajpurkar et al., MURA): DenseNet-169 at 320x320, batch 8, Adam 1e-4,
learning rate x0.1 whenever an epoch's validation loss fails to improve, flips and 30-degree
rotations, the 5 lowest-validation-loss checkpoints kept for the ensemble.

Train on real MURA with
    murajax --config=default --config.data.root=/path/to/MURA-v1.1 --workdir runs/mura
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.model = ml_collections.ConfigDict()
    config.model.name = "densenet169"  # densenet121/161/169/201, densenet_tiny
    config.model.dtype = "float32"  # compute dtype; params, loss and metrics stay float32
    # What the backward pass recomputes instead of storing: 'none', 'bottleneck' (each dense
    # layer's concat -> BN -> ReLU: half the activation memory), 'layer' (a third of it, ~+14%
    # FLOPs) or 'auto' ('bottleneck' on CPU, where it is also faster; 'none' elsewhere).
    config.model.remat = "auto"
    config.model.bn_momentum = 0.9
    # How convolutions run: 'auto' (matmul formulation on CPU, XLA's convolutions elsewhere),
    # 'matmul' or 'xla'. Speed only: the parameters and results are the same.
    config.model.conv_impl = "auto"
    # How dense blocks are laid out: 'unrolled' (one program section per layer) or 'scan'
    # (layers of similar width share one lax.scan loop, their variables stored stacked).
    # Measured on 2 CPU cores, DenseNet-169 at 224: 'scan' compiles in 16-18 s instead of
    # 44-53 s and relaunches from the persistent cache in 3.7 s instead of 18-19 s, for a
    # train step 1-5% slower. Results equal to rounding from the same variables; checkpoints
    # and Keras weights convert between the two. docs/performance.md, "Issue 15, third pass".
    config.model.block_impl = "unrolled"
    config.model.bn_epsilon = 1.001e-5  # Keras's value: required when init_from is a Keras file

    config.task = "mura"  # what the data means (murajax/tasks): MURA's binary study labels

    config.data = ml_collections.ConfigDict()
    config.data.root = ""  # the MURA-v1.1 folder (the one holding train_image_paths.csv)
    config.data.synthetic_studies = 0  # >0 and root empty: generate synthetic MURA in workdir
    config.data.image_size = 320
    config.data.resize = "stretch"  # 'stretch' (paper) or 'pad' (keep aspect ratio)
    # 'keep' (the paper: a colour PNG stays colour) or 'grey': every image becomes its
    # luminance (PIL's convert('L') after the resize, exact for a grey image stored as RGB) and
    # batches ship one uint8 plane, which the step repeats to the model's three: colour no
    # longer a cue, a third of the bytes to the device. No faster on the host's CPU where
    # measured (2-core AVX-512: converting the colour images costs what the smaller batch saves;
    # docs/performance.md, "Issue 15, sixth pass").
    config.data.colour = "keep"
    config.data.hflip = True
    config.data.rotation_degrees = 30.0
    # Where hflip and rotation_degrees are applied: 'host' (the pipeline, PIL, float32 batches)
    # or 'device' (uint8 batches, a quarter of the bytes; flipped, rotated and normalised in
    # the jitted train step, keyed by the image's index: murajax/data/device_augment.py).
    config.data.augment_on = "host"
    config.data.study_types = ""  # comma-separated subset, e.g. "XR_WRIST,XR_HAND"; empty: all
    config.data.fraction = 1.0  # fraction of studies to use (quick runs)
    # The train split's study labels from this CSV (MURA's "<study folder>/,<label>" rows, e.g.
    # <workdir>/relabel/train_labeled_studies.csv) instead of <root>/train_labeled_studies.csv;
    # a label it changes may disagree with the study folder's _positive/_negative suffix.
    config.data.labels_csv = ""
    # A CSV of extra train images without labels (MURA image-path rows, under train/): label -1,
    # left out of the supervised loss; studies may also have an empty or -1 label in the CSVs.
    config.data.unlabeled_csv = ""
    # An image cache folder (python -m murajax.data.cache build --root <data.root> --out <dir>
    # --image_size <data.image_size> --resize <data.resize>): pixels decoded and resized once,
    # read from its ArrayRecord shards. The index and labels come from data.root, or with it
    # empty from the cache's own copies of the CSVs (the cache alone trains and evaluates).
    # Refused if built with another image_size, resize or other CSVs. Empty: decode the files.
    config.data.cache = ""
    config.data.on_missing = "error"  # listed image missing: 'error' or 'skip' (counted)
    config.data.on_bad_image = "error"  # unreadable image: 'error' or 'skip' (counted)
    # Grain worker processes building batches; 0: in the main process. 'auto': the CPUs this
    # process may use (os.sched_getaffinity) minus 1 for the training loop and 1 per local device
    # (each needs a host thread to feed it), at most 32: 0 on 2 CPUs, where a worker would only
    # compete with training; 6 with 8 CPUs and 1 GPU. Logged at start. An integer is taken as is.
    config.data.num_workers = config_dict.FieldReference("auto", field_type=object)
    # Batches built ahead: per worker (at least 1), or with no workers in one background
    # thread; 0 builds them in the training loop's thread. 'auto': 0 when a process without
    # workers reads the image cache (a fifth to a third less CPU per image than the thread on
    # a 2-CPU host, docs/performance.md, issue 15's ninth and eleventh passes; the loop
    # overlaps it with the steps queued on the device), else 2. An integer is taken as is.
    config.data.prefetch = config_dict.FieldReference("auto", field_type=object)

    config.batch_size = 8  # global, across all devices and processes
    config.eval_batch_size = 16
    config.num_epochs = 20

    config.loss = ml_collections.ConfigDict()
    # The training recipe (murajax/recipes): 'weighted_bce' (the paper's), 'focal', 'gce' or
    # 'bootstrap'; each weighted per study type and label. Validation always reports the
    # paper's weighted BCE against the given labels.
    config.loss.name = "weighted_bce"
    config.loss.label_smoothing = 0.0  # a: y -> y (1 - a) + a / 2, for every loss
    config.loss.focal_gamma = 2.0  # focal: (1 - p_t)^gamma
    config.loss.focal_alpha = 0.0  # focal: optax's class balance alpha; 0 = off
    config.loss.gce_q = 0.7  # gce: (1 - p_y^q) / q; q -> 0 is cross-entropy, 1 is MAE
    config.loss.bootstrap_beta = 0.95  # bootstrap: target beta y + (1 - beta) prediction
    config.loss.bootstrap_mode = "soft"  # 'soft' (probability) or 'hard' (0/1 decision)

    # Mixup / CutMix inside the train step (murajax/recipes/mixup.py), with any loss: images,
    # targets and loss weights blended with the same lambda ~ Beta(alpha, alpha).
    config.mixup = ml_collections.ConfigDict()
    config.mixup.alpha = 0.0  # mixup's Beta parameter; 0 = off
    config.mixup.cutmix_alpha = 0.0  # CutMix's; 0 = off (both > 0: one of the two per batch)
    config.mixup.prob = 1.0  # share of batches mixed

    # Loss-based re-weighting (murajax/recipes/reweight.py): the train state keeps each train
    # image's running loss (r <- momentum r + (1 - momentum) loss; checkpointed); from
    # start_epoch on, examples whose running loss is above its quantile get `weight`:
    # 'small_loss' down-weights them (weight in [0, 1); MentorNet / co-teaching),
    # 'large_loss' up-weights them (weight > 1). 'none' (the paper): off, no running loss.
    config.reweight = ml_collections.ConfigDict()
    config.reweight.mode = "none"
    config.reweight.quantile = 0.7
    config.reweight.weight = 0.1
    config.reweight.momentum = 0.9
    config.reweight.start_epoch = 1

    # Mean teacher with confident pseudo-labels (murajax/recipes/teacher.py): the EMA above
    # (config.ema.decay > 0, e.g. 0.99) predicts each train batch on a mirrored view; where it
    # is confident (p > confidence or p < 1 - confidence) its prediction is merged with the
    # given label: 'missing_only' (only unlabelled examples), 'replace_disagreeing' (also the
    # labels it contradicts) or 'soft' (labelled: (1 - weight) y + weight p_teacher). From
    # warmup_epochs on; consistency_weight > 0 adds the squared student-teacher probability gap
    # over every real example. Off (the paper) by default.
    config.teacher = ml_collections.ConfigDict()
    config.teacher.enabled = False
    config.teacher.confidence = 0.9  # tau in (0.5, 1)
    config.teacher.merge = "missing_only"
    config.teacher.target = "hard"  # 'hard' (the teacher's 0/1 decision) or 'soft' (its p)
    config.teacher.weight = 0.5  # merge='soft': the teacher's share of the target
    config.teacher.warmup_epochs = 1
    config.teacher.consistency_weight = 0.0

    config.optim = ml_collections.ConfigDict()
    config.optim.learning_rate = 1e-4
    config.optim.b1 = 0.9
    config.optim.b2 = 0.999
    config.optim.eps = 1e-8
    config.optim.plateau_factor = 0.1
    config.optim.plateau_patience = 0  # epochs without improvement tolerated before a drop
    config.optim.plateau_cooldown = 0  # epochs after a drop during which no drop happens
    config.optim.plateau_threshold = 1e-4  # relative improvement that counts
    config.optim.min_learning_rate = 1e-8
    # Linear warm-up for large batches: each update is scaled by min(1, (n + 1) / warmup) at
    # update n, on top of the plateau-controlled rate. Given in steps or in epochs (one of
    # them; the other 0). 0 (the paper): off, the optimizer state is the paper's.
    config.optim.warmup_steps = 0
    config.optim.warmup_epochs = 0.0
    # What trains: 'all' (the paper) or 'head' (the classifier head only: the backbone's params
    # and BatchNorm statistics stay fixed, the backbone runs as at evaluation). For a second
    # run that retrains the head on relabelled data: --config.optim.trainable=head
    # --config.init_from=<first run's workdir> --config.data.labels_csv=<workdir>/relabel/...
    config.optim.trainable = "all"

    # Weight EMA: an exponential moving average of params and BatchNorm statistics, kept in the
    # train state (checkpointed, resumed exactly): ema = decay * ema + (1 - decay) * new after
    # every step, from the initial weights. In [0, 1); 0 (the paper): off, no EMA in the state.
    # When on, every validation also scores the EMA weights (ema_* in metrics.jsonl).
    config.ema = ml_collections.ConfigDict()
    config.ema.decay = 0.0  # e.g. 0.999 (an average over ~1000 steps)

    config.parallelism = "jit"  # 'jit' (mesh with a 'data' axis) or 'pmap'
    # Fresh runs only: a Keras DenseNet HDF5 with ImageNet weights, or a murajax workdir (its
    # best checkpoint's params and BatchNorm statistics; same config.model.name).
    config.init_from = ""
    config.checkpoint_every_steps = 1000
    config.keep_best = 5
    config.log_every_steps = 50
    config.stop_after_steps = 0  # >0: save and stop after this many steps (time-sliced jobs)

    config.distributed = ml_collections.ConfigDict()
    config.distributed.enabled = False
    config.distributed.coordinator_address = ""  # host:port; empty: from the environment
    config.distributed.num_processes = 0
    config.distributed.process_id = -1

    config.eval = ml_collections.ConfigDict()
    config.eval.split = "valid"
    config.eval.ensemble_top_k = 5
    config.eval.threshold = 0.5
    # Evaluate with the EMA weights (needs config.ema.decay > 0): then the EMA's validation loss,
    # not the raw weights', drives the plateau rule and picks the best checkpoints, and
    # --mode=evaluate / predict (and Predictor.from_workdir) load the EMA variables.
    config.eval.use_ema = False
    config.eval.bootstrap_samples = 10000
    config.eval.readers = ""  # CSV of per-study reader labels for the reader comparison
    config.eval.reader_gold = ""  # comma-separated readers whose majority is the gold standard

    # --mode=relabel: flip a train label where the ensemble's study probability disagrees with
    # it at this confidence (p >= c: 0 -> 1; p <= 1 - c: 1 -> 0); in (0.5, 1).
    config.relabel = ml_collections.ConfigDict()
    config.relabel.confidence = 0.95
    return config
