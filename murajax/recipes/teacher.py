"""The mean teacher with confident pseudo-labels (``config.teacher``): the teacher-student
framework for missing and doubtful annotations.

The teacher is the weight EMA the train state already keeps (``config.ema.decay``; Tarvainen
& Valpola 2017, "Mean teachers are better role models"). Each train step, before the student's
forward pass, the teacher predicts the batch (BatchNorm in inference mode, no gradient) on its
own view of the images: with ``config.data.augment_on='device'`` an independent draw of the
step's flips and rotations, else the student's images mirrored (``teacher_view``). Where it
is confident (p > tau or p < 1 - tau) its prediction, hard (0/1) or soft (the probability), is
merged with the given label by
``config.teacher.merge`` (``merge_targets``, a pure function of labels and probabilities):

* ``missing_only``: only examples without a label (label -1) take the teacher's prediction
  (pseudo-labelling, Lee 2013; with a confidence threshold as in FixMatch, Sohn et al. 2020);
* ``replace_disagreeing``: also replaces a given label the confident teacher disagrees with
  (re-labelling on the fly, as in the teacher-student framework for missing annotations);
* ``soft``: a labelled confident example trains on ``(1 - w) y + w p_teacher`` (``weight`` =
  w; Reed-style bootstrapping with the teacher instead of the student); unlabelled examples
  as ``missing_only``.

Examples the teacher labels join the supervised loss with the paper's per-study-type weights
of their (soft) target. From ``warmup_epochs`` on (before that the teacher is barely trained
and the batch trains on its given labels only). ``consistency_weight`` > 0 adds
``w_c * mean((p_student - p_teacher)^2)`` over every real example, labelled or not: the mean
teacher's consistency between two differently augmented views.

The merged batch carries ``target`` (float32 soft targets), ``loss_weight`` and ``label``
(the merged hard label, -1 where the example stays out of the loss), so every recipe loss, the
metrics, mixup and the running loss see the examples the step trains on.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from murajax.errors import UserError
from murajax.recipes import number_field
from murajax.recipes.weighted_bce import example_weights

MERGES = ("missing_only", "replace_disagreeing", "soft")


@dataclasses.dataclass(frozen=True)
class Teacher:
    """The static settings of a run's mean teacher (a static field of the train state)."""

    confidence: float  # tau in (0.5, 1): confident where p > tau or p < 1 - tau
    merge: str  # one of MERGES
    weight: float  # merge='soft': the teacher's share w of a labelled example's target
    hard: bool  # the teacher's 0/1 decision (True) or its probability (False) as the target
    start_step: int  # the first step the teacher's signal applies (warmup_epochs * steps)
    consistency_weight: float  # >= 0: weight of the student-teacher consistency loss
    flip_view: bool  # the teacher sees the student's images mirrored (config.data.hflip)


def merge_targets(label: jax.Array, teacher_prob: jax.Array, settings: Teacher,
                  real: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The targets a batch trains on: ``(target float32 [b], supervised bool [b])``.

    ``label``: the given labels (int, -1: none); ``teacher_prob``: the teacher's probability of
    abnormal; ``real``: the examples that are not padding. ``supervised`` marks the examples in
    the loss: given a label, or unlabelled where the teacher is confident. ``target`` is the
    given label where the teacher does not apply, and 0 where ``supervised`` is False."""
    p = teacher_prob.astype(jnp.float32)
    confident = real & ((p > settings.confidence) | (p < 1.0 - settings.confidence))
    decision = (p > 0.5).astype(jnp.float32)
    pseudo = decision if settings.hard else p
    labelled = real & (label >= 0)
    given = jnp.clip(label, 0, 1).astype(jnp.float32)
    missing = confident & ~labelled
    target = jnp.where(missing, pseudo, given)
    if settings.merge == "replace_disagreeing":
        target = jnp.where(labelled & confident & (decision != given), pseudo, target)
    elif settings.merge == "soft":
        w = jnp.float32(settings.weight)
        target = jnp.where(labelled & confident, (1.0 - w) * given + w * pseudo, target)
    supervised = labelled | missing
    return jnp.where(supervised, target, 0.0), supervised


def teacher_view(images: jax.Array, settings: Teacher) -> jax.Array:
    """The teacher's view of the student's (already augmented) images: mirrored left-right
    when the run flips images anyway (a flip is then a label-preserving augmentation the
    student did not see), else the same images."""
    return jnp.flip(images, axis=2) if settings.flip_view else images


def teacher_probabilities(state, images: jax.Array) -> jax.Array:
    """float32 [b]: the EMA weights' probability of abnormal, BatchNorm in inference mode, no
    gradient."""
    ema = state.ema
    logits = state.apply_fn({"params": ema["params"], "batch_stats": ema["batch_stats"]},
                            images, train=False)
    return jax.nn.sigmoid(jax.lax.stop_gradient(logits[:, 0].astype(jnp.float32)))


def taught_batch(state, batch: dict, settings: Teacher,
                 view: jax.Array | None = None) -> tuple[dict, jax.Array]:
    """``batch`` with the teacher's targets merged in (from ``settings.start_step`` on; before,
    the given labels as soft targets), and the teacher's probabilities on its view: ``view``
    (the train step's own augmentation of the images with another key, when it augments on
    the device), else ``teacher_view`` of the student's images."""
    if view is None:
        view = teacher_view(batch["image"], settings)
    prob = teacher_probabilities(state, view)
    real = batch["mask"] > 0
    target, supervised = merge_targets(batch["label"], prob, settings, real)
    given_supervised = real & (batch["label"] >= 0)
    active = jnp.asarray(state.step) >= settings.start_step
    target = jnp.where(active, target, jnp.clip(batch["label"], 0, 1).astype(jnp.float32))
    supervised = jnp.where(active, supervised, given_supervised)
    # The paper's weights of a soft target: the w_T0/w_T1 blend of its two classes.
    w1 = example_weights(state.loss_weights, batch["study_type"], jnp.ones_like(batch["label"]))
    w0 = example_weights(state.loss_weights, batch["study_type"], jnp.zeros_like(batch["label"]))
    label = jnp.where(supervised, (target > 0.5).astype(batch["label"].dtype), -1)
    return {**batch, "label": label, "target": target,
            "loss_weight": target * w1 + (1.0 - target) * w0}, prob


