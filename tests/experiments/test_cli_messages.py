"""What the ``dynabound`` command says when something is wrong or worth knowing: a misspelt
name, a run that is not there or is of another task, a bad number, the presets in --help."""

from __future__ import annotations

import pytest

from dynabound.experiments.cli import main
from dynabound.experiments.optimizers import OPTIMIZERS
from dynabound.experiments.presets import TASK_PRESETS


def _exit_lines(capsys, argv: list[str]) -> list[str]:
    """stderr of an argparse error, which exits with status 2."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()


def _error_lines(capsys, argv: list[str]) -> list[str]:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()


def test_a_misspelt_optimizer_is_one_line_and_a_suggestion(capsys):
    lines = _exit_lines(capsys, ["run", "convex", "--optim", "adabond"])
    assert lines == [
        "dynabound run convex: error: argument --optim: invalid choice: 'adabond' (choose from "
        f"{', '.join(OPTIMIZERS)})",
        "did you mean adabound?",
    ]


@pytest.mark.parametrize(
    "argv, suggestion",
    [
        (["compare", "convex", "--optims", "adam", "amsbond"], "did you mean amsbound?"),
        (["run", "convx", "--optim", "adam"], "did you mean convex?"),
        (["sweep", "digits", "--optim", "adam", "--final-lr", "1", "--gamma", "1"], None),
    ],
)
def test_other_misspelt_choices_get_the_same_treatment(argv, suggestion, capsys):
    lines = _exit_lines(capsys, argv)
    assert "invalid choice" in lines[0] and "usage:" not in lines[0]
    assert lines[1:] == ([suggestion] if suggestion else [])


def test_resume_with_an_out_that_does_not_exist_says_so(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    lines = _error_lines(capsys, ["run", "digits", "--resume", "--out", str(missing)])
    assert lines == [f"dynabound run: error: nothing to resume: {missing} does not exist"]
    empty = tmp_path / "empty"
    empty.mkdir()
    lines = _error_lines(capsys, ["run", "digits", "--resume", "--out", str(empty)])
    assert lines == [
        f"dynabound run: error: nothing to resume: {empty} is not a run directory (no config.json)"
    ]


def test_resuming_a_run_of_another_task_is_refused(tmp_path, capsys):
    out = tmp_path / "convex-run"
    run = ["run", "convex", "--optim", "adam", "--steps-per-epoch", "20", "--epochs", "1"]
    assert main([*run, "--quiet", "--out", str(out)]) == 0
    before = (out / "metrics.jsonl").read_text()
    lines = _error_lines(capsys, ["run", "digits", "--resume", "--epochs", "2", "--out", str(out)])
    assert lines[0].startswith("dynabound run: error: cannot resume with a different config")
    assert "  task: saved 'convex', given 'digits'" in lines
    assert (out / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--epochs", "-3"], "--epochs must be a positive integer, got -3"),
        (["--epochs", "0"], "--epochs must be a positive integer, got 0"),
        (["--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
        (["--scale-from-batch", "-1"], "--scale-from-batch must be a positive batch size, got -1"),
    ],
)
def test_a_bad_count_names_the_argument_and_the_value(flags, message, tmp_path, capsys):
    out = tmp_path / "r"
    for argv in (["run", "digits", "--optim", "adam"], ["compare", "digits"]):
        lines = _error_lines(capsys, [*argv, *flags, "--out", str(out), "--quiet"])
        assert lines == [f"dynabound {argv[0]}: error: {message}"]
    assert not out.exists()


def test_a_zero_final_lr_is_refused_with_what_it_would_do(tmp_path, capsys):
    argv = ["run", "digits", "--optim", "adabound", "--final-lr", "0", "--out", str(tmp_path)]
    lines = _error_lines(capsys, [*argv, "--quiet"])
    assert lines == [
        "dynabound run: error: AdaBound: Invalid final learning rate: 0.0 (must be > 0: both "
        "bounds are proportional to it, so 0 clips every step's rate to 0 and no parameter ever "
        "moves)"
    ]
    sweep = ["sweep", "digits", "--final-lr", "0.1", "0", "--gamma", "1e-3", "--quiet"]
    lines = _error_lines(capsys, [*sweep, "--out", str(tmp_path / "s")])
    assert "Invalid final learning rate: 0.0" in lines[0]


@pytest.mark.parametrize("mode", ["run", "compare", "sweep"])
@pytest.mark.parametrize("task", list(TASK_PRESETS))
def test_help_shows_the_preset_values(mode, task, capsys):
    args = ["--final-lr", "0.1", "--gamma", "1e-3"] if mode == "sweep" else []
    with pytest.raises(SystemExit):
        main([mode, task, *args, "--help"])
    text = capsys.readouterr().out
    assert "default: the paper's presets for this task" in text
    shown = [n for n in TASK_PRESETS[task] if mode != "sweep" or n.startswith(("adab", "amsb"))]
    for name in shown:
        assert f"\n    {name:<10} lr=" in text, name
    if task == "cifar10" and mode != "sweep":
        assert "    adam       lr=0.001 beta1=0.99 (densenet121: 0.9) beta2=0.999 " in text
    if task == "ptb":
        assert "    adabound   lr=0.001 beta1=0.9 beta2=0.999 final_lr=10 gamma=0.001" in text


def test_the_demo_report_says_what_compiling_the_kernel_cost(tmp_path, monkeypatch):
    """The demo's time depends on whether this run compiled the CPU kernel (a first run
    does, once per torch version): the report and the last line say how long that took."""
    import torch

    from dynabound.experiments import demo

    demo.cpu_kernel.load()  # loaded already: the demo's steps leave build_seconds alone
    # As if the extension cache had been empty when the demo started.
    monkeypatch.setattr(demo.cpu_kernel, "is_built", lambda name: False)
    monkeypatch.setattr(demo.cpu_kernel, "build_seconds", 17.4)
    report = demo.run_demo(tmp_path / "demo", quick=True, quiet=True)
    head = report.read_text().splitlines()[2]
    assert head.startswith("Generated by `dynabound demo --quick` in ")
    assert head.endswith(
        f"(offline, CPU, torch {torch.__version__}; 17 s of it compiling the CPU kernel, once "
        "per torch version)."
    )
