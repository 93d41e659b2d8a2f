"""The layer contracts of ``make lint`` (import-linter, ``[tool.importlinter]`` in ``pyproject.toml``) hold,
and each one breaks when the crossing it forbids is added: a contract that cannot fail guards nothing.

Each crossing is one import added to the project's real import graph (grimp, as import-linter builds
it); one more test writes a real crossing module into a copy of the sources and runs ``lint-imports``
itself, the command ``make lint`` runs, which must fail and name the contract.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import grimp
import pytest
from importlinter.application.use_cases import read_user_options
from importlinter.configuration import configure
from importlinter.contracts.forbidden import ForbiddenContract
from importlinter.domain.contract import Contract, registry

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"

# Per contract id: one import that crosses it (importer, imported). The importer need not import it
# directly to be caught: "worker-below-web" is crossed by a module the Celery tasks reach.
CROSSINGS: dict[str, tuple[str, str]] = {
    "agent-alone": ("hostagent.server", "django"),
    "console-uses-agent-protocol-only": ("vms.agent_client", "hostagent.server"),
    "inventory-knows-no-migrations": ("vms.power", "migrations_app.models"),
    "migrations-know-no-evacuations": ("migrations_app.engine", "evacuations.actions"),
    "outcome-tally-below-web": ("api.tallies", "api.metrics"),
    "domain-below-web": ("migrations_app.records", "migrations_app.views"),
    "template-helpers-below-views": ("vms.templatetags.console", "vms.views"),
    "worker-below-web": ("migrations_app.phases", "migrations_app.consumers"),
    "apps-below-project": ("vms.views", "matrixoe.error_views"),
    "cli-over-http": ("matrixoe_cli.main", "api.schemas"),
}


@cache
def options():  # type: ignore[no-untyped-def]
    configure()  # what the lint-imports command sets up first (its file readers, its graph builder)
    registry.register(ForbiddenContract, "forbidden")
    return read_user_options(str(PYPROJECT))


@cache
def graph() -> grimp.ImportGraph:
    session = options().session_options
    return grimp.build_graph(
        *session["root_packages"],
        include_external_packages=session["include_external_packages"] in (True, "True", "true"),
        exclude_type_checking_imports=True,
        cache_dir=None,
    )


def contract(contract_id: str) -> Contract:
    found = [o for o in options().contracts_options if o["id"] == contract_id]
    assert found, f"no contract {contract_id!r} in pyproject.toml"
    contract_options = found[0]
    contract_class = registry.get_contract_class(contract_options["type"])
    return contract_class(
        name=contract_options["name"],
        session_options=options().session_options,
        contract_options=contract_options,
    )


def test_every_contract_has_a_crossing_that_proves_it():
    assert sorted(o["id"] for o in options().contracts_options) == sorted(CROSSINGS)


@pytest.mark.parametrize("contract_id", sorted(CROSSINGS))
def test_the_code_keeps_the_contract(contract_id):
    check = contract(contract_id).check(copy.deepcopy(graph()), verbose=False)

    assert check.kept, check.metadata


@pytest.mark.parametrize("contract_id", sorted(CROSSINGS))
def test_the_contract_breaks_when_its_crossing_is_added(contract_id):
    importer, imported = CROSSINGS[contract_id]
    crossed = copy.deepcopy(graph())
    assert importer in crossed.modules and imported in crossed.modules
    line = f"import {imported}"
    crossed.add_import(importer=importer, imported=imported, line_number=1, line_contents=line)

    check = contract(contract_id).check(crossed, verbose=False)

    assert not check.kept


def test_lint_imports_fails_on_a_module_that_crosses_a_wall(tmp_path):
    """What ``make lint`` runs, on a copy of the sources with one module of the inventory importing
    the migrations app."""
    for package in options().session_options["root_packages"]:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(PYPROJECT, tmp_path / "pyproject.toml")
    (tmp_path / "vms" / "crossing.py").write_text("from migrations_app.models import Migration\n")
    lint_imports = Path(sys.executable).parent / "lint-imports"

    result = subprocess.run(
        [str(lint_imports), "--no-cache", "--config", "pyproject.toml"],
        cwd=tmp_path,
        env={"PATH": str(lint_imports.parent), "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 1, result.stdout + result.stderr
    assert "inventory (vms) imports neither migrations nor evacuations" in result.stdout
    assert "BROKEN" in result.stdout and "vms.crossing -> migrations_app.models" in result.stdout
