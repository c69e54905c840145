"""The web app in a real headless browser (Debian's chromium driven by playwright): upload the demo image and two
masks, write prompts, paint, check the result's size and the download; a bad input shows its message on the page.
Saves docs/app.png (the README's screenshot).

The app runs in this process (its Painter on the tiny random models at 64 px, fp32, 3 steps). Under CI (CI=true)
a missing chromium, gradio or playwright fails the test instead of skipping it: .ci/run installs chromium.
"""
import io
import json
import os
import shutil
import socket

import numpy as np
import pytest
from PIL import Image

from tests.data_fixtures import demo_root  # noqa: F401  (pytest fixture)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT = os.path.join(os.path.dirname(__file__), "..", "docs", "app.png")
STEM = "skimage_coffee"  # A test-split photograph of the demo dataset (600x400: not square, so it is cropped).


def _require(ok: bool, why: str):
  if not ok:
    if os.environ.get("CI") == "true":
      pytest.fail(f"{why} (CI must run the browser test: .ci/run installs chromium, the test extra the rest)")
    pytest.skip(why)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(demo_root, tmp_path_factory):  # noqa: F811
  _require(os.path.exists(CHROMIUM), f"{CHROMIUM} is missing (apt-get install chromium)")
  for module in ("gradio", "playwright"):
    try:
      __import__(module)
    except ImportError:
      _require(False, f"{module} is not installed (pip install -e '.[test]')")
  from idmp_jax.tasks import paint_app
  d = tmp_path_factory.mktemp("app")
  c = paint_app.default_config()  # model_dir = llava_dir = "tiny": random models built in the workdir.
  c.data_dir, c.port = demo_root, _free_port()
  c.dtype, c.resolution, c.num_inference_steps, c.prompt_max_new_tokens = "float32", 64, 3, 12
  app, url, _ = paint_app.serve(c, str(d / "work"), block=False)
  yield url
  app.close()


@pytest.fixture(scope="module")
def page(app_url):
  from playwright.sync_api import sync_playwright
  with sync_playwright() as p:
    browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    page = browser.new_page(viewport={"width": 1200, "height": 900}, accept_downloads=True)
    page.set_default_timeout(120_000)
    page.goto(app_url)
    page.wait_for_selector("#paint")
    yield page
    browser.close()


def test_upload_write_prompts_paint_download(page, demo_root, tmp_path):  # noqa: F811
  masks = [os.path.join(demo_root, "masks", STEM, f"mask_{k}.png") for k in (0, 1)]
  page.set_input_files("#editor input[type=file]", os.path.join(demo_root, "images", "test", f"{STEM}.jpg"))
  page.set_input_files("#mask-files input[type=file]", masks)
  page.wait_for_selector("#input-view img")  # The masks shown in their colours.
  assert "red: mask_0, green: mask_1" in page.inner_text("#status")

  page.click("#write")
  page.wait_for_function("document.querySelector('#prompt-green textarea').value.length > 0")
  written = {c: page.input_value(f"#prompt-{c} textarea") for c in ("red", "green", "blue")}
  assert written["red"] and written["green"] and not written["blue"]  # One box filled per mask.
  page.fill("#prompt-red textarea", "a blue cup of tea")  # The boxes are editable: this is what gets painted.

  page.click("#paint")
  page.wait_for_selector("#downloads a")
  size = page.evaluate("() => { const i = document.querySelector('#result img'); "
                       "return [i.naturalWidth, i.naturalHeight]; }")
  assert size == [64, 64]
  assert "Painted 2 mask(s)" in page.inner_text("#status")
  status = page.inner_text("#status")  # The page says the models are tiny random ones.
  assert "the painting is noise" in status and "the prompts are random text" in status

  links = page.locator("#downloads a")
  assert links.count() == 2
  saved = {}
  for i in range(2):
    with page.expect_download() as download:
      links.nth(i).click()
    path = tmp_path / download.value.suggested_filename
    download.value.save_as(path)
    saved[path.name] = path
  painting = np.asarray(Image.open(saved["painting.png"]))
  assert painting.shape == (64, 64, 3) and painting.std() > 0
  record = json.loads(saved["prompts.json"].read_text())
  assert [r["color"] for r in record] == ["red", "green"]
  assert record[0]["prompt"] == "a blue cup of tea" and record[1]["prompt"] == written["green"]

  page.check("#regions input")  # The RCA regions over the result.
  page.wait_for_timeout(500)
  page.evaluate("() => document.querySelectorAll('.toast-wrap').forEach(t => t.remove())")  # Unhide the boxes.
  _save_screenshot(page)


def test_bad_mask_file_shows_a_message(page, tmp_path):
  bad = tmp_path / "notes.png"
  bad.write_text("not a picture")
  page.set_input_files("#mask-files input[type=file]", [str(bad)])
  message = page.get_by_text("is not an image PIL can read")
  message.first.wait_for()
  assert "notes.png" in message.first.inner_text()


def _save_screenshot(page):
  """A small PNG for the README (palette-quantised: well under 300 KB)."""
  image = Image.open(io.BytesIO(page.screenshot(full_page=True))).convert("RGB")
  image = image.quantize(colors=256, method=Image.Quantize.MEDIANCUT)
  os.makedirs(os.path.dirname(SCREENSHOT), exist_ok=True)
  tmp = SCREENSHOT + ".tmp"
  image.save(tmp, format="PNG", optimize=True)
  shutil.move(tmp, SCREENSHOT)
