"""The web app: `python -m idmp_jax.main --config=configs/app.py` (then open the printed local address).

Upload a painting (or take an example of the dataset on disk), mark up to `max_concepts` regions (brush strokes in
the region's colour, or mask PNGs), "Write prompts" (the MultiMask prompt generator fills one editable box per
colour), "Paint" (RCA sampler, progress over the denoising steps), then toggle the RCA regions over the result and
download the painting with a JSON of the masks' colours and prompts.

Gradio, the ecosystem's convention for model demos: its ImageEditor draws masks with a brush, and its queue runs
one request at a time in front of the one `Painter` (models loaded and compiled at start-up, see
`idmp_jax.painter`). Everything is served from this machine: no share link, no analytics, no fonts from a CDN.
Input problems come back as a message on the page (`gr.Error` / `gr.Warning`), never as a stack trace.

Masks: mask k has colour k of SPEC §8's list (red, green, blue, yellow, cyan, ...). An uploaded PNG (white = paint
here, the painting's size) is mask 1, 2, ... in upload order; brush strokes in a colour add to that colour's mask.
Overlaps are allowed: a pixel covered by several masks listens to every covering mask's prompt (RCA).
"""
from __future__ import annotations

import os

# Before gradio is imported: nothing leaves the machine (no usage statistics, no version check).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import functools
import time
import traceback

import ml_collections
import numpy as np
from absl import logging
from PIL import Image

from idmp_jax import painter as painter_lib
from idmp_jax.data import files
from idmp_jax.data.llava import COLORS
from idmp_jax.painter import InputError, Mask
from idmp_jax.tasks import paint

MAX_UPLOAD_MB = 50


def default_config() -> ml_collections.ConfigDict:
  c = paint.default_config()
  c.task = "paint_app"
  c.name = "paint_app"
  for field in ("image", "masks", "prompts", "stem", "captions"):  # Inputs come from the page.
    del c[field]
  c.data_dir = "demo"        # Dataset whose examples the page offers; "demo" builds the demo dataset in the workdir;
                             # "" offers none.
  c.host = "127.0.0.1"       # Local only; "0.0.0.0" serves the network (no authentication: mind who can reach it).
  c.port = 7860
  c.queue_size = 16          # Requests waiting beyond this are refused with a message.
  c.warm_up = True           # Compile at start-up (the first request is then as fast as the next).
  return c


# ------------------------------------------------------------------------------------------------------------------
# Inputs from the page.


def hex_color(name: str) -> str:
  return "#%02x%02x%02x" % COLORS[name]


def _open_image(path: str, what: str) -> Image.Image:
  try:
    with Image.open(path) as im:
      im.load()
      return im.copy()
  except Exception as e:  # PIL raises several kinds for a file that is not an image.
    raise InputError(f"{what} {os.path.basename(path)!r} is not an image PIL can read ({type(e).__name__})") from None


def brush_masks(layers, size, colors) -> dict[str, np.ndarray]:
  """{colour: uint8 mask} of the brush strokes: opaque pixels (alpha >= 128) of every layer, each given to the
  nearest of `colors` when close to it (the brush only offers those colours)."""
  out = {}
  palette = np.asarray([COLORS[c] for c in colors], np.float32)
  for layer in layers or []:
    if layer is None:
      continue
    layer = layer.convert("RGBA")
    if layer.size != size:  # The editor's canvas can differ from the image; map it back onto the image.
      layer = layer.resize(size, Image.NEAREST)
    rgba = np.asarray(layer, np.float32)
    opaque = rgba[..., 3] >= 128
    if not opaque.any():
      continue
    dist = np.linalg.norm(rgba[..., None, :3] - palette[None, None], axis=-1)  # (H, W, K)
    nearest, close = dist.argmin(-1), dist.min(-1) < 80
    for k, c in enumerate(colors):
      sel = opaque & close & (nearest == k)
      if sel.any():
        out[c] = np.maximum(out.get(c, np.zeros(sel.shape, np.uint8)), sel.astype(np.uint8) * 255)
  return out


