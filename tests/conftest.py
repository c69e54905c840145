"""Test setup: 8 forced host devices (so sharded code paths run on CPU) and exact fp32 matmuls."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def rng():
  """A fresh NumPy generator per test, seeded by the test's name (reproducible, distinct across tests)."""
  import zlib
  return np.random.default_rng(zlib.crc32(os.environ.get("PYTEST_CURRENT_TEST", "").encode()))


def rel_err(a, b) -> float:
  """||a - b|| / ||b|| in float64."""
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def pallas_calls(fn, *args) -> list[tuple[str, list[tuple]]]:
  """(kernel name, its operands' shapes) of every Pallas call that tracing fn(*args) makes, in jaxpr order, nested
  jaxprs (jit, custom VJP, scan, ...) included."""
  import jax.extend as jex
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "pallas_call":
        found.append((eqn.params["name"], [tuple(x.aval.shape) for x in eqn.invars]))
        continue
      for p in eqn.params.values():
        for sub in p if isinstance(p, (tuple, list)) else (p,):
          if isinstance(sub, jex.core.ClosedJaxpr):
            walk(sub.jaxpr)
          elif isinstance(sub, jex.core.Jaxpr):
            walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return found
