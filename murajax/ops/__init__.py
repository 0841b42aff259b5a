"""Speed-only kernels: the same mathematics as a plain Flax/XLA formulation, computed faster.

Nothing here chooses an architecture or a setting; a model takes these as module factories
(``conv=MatmulConv``, ``norm=BatchNormReLU``) in place of ``nn.Conv`` and ``nn.BatchNorm`` +
ReLU, with the same parameter names and shapes, so a checkpoint does not depend on which one ran.

* ``murajax.ops.conv``: convolutions whose gradients are matmuls (XLA:CPU computes a
  convolution's gradients many times slower than the same products written as dots).
* ``murajax.ops.batchnorm``: training-mode BatchNorm fused with the ReLU that follows it, with
  a hand-written backward pass.
* ``murajax.ops.dense_scan``: a dense block's layers as a few scans over a preallocated
  feature buffer, for a shorter compile (``config.model.block_impl='scan'``).
* ``murajax.ops.params``: parameters without Flax's per-apply re-trace of their initialiser
  (a shorter trace).

Each is checked against the plain formulation: ``tests/test_ops.py`` (each kernel against
``lax.conv`` / ``nn.Conv`` / ``nn.BatchNorm``, values and gradients) and
``tests/test_train_step_reference.py`` (a whole training step against a plain DenseNet).
"""

from murajax.ops.batchnorm import BatchNormReLU, batch_norm_relu_train
from murajax.ops import dense_scan, params
from murajax.ops.conv import MatmulConv, conv3x3_same, conv_patch_grad

__all__ = ["BatchNormReLU", "MatmulConv", "batch_norm_relu_train", "conv3x3_same",
           "conv_patch_grad", "dense_scan", "params"]
