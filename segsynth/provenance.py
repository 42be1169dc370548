"""What a rule's code is: the segsynth modules its script imports, their content hash, and the third-party
packages they need.

Snakemake reruns a ``script:`` job when the script file changes, but not when the library modules it calls
change. The workflow passes :func:`code_version` of each rule's script as a rule parameter, so editing a
module reruns exactly the rules whose scripts reach it (and what depends on them). The hash covers each
module's syntax tree without docstrings: a comment, a docstring or a reformatting reruns nothing.

The same import walk gives :func:`third_party_imports`, which the environment tests compare with what each
rule's conda env declares. Imports inside functions count (they run when the job calls them).

Parsing only, never importing: the workflow computes this at every start, so it must cost milliseconds and
pull in no torch.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

PACKAGE = "segsynth"
ROOT = Path(__file__).resolve().parents[1]
# Parsing every module costs ~0.2 s per workflow start; results are kept per (file, mtime, size) here.
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "segsynth" / "provenance.json"


@lru_cache(maxsize=None)
def module_path(module: str, root: Path = ROOT) -> Path | None:
    """The source file of a segsynth module (``segsynth.data.canonical`` → ``segsynth/data/canonical.py``)."""
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


_cache: dict | None = None
_cache_dirty: set = set()


def _cached_analysis(path: Path, root: Path) -> tuple[frozenset[str], bytes]:
    """``_analyse`` through the on-disk cache (a stale entry is impossible: the key has mtime and size)."""
    global _cache
    if _cache is None:
        try:
            _cache = json.loads(CACHE.read_text())
        except (OSError, ValueError):
            _cache = {}
    stat = path.stat()
    key = f"{path}|{root}|{stat.st_mtime_ns}|{stat.st_size}"
    if key not in _cache:
        names, digest = _analyse(path, root)
        _cache[key] = [sorted(names), digest.hex()]
        _cache_dirty.add(key)
    names, digest = _cache[key]
    return frozenset(names), bytes.fromhex(digest)


def _save_cache() -> None:
    if not _cache_dirty:
        return
    _cache_dirty.clear()
    # drop the entries of files that are gone or have changed since (edits would otherwise pile up forever)
    for key in list(_cache):
        path, _, mtime, size = key.rsplit("|", 3)
        try:
            stat = os.stat(path)
        except OSError:
            del _cache[key]
            continue
        if (str(stat.st_mtime_ns), str(stat.st_size)) != (mtime, size):
            del _cache[key]
    try:
        CACHE.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=CACHE.parent, delete=False, suffix=".tmp") as tmp:
            json.dump(_cache, tmp)
        os.replace(tmp.name, CACHE)
    except OSError:
        pass  # a read-only home only costs the parse time


def _analyse(path: Path, root: Path) -> tuple[frozenset[str], bytes]:
    """One parse of ``path``: the absolute names of every module it imports anywhere (``from a import b``
    gives a and a.b, since b may be a submodule), and the hash of its syntax tree without docstrings."""
    is_package = path.name == "__init__.py"
    package = _module_name(path, root) if is_package else _module_name(path, root).rpartition(".")[0]
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    name = str(path.relative_to(root)) if path.is_relative_to(root) else path.name
    digest = hashlib.sha256(name.encode() + b"\0" + ast.dump(tree).encode()).digest()
    return frozenset(names), digest


@lru_cache(maxsize=None)
def _closure(script: Path, root: Path) -> tuple[tuple[Path, ...], frozenset[str]]:
    seen: dict[Path, None] = {}
    third_party: set[str] = set()
    todo = [script]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen[path] = None
        for name in _cached_analysis(path, root)[0]:
            top = name.split(".")[0]
            if top != PACKAGE:
                if top not in sys.stdlib_module_names and top != "__future__":
                    third_party.add(top)
                continue
            parts = name.split(".")
            # importing a.b.c runs a/__init__, a/b/__init__ and a/b/c
            for depth in range(1, len(parts) + 1):
                found = module_path(".".join(parts[:depth]), root)
                if found is not None and found not in seen:
                    todo.append(found)
    _save_cache()
    return tuple(sorted(seen, key=str)), frozenset(third_party)


def import_closure(script, root: Path = ROOT) -> tuple[Path, ...]:
    """The script and every segsynth module it can import, directly or through other modules."""
    return _closure(Path(script).resolve(), Path(root).resolve())[0]


def third_party_imports(script, root: Path = ROOT) -> frozenset[str]:
    """Top-level names of the non-stdlib, non-segsynth modules the script's closure imports."""
    return _closure(Path(script).resolve(), Path(root).resolve())[1]


def code_version(script, root: Path = ROOT) -> str:
    """A short hash of the syntax trees of ``script`` and every segsynth module it can import."""
    root = Path(root).resolve()
    digest = hashlib.sha256()
    for path in import_closure(script, root):
        digest.update(_cached_analysis(path, root)[1])
    return digest.hexdigest()[:16]
