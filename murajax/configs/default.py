"""The paper's recipe (Rajpurkar et al., MURA): DenseNet-169 at 320x320, batch 8, Adam 1e-4,
learning rate x0.1 whenever an epoch's validation loss fails to improve, flips and 30-degree
rotations, the 5 lowest-validation-loss checkpoints kept for the ensemble.

Train on real MURA with
    murajax --config=default --config.data.root=/path/to/MURA-v1.1 --workdir runs/mura
"""

import ml_collections


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
    config.model.bn_epsilon = 1.001e-5  # Keras's value: required when init_from is a Keras file

    config.task = "mura"  # what the data means (murajax/tasks): MURA's binary study labels

    config.data = ml_collections.ConfigDict()
    config.data.root = ""  # the MURA-v1.1 folder (the one holding train_image_paths.csv)
    config.data.synthetic_studies = 0  # >0 and root empty: generate synthetic MURA in workdir
    config.data.image_size = 320
    config.data.resize = "stretch"  # 'stretch' (paper) or 'pad' (keep aspect ratio)
    config.data.hflip = True
    config.data.rotation_degrees = 30.0
    config.data.study_types = ""  # comma-separated subset, e.g. "XR_WRIST,XR_HAND"; empty: all
    config.data.fraction = 1.0  # fraction of studies to use (quick runs)
    config.data.on_missing = "error"  # listed image missing: 'error' or 'skip' (counted)
    config.data.on_bad_image = "error"  # unreadable image: 'error' or 'skip' (counted)
    config.data.num_workers = 0  # Grain worker processes (0: decode in the main process)
    config.data.prefetch = 2  # batches buffered per worker

    config.batch_size = 8  # global, across all devices and processes
    config.eval_batch_size = 16
    config.num_epochs = 20

    config.loss = ml_collections.ConfigDict()
    config.loss.name = "weighted_bce"  # the training recipe (murajax/recipes): the paper's loss

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

    config.parallelism = "jit"  # 'jit' (mesh with a 'data' axis) or 'pmap'
    config.init_from = ""  # Keras DenseNet HDF5 with ImageNet weights; fresh runs only
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
    config.eval.bootstrap_samples = 10000
    config.eval.readers = ""  # CSV of per-study reader labels for the reader comparison
    config.eval.reader_gold = ""  # comma-separated readers whose majority is the gold standard
    return config
