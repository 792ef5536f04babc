"""AdaBound in a Keras 3 model, saved half way and resumed from the saved file.

A small classifier trains with ``dynabound.keras.AdaBound`` under a learning-rate schedule
in ``model.fit``. The same training runs twice: once straight through, once for half the
epochs, saved with ``model.save`` and continued from ``keras.models.load_model`` with
``initial_epoch``. The saved model holds the optimizer's moments, its step count and its
``base_learning_rate`` (the rate ``final_lr`` refers to, which the decayed learning rate
could not bring back), so both runs end with the same weights, bit for bit.

``dynabound.keras`` registers its optimizers with Keras when it is imported: import it
before ``load_model``.

Needs Keras 3 (``python -m pip install ".[keras]"`` in the clone). Keras runs on the backend
named by ``KERAS_BACKEND``; without one this script uses PyTorch, which dynabound needs
anyway (JAX and TensorFlow work too). Run ``python examples/keras_model.py``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")  # read once, when Keras is first imported

import keras  # noqa: E402
import numpy as np  # noqa: E402

from dynabound.keras import AdaBound  # noqa: E402

BATCH = 32
LR = 1e-2


def make_data(n: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Three classes of 8 features, labelled by a fixed linear map."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 8)).astype("float32")
    y = np.argmax(x @ rng.standard_normal((8, 3)), axis=1)
    return x, y


def make_model() -> keras.Model:
    keras.utils.set_random_seed(0)  # the same initial weights in every run
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(32, activation="tanh"),
            keras.layers.LayerNormalization(),
            keras.layers.Dense(3),
        ]
    )
    # halves the learning rate every epoch (8 steps); the bounds follow it
    schedule = keras.optimizers.schedules.ExponentialDecay(LR, decay_steps=8, decay_rate=0.5)
    # gamma is large so that the bounds have closed in on final_lr within these few steps
    optimizer = AdaBound(learning_rate=schedule, final_lr=0.05, gamma=0.5)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def fit(model: keras.Model, epochs: int, initial_epoch: int = 0) -> keras.callbacks.History:
    x, y = make_data()
    # unshuffled, so that the epochs after the resume see the batches they saw before
    return model.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=epochs,
        initial_epoch=initial_epoch,
        shuffle=False,
        verbose=0,
    )


def main(epochs: int = 4, workdir: str | Path | None = None) -> dict[str, keras.Model]:
    """Train ``epochs`` epochs straight through, then again with a save and a load half way;
    returns both models, ``{"uninterrupted": ..., "resumed": ...}``."""
    uninterrupted = make_model()
    history = fit(uninterrupted, epochs)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(workdir or tmp) / "half.keras"
        first = make_model()
        fit(first, epochs // 2)
        first.save(path)  # weights, optimizer state and compile settings
        resumed = keras.models.load_model(path)
        fit(resumed, epochs, initial_epoch=epochs // 2)

    same = [
        np.array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
        for a, b in zip(uninterrupted.weights, resumed.weights, strict=True)
    ]
    assert all(same), "the resumed run ended elsewhere"
    accuracy = history.history["accuracy"]
    print(f"training accuracy {accuracy[0]:.3f} in the first epoch, {accuracy[-1]:.3f} in the last")
    return {"uninterrupted": uninterrupted, "resumed": resumed}


if __name__ == "__main__":
    runs = main()
    optimizer = runs["resumed"].optimizer
    lr = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
    base = float(keras.ops.convert_to_numpy(optimizer.base_learning_rate))
    print("resumed run equals the uninterrupted one")
    print(f"{keras.backend.backend()} backend, learning rate {lr:.2e}, base {base:.0e}")
