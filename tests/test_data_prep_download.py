"""download against a local WikiArt imitation on 127.0.0.1 that injects faults."""
import collections
import csv
import http.server
import io
import os
import threading
import time

import numpy as np
import pytest
from PIL import Image

from data_prep import download
from data_prep.cli import main


class FaultyWikiArt(http.server.ThreadingHTTPServer):
  """Serves /images/<artist>/<title>.jpg!<Modifier>.jpg. `faults[path]` lists what the next requests get:
  "timeout" (answer after the client gave up), "500", "429" (Retry-After: 0), "cut" (connection closed half-way
  through a body announced in full), "bad" (a valid HTTP response whose JPEG is truncated); "404" is final."""

  daemon_threads = True

  def __init__(self, images, faults):
    super().__init__(("127.0.0.1", 0), Handler)
    self.images, self.faults = images, {k: list(v) for k, v in faults.items()}
    self.requests = collections.Counter()
    self.lock = threading.Lock()


class Handler(http.server.BaseHTTPRequestHandler):

  def log_message(self, *args):
    pass

  def do_GET(self):
    srv = self.server
    with srv.lock:
      srv.requests[self.path] += 1
      queue = srv.faults.get(self.path, [])
      fault = queue[0] if queue and queue[0] == "404" else (queue.pop(0) if queue else None)
    body = srv.images.get(self.path)
    if fault == "404" or body is None:
      return self.send_error(404)
    if fault == "timeout":
      time.sleep(3.0)
    if fault in ("500", "429"):
      self.send_response(int(fault))
      self.send_header("Retry-After", "0")
      self.send_header("Content-Length", "0")
      self.end_headers()
      return
    data = body[:len(body) // 2] if fault in ("cut", "bad") else body
    self.send_response(200)
    self.send_header("Content-Type", "image/jpeg")
    self.send_header("Content-Length", str(len(body) if fault == "cut" else len(data)))
    self.end_headers()
    try:
      self.wfile.write(data)
    except (BrokenPipeError, ConnectionResetError):
      pass
    if fault == "cut":
      self.close_connection = True


def jpeg_bytes(seed, size=(96, 64)):
  rng = np.random.default_rng(seed)
  img = Image.fromarray(rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), np.uint8)).resize(size)
  buf = io.BytesIO()
  img.save(buf, format="JPEG", quality=90)
  return buf.getvalue()


def expected_file(data):
  buf = io.BytesIO()
  Image.open(io.BytesIO(data)).convert("RGB").save(buf, format="JPEG")  # what the original stores
  return buf.getvalue()


FAULTS = {0: [], 1: ["500", "500"], 2: ["429"], 3: ["timeout"], 4: ["cut", "bad"], 5: ["404"], 6: ["bad"] * 20,
          7: []}


@pytest.fixture
def site(tmp_path):
  images, rows = {}, []
  server = FaultyWikiArt(images, {})
  port = server.server_address[1]
  for i, fault in FAULTS.items():
    path = f"/images/artist-{i % 3}/painting-{i}.jpg!Large.jpg"
    images[path] = jpeg_bytes(i)
    server.faults[path] = list(fault)
    rows.append({"file_name": f"artist-{i % 3}_painting-{i}.jpg", "modifier": "Large", "split": "train",
                 "url": f"http://127.0.0.1:{port}/images/artist-{i % 3}/painting-{i}.jpg"})
  csv_path = tmp_path / "wikiart_images.csv"
  with open(csv_path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=["file_name", "url", "modifier", "split"])
    writer.writeheader()
    writer.writerows(rows)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  yield server, csv_path, rows
  server.shutdown()
  server.server_close()


# A generous client timeout: a loaded CI machine once took over 0.4 s to answer a plain request (a 404 then
# counted as a timeout and was retried); the "timeout" fault stalls well past it.
OPTIONS = download.Options(num_threads=8, timeout=1.5, retries=3, backoff=0.01, max_backoff=0.05)


def test_faults_resume_and_progress(site, tmp_path):
  server, csv_path, rows = site
  out = tmp_path / "images"
  out.mkdir()
  (out / ".stale-from-a-killed-run.part").write_bytes(b"half")
  bar = io.StringIO()
  stats = download.download(csv_path, out, OPTIONS, missing_list=tmp_path / "missing.txt", progress_file=bar)
  # every image the server could serve is there and intact; nothing half-written
  for i, row in enumerate(rows):
    path = out / row["file_name"]
    if i in (5, 6):  # 404, and a file that is truncated on every attempt
      assert not path.exists()
    else:
      assert path.read_bytes() == expected_file(server.images[f"/images/artist-{i % 3}/painting-{i}.jpg!Large.jpg"])
  assert not [f for f in os.listdir(out) if f.endswith(".part")]
  assert stats["missing"] == 2 and stats["downloaded"] == 6 and stats["failed"] == 2
  assert (tmp_path / "missing.txt").read_text().split() == sorted([rows[5]["file_name"], rows[6]["file_name"]])
  assert "8/8" in bar.getvalue().replace("\r", "\n").strip().splitlines()[-1]  # exact with 8 threads
  # retries happened as injected, the 404 was not retried
  path = lambda i: f"/images/artist-{i % 3}/painting-{i}.jpg!Large.jpg"
  assert server.requests[path(1)] == 3 and server.requests[path(4)] == 3 and server.requests[path(5)] == 1
  assert server.requests[path(2)] == 2 and server.requests[path(3)] == 2  # 429, timeout: one retry each
  assert server.requests[path(6)] == OPTIONS.retries + 1

  # resume: only what is missing is requested again; the bar starts at what is present
  before = dict(server.requests)
  server.faults[path(6)] = []  # the server heals
  bar = io.StringIO()
  stats = download.download(csv_path, out, OPTIONS, progress_file=bar)
  assert stats["present"] == 6 and stats["downloaded"] == 1 and stats["missing"] == 1
  new = {p: n - before.get(p, 0) for p, n in server.requests.items() if n != before.get(p, 0)}
  assert new == {path(5): 1, path(6): 1}
  assert (out / rows[6]["file_name"]).read_bytes() == expected_file(server.images[path(6)])
  assert "8/8" in bar.getvalue().replace("\r", "\n").strip().splitlines()[-1]


def test_already_split_images_are_not_fetched_and_cli_status(site, tmp_path):
  server, csv_path, rows = site
  out = tmp_path / "images"
  (out / "train").mkdir(parents=True)
  for row in rows:
    (out / "train" / row["file_name"]).write_bytes(b"x")
  assert main(["download", "--csv", str(csv_path), "-o", str(out)]) == 0
  assert sum(server.requests.values()) == 0
  os.unlink(out / "train" / rows[5]["file_name"])
  assert main(["download", "--csv", str(csv_path), "-o", str(out), "--timeout", "1.5", "--backoff", "0.01"]) == 1
