"""The architecture as a test: import contracts between the client (``lossd``), the server
(``lossd_server``) and ``bench``, read from the source with ``ast`` (nothing is imported).

Contracts, each failing with the offending imports (file:line):

(a) the client imports nothing from the server;
(b) no module imports a private name (a module or attribute starting with ``_``, dunders
    aside) of another of the three packages;
(c) the two protocol fronts, ``lossd_server.servicer`` and ``lossd_server.kserve``, don't
    import each other;
(d) the functional core (``losses``, ``reduce``, ``analysis``, ``catalogue``) imports no gRPC;
(e) the server's modules import each other without cycles (module-level imports; those in
    a function body or an ``if TYPE_CHECKING:`` block don't run at import time).

Every import counts for (a) to (d), wherever it stands in the module.
"""

from __future__ import annotations

import ast
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"lossd": ROOT / "client" / "lossd", "lossd_server": ROOT / "server" / "lossd_server",
            "bench": ROOT / "bench"}
FRONTS = ("lossd_server.servicer", "lossd_server.kserve")
CORE = tuple(f"lossd_server.{m}" for m in ("losses", "reduce", "analysis", "catalogue"))


@dataclass(frozen=True)
class Import:
    """One imported module or name: ``importer`` (a module) imports ``target`` (a module)
    or, with ``name``, that attribute of it."""

    importer: str
    where: str
    """``path:line`` of the import statement."""
    target: str
    name: str | None
    runtime: bool
    """At module level (not in a function body) and not under ``if TYPE_CHECKING:``."""

    def __str__(self) -> str:
        what = self.target if self.name is None else f"{self.target}.{self.name}"
        return f"{self.where}: {self.importer} imports {what}"


