"""Session fixtures for the data tests: the demo dataset and a real CLIP tokenizer folder, each built once.

Import the fixtures into a test module (`from tests.data_fixtures import demo_root, clip_tokenizer_dir`).
pytest registers an imported fixture once per importing module, so the builds are memoised here to happen once
per session whatever the number of modules. Tests must not modify these folders: copy first (`demo_copy`).
"""
from __future__ import annotations

import shutil

import pytest

_BUILT: dict[str, str] = {}


def _once(key, tmp_path_factory, build):
  if key not in _BUILT:
    _BUILT[key] = build(tmp_path_factory.mktemp(key))
  return _BUILT[key]


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> str:
  """The demo dataset root (mm_inp_dataset) built by `python -m data_prep make-demo-dataset`'s function."""
  from data_prep.demo import make_demo_dataset
  return _once("demo", tmp_path_factory, make_demo_dataset)


@pytest.fixture(scope="session")
def clip_tokenizer_dir(tmp_path_factory) -> str:
  from tests.tiny_clip_tokenizer import make_clip_tokenizer_folder
  return _once("clip_tokenizer", tmp_path_factory, make_clip_tokenizer_folder)


@pytest.fixture(scope="session")
def clip_tokenizer(clip_tokenizer_dir):
  from idmp_jax.data.tokenizer import load_clip_tokenizer
  if "tokenizer_object" not in _BUILT:
    _BUILT["tokenizer_object"] = load_clip_tokenizer(clip_tokenizer_dir)
  return _BUILT["tokenizer_object"]


@pytest.fixture
def demo_copy(demo_root, tmp_path) -> str:
  """A private copy of the demo dataset root, for tests that damage or move files."""
  dst = tmp_path / "mm_inp_dataset"
  shutil.copytree(demo_root, dst)
  return str(dst)
