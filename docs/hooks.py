"""MkDocs hooks of the documentation site (mkdocs.yml: `hooks`); not part of the site itself.

- The home page is the README: `docs/index.md` is replaced by `../README.md` at build time, so the two
  cannot drift apart.
- Links are written for reading the Markdown on disk (a README link says `docs/math.md`, a page in docs/
  may say `../examples/own_array.py`). Each link is resolved from the file it was written in: a target
  inside docs/ is rewritten relative to the page, the README becomes the home page, and any other file
  outside docs/ (examples, sources) keeps its text without the link, since the site does not carry it.
- No undocumented public name: every name of `rhovae.__all__`, every public name of the modules the API
  reference documents, and their public methods need a docstring (inherited ones count, e.g. the
  `forward` of an `nn.Module`), and every name of `rhovae.__all__` must be listed in the reference's
  index. Each one missing is a warning, so `mkdocs build --strict` fails on it.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import re
from pathlib import Path

log = logging.getLogger("mkdocs.hooks.rhovae")

# Modules whose every public name the API reference documents (besides rhovae.__all__).
REFERENCE_MODULES = [
    "rhovae.posteriors",
    "rhovae.distributions",
    "rhovae.distributions.ar1",
    "rhovae.distributions.ar1_2d",
    "rhovae.distributions.banded",
    "rhovae.distributions.gp",
    "rhovae.distributions.latent_map",
    "rhovae.distributions.flows",
    "rhovae.distributions.kl",
    "rhovae.distributions.standard_normal",
]
REFERENCE_INDEX = "reference/index.md"

_LINK = re.compile(r"(!?)\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\(([^()\s]+)\)")
_FENCE = re.compile(r"^( {0,3})(`{3,}|~{3,})")


def _outside_fences(markdown: str, fn) -> str:
    """Apply ``fn`` to the Markdown outside fenced code blocks."""
    out, chunk, fence = [], [], None
    for line in markdown.splitlines(keepends=True):
        m = _FENCE.match(line)
        if fence is None and m:
            out.append(fn("".join(chunk)))
            chunk, fence = [line], m.group(2)[0] * len(m.group(2))
        elif fence is not None and line.strip().startswith(fence) and not line.strip().strip(fence[0]):
            chunk.append(line)
            out.append("".join(chunk))
            chunk, fence = [], None
        else:
            chunk.append(line)
    out.append("".join(chunk) if fence is not None else fn("".join(chunk)))
    return "".join(out)


def rewrite_links(markdown: str, written_in: Path, page_dir: Path, docs_dir: Path, readme: Path) -> str:
    """Rewrite the relative links of ``markdown`` (a file in ``written_in``) for a page in ``page_dir``."""

    def one(m: re.Match) -> str:
        bang, text, target = m.groups()
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:|^#|^/", target):  # URL, same-page anchor, absolute
            return m.group(0)
        path, _, anchor = target.partition("#")
        resolved = Path(os.path.normpath(written_in / path))
        if resolved == readme:
            resolved = docs_dir / "index.md"
        try:
            resolved.relative_to(docs_dir)
        except ValueError:  # a file the site does not carry
            return text if not bang else m.group(0)
        if resolved.is_dir() and (resolved / "README.md").exists():
            resolved = resolved / "README.md"
        new = Path(os.path.relpath(resolved, page_dir)).as_posix() + (f"#{anchor}" if anchor else "")
        return f"{bang}[{text}]({new})"

    return _outside_fences(markdown, lambda s: _LINK.sub(one, s))


def on_page_markdown(markdown, page, config, files, **kwargs):
    docs_dir = Path(config["docs_dir"]).resolve()
    readme = docs_dir.parent / "README.md"
    src = docs_dir / page.file.src_uri
    if page.file.src_uri == "index.md":
        return rewrite_links(readme.read_text(encoding="utf-8"), readme.parent, docs_dir, docs_dir, readme)
    return rewrite_links(markdown, src.parent, src.parent, docs_dir, readme)


def _undocumented(obj, path: str) -> list[str]:
    missing = [] if inspect.getdoc(obj) else [path]
    if inspect.isclass(obj):
        for name, member in vars(obj).items():
            if name.startswith("_"):
                continue
            if isinstance(member, (staticmethod, classmethod)):
                member = member.__func__
            if isinstance(member, property) or inspect.isfunction(member):
                # getattr on the class gives inspect.getdoc the chance to inherit the base's docstring
                if not inspect.getdoc(getattr(obj, name, member)):
                    missing.append(f"{path}.{name}")
    return missing


def on_pre_build(config, **kwargs):
    rhovae = importlib.import_module("rhovae")
    named: dict[int, tuple[object, str]] = {}  # each object once, under its first public name
    for name in rhovae.__all__:
        named.setdefault(id(getattr(rhovae, name)), (getattr(rhovae, name), f"rhovae.{name}"))
    missing: list[str] = []
    for modname in REFERENCE_MODULES:
        module = importlib.import_module(modname)
        if not inspect.getdoc(module):
            missing.append(modname)
        for name in getattr(module, "__all__", []):
            named.setdefault(id(getattr(module, name)), (getattr(module, name), f"{modname}.{name}"))
    for obj, path in named.values():
        if inspect.isclass(obj) or inspect.isfunction(obj):  # not data such as __version__ or HEADS
            missing += _undocumented(obj, path)
    for path in sorted(set(missing)):
        log.warning("public name without a docstring: %s", path)
    index = (Path(config["docs_dir"]) / REFERENCE_INDEX).read_text(encoding="utf-8")
    for name in rhovae.__all__:
        if f"`rhovae.{name}`" not in index:
            log.warning("rhovae.%s is in rhovae.__all__ but not listed in docs/%s", name, REFERENCE_INDEX)
