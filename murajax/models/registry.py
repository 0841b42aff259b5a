"""The backbone seam: model constructors by ``config.model.name``, and the creation-time
settings every backbone shares, resolved here once.

A backbone module (``murajax/models/densenet.py``; later ``resnet.py``, ``vit.py``) calls
``register(name, build, load_weights=...)`` for each of its variants, and gets one import line
in ``murajax/models/__init__.py``. Nothing else changes for a new backbone.

* ``build(**overrides)`` returns a linen module called as
  ``model.apply(variables, images, train=False, return_features=False)`` on NHWC images, giving
  float32 logits ``[batch, num_outputs]``, or ``(logits, features)`` with ``return_features``
  (the pre-logits feature map or vector; class activation maps use it). It accepts at least
  ``num_outputs``, ``dtype``, ``bn_epsilon``, ``bn_momentum``, ``bn_axis_name``, ``remat``,
  ``conv_impl`` and ``block_impl`` (what ``train_state.model_from_config`` passes).
* ``load_weights(path, variables, *, model)`` (optional) returns ``variables`` with the
  backbone taken from a weight file (the Keras HDF5 importer for the DenseNets); it raises a
  UserError for a file or a model setting that does not fit.
* ``model.layout_variables(tree, like=None)`` (optional): a backbone whose settings change
  how it *stores* its variables (the DenseNets' ``block_impl='scan'`` stacks the layers of a
  scan) converts one collection of them, or any tree shaped like one, from whatever layout
  it is in to the layout of ``like`` (a collection; default: the model's own; ``{}``: one
  entry per layer, the layout of weight files). ``in_layout`` applies it, so that weight
  files import and a checkpoint written in one layout restores in another.

``'auto'`` settings are resolved against JAX's default backend here and nowhere else:
``resolve_conv_impl`` ('matmul' on CPU, 'xla' elsewhere) and ``resolve_remat`` ('bottleneck'
on CPU, 'none' elsewhere; docs/performance.md). A constructor calls them once, when it builds
the model; modules receive resolved values. Bad values are UserErrors naming the config field.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np

from murajax import ops
from murajax.errors import UserError

# How convolutions run (speed only: parameters and results are the same): the matmul
# formulation of murajax.ops, XLA's convolutions, or 'auto' (the first on CPU).
CONV_IMPLS = ("auto", "matmul", "xla")
# What the backward pass recomputes instead of storing: nothing; each dense layer's
# concatenation -> BN -> ReLU (cheap elementwise work); or the whole layer minus its 3x3 output
# (adds the 1x1 matmul again). 'auto': 'bottleneck' on CPU, where it is also faster (XLA:CPU
# streams and faults in less scratch memory every step), 'none' elsewhere.
# docs/performance.md has their memory and time.
REMAT_POLICIES = ("auto", "none", "bottleneck", "layer")
# How a dense block's layers are laid out (speed only: the same results from the same
# variables): 'unrolled', one program section per layer, or 'scan', layers grouped by input
# width rounded up to 128 channels and run as lax.scan loops (murajax.ops.dense_scan), their
# variables stored stacked per group: a third of the compile on CPU, a step 1-5% slower
# (docs/performance.md, "Issue 15, third pass"). Checkpoints and weight files convert between
# the two (in_layout).
BLOCK_IMPLS = ("unrolled", "scan")


@dataclasses.dataclass(frozen=True)
class Backbone:
    """A registered model: its name, constructor and (optional) weight importer."""

    name: str
    build: Callable[..., nn.Module]
    load_weights: Callable[..., Any] | None = None


_BACKBONES: dict[str, Backbone] = {}


def register(name: str, build: Callable[..., nn.Module], *,
             load_weights: Callable[..., Any] | None = None) -> Backbone:
    """Makes ``build`` the constructor of ``config.model.name == name``."""
    if name in _BACKBONES:
        raise ValueError(f"model {name!r} is registered twice")
    backbone = Backbone(name, build, load_weights)
    _BACKBONES[name] = backbone
    return backbone


def names() -> tuple[str, ...]:
    """The registered model names, sorted."""
    return tuple(sorted(_BACKBONES))


def get(name: str) -> Backbone:
    """The registered backbone ``name``; a UserError listing the known names otherwise."""
    try:
        return _BACKBONES[name]
    except (KeyError, TypeError):
        raise UserError(f"config.model.name={name!r} is not a known model; choose one of "
                        f"{list(names())}") from None


def create(name: str, **overrides) -> nn.Module:
    """The model ``name`` built by its registered constructor with ``overrides``."""
    return get(name).build(**overrides)


def layout_converter(model: nn.Module, like: dict | None = None) -> Callable[[Any], Any]:
    """One collection (or a tree shaped like one) -> the same in ``model``'s variable layout,
    or in the layout of ``like`` (a collection; ``{}``: one entry per layer); the identity for
    a backbone with a single layout (no ``layout_variables``)."""
    convert = getattr(model, "layout_variables", None)
    if convert is None:
        return lambda tree: tree
    return lambda tree: convert(tree, like)


def in_layout(model: nn.Module, variables: dict, like: dict | None = None) -> dict:
    """``variables`` (``{collection: tree}``, real or abstract arrays) in ``model``'s variable
    layout, or in the layout of ``like`` (``layout_converter``)."""
    convert = layout_converter(model, like)
    return {name: convert(tree) for name, tree in variables.items()}


def _resolve(field: str, value, choices, on_cpu: str, elsewhere: str, also: str = "") -> str:
    """``value`` checked against ``choices``, with 'auto' resolved for JAX's default backend:
    the one place murajax asks which backend it runs on."""
    if value not in choices:
        raise UserError(f"config.model.{field} must be one of {list(choices)}{also}, "
                        f"got {value!r}")
    if value == "auto":
        return on_cpu if jax.default_backend() == "cpu" else elsewhere
    return value


def resolve_conv_impl(value: str) -> str:
    """``conv_impl`` as 'matmul' or 'xla' for JAX's default backend."""
    return _resolve("conv_impl", value, CONV_IMPLS, on_cpu="matmul", elsewhere="xla")


def conv_module(conv_impl: str) -> type[nn.Module]:
    """The convolution module ``conv_impl`` selects: ``nn.Conv`` or ``ops.MatmulConv`` (same
    arguments and parameters)."""
    return ops.MatmulConv if resolve_conv_impl(conv_impl) == "matmul" else nn.Conv


def resolve_block_impl(value: str) -> str:
    """``block_impl`` checked: 'unrolled' or 'scan' (no 'auto': the same on every backend)."""
    if value not in BLOCK_IMPLS:
        raise UserError(f"config.model.block_impl must be one of {list(BLOCK_IMPLS)}, "
                        f"got {value!r}")
    return value


def resolve_remat(value: bool | str) -> str:
    """``remat`` as 'none', 'bottleneck' or 'layer' for JAX's default backend; booleans mean
    'none'/'bottleneck'."""
    if isinstance(value, (bool, np.bool_)):
        return "bottleneck" if value else "none"
    return _resolve("remat", value, REMAT_POLICIES, on_cpu="bottleneck", elsewhere="none",
                    also=" (or a bool)")