def collect_inputs(editor_value, mask_paths, max_concepts: int) -> tuple[Image.Image, list[Mask]]:
  """The painting and its masks (colour order) from the editor and the uploaded PNGs, or InputError."""
  colors = list(COLORS)[:max_concepts]
  mask_paths = [p for p in (mask_paths or []) if p]
  if len(mask_paths) > max_concepts:
    raise InputError(f"{len(mask_paths)} mask files, but at most max_concepts = {max_concepts} masks can be "
                     "painted at once")
  mask_images = [_open_image(path, "mask file").convert("L") for path in mask_paths]
  if not editor_value or editor_value.get("background") is None:
    raise InputError("no painting: upload one into the editor (or take a dataset example)")
  image = editor_value["background"].convert("RGB")
  uploaded = {}
  for path, m, color in zip(mask_paths, mask_images, colors):
    if m.size != image.size:
      raise InputError(f"mask file {os.path.basename(path)!r} is {m.width}x{m.height} but the painting is "
                       f"{image.width}x{image.height}: masks must have the painting's size")
    uploaded[color] = (os.path.splitext(os.path.basename(path))[0], np.asarray(m))
  brushed = brush_masks(editor_value.get("layers"), image.size, colors)
  masks = []
  for color in colors:
    if color in uploaded and color in brushed:
      name, pixels = uploaded[color]
      masks.append(Mask(f"{name} + {color} brush", color, np.maximum(painter_lib.binarize(pixels), brushed[color])))
    elif color in uploaded:
      name, pixels = uploaded[color]
      masks.append(Mask(name, color, pixels))
    elif color in brushed:
      masks.append(Mask(f"{color} brush", color, brushed[color]))
  return image, masks


def describe_overlaps(masks) -> str:
  pairs = painter_lib.overlaps(masks)
  if not pairs:
    return ""
  listed = ", ".join(f"{a} and {b} ({n:,} px)" for a, b, n in pairs)
  return (f"Overlapping masks: {listed}. That is allowed: each pixel listens to the prompt of every mask covering "
          "it (regional cross-attention).")


# ------------------------------------------------------------------------------------------------------------------
# The page.


def _friendly(fn):
  """Input problems become a message on the page; anything else is logged here and reported in one line."""
  import gradio as gr

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    try:
      return fn(*args, **kwargs)
    except gr.Error:
      raise
    except (InputError, files.BadExampleError) as e:
      raise gr.Error(str(e), print_exception=False) from None
    except Exception as e:  # noqa: BLE001 -- the page gets one line, the log the traceback.
      logging.error("request failed:\n%s", traceback.format_exc())
      raise gr.Error(f"the request failed ({type(e).__name__}: {str(e)[:200]}); the server log has the details",
                     print_exception=False) from None
  return wrapped


CSS = "\n".join([f"#prompt-{c} textarea {{ border-left: 10px solid {hex_color(c)}; }}" for c in COLORS] + [
    # Small paintings (CPU settings) fill the view, pixels kept sharp; the files keep their size.
    "#input-view img, #result img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }"])


