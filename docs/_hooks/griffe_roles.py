"""A griffe extension: the docstrings' Sphinx markup, read as Markdown.

``:class:`X``` and the other roles become links to X where X is documented on the site
(the ``::: path`` lines of docs/api/*.md say what is), and inline code elsewhere;
``.. code-block:: LANG`` and a paragraph's closing ``::`` introduce code blocks, and an
argument entry naming several parameters (``foreach, fused: as in Adam``) becomes one entry
for each.
"""

from __future__ import annotations

import re
from pathlib import Path

import griffe

API_PAGES = Path(__file__).resolve().parents[1] / "api"

ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj):`~?([\w.]+)`")
CODE_BLOCK = re.compile(r"^(?P<indent> *)\.\. code-block:: *(?P<lang>\w*)\n\n", re.M)
SECTION = re.compile(r"^(?P<indent> *)(?:Args|Arguments|Parameters|Params):$")
SHARED_ENTRY = re.compile(r"^(?P<indent> +)(?P<names>\w+(?:, *\w+)+):(?P<text>.*)$")


def _documented() -> list[str]:
    paths = []
    for page in API_PAGES.glob("*.md"):
        paths += re.findall(r"^::: ([\w.]+)", page.read_text(encoding="utf-8"), re.M)
    return paths


def _indented_block(lines: list[str], start: int, indent: str) -> int:
    """Index of the first line after the block indented deeper than ``indent``."""
    end = start
    while end < len(lines) and (not lines[end].strip() or lines[end].startswith(indent + " ")):
        end += 1
    while end > start and not lines[end - 1].strip():
        end -= 1
    return end


def _fence_code_blocks(text: str) -> str:
    """``.. code-block:: LANG`` + an indented block -> a fenced block; Markdown shows an
    indented block after a paragraph as code already, so a closing ``::`` becomes ``:``."""
    out: list[str] = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        match = CODE_BLOCK.match(lines[i] + "\n\n") if i + 1 < len(lines) else None
        if match and not lines[i + 1].strip():
            indent = match["indent"]
            end = _indented_block(lines, i + 2, indent)
            out.append(f"{indent}```{match['lang'] or 'text'}")
            out += lines[i + 2 : end]
            out.append(f"{indent}```")
            i = end
            continue
        line = lines[i]
        if line.endswith("::") and not line.strip().startswith(".."):
            line = line[:-1]
        out.append(line)
        i += 1
    return "\n".join(out)


def _split_shared_entries(text: str) -> str:
    """``a, b: text`` in an arguments section -> ``a: text`` and ``b: text``."""
    out: list[str] = []
    lines = text.split("\n")
    section_indent = None
    i = 0
    while i < len(lines):
        line = lines[i]
        section = SECTION.match(line)
        if section:
            section_indent = section["indent"]
        elif line.strip() and section_indent is not None:
            if not line.startswith(section_indent + " "):
                section_indent = None  # the section ended
            elif entry := SHARED_ENTRY.match(line):
                end = _indented_block(lines, i + 1, entry["indent"])
                for name in re.split(r", *", entry["names"]):
                    out.append(f"{entry['indent']}{name}:{entry['text']}")
                    out += lines[i + 1 : end]
                i = end
                continue
        out.append(line)
        i += 1
    return "\n".join(out)


class SphinxRoles(griffe.Extension):
    def __init__(self) -> None:
        self.documented = _documented()
        self.objects: list[griffe.Object] = []

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            self.objects.append(obj)

    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        for obj in self.objects:
            if obj.package is pkg or obj.path.startswith(pkg.path + "."):
                obj.docstring.value = self._convert(obj, obj.docstring.value)

    def _convert(self, obj: griffe.Object, text: str) -> str:
        text = _split_shared_entries(_fence_code_blocks(text))
        return ROLE.sub(lambda m: self._link(obj, m[1]), text)

    def _link(self, obj: griffe.Object, name: str) -> str:
        target = self._resolve(obj, name)
        if target is None or not self._is_rendered(target):
            return f"`{name}`"
        return f"[`{name}`][{target.path}]"

    def _resolve(self, obj: griffe.Object, name: str) -> griffe.Object | None:
        """The object ``name`` means in ``obj``'s docstring, if it exists."""
        scopes = [obj, obj.parent, obj.module, obj.package]
        candidates = [name] + [f"{s.path}.{name}" for s in scopes if s is not None]
        for path in candidates:
            root, _, rest = path.partition(".")
            if root != obj.package.name:
                continue
            try:
                found = obj.package[rest] if rest else obj.package
                return found.final_target if isinstance(found, griffe.Alias) else found
            except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
                continue
        return None

    def _is_rendered(self, target: griffe.Object) -> bool:
        """Whether the site shows ``target``: a documented module, or a public member with a
        docstring of one (through classes only; submodules are pages of their own)."""
        if target.path in self.documented:
            return True
        if target.name.startswith("_") or target.docstring is None:
            return False
        parent = target.parent
        while parent is not None and parent.path not in self.documented:
            if not parent.is_class or parent.name.startswith("_"):
                return False
            parent = parent.parent
        return parent is not None
