"""The web app in a real headless browser (Debian's chromium driven by playwright): upload the demo image and two
masks, add a brush stroke, write prompts, paint, check the result's size and the download; a bad input shows its
message on the page.
Saves docs/app.png (the README's screenshot).

The app runs in this process (its Painter on the tiny random models at 64 px, fp32, 3 steps). Under CI (CI=true)
a missing chromium, gradio or playwright fails the test instead of skipping it: .ci/run installs chromium.
"""
import io
import json
import os
import shutil
import socket
from urllib.parse import urlparse

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
    page.outside = []  # Requests to anywhere but this machine: the page must load nothing from outside.
    page.on("request", lambda r: None if urlparse(r.url).hostname in ("127.0.0.1", "localhost", None)
            or r.url.startswith(("data:", "blob:")) else page.outside.append(r.url))
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

  _brush_stroke(page)  # Red (the brush's first colour): adds to the red mask.

  page.click("#write")
  page.wait_for_function("document.querySelector('#prompt-green textarea').value.length > 0")
  written = {c: page.input_value(f"#prompt-{c} textarea") for c in ("red", "green", "blue")}
  assert written["red"] and written["green"] and not written["blue"]  # One box filled per mask.
  page.fill("#prompt-red textarea", "a blue cup of tea")  # The boxes are editable: this is what gets painted.

  page.click("#paint")
  page.wait_for_selector("#downloads a")
  page.wait_for_function("() => { const i = document.querySelector('#result img'); "
                         "return i && i.complete && i.naturalWidth > 0; }")  # Decoded, not just inserted.
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
  assert [(r["color"], r["mask"]) for r in record] == [("red", "mask_0 + red brush"), ("green", "mask_1")]
  assert record[0]["prompt"] == "a blue cup of tea" and record[1]["prompt"] == written["green"]

  assert page.outside == []
  page.check("#regions input")  # The RCA regions over the result.
  page.wait_for_timeout(500)
  page.evaluate("() => document.querySelectorAll('.toast-wrap').forEach(t => t.remove())")  # Unhide the boxes.
  _save_screenshot(page)


def test_bad_mask_file_shows_a_message(page, app_url, tmp_path):
  page.goto(app_url)  # A fresh page: no painting, no masks.
  page.wait_for_selector("#paint")
  bad = tmp_path / "notes.png"
  bad.write_text("not a picture")
  page.set_input_files("#mask-files input[type=file]", [str(bad)])
  message = page.get_by_text("is not an image PIL can read")
  message.first.wait_for()
  assert "notes.png" in message.first.inner_text()


def test_page_inputs_brush_colours_and_messages(tmp_path):
  """The page's input rules without a browser: brush strokes by colour, uploads in colour order, the messages."""
  from idmp_jax.painter import InputError, check_inputs
  from idmp_jax.tasks.paint_app import collect_inputs
  image = Image.new("RGB", (40, 30), (90, 80, 70))
  layer = np.zeros((30, 40, 4), np.uint8)
  layer[2:10, 2:10] = (250, 5, 5, 255)    # Red brush (nearly pure: antialiasing).
  layer[5:20, 5:25] = (0, 0, 255, 200)    # Blue brush over part of it.
  layer[25:, 30:] = (0, 255, 0, 40)       # Too transparent to count.
  upload = np.zeros((30, 40), np.uint8)
  upload[10:, :] = 255
  Image.fromarray(upload).save(tmp_path / "sky.png")
  value = {"background": image, "layers": [Image.fromarray(layer, "RGBA")], "composite": None}
  _, masks = collect_inputs(value, [str(tmp_path / "sky.png")], max_concepts=3)
  assert [(m.color, m.name) for m in masks] == [("red", "sky + red brush"), ("blue", "blue brush")]
  assert masks[0].pixels[3, 3] == 255 and masks[0].pixels[20, 0] == 255 and masks[1].pixels[6, 6] == 255
  assert not masks[1].pixels[25:, 30:].any()

  Image.fromarray(np.zeros((30, 41), np.uint8)).save(tmp_path / "wide.png")
  Image.fromarray(np.zeros((30, 40), np.uint8)).save(tmp_path / "black.png")
  cases = [
      (dict(value=None, paths=[]), "no painting"),
      (dict(value=value, paths=[str(tmp_path / "wide.png")]), "41x30 but the painting is 40x30"),
      (dict(value=value, paths=[str(tmp_path / "sky.png")] * 4), "at most max_concepts = 3"),
  ]
  for case, message in cases:
    with pytest.raises(InputError, match=message):
      collect_inputs(case["value"], case["paths"], max_concepts=3)
  _, masks = collect_inputs({**value, "layers": []}, [str(tmp_path / "black.png")], max_concepts=3)
  with pytest.raises(InputError, match="'black' \\(red\\) is empty"):
    check_inputs(image, masks, 3)
  with pytest.raises(InputError, match="limit of 1,000 pixels"):
    check_inputs(image, masks, 3, max_pixels=1000)
  _, masks = collect_inputs(value, [], max_concepts=3)
  with pytest.raises(InputError, match="prompt of the blue mask"):
    check_inputs(image, masks, 3, prompts=["a cat", " "])


def _brush_stroke(page):
  """A stroke with the editor's brush across the middle of the painting."""
  page.locator("#editor button[aria-label='Brush']").first.click()
  box = page.locator("#editor canvas").first.bounding_box()
  x, y = box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.4
  page.mouse.move(x, y)
  page.mouse.down()
  for k in range(1, 16):
    page.mouse.move(x + 10 * k, y + 4 * k)
  page.mouse.up()
  page.wait_for_timeout(300)


def _save_screenshot(page):
  """A small PNG for the README (palette-quantised: well under 300 KB)."""
  image = Image.open(io.BytesIO(page.screenshot(full_page=True))).convert("RGB")
  image = image.quantize(colors=256, method=Image.Quantize.MEDIANCUT)
  os.makedirs(os.path.dirname(SCREENSHOT), exist_ok=True)
  tmp = SCREENSHOT + ".tmp"
  image.save(tmp, format="PNG", optimize=True)
  shutil.move(tmp, SCREENSHOT)
