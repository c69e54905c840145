"""The job runner: `--compilation_cache` keeps compiled programs across runs."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_unet_demo(workdir, cache):
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  # Every program is written, however short its compile (JAX's default keeps those of 1 s and more).
  env.update(JAX_PLATFORMS="cpu", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  proc = subprocess.run([sys.executable, "-m", "idmp_jax.main", "--config=configs/demo.py:unet",
                         f"--workdir={workdir}", f"--compilation_cache={cache}"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def entries(cache):
  return sorted(os.listdir(cache)) if os.path.isdir(cache) else []


def test_compilation_cache_is_written_then_reused(tmp_path):
  cache = str(tmp_path / "cache")
  run_unet_demo(str(tmp_path / "first"), cache)
  first = entries(cache)
  assert first, "the first run wrote nothing into --compilation_cache"
  run_unet_demo(str(tmp_path / "second"), cache)
  # Same programs: every compile of the second run is a cache hit, so no entry is added.
  assert entries(cache) == first
