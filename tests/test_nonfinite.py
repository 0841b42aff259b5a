"""A loss that goes NaN between host reads: caught at the next log line or save, never saved,
and the loss is read on the host at those points only (not once per step)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from murajax import checkpoints, steps, synthetic, train
from murajax.data import device_augment
from tests import helpers

BAD_STEP = 5  # the 5th step (state.step 4 -> 5) gets NaN images: its loss and update are NaN


@pytest.fixture(scope="module")
def mura_root(tmp_path_factory):
    return synthetic.generate(tmp_path_factory.mktemp("data"), num_studies=40, seed=3)


def test_nan_mid_window_is_caught_at_the_next_save_and_not_saved(mura_root, tmp_path,
                                                                  monkeypatch):
    plain_step = steps.train_step

    def diverging_step(state, batch, **kwargs):
        bad = state.step == BAD_STEP - 1
        batch = device_augment.eval_batch(batch)  # uint8 -> float32, as the step does first
        batch = dict(batch, image=jnp.where(bad, jnp.nan, batch["image"]))
        return plain_step(state, batch, **kwargs)

    # The strategies jit steps.train_step when they are built, inside train_and_evaluate.
    monkeypatch.setattr(steps, "train_step", diverging_step)
    reads = []
    finite_loss = train._finite_loss
    monkeypatch.setattr(train, "_finite_loss",
                        lambda *args: reads.append(args[2]) or finite_loss(*args))
    # Saves at 3 and 6, log lines at 8: step 5's NaN is mid-window, the save at 6 reads it.
    config = helpers.run_config(mura_root, checkpoint_every_steps=3, log_every_steps=8)
    with pytest.raises(train.NonFiniteLossError) as error:
        train.train_and_evaluate(config, tmp_path)
    message = str(error.value)
    assert "in steps 4..6" in message and "was not saved" in message
    assert "last checkpoint: step 3" in message and "--config.optim.learning_rate" in message
    assert reads == [3, 6]  # the host read the loss at the two saves only, not every step
    checkpointer = checkpoints.Checkpointer(tmp_path, read_only=True)
    assert checkpointer.all_steps() == [3]
    params = checkpointer.restore_variables(3)["params"]
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))
