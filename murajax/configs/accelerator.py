"""The paper's model and images on GPU/TPU: bfloat16 compute, large global batch, remat.

Params, loss and metrics stay float32. The learning rate scales linearly with the batch
(1e-4 at 8 -> 3.2e-3 at 256); lower it if the first epochs diverge.
"""

from murajax.configs import default


def get_config():
    config = default.get_config()
    config.model.dtype = "bfloat16"
    config.model.remat = "bottleneck"
    config.batch_size = 256
    config.eval_batch_size = 512
    config.optim.learning_rate = 1e-4 * 256 / 8
    config.data.num_workers = 16
    config.data.prefetch = 4
    config.checkpoint_every_steps = 500
    config.log_every_steps = 20
    return config
