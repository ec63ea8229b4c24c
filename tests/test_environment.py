"""The environment the tests run in is the one the documented figures were measured with (constraints.txt)."""

import importlib.metadata
import os

import pytest

pytestmark = pytest.mark.fast  # Pure unit tests: `make test-fast` runs them (see pyproject.toml).

CONSTRAINTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "constraints.txt")


def test_installed_versions_are_the_pinned_ones():
  pinned = {}
  with open(CONSTRAINTS) as f:
    for line in f:
      if line.strip() and not line.startswith("#"):
        name, version = line.strip().split("==")
        pinned[name] = version
  for name in ("jax", "jaxlib", "flax", "optax", "zarr", "numcodecs", "numpy", "orbax-checkpoint",
               "tensorflow-datasets"):
    assert name in pinned, f"{name} is not pinned in constraints.txt"
  wrong = {name: (importlib.metadata.version(name), version) for name, version in pinned.items()
           if importlib.metadata.version(name) != version}
  assert not wrong, f"installed vs constraints.txt: {wrong}; install with `pip install -c constraints.txt`"