def consistency(student_logits: jax.Array, teacher_prob: jax.Array) -> jax.Array:
    """float32 [b]: the squared difference of the student's and the teacher's probabilities."""
    student = jax.nn.sigmoid(student_logits.astype(jnp.float32))
    return jnp.square(student - teacher_prob)


def consistency_scale(state, settings: Teacher) -> jax.Array:
    """The consistency loss's weight at this step: 0 before ``start_step``."""
    return jnp.where(jnp.asarray(state.step) >= settings.start_step,
                     jnp.float32(settings.consistency_weight), jnp.float32(0.0))


def from_config(config, steps_per_epoch: int = 1) -> Teacher | None:
    """``config.teacher`` checked (UserError naming the field) as a ``Teacher``; None when it is
    not enabled (or the config has no ``teacher`` section)."""
    section = config.get("teacher")
    if section is None or not bool(section.get("enabled", False)):
        return None
    ema = config.get("ema")
    if ema is None or not float(ema.get("decay", 0.0)) > 0.0:
        raise UserError("config.teacher.enabled=True needs an EMA to be the teacher: set "
                        "config.ema.decay in (0, 1), e.g. --config.ema.decay=0.99")

    def number(field, default):
        return number_field(section, "teacher", field, default, finite=True)

    confidence, weight = number("confidence", 0.9), number("weight", 0.5)
    consistency_weight = number("consistency_weight", 0.0)
    merge = section.get("merge", "missing_only")
    target = section.get("target", "hard")
    warmup = section.get("warmup_epochs", 1)
    if merge not in MERGES:
        raise UserError(f"config.teacher.merge must be one of {', '.join(MERGES)}, got "
                        f"{merge!r}")
    if target not in ("hard", "soft"):
        raise UserError(f"config.teacher.target must be 'hard' (the teacher's 0/1 decision) "
                        f"or 'soft' (its probability), got {target!r}")
    if not 0.5 < confidence < 1.0:
        raise UserError(f"config.teacher.confidence={confidence!r} must be in (0.5, 1)")
    if not 0.0 <= weight <= 1.0:
        raise UserError(f"config.teacher.weight={weight!r} must be in [0, 1]")
    if consistency_weight < 0.0:
        raise UserError(f"config.teacher.consistency_weight={consistency_weight!r} must be >= 0")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise UserError(f"config.teacher.warmup_epochs={warmup!r} must be an integer >= 0")
    mixing = config.get("mixup")
    if consistency_weight > 0 and mixing is not None and (mixing.alpha > 0
                                                         or mixing.cutmix_alpha > 0):
        raise UserError("config.teacher.consistency_weight > 0 cannot be combined with "
                        "config.mixup: the student would see mixed images the teacher did not; "
                        "set one of them to 0")
    return Teacher(confidence=confidence, merge=merge, weight=weight, hard=target == "hard",
                   start_step=int(warmup) * int(steps_per_epoch),
                   consistency_weight=consistency_weight,
                   flip_view=bool(config.data.get("hflip", True)))
