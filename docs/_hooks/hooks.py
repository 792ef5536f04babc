"""MkDocs hooks: command-line help generated from the parsers, and benchmarks/ as pages.

The help text is rendered from the argparse parsers at build time, so the pages cannot
drift from the commands. benchmarks/README.md and its result files stay where they are and
are added to the site as they are.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[2]
COLUMNS = "92"  # wide enough for the option tables, narrow enough for the page

# A marker line a page holds where the generated text goes.
MARKER = re.compile(r"^<!-- generated: (?P<what>[\w-]+) -->$", re.M)


@contextlib.contextmanager
def _columns():
    # argparse wraps to the terminal's width: fix it, or the pages depend on the build's.
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = COLUMNS
    try:
        yield
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _block(text: str, indent: str = "") -> str:
    lines = ["```text", *text.rstrip().splitlines(), "```"]
    return "\n".join(indent + line if line else line for line in lines)


def _dynabound_help() -> str:
    from dynabound.experiments.arguments import build_parser

    parser = build_parser()
    with _columns():
        out = ["## dynabound --help", "", _block(parser.format_help())]
        for name, command in _subcommands(parser).items():
            out += ["", f"## dynabound {name}", "", _block(command.format_help())]
            for task_name, task in _subcommands(command).items():
                title = f"dynabound {name} {task_name} --help"
                out += ["", f'??? note "{title}"', "", _block(task.format_help(), "    ")]
    return "\n".join(out)


def _kernels_help() -> str:
    from dynabound.kernels.__main__ import main

    stdout = io.StringIO()
    with _columns(), contextlib.redirect_stdout(stdout), contextlib.suppress(SystemExit):
        main(["--help"])
    return _block(stdout.getvalue())


GENERATORS = {"dynabound-help": _dynabound_help, "kernels-help": _kernels_help}


def on_files(files, config):
    """Add benchmarks/README.md and its JSON results, read from the repository root."""
    for path in sorted((ROOT / "benchmarks").glob("*")):
        if path.suffix in (".md", ".json"):
            files.append(
                File(
                    f"benchmarks/{path.name}",
                    src_dir=str(ROOT),
                    dest_dir=config["site_dir"],
                    use_directory_urls=config["use_directory_urls"],
                )
            )
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    markdown = MARKER.sub(lambda m: GENERATORS[m["what"]](), markdown)
    # The pages link the benchmarks as files of the repository, outside docs/; on the site
    # they sit at its root.
    depth = page.file.src_uri.count("/")
    in_repository, on_site = "../" * (depth + 1), "../" * depth
    return markdown.replace(f"]({in_repository}benchmarks/", f"]({on_site}benchmarks/")
