"""The paper's model and images on GPU/TPU: bfloat16 compute, large global batch, remat,
augmentation on the device, loader workers sized from the host.

Params, loss and metrics stay float32. Adam's learning rate scales with the square root of the
batch (1e-4 at 8 -> 1e-4 * sqrt(256 / 8) = 5.7e-4 at 256): Adam normalises each update by the
gradient's running RMS, so a larger batch, whose gradient noise is smaller by sqrt(batch), gains
a step sqrt(batch) times larger at the same noise, not batch times (linear scaling, 3.2e-3, is
SGD's rule). A linear warm-up over the first epoch (``config.optim.warmup_epochs``) keeps the
first updates small while Adam's second-moment estimate is still noisy. Checked on the synthetic
set with the tiny model (benchmarks/large_batch.py, docs/performance.md "Large batches").
"""

from murajax.configs import default


def get_config():
    config = default.get_config()
    config.model.dtype = "bfloat16"
    config.model.remat = "bottleneck"
    config.batch_size = 256
    config.eval_batch_size = 512
    config.optim.learning_rate = 1e-4 * (256 / 8) ** 0.5
    config.optim.warmup_epochs = 1.0
    # Decode workers from the host's CPUs and local devices; uint8 batches, flipped, rotated
    # and normalised by the train step (a quarter of the bytes, no host-side warps). Training
    # from a prebuilt cache (config.data.cache) leaves the workers only the record reads.
    config.data.num_workers = "auto"
    config.data.augment_on = "device"
    config.data.prefetch = 4
    config.checkpoint_every_steps = 500
    config.log_every_steps = 20
    return config
