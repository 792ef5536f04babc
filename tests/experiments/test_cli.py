"""The ``dynabound`` command line: help, demo, run/resume, compare, sweep, plot, probe, errors."""

from __future__ import annotations

import json
import re

import pytest
import torch

from dynabound.experiments.cli import main
from dynabound.experiments.runner import build_config, read_metrics, train
from dynabound.experiments.tasks import TASKS

HELP = [
    [],
    ["demo"],
    ["run"],
    ["compare"],
    ["sweep"],
    ["plot"],
    ["probe"],
    *(["run", t] for t in TASKS),
    ["compare", "cifar10"],
    ["sweep", "ptb"],
]


@pytest.mark.parametrize("argv", HELP, ids=lambda a: " ".join(a) or "top")
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "usage: dynabound" in text
    if argv[:1] == ["run"] and len(argv) == 2:
        assert "--optim" in text and "--resume" in text and "--data-dir" in text
    if argv == ["run", "ptb"]:
        assert "--layers" in text and "--bptt" in text and "--clip" in text
    if argv == ["compare", "cifar10"]:
        assert "--model" in text and "resnet34" in text
    if argv == ["sweep", "ptb"]:
        assert "--final-lr" in text and "--gamma" in text


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--out", str(out), "--quiet"]) == 0
    return out


def test_demo_quick_writes_report_and_figures(demo):
    report = (demo / "report.md").read_text()
    for name in ("SGDM", "AdaGrad", "Adam", "AMSGrad", "AdaBound", "AMSBound"):
        assert f"| {name} |" in report
    figures = [
        "convex.png",
        "section3.png",
        "digits.png",
        "figure1-adam.png",
        "figure1-adabound.png",
        "transition-adabound.png",
    ]
    for name in figures:
        assert f"]({name})" in report
        assert (demo / name).stat().st_size > 10_000, name

    def final_x(section: str) -> dict[str, float]:
        return {
            line.split("|")[1].strip(): float(line.split("|")[2])
            for line in section.splitlines()
            if line.startswith("| A") and "|" in line[2:] and line.count("|") == 4
        }

    sections = report.split("\n## ")
    x = final_x(next(s for s in sections if s.startswith("1. ")))
    assert x["Adam"] > 0.9 and x["AdaBound"] < -0.5  # the counterexample already shows
    # Section 3 example: Adam on x >= 0; the bounded methods overshoot at step 2.
    x3 = final_x(next(s for s in sections if s.startswith("2. ")))
    assert len(x3) == 4 and x3["Adam"] > 0 and x3["AdaBound"] < 0 and x3["AMSBound"] < 0


def test_plot_and_probe_on_saved_runs(demo, tmp_path, capsys):
    runs = [str(demo / "digits" / o) for o in ("adam", "adabound")]
    assert main(["plot", *runs, "--out", str(tmp_path / "both.png")]) == 0
    assert (tmp_path / "both.png").stat().st_size > 10_000
    assert (tmp_path / "transition-adabound.png").stat().st_size > 10_000
    assert not (tmp_path / "transition-adam.png").exists()
    assert main(["probe", runs[1], "--out", str(tmp_path / "fig1.png")]) == 0
    assert (tmp_path / "fig1.png").stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "both.png" in printed and "fig1.png" in printed


