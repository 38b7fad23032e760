PY := .venv/bin/python
VENV_STAMP := .venv/.installed

.PHONY: test demo lint clean

$(VENV_STAMP): setup.cfg constraints.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(VENV_STAMP)

lint: $(VENV_STAMP)
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

test: $(VENV_STAMP) lint
	TRITON_INTERPRET=1 $(PY) -m pytest -q -n auto --maxprocesses 4 --durations=15 tests

demo: $(VENV_STAMP)
	bash scripts/demo.sh

clean:
	rm -rf .venv demo_runs
