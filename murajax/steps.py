"""Pure training and evaluation steps: gradients of the recipe's loss, one Adam update, one
eval batch.

The loss itself is the state's recipe (``murajax.recipes``, the paper's weighted BCE by
default): these steps only mask, average, differentiate and collect metrics.

Nothing here is jitted, sharded or stateful: ``murajax.parallel`` wraps these same functions in
``jax.jit`` over a device mesh or in ``jax.pmap``. Under ``pmap`` the caller passes the mapped
axis name, and gradients and metrics are combined across devices with collectives; under ``jit``
the arrays are global and ``axis_name`` stays ``None``.

A batch is a dict of arrays: ``image`` [b, H, W, 3] float32, ``label`` [b] int32 (-1:
unlabelled, left out of the loss and the metrics),
``study_type`` [b] int32, ``mask`` [b] float32 (0 for padding or skipped images) and ``index`` [b]
int32 (the image's position in its split, -1 for padding).
"""

# No `from __future__ import annotations`: clu reads the metric annotations at run time.
import flax.struct
import jax
import jax.numpy as jnp
from clu import metrics

from murajax import optim
from murajax.data import device_augment
from murajax.recipes import reweight as reweighting
from murajax.recipes import teacher as teaching
from murajax.train_state import TrainState, update_ema


@flax.struct.dataclass
class StepMetrics(metrics.Collection):
    """Mean loss and accuracy over a batch's unmasked examples (train and eval alike)."""

    loss: metrics.Average.from_output("loss")
    accuracy: metrics.Average.from_output("correct")


def _psum(x, axis_name):
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def _per_example_outputs(state: TrainState, logits: jax.Array, batch: dict, loss_fn) -> dict:
    logits = logits.astype(jnp.float32)
    return {
        "logits": logits[:, 0],
        "loss": loss_fn(logits, batch, state),
        "correct": ((logits[:, 0] > 0).astype(jnp.int32) == batch["label"]).astype(jnp.float32),
    }


def supervised_mask(batch: dict) -> jax.Array:
    """float32 [b]: 1 for the examples the loss sees: real (not padding, not skipped) and
    labelled (an unlabelled image, label -1, only feeds BatchNorm and label-free signals)."""
    return batch["mask"].astype(jnp.float32) * (batch["label"] >= 0).astype(jnp.float32)


def _collect(collection, outputs: dict, mask: jax.Array, axis_name):
    values = {"loss": outputs["loss"], "correct": outputs["correct"], "mask": mask > 0}
    if axis_name is None:
        return collection.single_from_model_output(**values)
    return collection.gather_from_model_output(axis_name=axis_name, **values)