def test_run_resume_and_config_checks(tmp_path, capsys):
    run = [
        "run",
        "convex",
        "--optim",
        "adabound",
        "--steps-per-epoch",
        "40",
        "--quiet",
        "--out",
        str(tmp_path / "r"),
    ]
    assert main([*run, "--epochs", "1"]) == 0
    assert main([*run, "--epochs", "1"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (
        main(
            ["run", "convex", "--resume", "--epochs", "3", "--out", str(tmp_path / "r"), "--quiet"]
        )
        == 0
    )
    metrics = read_metrics(tmp_path / "r" / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == [1, 2, 3] and metrics[-1]["steps"] == 120
    assert main([*run, "--epochs", "4", "--resume", "--lr", "0.1"]) == 2
    assert "cannot resume with a different configuration" in capsys.readouterr().err


def test_missing_data_gives_the_offline_message_without_traceback(tmp_path, capsys):
    code = main(
        [
            "run",
            "mnist",
            "--optim",
            "adam",
            "--data-dir",
            str(tmp_path / "none"),
            "--out",
            str(tmp_path / "r"),
            "--quiet",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "MNIST data not found" in err and "--download" in err
    assert "train-images-idx3-ubyte.gz" in err and "Traceback" not in err
    assert (
        main(
            [
                "run",
                "cifar10",
                "--optim",
                "sgdm",
                "--data-dir",
                str(tmp_path / "none"),
                "--out",
                str(tmp_path / "c"),
                "--quiet",
            ]
        )
        == 2
    )
    assert "CIFAR-10" in capsys.readouterr().err


def test_bad_options_are_clean_errors(tmp_path, capsys):
    assert (
        main(
            [
                "run",
                "digits",
                "--optim",
                "sgdm",
                "--final-lr",
                "0.1",
                "--quiet",
                "--out",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "does not take" in capsys.readouterr().err
    assert main(["run", "digits", "--quiet"]) == 2
    assert "--optim is required" in capsys.readouterr().err


def test_compare_runs_every_preset_and_draws_the_figure(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "convex", "--epochs", "1", "--steps-per-epoch", "60", "--quiet"]
    assert main([*argv, "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())
    assert [r["optimizer"] for r in rows] == ["Adam", "AMSGrad", "AdaBound", "AMSBound"]
    assert (out / "compare.png").stat().st_size > 10_000
    assert "| AMSBound |" in (out / "results.md").read_text()
    # A second compare resumes the finished runs instead of training them again.
    assert main([*argv, "--out", str(out)]) == 0
    assert len(read_metrics(out / "adam" / "metrics.jsonl")) == 1


def test_sweep_grid_and_summary(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert (
        main(
            [
                "sweep",
                "digits",
                "--final-lr",
                "0.05",
                "0.5",
                "--gamma",
                "1e-3",
                "--epochs",
                "1",
                "--hidden",
                "8",
                "--quiet",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    results = json.loads((out / "results.json").read_text())
    assert sorted(r["final_lr"] for r in results) == [0.05, 0.5]
    assert all(r["gamma"] == 1e-3 and 0 <= r["value"] <= 100 for r in results)
    assert (out / "sweep.png").stat().st_size > 10_000
    assert (out / "final_lr=0.05,gamma=0.001" / "checkpoint.pt").is_file()


def _one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"dynabound {command}: error: "), err
    return err.strip()


@pytest.mark.parametrize("threads", ["-3", "0"])
@pytest.mark.parametrize(
    "argv", [["run", "digits", "--optim", "adam"], ["compare", "digits"], ["demo", "--quick"]]
)
def test_threads_must_be_a_positive_integer(argv, threads, tmp_path, capsys):
    assert main([*argv, "--threads", threads, "--out", str(tmp_path / "out")]) == 2
    line = _one_error_line(capsys, argv[0])
    assert line.endswith(f"--threads must be a positive integer, got {threads}")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "device, message",
    [
        ("cuda", "CUDA is not available"),
        ("cuda:1", "CUDA is not available"),
        ("gpu", "must be auto, cpu, cuda or cuda:N"),
    ],
)
def test_an_unusable_device_is_refused_before_any_work(
    device, message, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # The demo's convex part runs on the CPU whatever --device says: it must not start.
    assert main(["demo", "--quick", "--device", device, "--out", str(tmp_path / "demo")]) == 2
    assert message in _one_error_line(capsys, "demo")
    assert not (tmp_path / "demo").exists()
    run = ["run", "digits", "--optim", "adam", "--device", device, "--out", str(tmp_path / "r")]
    assert main(run) == 2
    assert message in _one_error_line(capsys, "run")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lr", "-0.1"], "lr"),
        (["--gamma", "0"], "gamma"),
        (["--gamma", "-1"], "gamma"),
        (["--beta1", "1.5"], "beta"),
        (["--beta2", "-0.1"], "beta"),
        (["--final-lr", "-1"], "final"),
        (["--eps", "-1"], "eps"),
        (["--lr-decay", "0"], "--lr-decay"),
        (["--milestones", "0"], "--milestones"),
        (["--epochs", "0"], "epochs"),
        (["--hidden", "0"], "--hidden"),
        (["--checkpoint-every", "-1"], "--checkpoint-every"),
        (["--checkpoint-steps", "0"], "--checkpoint-steps"),
        (["--progress-every", "nan"], "--progress-every"),
    ],
)
def test_bad_values_are_reported_before_missing_data(flags, message, tmp_path, capsys):
    argv = ["run", "mnist", "--optim", "adabound", "--data-dir", str(tmp_path / "none")]
    assert main([*argv, *flags, "--out", str(tmp_path / "r"), "--quiet"]) == 2
    line = _one_error_line(capsys, "run")
    assert message in line.lower() and "mnist" not in line.lower()
    assert not (tmp_path / "r").exists()


def test_bad_task_options_are_reported_before_missing_data(tmp_path, capsys):
    argv = ["run", "ptb", "--optim", "adam", "--data-dir", str(tmp_path / "none"), "--quiet"]
    for flags, message in (
        (["--bptt", "0"], "--bptt must be positive"),
        (["--dropout", "1"], "--dropout must be in [0, 1)"),
        (["--tie", "--embed", "8", "--hidden", "16"], "--tie needs --embed equal to --hidden"),
    ):
        assert main([*argv, *flags, "--out", str(tmp_path / "r")]) == 2
        assert message in _one_error_line(capsys, "run")
    assert not (tmp_path / "r").exists()


def test_a_sweep_checks_every_grid_point_before_training_any(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", "digits", "--final-lr", "0.1", "--gamma", "1e-3", "-1", "--epochs", "1"]
    assert main([*argv, "--quiet", "--out", str(out)]) == 2
    assert "gamma" in _one_error_line(capsys, "sweep")
    assert not out.exists()


def test_plot_help_names_the_transition_files_that_plot_writes(tmp_path, capsys):
    # Run directories named unlike their optimizer, so that the two cannot be confused.
    runs = [tmp_path / "first-try", tmp_path / "second-try"]
    config = build_config("convex", "adabound", epochs=1, task_args={"steps_per_epoch": 20})
    for run in runs:
        train(config, run, quiet=True, figures=False)
    with pytest.raises(SystemExit):
        main(["plot", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # undo the help's line wrapping
    single, each = re.findall(r"transition(?:-<[^>]*>)?\.png", text)
    placeholder = re.fullmatch(r"transition-<([^>]*)>\.png", each).group(1)
    assert "RUN_DIR" in placeholder

    assert main(["plot", *map(str, runs), "--out", str(tmp_path / "both" / "curves.png")]) == 0
    written = sorted(p.name for p in (tmp_path / "both").glob("transition*.png"))
    assert written == [each.replace(f"<{placeholder}>", run.name) for run in runs]
    assert main(["plot", str(runs[0]), "--out", str(tmp_path / "one" / "curves.png")]) == 0
    assert [p.name for p in (tmp_path / "one").glob("transition*.png")] == [single]


def test_scale_from_batch_scales_the_presets_and_resumes(tmp_path, capsys):
    out = tmp_path / "r"
    argv = ["run", "digits", "--optim", "adabound", "--epochs", "1", "--batch-size", "64"]
    argv += ["--scale-from-batch", "128", "--lr", "2e-3", "--quiet", "--out", str(out)]
    assert main(argv) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["scale_from_batch"] == 128 and config["tuned_hparams"]["lr"] == 2e-3
    assert config["hparams"]["lr"] == pytest.approx(2e-3 / 2**0.5)
    assert config["hparams"]["final_lr"] == pytest.approx(0.05)
    # The same command with --resume: the given --lr is again the one for batch 128.
    assert main([*argv[:5], "2", *argv[6:], "--resume"]) == 0
    assert len(read_metrics(out / "metrics.jsonl")) == 2
    assert main(["compare", "digits", "--optims", "sgdm", "--scale-from-batch", "8"]) == 2
    assert "no batch-size scaling rule for sgdm" in capsys.readouterr().err
