# Developer entry points. `make test` is what CI runs (scripts/test.sh).
VENV := .venv/bin

.PHONY: venv lint type unit test demo bench bench-quick clean

venv:
	bash scripts/bootstrap.sh

lint: venv
	$(VENV)/ruff check .
	$(VENV)/ruff format --check .

type: venv
	$(VENV)/mypy -p zfs_unlock_common -p zfs_unlock_agent -p zfs_unlock_server
	$(VENV)/mypy tests scripts bench

unit: venv
	$(VENV)/pytest -m "not slow"

test:
	bash scripts/test.sh

demo:
	bash scripts/demo.sh

# The benchmark suite (issue 6): under 10 minutes; writes docs/benchmarks.md.
bench:
	bash bench/run.sh

# Its smoke run (seconds; what CI runs): writes build/bench/benchmarks-quick.md.
bench-quick:
	bash bench/run.sh --quick

clean:
	rm -rf .venv build *.egg-info .mypy_cache .ruff_cache .pytest_cache
