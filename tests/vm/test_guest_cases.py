"""The guest's cases and their one list agree, without booting a guest (fast; not marked vm):
a wrong list or a case the guest cannot import would otherwise show only after a boot."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from tests.vm.guest import cases
from tests.vm.guest.cases import SCENARIOS

CASES_DIR = Path(cases.__file__).parent
REPO = Path(__file__).resolve().parents[2]


def test_every_case_file_is_listed_once_and_every_name_has_a_file() -> None:
    files = {path.stem for path in CASES_DIR.glob("*.py") if path.stem != "__init__"}
    assert len(set(SCENARIOS)) == len(SCENARIOS)
    assert files == set(SCENARIOS)


def test_the_benchmark_runs_last_and_after_the_native_https_migration() -> None:
    # bench_native_vs_agent trusts the key server system-wide (tests/vm/README.md)
    assert SCENARIOS[-1] == "bench_native_vs_agent"
    assert "migrate_from_native_https" in SCENARIOS[:-1]


@pytest.mark.parametrize("name", SCENARIOS)
def test_a_case_has_a_strategy_and_a_run(name: str) -> None:
    module = importlib.import_module(f"{cases.__name__}.{name}")
    assert "STRATEGY" in (module.__doc__ or "")
    assert callable(module.run)


def test_the_guest_imports_every_case_with_the_standard_library_alone() -> None:
    """As the guest does: the checkout on the path, no site-packages (the agent's
    dependencies are imported only inside the cases that use them). Reading the list does
    not import the harness."""
    code = (
        "import sys, importlib\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from tests.vm.guest.cases import SCENARIOS\n"
        "assert 'tests.vm.guest.harness' not in sys.modules, 'the list imported the harness'\n"
        "for name in SCENARIOS:\n"
        "    importlib.import_module('tests.vm.guest.cases.' + name)\n"
        "importlib.import_module('tests.vm.guest.runner')\n"
    )
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
