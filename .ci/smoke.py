"""Release check: what a user of the built wheel gets, run outside the source tree.

.ci/run builds the sdist and the wheel, installs the wheel with its [torch], [jax] and
[keras] extras into a fresh virtual environment and runs this script with that environment's
Python from a temporary folder, with TORCH_EXTENSIONS_DIR pointing at an empty folder, so
that the CPU kernel is compiled from the sources the wheel ships. Each check prints one
line; the first failure stops it with a non-zero exit.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path


def check(ok: bool, what: str) -> None:
    if not ok:
        sys.exit(f"smoke: FAILED: {what}")
    print(f"smoke: ok: {what}", flush=True)


def installed_not_checkout() -> None:
    import dynabound

    where = Path(dynabound.__file__).resolve()
    check("site-packages" in where.parts, f"dynabound is imported from the wheel ({where})")


def fused_cpu_step() -> None:
    import torch

    from dynabound import AdaBound, kernels
    from dynabound.kernels import cpu

    check(not cpu.is_built(cpu.extension_name()), "no CPU kernel built yet in this environment")
    check(kernels.is_available("cpu"), f"CPU kernel built: {kernels.unavailable_reason('cpu')}")
    gen = torch.Generator().manual_seed(0)
    shapes = [(64, 32), (32,), (3, 3, 4, 4)]
    params = [torch.randn(s, generator=gen, requires_grad=True) for s in shapes]
    twins = [p.detach().clone().requires_grad_() for p in params]
    fused = AdaBound(params, lr=1e-2, amsbound=True, weight_decay=1e-3)  # the default path
    reference = AdaBound(twins, lr=1e-2, amsbound=True, weight_decay=1e-3, foreach=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fall-back to foreach warns: fail on it
        for _ in range(5):
            for p, q in zip(params, twins, strict=True):
                p.grad = torch.randn(p.shape, generator=gen)
                q.grad = p.grad.clone()
            fused.step()
            reference.step()
    same = all(
        torch.allclose(p, q, rtol=1e-6, atol=1e-7) for p, q in zip(params, twins, strict=True)
    )
    check(same, f"5 default (fused) CPU steps equal the single-tensor path ({cpu.vector_isa()})")


def optax_port() -> None:
    import jax
    import jax.numpy as jnp
    import optax

    import dynabound.optax as dbo

    params = {"w": jnp.ones(3)}
    tx = optax.inject_hyperparams(dbo.adabound)(learning_rate=optax.linear_schedule(1e-2, 0, 10))
    state = tx.init(params)
    updates, state = jax.jit(tx.update)({"w": jnp.full(3, 0.5)}, state, params)
    check(bool(jnp.all(updates["w"] < 0)), "dynabound.optax: an injected schedule, jitted")


def keras_port() -> None:
    os.environ.setdefault("KERAS_BACKEND", "torch")
    import keras
    import numpy as np

    from dynabound.keras import AdaBound

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer=AdaBound(learning_rate=1e-2, final_lr=0.1), loss="mse")
    x = np.ones((8, 4), dtype="float32")
    history = model.fit(x, x.sum(axis=1), epochs=2, verbose=0)
    check(
        len(history.history["loss"]) == 2,
        f"dynabound.keras: model.fit on {keras.backend.backend()}",
    )


def command() -> None:
    exe = Path(sys.executable).with_name("dynabound")
    result = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    check(result.returncode == 0 and "usage: dynabound" in result.stdout, "dynabound --help")
    # The wheel was installed without [experiments]: the harness says so in one line.
    result = subprocess.run([exe, "demo"], capture_output=True, text=True, timeout=120)
    last = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
    check(
        result.returncode == 2 and last.endswith('python -m pip install ".[experiments]"'),
        f"dynabound demo without the [experiments] extra: {last!r}",
    )


if __name__ == "__main__":
    check(not Path("src/dynabound").exists(), f"running outside a checkout ({os.getcwd()})")
    for step in (installed_not_checkout, fused_cpu_step, optax_port, keras_port, command):
        step()
    print("smoke: all checks passed")