def modules(roots: dict[str, Path]) -> dict[str, Path]:
    """Every module of the packages by dotted name (a package by its own name)."""
    out = {}
    for package, root in roots.items():
        for path in sorted(root.rglob("*.py")):
            parts = [package, *path.relative_to(root).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _statements(body: list[ast.stmt], runtime: bool) -> Iterator[tuple[ast.stmt, bool]]:
    """Every statement under ``body``, with whether it runs when the module is imported."""
    for node in body:
        yield node, runtime
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from _statements(node.body, False)
        elif isinstance(node, ast.If) and _type_checking(node):
            yield from _statements(node.body, False)
            yield from _statements(node.orelse, runtime)
        else:
            for field in ("body", "orelse", "finalbody", "handlers", "cases"):
                for child in getattr(node, field, ()):
                    inner = getattr(child, "body", None)
                    if isinstance(child, ast.stmt):
                        yield from _statements([child], runtime)
                    elif inner is not None:  # except handlers, match cases
                        yield from _statements(inner, runtime)


def scan(roots: dict[str, Path]) -> list[Import]:
    """Every import of every module under ``roots`` ({package: directory})."""
    known = modules(roots)
    base = Path(os.path.commonpath([root.parent for root in roots.values()]))
    out = []
    for module, path in known.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        where = path.relative_to(base)
        tree = ast.parse(path.read_text(), str(path))
        for node, runtime in _statements(tree.body, True):
            at = f"{where}:{node.lineno}"
            if isinstance(node, ast.Import):
                out += [Import(module, at, alias.name, None, runtime) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                source = node.module or ""
                if node.level:  # relative: from the package, or levels above it
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    source = ".".join(filter(None, [*anchor, source]))
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    out.append(Import(module, at, sub, None, runtime) if sub in known
                               else Import(module, at, source, alias.name, runtime))
    return out


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _top(module: str) -> str:
    return module.split(".")[0]


def _private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def client_imports_server(imports: list[Import]) -> list[Import]:
    """(a) imports of ``lossd_server`` by the client ``lossd``."""
    return [i for i in imports if _top(i.importer) == "lossd" and _top(i.target) == "lossd_server"]


def private_across(imports: list[Import], packages: tuple[str, ...]) -> list[Import]:
    """(b) imports of another package's private module or name."""
    return [i for i in imports
            if _top(i.target) in packages and _top(i.target) != _top(i.importer)
            and any(map(_private, [*i.target.split("."), *filter(None, [i.name])]))]


def fronts_import_each_other(imports: list[Import]) -> list[Import]:
    """(c) imports of one front by the other."""
    a, b = FRONTS
    return [i for i in imports if (_within(i.importer, a) and _within(i.target, b))
            or (_within(i.importer, b) and _within(i.target, a))]


def core_imports_grpc(imports: list[Import]) -> list[Import]:
    """(d) imports of grpc (``grpc``, ``grpc_health``, ...) by the functional core."""
    return [i for i in imports if any(_within(i.importer, m) for m in CORE)
            and (_top(i.target) == "grpc" or _top(i.target).startswith("grpc_"))]


def cycles(imports: list[Import], package: str) -> list[list[Import]]:
    """(e) the import cycles among ``package``'s modules at import time: for each group of
    modules that import one another round (a strongly connected component), its imports."""
    edges: dict[str, list[Import]] = {}
    for i in imports:
        if i.runtime and _top(i.importer) == package and _top(i.target) == package:
            edges.setdefault(i.importer, []).append(i)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(m: str) -> None:  # Tarjan's algorithm
        index[m] = low[m] = len(index)
        stack.append(m)
        for i in edges.get(m, []):
            if i.target not in index:
                visit(i.target)
                low[m] = min(low[m], low[i.target])
            elif i.target in stack:
                low[m] = min(low[m], index[i.target])
        if low[m] == index[m]:
            group = {stack.pop()}
            while m not in group:
                group.add(stack.pop())
            groups.append(group)

    for m in sorted(edges):
        if m not in index:
            visit(m)
    out = []
    for group in groups:
        inner = [i for m in sorted(group) for i in edges.get(m, []) if i.target in group]
        if inner:
            out.append(inner)
    return out


def _report(contract: str, offenders: list[Import]) -> str:
    return f"{contract}, broken by {len(offenders)} import(s):\n" + "\n".join(
        f"  {i}" for i in offenders)


def _holds(contract: str, offenders: list[Import]) -> None:
    """Fail with the contract and its offending imports, one a line, if there are any."""
    if offenders:
        pytest.fail(_report(contract, offenders), pytrace=False)


IMPORTS = scan(PACKAGES)


def test_the_scan_sees_every_package() -> None:
    importers = {_top(i.importer) for i in IMPORTS}
    assert importers == set(PACKAGES)
    assert any(i.target == "lossd_server.engine" for i in IMPORTS)


def test_a_the_client_imports_nothing_from_the_server() -> None:
    _holds("(a) the client lossd imports nothing from lossd_server",
           client_imports_server(IMPORTS))


def test_b_no_private_name_is_imported_across_packages() -> None:
    _holds("(b) no private module or name (a leading _) is imported across lossd, "
           "lossd_server and bench", private_across(IMPORTS, tuple(PACKAGES)))


def test_c_the_fronts_do_not_import_each_other() -> None:
    _holds(f"(c) the fronts {' and '.join(FRONTS)} stand side by side",
           fronts_import_each_other(IMPORTS))


def test_d_the_functional_core_imports_no_grpc() -> None:
    _holds(f"(d) the functional core ({', '.join(CORE)}) imports no grpc",
           core_imports_grpc(IMPORTS))


def test_e_the_server_modules_import_without_cycles() -> None:
    for cycle in cycles(IMPORTS, "lossd_server"):
        _holds("(e) no import cycle among lossd_server's modules: "
               + " <-> ".join(sorted({i.importer for i in cycle})), cycle)


# ---- the checker itself, on a synthetic tree ------------------------------------------

SYNTHETIC = {
    "lossd/__init__.py": "from lossd._client import Client\n",
    "lossd/_client.py": "import grpc\n\n\ndef f():\n    import lossd_server.engine\n",
    "lossd_server/__init__.py": "",
    "lossd_server/engine.py": ("from typing import TYPE_CHECKING\n"
                               "from lossd_server import reduce\n"
                               "if TYPE_CHECKING:\n    from lossd_server import servicer\n"),
    "lossd_server/reduce.py": "import lossd_server.losses\n",
    "lossd_server/losses.py": ("from lossd_server.engine import Engine\n"
                               "from lossd import Client\n"),
    "lossd_server/analysis.py": "def f():\n    from grpc_status import rpc_status\n",
    "lossd_server/catalogue.py": "from . import losses\n",
    "lossd_server/servicer.py": "from lossd._result import PerClass\n",
    "lossd_server/kserve.py": ("try:\n    from lossd_server.servicer import LossServicer\n"
                               "except ImportError:\n    pass\n"),
    "bench/__init__.py": "",
    "bench/run.py": ("from lossd import _client\nfrom lossd_server.engine import _Checked\n"
                     "from bench.small import _wait\n"),
    "bench/small.py": "def _wait():\n    pass\n",
}


@pytest.fixture()
def synthetic(tmp_path: Path) -> list[Import]:
    for name, text in SYNTHETIC.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return scan({p: tmp_path / p for p in PACKAGES})


def _lines(found: list[Import]) -> set[str]:
    return {str(i) for i in found}


def test_checker_catches_each_contract_on_a_synthetic_tree(synthetic: list[Import]) -> None:
    assert _lines(client_imports_server(synthetic)) == {
        "lossd/_client.py:5: lossd._client imports lossd_server.engine"}
    assert _lines(private_across(synthetic, tuple(PACKAGES))) == {
        "lossd_server/servicer.py:1: lossd_server.servicer imports lossd._result.PerClass",
        "bench/run.py:1: bench.run imports lossd._client",
        "bench/run.py:2: bench.run imports lossd_server.engine._Checked"}
    assert _lines(fronts_import_each_other(synthetic)) == {
        "lossd_server/kserve.py:2: lossd_server.kserve imports "
        "lossd_server.servicer.LossServicer"}
    assert _lines(core_imports_grpc(synthetic)) == {
        "lossd_server/analysis.py:2: lossd_server.analysis imports grpc_status.rpc_status"}
    [cycle] = cycles(synthetic, "lossd_server")
    assert _lines(cycle) == {
        "lossd_server/engine.py:2: lossd_server.engine imports lossd_server.reduce",
        "lossd_server/reduce.py:1: lossd_server.reduce imports lossd_server.losses",
        "lossd_server/losses.py:1: lossd_server.losses imports lossd_server.engine.Engine"}
    assert _report("(x)", cycle).startswith("(x), broken by 3 import(s):\n  lossd_server/")


def test_checker_passes_a_tree_that_keeps_the_contracts(tmp_path: Path) -> None:
    for name, text in {"lossd/__init__.py": "import grpc\nfrom lossd import _wire\n",
                       "lossd/_wire.py": "",
                       "lossd_server/__init__.py": "",
                       "lossd_server/losses.py": "import torch\n",
                       "lossd_server/servicer.py": ("from lossd import LossResult\n"
                                                    "from lossd_server import losses\n"),
                       "lossd_server/kserve.py": "from lossd_server.losses import f\n",
                       "bench/__init__.py": "",
                       "bench/run.py": "from lossd import __version__\n"}.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    found = scan({p: tmp_path / p for p in PACKAGES})
    assert len(found) == 7
    assert not (client_imports_server(found) or private_across(found, tuple(PACKAGES))
                or fronts_import_each_other(found) or core_imports_grpc(found)
                or cycles(found, "lossd_server"))
