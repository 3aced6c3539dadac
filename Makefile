# Two commands on a fresh machine:  make demo  and  make test.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
LOCK := requirements/lock-cpu.txt
DEMO_OUT ?= runs/demo
PYTEST_ARGS ?=

.PHONY: install demo test lock proto clean

install: $(VENV)/.installed

# torch first (the CPU build), then the --no-deps wheels, then everything else in one
# pip call that is held to the lock file, so nothing can move torch.
$(VENV)/.installed: $(LOCK) requirements/cpu.txt requirements/no-deps.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q pip==25.3
	$(PIP) install -q -c $(LOCK) torch
	$(PIP) install -q --no-deps -c $(LOCK) -r requirements/no-deps.txt
	$(PIP) install -q -c $(LOCK) -r requirements/cpu.txt
	$(PIP) install -q --no-deps --no-build-isolation -e .
	touch $@

demo: install
	$(VENV)/bin/mmtok demo --out $(DEMO_OUT)

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Regenerate the gRPC stubs from proto/mmtok/v1/ranking.proto (committed; a test checks
# they are current). -I . keeps the import path proto.mmtok.v1 in the generated code.
proto: install
	$(PY) -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. \
	  proto/mmtok/v1/ranking.proto

# Rewrite the lock from the current environment (after a deliberate upgrade).
lock:
	$(PIP) freeze --exclude-editable | sed 's/^torch==\(.*\)+cpu$$/torch==\1/' \
	  | (echo "# The exact versions every install uses (pip freeze of a tested CPU environment)."; \
	     echo "# Regenerate with: make lock"; cat) > $(LOCK)

clean:
	rm -rf $(VENV) runs .pytest_cache
