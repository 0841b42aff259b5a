"""The training state pytree and how to build it from a config.

``TrainState`` holds everything a step reads or writes: params, BatchNorm statistics, the Adam
state (which carries the current learning rate), the step counter, a PRNG key, the plateau
tracker and the per-study-type loss weights; with ``config.ema.decay`` > 0, an exponential moving
average of params and BatchNorm statistics (``ema``; None, and so no leaf at all, when off); with
``config.reweight.mode`` other than 'none', each train image's running loss (``running_loss``;
None when off); and, as static fields, the model's apply function, the training recipe, the EMA
decay, the re-weighting and the device augmentation settings. It is the unit that is sharded,
donated and checkpointed.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import flax.linen as nn
import flax.struct
from flax.training import train_state

from murajax import models, optim, recipes, tasks
from murajax.data import device_augment
from murajax.recipes import reweight as reweighting
from murajax.recipes import teacher as teaching
from murajax.errors import UserError

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class TrainState(train_state.TrainState):
    batch_stats: Any
    rng: jax.Array
    plateau: optim.PlateauState
    loss_weights: jax.Array  # float32 [num_study_types, 2]: weight of (study type, label)
    # How outputs become the loss (static, like apply_fn: not saved, chosen by config.loss).
    recipe: recipes.Recipe = flax.struct.field(
        pytree_node=False, default=recipes.DEFAULT_RECIPE)

    # {'params', 'batch_stats'}: their exponential moving average (config.ema.decay > 0), saved
    # and restored with the rest; None when off, so a default state has exactly its old leaves.
    ema: Any = None
    ema_decay: float = flax.struct.field(pytree_node=False, default=0.0)  # static, like recipe

    # float32 [number of train images]: each image's running loss (NaN: not seen yet), indexed
    # by its position in the train split (murajax.recipes.reweight); None when
    # config.reweight.mode is 'none', so a default state has exactly its old leaves.
    running_loss: Any = None
    reweight: reweighting.Reweight | None = flax.struct.field(pytree_node=False, default=None)
    # The mean teacher's settings (config.teacher; static): the EMA above is the teacher, so
    # the teacher adds no leaf. None when off.
    teacher: teaching.Teacher | None = flax.struct.field(pytree_node=False, default=None)
    # What the train step draws to flip and rotate uint8 images (config.data.augment_on=
    # 'device'; static, no leaf). None: the pipeline augmented them (the default).
    augment: device_augment.DeviceAugment | None = flax.struct.field(pytree_node=False,
                                                                     default=None)

    @property
    def variables(self) -> dict:
        return {"params": self.params, "batch_stats": self.batch_stats}

    def with_ema_weights(self) -> "TrainState":
        """This state with the EMA's params and BatchNorm statistics in place of the raw ones
        (same pytree structure: the compiled eval step serves both)."""
        if self.ema is None:
            raise ValueError("this state keeps no EMA (config.ema.decay is 0)")
        return self.replace(params=self.ema["params"], batch_stats=self.ema["batch_stats"])


def map_variables(state: TrainState, convert) -> TrainState:
    """``state`` with ``convert`` applied to each tree of model variables in it: params,
    BatchNorm statistics, the EMA's, and the optimizer state's trees shaped like params
    (Adam's moments; masked ones too). For ``models.in_layout``-style layout changes."""
    keys = set(state.params)

    def shaped_like_params(node) -> bool:
        return isinstance(node, dict) and set(node) == keys

    opt_state = jax.tree.map(lambda node: convert(node) if shaped_like_params(node) else node,
                             state.opt_state, is_leaf=shaped_like_params)
    ema = None if state.ema is None else {name: convert(tree) for name, tree in state.ema.items()}
    return state.replace(params=convert(state.params), batch_stats=convert(state.batch_stats),
                         opt_state=opt_state, ema=ema)


def relayout(model: nn.Module, state: TrainState, like=None) -> TrainState:
    """``state``'s model variables in the layout of ``like`` (a params tree; None: ``model``'s
    own; ``models.in_layout``), e.g. a checkpoint's written with another block_impl."""
    return map_variables(state, models.registry.layout_converter(model, like))


def ema_decay_from_config(config: ml_collections.ConfigDict) -> float:
    """``config.ema.decay``, checked: in [0, 1) (0: no EMA), else a UserError naming the field;
    and ``config.eval.use_ema`` needs an EMA to evaluate with."""
    ema = config.get("ema")
    decay = ema.get("decay", 0.0) if ema is not None else 0.0
    try:
        decay = float(decay)
    except (TypeError, ValueError):
        raise UserError(f"config.ema.decay must be a number in [0, 1), got {decay!r}") from None
    if not 0.0 <= decay < 1.0:  # NaN too
        raise UserError(f"config.ema.decay must be in [0, 1) (0: no EMA; e.g. 0.999), got "
                        f"{decay!r}")
    if decay == 0.0 and bool(config.eval.get("use_ema", False)):
        raise UserError("config.eval.use_ema=True needs an EMA: set config.ema.decay in (0, 1), "
                        "e.g. --config.ema.decay=0.999")
    return decay


def update_ema(ema: dict, params, batch_stats, decay: float) -> dict:
    """One EMA step of params and BatchNorm statistics: ``decay * ema + (1 - decay) * new``
    (``optax.incremental_update(new, old, step_size)`` is ``step_size * new + (1 - step_size)
    * old``; ``optax.ema`` would average updates, not params)."""
    step_size = 1.0 - decay
    return {
        "params": optax.incremental_update(params, ema["params"], step_size),
        "batch_stats": optax.incremental_update(batch_stats, ema["batch_stats"], step_size),
    }


def compute_dtype(name: str):
    if name not in _DTYPES:
        raise UserError(f"config.model.dtype must be one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


def model_from_config(config: ml_collections.ConfigDict, *, bn_axis_name: str | None = None):
    """The model ``config.model.name`` selects (``murajax.models`` registry), with as many
    outputs as ``config.task`` needs and the config's numerics settings. Unknown names and
    bad ``conv_impl``/``remat`` values are UserErrors naming the field (checked, and 'auto'
    resolved, by ``murajax.models``)."""
    model_config = config.model
    return models.create(
        model_config.name,
        num_outputs=tasks.from_config(config).num_outputs,
        dtype=compute_dtype(model_config.dtype),
        remat=model_config.remat,
        bn_momentum=float(model_config.bn_momentum),
        bn_epsilon=float(model_config.bn_epsilon),
        bn_axis_name=bn_axis_name,
        conv_impl=str(model_config.get("conv_impl", "auto")),
        block_impl=str(model_config.get("block_impl", "unrolled")),
    )


def create_train_state(
    rng: jax.Array,
    model: nn.Module,
    tx,
    image_size: int,
    loss_weights: np.ndarray,
    recipe: recipes.Recipe | None = None,
    ema_decay: float = 0.0,
    reweight: reweighting.Reweight | None = None,
    num_images: int = 0,
    teacher: teaching.Teacher | None = None,
    augment: device_augment.DeviceAugment | None = None,
) -> TrainState:
    """Initialises a fresh state. Pure: meant to run under ``jax.jit`` or ``jax.eval_shape``.

    With ``ema_decay`` > 0 (``ema_decay_from_config`` checks it) the state keeps an EMA of params
    and BatchNorm statistics, starting from their initial values. With ``reweight``
    (``recipes.reweight.from_config``) it keeps the running loss of ``num_images`` train
    images, all NaN (not seen yet). ``teacher`` (``recipes.teacher.from_config``, which
    requires an EMA) makes the EMA a mean teacher of the train step. ``augment``
    (``data.device_augment.from_config``): the train step flips and rotates uint8 images."""
    init_rng, state_rng = jax.random.split(rng)
    dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    variables = model.init(init_rng, dummy, train=False)
    params = variables["params"]
    ema = None
    if ema_decay:
        # Copies: the EMA shares no buffer with params (the train step donates the state).
        ema = jax.tree.map(jnp.copy, {"params": params, "batch_stats": variables["batch_stats"]})
    running_loss = None
    if reweight is not None:
        if num_images < 1:
            raise ValueError("a running loss needs num_images >= 1 (the train split's size)")
        running_loss = jnp.full((int(num_images),), jnp.nan, jnp.float32)
    return TrainState(
        step=jnp.asarray(0, jnp.int32),
        apply_fn=model.apply,
        params=params,
        tx=tx,
        opt_state=tx.init(params),
        batch_stats=variables["batch_stats"],
        rng=state_rng,
        plateau=optim.init_plateau(),
        loss_weights=jnp.asarray(loss_weights, jnp.float32),
        recipe=recipe or recipes.DEFAULT_RECIPE,
        ema=ema,
        ema_decay=float(ema_decay),
        running_loss=running_loss,
        reweight=reweight,
        teacher=teacher,
        augment=augment,
    )
