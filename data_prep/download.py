"""download: WikiArt thumbnails listed in the original's `wikiart_images.csv` (SPEC §11).

CSV columns: file_name, url, modifier, split. Each image is fetched from `url + "!{modifier}.{ext}"` (ext = the
URL's last "."-part, as the original), decoded completely, converted to RGB and re-saved with PIL's default JPEG
encoder as `<output_dir>/<file_name>`.

Robustness (what the original lacked):
- resumable: an image already in the output folder (or in its train/val/test/unannotated subfolders, after
  `split`) is not fetched again; every file is written to a temp file and renamed, so a file with the final name
  is always complete, and stale temp files of an interrupted run are removed at start;
- retries with exponential backoff and jitter on timeouts, connection errors, HTTP 429 and 5xx (Retry-After is
  honoured, capped), bodies shorter than their Content-Length, and bytes that do not decode completely
  (truncated images); other HTTP errors (404...) are final;
- the progress bar is advanced only by the main thread as downloads complete, so it is exact with any number of
  threads; it starts at the number already present;
- the end prints how many images are still missing (exit status 1 if any), and can list them (`missing_list`).
"""
from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import http.client
import io
import os
import random
import sys
import time
import urllib.error
import urllib.request

from PIL import Image
from tqdm import tqdm

from data_prep import common

USER_AGENT = "idmp_jax-data-prep/0.1 (+https://github.com/cilabuniba/i-dream-my-painting)"


class Retryable(Exception):
  def __init__(self, message: str, wait: float | None = None):
    super().__init__(message)
    self.wait = wait


@dataclasses.dataclass
class Options:
  num_threads: int = 16
  timeout: float = 30.0
  retries: int = 5
  backoff: float = 1.0       # seconds before the first retry; doubles each time
  max_backoff: float = 60.0


def read_rows(csv_path) -> list[dict]:
  with open(csv_path, newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  for key in ("file_name", "url", "modifier"):
    if rows and key not in rows[0]:
      raise ValueError(f"{csv_path}: missing column {key!r}")
  return rows


def image_url(row: dict) -> str:
  url = row["url"]
  return f"{url}!{row['modifier']}.{url.split('.')[-1]}"


def existing_path(output_dir: str, file_name: str) -> str | None:
  for folder in ("",) + common.SPLIT_DIRS:
    path = os.path.join(output_dir, folder, file_name)
    if os.path.exists(path):
      return path
  return None


def fetch_once(url: str, timeout: float) -> bytes:
  request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
  try:
    with urllib.request.urlopen(request, timeout=timeout) as response:
      data = response.read()
      expected = response.headers.get("Content-Length")
      if expected is not None and len(data) != int(expected):
        raise Retryable(f"truncated body: {len(data)} of {expected} bytes")
      return data
  except urllib.error.HTTPError as e:
    if e.code == 429 or 500 <= e.code < 600:
      retry_after = e.headers.get("Retry-After") if e.headers else None
      wait = float(retry_after) if retry_after and retry_after.strip().isdigit() else None
      raise Retryable(f"HTTP {e.code}", wait) from None
    raise
  except (http.client.HTTPException, urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
    raise Retryable(f"{type(e).__name__}: {e}") from None


def decode(data: bytes) -> Image.Image:
  """Fully decoded RGB image; truncated or corrupt bytes raise Retryable."""
  try:
    with Image.open(io.BytesIO(data)) as im:
      im.load()
      return im.convert("RGB")
  except Exception as e:  # PIL: OSError (truncated), UnidentifiedImageError, SyntaxError, ValueError
    raise Retryable(f"undecodable image ({type(e).__name__}: {e})") from None


def download_one(row: dict, output_dir: str, options: Options) -> tuple[str, str | None]:
  """(file_name, None) on success or when present, (file_name, error) when given up."""
  file_name = row["file_name"]
  if existing_path(output_dir, file_name):
    return file_name, None
  url = image_url(row)
  error = None
  for attempt in range(options.retries + 1):
    try:
      image = decode(fetch_once(url, options.timeout))
      common.save_image_atomic(image, os.path.join(output_dir, file_name))
      return file_name, None
    except Retryable as e:
      error = f"{url}: {e}"
      if attempt == options.retries:
        break
      wait = min(options.backoff * 2**attempt, options.max_backoff) * (0.5 + random.random() / 2)
      if e.wait is not None:
        wait = max(wait, min(e.wait, options.max_backoff))
      time.sleep(wait)
    except urllib.error.HTTPError as e:
      return file_name, f"{url}: HTTP {e.code} (not retried)"
  return file_name, f"{error} (gave up after {options.retries + 1} attempts)"


def remove_stale_temp_files(output_dir: str) -> int:
  removed = 0
  for name in os.listdir(output_dir):
    if name.startswith(".") and name.endswith(".part"):
      os.unlink(os.path.join(output_dir, name))
      removed += 1
  return removed


def download(csv_path, output_dir, options: Options = Options(), missing_list=None, progress_file=None) -> dict:
  """Downloads what is missing; returns counts {total, present, downloaded, failed, missing}."""
  output_dir = os.fspath(output_dir)
  os.makedirs(output_dir, exist_ok=True)
  remove_stale_temp_files(output_dir)
  rows = read_rows(csv_path)
  todo = [r for r in rows if not existing_path(output_dir, r["file_name"])]
  present = len(rows) - len(todo)
  failed = []
  bar = tqdm(total=len(rows), initial=present, desc="download", unit="img", file=progress_file or sys.stderr,
             disable=None if progress_file is None else False)
  with concurrent.futures.ThreadPoolExecutor(max_workers=options.num_threads) as pool:
    futures = [pool.submit(download_one, r, output_dir, options) for r in todo]
    for future in concurrent.futures.as_completed(futures):
      file_name, error = future.result()
      if error:
        failed.append((file_name, error))
        print(f"error: {error}", file=sys.stderr)
      bar.update(1)
      bar.set_postfix(failed=len(failed), refresh=False)
  bar.close()
  missing = sorted(r["file_name"] for r in rows if not existing_path(output_dir, r["file_name"]))
  if missing_list:
    with open(missing_list, "w", encoding="utf-8") as f:
      f.write("".join(f"{m}\n" for m in missing))
  print(f"download: {len(rows)} listed, {present} already present, {len(todo) - len(failed)} downloaded, "
        f"{len(missing)} missing" + (" (re-run to retry)" if missing else ""))
  return {"total": len(rows), "present": present, "downloaded": len(todo) - len(failed), "failed": len(failed),
          "missing": len(missing), "missing_files": missing}
