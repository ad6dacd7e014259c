"""The layers of the tree, read from every import statement (including imports inside functions).

Rules: `common/` imports neither `trainer` nor `services`; `services/` never imports `trainer`; `trainer/` never
imports `services`; a service never imports another service's web module (`services.<b>.app` or
`services.<b>.__main__`; its `core`, `client`, `index`, ... are fine). `scripts/` may import anything.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "trainer", "services", "scripts")
WEB_MODULES = ("app", "__main__")
FORBIDDEN = {"common": ("trainer", "services"), "services": ("trainer",), "trainer": ("services",)}


def module_of(rel: str) -> tuple[str, bool]:
    """Dotted module name of a path relative to the root, and whether it is a package's `__init__`."""
    parts = rel.removesuffix(".py").split("/")
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def imported_modules(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `source`, wherever it is. `from x import y` yields both
    `x` and `x.y` (y may be a submodule); relative imports are resolved against `module`;
    `importlib.import_module("literal")` counts too."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level - 1 <= len(package) else []
                name = ".".join([*base, *([node.module] if node.module else [])])
            else:
                name = node.module or ""
            if name:
                found.append((node.lineno, name))
            found += [(node.lineno, f"{name}.{alias.name}" if name else alias.name) for alias in node.names
                      if alias.name != "*"]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and (getattr(node.func, "attr", None) == "import_module" or getattr(node.func, "id", None) in
                   ("import_module", "__import__"))):
            found.append((node.lineno, node.args[0].value))
    return found


def violations(rel: str, source: str) -> list[str]:
    """'path:line: module imports name (rule)' for every import of the file at `rel` that breaks a layer rule."""
    module, is_package = module_of(rel)
    top = module.split(".")[0]
    own_service = module.split(".")[1] if top == "services" and module.count(".") >= 1 else None
    out, reported = [], set()
    for line, name in imported_modules(source, module, is_package):
        if line in reported:  # one message per statement (`from x.app import a, b` names x.app, x.app.a, ...)
            continue
        parts = name.split(".")
        if parts[0] in FORBIDDEN.get(top, ()):
            out.append(f"{rel}:{line}: {module} imports {name} ({top}/ must not import {parts[0]})")
        elif (own_service is not None and parts[0] == "services" and len(parts) >= 3 and parts[2] in WEB_MODULES
              and parts[1] != own_service):
            out.append(f"{rel}:{line}: {module} imports {name} (a service must not import another service's "
                       f"web module)")
        else:
            continue
        reported.add(line)
    return out


def web_module_chains(sources: dict[str, str]) -> list[str]:
    """Import chains by which a service reaches another service's web module through modules of the tree
    (e.g. recall_server → vector_server.embedded → vector_server.app), given {relative path: source}."""
    graph: dict[str, set[str]] = {}
    for rel, source in sources.items():
        module, is_package = module_of(rel)
        graph[module] = set()
        for _, name in imported_modules(source, module, is_package):
            parts = name.split(".")
            graph[module].update(".".join(parts[:i]) for i in range(1, len(parts) + 1))  # packages run too
    for module in graph:
        graph[module] &= graph.keys()
    out = []
    for start in sorted(m for m in graph if m.startswith("services.")):
        own = start.split(".")[1]
        parent: dict[str, str | None] = {start: None}
        todo = [start]
        while todo:
            m = todo.pop()
            parts = m.split(".")
            if len(parts) >= 3 and parts[0] == "services" and parts[1] != own and parts[2] in WEB_MODULES:
                chain = [m]
                while parent[chain[-1]] is not None:
                    chain.append(parent[chain[-1]])
                out.append(" → ".join(reversed(chain)))
                continue
            for nxt in sorted(graph[m] - parent.keys()):
                parent[nxt] = m
                todo.append(nxt)
    return out


def _tree() -> dict[str, str]:
    files = sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))
    assert len(files) > 50  # the walk found the tree
    return {p.relative_to(ROOT).as_posix(): p.read_text() for p in files}


def test_tree_keeps_its_layers():
    found = [v for rel, source in _tree().items() for v in violations(rel, source)]
    assert not found, "layer violations:\n" + "\n".join(found)


def test_no_service_reaches_another_services_web_module():
    """Also through a module of its own package (the embedded vector search must not pull in the FastAPI app)."""
    chains = web_module_chains({rel: src for rel, src in _tree().items() if rel.startswith("services/")})
    assert not chains, "a service imports another service's web module indirectly:\n" + "\n".join(chains)


def test_checker_catches_planted_violations():
    common = "import numpy\n\ndef f():\n    from trainer.data import io\n    return io\n"
    assert violations("common/x.py", common) == ["common/x.py:4: common.x imports trainer.data (common/ must not "
                                                 "import trainer)"]
    assert len(violations("common/__init__.py", "import services.recall_server.state as s\n")) == 1
    assert len(violations("services/a/core.py", "class C:\n    def m(self):\n        import trainer\n")) == 1
    assert len(violations("trainer/nightly.py", "from services.feature_server import build\n")) == 1
    # another service's web module: absolute, relative (`from ..b import app`) and by import_module
    assert len(violations("services/a/embedded.py", "from services.b.app import VectorService\n")) == 1
    assert len(violations("services/a/embedded.py", "from ..b import app\n")) == 1
    assert len(violations("services/a/__init__.py", "from ..b.__main__ import main\n")) == 1
    assert len(violations("services/a/x.py", "import importlib\nimportlib.import_module('services.b.app')\n")) == 1
    # allowed: its own web module, another service's core/client, anything from scripts/
    assert violations("services/a/embedded.py", "from .app import create_app\nfrom ..b.core import S\n") == []
    assert violations("services/a/app.py", "from services.b import client\nfrom services.b.index import x\n") == []
    assert violations("scripts/bench.py", "from services.b.app import create_app\nimport trainer.cli\n") == []
    # indirect: a's module imports b's embedded module, which imports b's app
    tree = {"services/a/app.py": "def f():\n    from services.b.embedded import E\n",
            "services/b/embedded.py": "from services.b.app import VectorService\n", "services/b/app.py": "",
            "services/b/core.py": ""}
    assert web_module_chains(tree) == ["services.a.app → services.b.embedded → services.b.app"]
    tree["services/b/embedded.py"] = "from .core import VectorService\n"
    assert web_module_chains(tree) == []
