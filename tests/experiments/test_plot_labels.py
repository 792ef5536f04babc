"""Legend labels of runs of one optimizer that differ by a hyperparameter."""

from __future__ import annotations

from dynabound.experiments.plots import run_label


def config(**hparams):
    return {"task": "mnist", "optim": "adabound", "hparams": {"lr": 1e-3, **hparams}}


def test_named_and_missing_hyperparameters_label_their_runs():
    default, bf16, eight = config(), config(state_dtype="bfloat16"), config(state_dtype="8bit")
    runs = [default, bf16, eight]
    assert run_label(default, runs) == "AdaBound (state_dtype=default)"
    assert run_label(bf16, runs) == "AdaBound (state_dtype=bfloat16)"
    assert run_label(eight, runs) == "AdaBound (state_dtype=8bit)"


def test_numbers_stay_compact():
    a, b = config(final_lr=0.1), config(final_lr=0.03)
    assert run_label(a, [a, b]) == "AdaBound (final_lr=0.1)"
