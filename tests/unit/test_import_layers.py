"""The import direction holds where `lint-imports` cannot see: at run time, and across packages."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import grimp

SERVER_ONLY = textwrap.dedent(
    """
    import importlib, pkgutil, sys
    import tartarus
    client_side = ("tartarus.sdk", "tartarus.cli", "tartarus.bench")
    for top in pkgutil.iter_modules(tartarus.__path__, "tartarus."):  # walk_packages would import the SDK
        if top.name in client_side:
            continue
        package = importlib.import_module(top.name)
        for info in pkgutil.walk_packages(getattr(package, "__path__", []), top.name + "."):
            importlib.import_module(info.name)
    loaded = sorted(m for m in sys.modules if m.startswith("tartarus.sdk"))
    print(",".join(loaded))
    """
)

LAZY_EDGES = [("tartarus", "tartarus.sdk"), ("tartarus.sdk._autostart", "tartarus.daemon.server")]


def _cycles(graph: grimp.ImportGraph) -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(component)
    return found


def test_no_module_is_part_of_an_import_cycle() -> None:
    # lint-imports checks cycles between siblings of one package; this catches those that cross packages
    # (quarantine/actions.py <-> runtime/sandbox.py was one), counting imports under TYPE_CHECKING too.
    graph = grimp.build_graph("tartarus", cache_dir=None)
    # The lazy edges pyproject's contracts ignore too: `tartarus.Sandbox` is loaded on first use, and the
    # SDK starts an embedded daemon only when none runs.
    for importer, imported in LAZY_EDGES:
        graph.remove_import(importer=importer, imported=imported)
    assert [sorted(c) for c in _cycles(graph)] == []


def test_server_code_does_not_load_the_sdk() -> None:
    # `tartarus/__init__.py` re-exports Sandbox; lint-imports is told to ignore that one edge, so this
    # proves the re-export is lazy: importing every server module leaves the SDK unloaded.
    out = subprocess.run([sys.executable, "-c", SERVER_ONLY], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_the_readme_import_still_works() -> None:
    from tartarus import AsyncSandbox, Sandbox
    from tartarus.sdk import AsyncSandbox as SdkAsyncSandbox
    from tartarus.sdk import Sandbox as SdkSandbox

    assert (Sandbox, AsyncSandbox) == (SdkSandbox, SdkAsyncSandbox)
