# The two set-up commands of the README (and the tests). Each creates .venv and installs the project into it first.
PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast install docs

# constraints.txt pins every package to the version the tests and the documented figures were measured with.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/student-train demo

# The whole suite (CI runs it), in two worker processes (pytest-xdist), a test file each at a time: many tests wait
# on processes they start (killed jobs, servers), so two run in about 0.6 of one's time on 2 cores.
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile

# The pure unit tests alone (marked `fast`; see pyproject.toml), in under a minute on 2 cores.
test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m fast

# The generated pages of docs/ (commands, cache format, benchmarks, refusals); tests/test_docs.py checks them.
docs: $(STAMP)
	$(VENV)/bin/python scripts/make_docs.py