def build_app(painter: painter_lib.Painter, config, workdir: str):
  """The gr.Blocks page around one Painter."""
  import gradio as gr

  colors = list(COLORS)[:painter.max_concepts]
  out_root = os.path.join(workdir, "outputs")
  stems, layout = [], None
  if config.data_dir:
    data_dir = config.data_dir
    if data_dir == "demo":
      from data_prep.demo import make_demo_dataset
      root = os.path.join(workdir, "demo_data", "mm_inp_dataset")
      data_dir = root if os.path.isdir(root) else make_demo_dataset(os.path.join(workdir, "demo_data"))
    stems = files.list_split(data_dir, config.split)[0]
    layout = files.Layout(data_dir)

  def masks_preview(image, masks):
    return painter_lib.to_image(painter_lib.overlay(np.asarray(image, np.float32) / 255, masks))

  @_friendly
  def show_masks(editor_value, mask_paths):
    if not editor_value or editor_value.get("background") is None:
      for path in mask_paths or []:  # No painting yet: at least say now whether the files are images.
        _open_image(path, "mask file")
      return None, "Masks uploaded; now upload the painting." if mask_paths else ""
    image, masks = collect_inputs(editor_value, mask_paths, painter.max_concepts)
    listed = ", ".join(f"{m.color}: {m.name}" for m in masks) or "none yet"
    return masks_preview(image, masks), f"Masks: {listed}."

  @_friendly
  def load_example(stem):
    if not stem:
      return (gr.update(),) * (3 + len(colors))
    image, anns, masks = files.read_example(layout, config.split, stem, ("caption",))
    names = sorted(anns, key=lambda n: -int(masks[n].astype(np.int64).sum()))[:painter.max_concepts]
    layers = []
    for name, color in zip(names, colors):  # One layer per mask, in its colour: overlaps survive.
      rgba = np.zeros(masks[name].shape + (4,), np.uint8)
      rgba[masks[name] >= 128] = COLORS[color] + (255,)
      layers.append(Image.fromarray(rgba, "RGBA"))
    captions = [anns[n]["caption"] for n in names]
    boxes = [captions[i] if i < len(captions) else "" for i in range(len(colors))]
    value = {"background": image, "layers": layers, "composite": None}
    return (value, None, f"Example {stem}: {len(names)} masks and the dataset's captions (edit them, or press "
                         "Write prompts).", *boxes)

  @_friendly
  def write_prompts(editor_value, mask_paths):
    if painter.prompt_writer is None:
      raise InputError("this app was started without a prompt generator: write the prompts by hand")
    image, masks = collect_inputs(editor_value, mask_paths, painter.max_concepts)
    prompts, missing, _ = painter.write_prompts(image, masks)
    if missing:
      gr.Warning(f"The prompt generator wrote no region for {', '.join(missing)}: those boxes hold its whole "
                 "answer; edit them before painting.")
    by_color = dict(zip((m.color for m in masks), prompts))
    return (*[by_color.get(c, "") for c in colors], masks_preview(image, masks),
            f"Prompts written for {', '.join(by_color)}. " + " ".join(n for n in painter.notes if "llava" in n))

  @_friendly
  def do_paint(editor_value, mask_paths, steps, guidance, seed, scheduler, show_regions, *boxes,
               progress=gr.Progress()):
    image, masks = collect_inputs(editor_value, mask_paths, painter.max_concepts)
    box = dict(zip(colors, boxes))
    used = {m.color for m in masks}
    for m in masks:
      if not (box[m.color] or "").strip():
        raise InputError(f"the prompt of the {m.color} mask ({m.name!r}) is empty: write one, or press "
                         "Write prompts")
    unused = [c for c in colors if c not in used and (box[c] or "").strip()]
    if unused:
      gr.Warning(f"No mask is {', '.join(unused)}: those prompts are not used.")
    masks = painter.check(image, masks, [box[m.color] for m in masks])
    note = describe_overlaps(masks)
    if note:
      gr.Info(note)
    progress((0, None), desc="denoising")
    result = painter.paint(image, masks, [box[m.color] for m in masks], steps=int(steps), guidance=float(guidance),
                           seed=int(seed), scheduler=scheduler or "",
                           on_progress=lambda done, total: progress((done, total), desc="denoising", unit="steps"))
    folder = os.path.join(out_root, time.strftime("%Y%m%d-%H%M%S") + f"-{int(time.time() * 1000) % 1000:03d}")
    paths = painter_lib.save_outputs(result, folder, with_grid=False)
    status = (f"Painted {len(masks)} mask(s) at {painter.resolution}x{painter.resolution} in {result.seconds:.1f} s. "
              + (note + " " if note else "") + " ".join(painter.notes))
    return (painter_lib.to_image(painter_lib.overlay(result.input, result.masks)), shown(result, show_regions),
            [paths["painting"], paths["prompts"]], status, result)

  def shown(result, show_regions):
    if result is None:
      return None
    if show_regions:
      return painter_lib.to_image(painter_lib.regions_overlay(result.image, result.masks))
    return painter_lib.to_image(result.image)

  with gr.Blocks(title="I Dream My Painting", analytics_enabled=False) as app:
    gr.Markdown(
        "# I Dream My Painting\n"
        f"Upload a painting, mark up to {painter.max_concepts} regions — brush strokes in the region's colour "
        f"({', '.join(colors)}), or mask PNGs of the painting's size (white = paint here; the first file is red, "
        "the next green, ...) — then **Write prompts** and **Paint**. Every region is painted at once, each "
        "listening to its own prompt; where masks overlap, a pixel listens to every covering mask's prompt. "
        f"Paintings up to {painter.max_pixels:,} pixels, files up to {MAX_UPLOAD_MB} MB; the painter works on "
        f"the centre square of the painting at {painter.resolution} px."
        + "".join(f"\n\n*{n}*" for n in painter.notes))
    last = gr.State(None)
    with gr.Row():
      with gr.Column(scale=3):
        editor = gr.ImageEditor(
            label="Painting and masks", type="pil", image_mode="RGBA", sources=["upload"], format="png",
            brush=gr.Brush(colors=[hex_color(c) for c in colors], default_color=hex_color(colors[0]),
                           color_mode="fixed"),
            transforms=(), canvas_size=(painter.resolution, painter.resolution), elem_id="editor")
        mask_files = gr.File(label="Mask PNGs (optional; in order: red, green, blue, ...)", file_count="multiple",
                             type="filepath", elem_id="mask-files")
        if stems:
          example = gr.Dropdown(choices=[""] + stems, value="", label="Or take an example of the dataset",
                                elem_id="example")
      with gr.Column(scale=2):
        boxes = [gr.Textbox(label=f"{c} mask's prompt", lines=2, elem_id=f"prompt-{c}") for c in colors]
        write_btn = gr.Button("Write prompts", elem_id="write")
        with gr.Accordion("Settings", open=False):
          steps = gr.Slider(1, 200, value=painter.defaults["steps"], step=1, label="Denoising steps",
                            elem_id="steps")
          guidance = gr.Slider(1.0, 20.0, value=painter.defaults["guidance"], step=0.5,
                               label="Guidance scale (1 = no classifier-free guidance)", elem_id="guidance")
          seed = gr.Number(value=painter.seed, precision=0, label="Seed", elem_id="seed")
          scheduler = gr.Dropdown(choices=[("the model's own", ""), ("PNDM", "pndm"), ("DDIM", "ddim"),
                                           ("DPM-Solver++", "dpm++")],
                                  value=painter.defaults["scheduler"], label="Scheduler", elem_id="scheduler")
        paint_btn = gr.Button("Paint", variant="primary", elem_id="paint")
    status = gr.Markdown(elem_id="status")
    with gr.Row():
      # Shown at least 320 px high whatever the resolution (the files keep their size).
      input_view = gr.Image(label="Input: the masks in their colours", type="pil", format="png", height=320,
                            interactive=False, elem_id="input-view")
      result_view = gr.Image(label="Painting", type="pil", format="png", height=320, interactive=False,
                             elem_id="result")
    show_regions = gr.Checkbox(label="Show which prompt each pixel listens to (RCA regions: a mask's colour, mixed "
                                     "where masks overlap; unmarked pixels listen to every prompt)",
                               elem_id="regions")
    downloads = gr.File(label="Download: painting and prompts (JSON of colours and prompts)", file_count="multiple",
                        interactive=False, elem_id="downloads")

    mask_files.change(show_masks, [editor, mask_files], [input_view, status])
    if stems:
      example.change(load_example, [example], [editor, mask_files, status, *boxes])
    write_btn.click(write_prompts, [editor, mask_files], [*boxes, input_view, status])
    paint_btn.click(do_paint, [editor, mask_files, steps, guidance, seed, scheduler, show_regions, *boxes],
                    [input_view, result_view, downloads, status, last])
    show_regions.change(shown, [last, show_regions], [result_view])
  app.queue(default_concurrency_limit=1, max_size=config.queue_size)  # One request at a time on the one Painter.
  return app


def serve(config, workdir: str, *, block: bool = True):
  """Loads and compiles the models, then serves the page; returns (app, url, painter) when not blocking."""
  t0 = time.perf_counter()
  painter = painter_lib.Painter.from_config(config, workdir)
  compile_s = painter.warm_up() if config.warm_up else 0.0
  app = build_app(painter, config, workdir)
  _, url, _ = app.launch(server_name=config.host, server_port=config.port, share=False, prevent_thread_lock=True,
                         max_file_size=f"{MAX_UPLOAD_MB}mb", ssr_mode=False, mcp_server=False, quiet=True,
                         footer_links=[], css=CSS, allowed_paths=[os.path.abspath(workdir)])
  url = url or f"http://{config.host}:{config.port}/"
  print(f"paint app: models loaded in {painter.load_seconds:.1f} s, compiled in {compile_s:.1f} s, "
        f"ready in {time.perf_counter() - t0:.1f} s at {url}", flush=True)
  if block:
    try:
      app.block_thread()
    finally:
      app.close()
  return app, url, painter


def run(config, workdir: str, mesh):
  del mesh  # One painting at a time on the default device.
  return serve(config, workdir, block=True)
