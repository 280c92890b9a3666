# Developer entry points. `make test` is what CI runs (scripts/test.sh).
VENV := .venv/bin

.PHONY: venv lint type unit test demo bench bench-quick deb clean

venv:
	bash scripts/bootstrap.sh

lint: venv
	$(VENV)/ruff check .
	$(VENV)/ruff format --check .
	$(VENV)/lint-imports --no-cache

type: venv
	$(VENV)/mypy -p zfs_unlock_common -p zfs_unlock_agent -p zfs_unlock_server
	$(VENV)/mypy tests scripts bench

# The fast loop: every tier but the real-OpenZFS VMs, the Debian packages and the slow crash loops.
unit: venv
	$(VENV)/pytest -m "not slow and not vm and not deb"

test:
	bash scripts/test.sh

demo:
	bash scripts/demo.sh

# The benchmark suite: under 10 minutes; writes docs/benchmarks.md (its targets are listed there).
bench:
	bash bench/run.sh

# Its smoke run (seconds; what CI runs): writes build/bench/benchmarks-quick.md.
bench-quick:
	bash bench/run.sh --quick

# The Debian packages (debian/) into build/deb/, checked by lintian.
deb:
	bash scripts/deb.sh

clean:
	rm -rf .venv build *.egg-info .mypy_cache .ruff_cache .pytest_cache
