"""The console's apps import one way: no module reaches itself again through its imports.

Imports inside functions count (they are how a cycle hides); imports under ``TYPE_CHECKING`` do not
(they never run). The graph is built by grimp (the library behind import-linter).
"""

from __future__ import annotations

from pathlib import Path

import grimp
from django.conf import settings

ROOT = Path(__file__).resolve().parent.parent


def console_packages() -> list[str]:
    """The project's own top-level packages among the installed apps, plus the settings package."""
    apps = {name.split(".")[0] for name in settings.INSTALLED_APPS}
    apps.add(settings.ROOT_URLCONF.split(".")[0])
    return sorted(app for app in apps if (ROOT / app / "__init__.py").exists())


def build_graph(packages: list[str]) -> grimp.ImportGraph:
    return grimp.build_graph(
        *packages, include_external_packages=False, exclude_type_checking_imports=True, cache_dir=None
    )


def import_cycles(packages: list[str]) -> list[list[str]]:
    """Each direct import ``a -> b`` for which ``b`` leads back to ``a``, as the chain ``a, b, ..., a``."""
    graph = build_graph(packages)
    cycles = []
    for importer in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            back = graph.find_shortest_chain(importer=imported, imported=importer)
            if back:
                cycles.append([importer, *back])
    return cycles


def test_it_finds_the_console_apps():
    assert {"matrixoe", "vms", "migrations_app", "api"} <= set(console_packages())


def test_it_finds_no_import_cycle_in_the_console_apps():
    assert import_cycles(console_packages()) == []


def test_it_lets_only_the_celery_tasks_import_the_driving_loop():
    graph = build_graph(console_packages())
    assert graph.find_modules_that_directly_import("migrations_app.engine") == {"migrations_app.tasks"}


def test_the_console_reaches_the_agent_only_through_the_protocol_package():
    """The console imports ``agentprotocol`` (the messages), never the agent package itself; the
    protocol package imports neither side."""
    console = console_packages()
    graph = build_graph([*console, "hostagent", "agentprotocol"])
    crossings = [
        (importer, imported)
        for importer in sorted(graph.modules)
        if importer.split(".")[0] in console
        for imported in sorted(graph.find_modules_directly_imported_by(importer))
        if imported.split(".")[0] == "hostagent"
    ]
    protocol_imports = {
        imported.split(".")[0]
        for importer in graph.find_children("agentprotocol") | {"agentprotocol"}
        for imported in graph.find_modules_directly_imported_by(importer)
    }
    assert crossings == []
    assert protocol_imports <= {"agentprotocol"}
    assert graph.find_modules_that_directly_import("agentprotocol") & {"vms.agent_client"}


def test_it_would_report_a_cycle(tmp_path, monkeypatch):
    package = tmp_path / "knot"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from knot import b\n")
    (package / "b.py").write_text("def late():\n    from knot import a\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert ["knot.a", "knot.b", "knot.a"] in import_cycles(["knot"])