def compute_gradients(state: TrainState, batch: dict, axis_name=None):
    """Gradients of the mean recipe loss over the (global) batch's unmasked examples.

    Returns ``(grads, outputs, batch_stats)``: the gradients (summed over devices under
    ``pmap``), the per-example outputs and the BatchNorm statistics updated by this batch.
    With a running loss in the state (``config.reweight``), each example's loss is weighted by
    ``recipes.reweight.example_weights`` of the running loss before this step's update. With a
    mean teacher (``config.teacher``), the batch first takes the teacher's merged targets
    (``recipes.teacher.taught_batch``), and ``outputs['label']`` holds the labels trained on.
    """
    # uint8 images (config.data.augment_on='device'): flipped, rotated and normalised here,
    # keyed by stream 2 of the step's key (1 is recipe.prepare's), the step and the index.
    augment_key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 2)
    raw = batch
    batch = device_augment.train_batch(batch, augment_key, state.step, state.augment)
    teacher_prob = None
    if state.teacher is not None:  # static: decided by the state's settings at trace time
        view = None  # host augmentation: the teacher sees the student's images mirrored
        if state.augment is not None and state.augment.active:  # its own draw, stream 2/1
            view = device_augment.train_batch(raw, jax.random.fold_in(augment_key, 1),
                                              state.step, state.augment)["image"]
        batch, teacher_prob = teaching.taught_batch(state, batch, state.teacher, view)
    mask = supervised_mask(batch)
    weighted = mask
    if state.running_loss is not None:  # static: decided by the state's structure
        weighted = mask * reweighting.example_weights(state.running_loss, batch["index"],
                                                      state.reweight, state.step)
    # The global number of labelled real examples: each device's share of the mean is its sum
    # over it, so that summing gradients over devices gives the gradient of the global mean.
    count = jnp.maximum(_psum(jnp.sum(mask), axis_name), 1.0)
    dropout_rng = jax.random.fold_in(state.rng, state.step)
    if state.recipe.prepare is not None:  # e.g. mixup: before the forward pass, keyed per step
        batch = state.recipe.prepare(batch, jax.random.fold_in(dropout_rng, 1), state)

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            batch["image"],
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": dropout_rng},
        )
        outputs = _per_example_outputs(state, logits, batch, state.recipe.train_loss)
        loss = jnp.sum(outputs["loss"] * weighted) / count
        if teacher_prob is not None and state.teacher.consistency_weight > 0:
            loss = loss + _consistency_loss(state, logits, teacher_prob, batch, axis_name)
        return loss, (outputs, updates["batch_stats"])

    grads, (outputs, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
    if teacher_prob is not None:
        outputs = {**outputs, "label": batch["label"]}
    return _psum(grads, axis_name), outputs, batch_stats


def _consistency_loss(state, logits, teacher_prob, batch, axis_name):
    """The mean teacher's consistency term: its weight times the mean over the global batch's
    real examples (labelled or not) of the squared student-teacher probability gap."""
    real = batch["mask"].astype(jnp.float32)
    gap = teaching.consistency(logits[:, 0], teacher_prob)
    count = jnp.maximum(_psum(jnp.sum(real), axis_name), 1.0)
    return teaching.consistency_scale(state, state.teacher) * jnp.sum(gap * real) / count


def _updated_running_loss(state: TrainState, index, loss, mask, axis_name):
    if axis_name is not None:  # each device has its own examples: scatter them all everywhere
        index, loss, mask = (jax.lax.all_gather(x, axis_name, tiled=True)
                             for x in (index, loss, mask))
    return reweighting.update_running_loss(state.running_loss, index, loss, mask,
                                           state.reweight.momentum)


def train_step(
    state: TrainState, batch: dict, axis_name=None
) -> tuple[TrainState, StepMetrics]:
    """One Adam update on the mean recipe loss over the (global) batch's unmasked examples;
    then, if the state keeps one, the EMA of the new params and BatchNorm statistics, and the
    running loss of this batch's labelled examples (all devices' under ``pmap``: every replica
    holds the same array)."""
    grads, outputs, batch_stats = compute_gradients(state, batch, axis_name)
    new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    # The examples trained on (with a mean teacher: its merged labels).
    mask = supervised_mask({**batch, "label": outputs.get("label", batch["label"])})
    if new_state.running_loss is not None:  # static, as the EMA's
        new_state = new_state.replace(running_loss=_updated_running_loss(
            new_state, batch["index"], outputs["loss"], mask, axis_name))
    if new_state.ema is not None:  # static: decided by the state's structure at trace time
        new_state = new_state.replace(ema=update_ema(
            new_state.ema, new_state.params, new_state.batch_stats, new_state.ema_decay))
    return new_state, _collect(StepMetrics, outputs, mask, axis_name)


def eval_step(
    state: TrainState, batch: dict, axis_name=None
) -> tuple[StepMetrics, jax.Array]:
    """The recipe's validation loss and accuracy over unmasked examples, and each example's
    probability of abnormal."""
    batch = device_augment.eval_batch(batch)  # uint8 images: normalised here
    logits = state.apply_fn(state.variables, batch["image"], train=False)
    outputs = _per_example_outputs(state, logits, batch, state.recipe.eval_loss)
    return (_collect(StepMetrics, outputs, supervised_mask(batch), axis_name),
            jax.nn.sigmoid(outputs["logits"]))


def apply_plateau(state: TrainState, val_loss, optim_config) -> TrainState:
    """End of epoch: feed the validation loss to the plateau rule and set the next rate."""
    plateau, rate = optim.plateau_step(
        state.plateau, optim.learning_rate(state.opt_state), val_loss, optim_config
    )
    return state.replace(plateau=plateau, opt_state=optim.with_learning_rate(state.opt_state, rate))
