"""A tiny DenseNet on synthetic MURA: the demo, and a check that the whole system works.

Same code path as the paper's recipe (weighted loss, plateau rule, checkpoints, per-study
metrics), scaled to finish in about a minute and a half on two CPU cores.
"""

from murajax.configs import default


def get_config():
    config = default.get_config()
    config.model.name = "densenet_tiny"
    config.data.synthetic_studies = 600
    config.data.image_size = 64
    config.batch_size = 32
    config.eval_batch_size = 64
    config.num_epochs = 8
    config.optim.learning_rate = 3e-3
    config.optim.plateau_patience = 1
    config.checkpoint_every_steps = 50
    config.log_every_steps = 10
    config.keep_best = 3
    return config
