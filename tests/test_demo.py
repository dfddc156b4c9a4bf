"""`hdb demo` in a real browser (Playwright driving Debian's chromium, no browser download)
and through gradio_client: one server for the file (mini world, few steps), started as
`hdb demo` is.

Chromium: `apt-get install chromium` (.ci/run does it when missing); $HDB_CHROMIUM
points elsewhere."""

import concurrent.futures
import os
import re
import socket
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHOTO = os.path.join(REPO, "assets", "mini_subject", "photo_0.png")
CHROMIUM = os.environ.get("HDB_CHROMIUM") or next(
    (p for p in ("/usr/lib/chromium/chromium", "/usr/bin/chromium") if os.path.exists(p)), None)
# test_personalize.py's settings: the same XLA programs, compiled once per test run
# (tests/conftest.py shares XLA's cache with launched commands)
FAST = ["--set", "personalize.steps=3", "--set", "personalize.per_prompt=1",
        "--set", "personalize.sample_steps=2", "--set", "personalize.upscale=1"]
TIMEOUT_MS = 240_000


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  """`hdb demo` on a free port -> (its URL once the page is served, Gradio's folder)."""
  port = _free_port()
  cache = str(tmp_path_factory.mktemp("demo-cache"))
  uploads = str(tmp_path_factory.mktemp("gradio"))
  env = dict(os.environ, GRADIO_TEMP_DIR=uploads,
             GRADIO_ANALYTICS_ENABLED="False", PYTHONPATH=REPO)
  log = open(tmp_path_factory.mktemp("demo-log") / "server.log", "w+")
  process = subprocess.Popen(
      [sys.executable, "-m", "hdb_jax.cli", "demo", "--port", str(port), "--cache-dir", cache,
       "--max-upload-mb", "1"] + FAST, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
  url = f"http://127.0.0.1:{port}"
  deadline = time.monotonic() + 300
  while True:
    log.seek(0)
    text = log.read()
    if "Running on local URL" in text:
      break
    assert process.poll() is None, text[-3000:]
    assert time.monotonic() < deadline, text[-3000:]
    time.sleep(0.5)
  yield url, uploads
  process.kill()  # nothing of the server's is kept (its folders are the test's)
  process.wait(timeout=30)
  log.close()


@pytest.fixture(scope="module")
def browser():
  from playwright.sync_api import sync_playwright
  assert CHROMIUM, "chromium is missing: apt-get install chromium (or set $HDB_CHROMIUM)"
  with sync_playwright() as p:
    chromium = p.chromium.launch(executable_path=CHROMIUM,
                                 args=["--no-sandbox", "--disable-dev-shm-usage"])
    yield chromium
    chromium.close()


def _bomb_png(path, side=20000):
  """A PNG whose header says side x side pixels (over PIL's bomb limit), 100 bytes long."""
  def chunk(kind, data):
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
  header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
  path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                   + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def _message(page):
  return page.locator("#hdb-message")


def test_the_page_personalizes_renders_downloads_and_refuses_bad_photos(
    server, browser, tmp_path):
  import safetensors.numpy
  server, uploads = server
  page = browser.new_page()
  page.set_default_timeout(TIMEOUT_MS)
  page.goto(server)
  page.locator("#hdb-upload input[type=file]").set_input_files(PHOTO)
  page.get_by_text("is what the hypernetwork sees").wait_for()
  assert page.locator("#hdb-crop img").count() == 1
  page.locator("#hdb-personalize").click()
  page.get_by_text("Personalized photo_0.png").wait_for()
  gallery = page.locator("#hdb-gallery")
  assert gallery.locator("img").count() >= 1
  assert "a cartoon of a sks face on a green background" in gallery.inner_text()  # captions
  assert "Done in" in page.locator("#hdb-timings").inner_text()
  assert re.search(r"finetune \d+\.\d+ s", page.locator("#hdb-timings").inner_text())

  page.locator("#hdb-prompt textarea").fill("a sketch of a sks face on a blue background")
  page.locator("#hdb-render").click()
  page.get_by_text("Rendered: a sketch of a sks face on a blue background").wait_for()
  assert page.locator("#hdb-rendered img").count() >= 1

  with page.expect_download() as download:
    page.locator("#hdb-download-kohya").click()
  assert download.value.suggested_filename == "photo_0_kohya.safetensors"
  saved = tmp_path / "kohya.safetensors"
  download.value.save_as(saved)
  tensors = safetensors.numpy.load_file(str(saved))
  assert tensors and all(k.startswith("lora_unet_") or k.startswith("lora_te_")
                         for k in tensors)
  assert all(np.isfinite(v).all() for v in tensors.values())

  bad = {"not_an_image.png": b"hello, not an image", "truncated.png":
         open(PHOTO, "rb").read()[:150]}
  for name, data in bad.items():
    (tmp_path / name).write_bytes(data)
  Image.new("RGB", (8, 8), (90, 90, 90)).save(tmp_path / "too_small.png")
  Image.new("RGB", (64, 64), (120, 120, 120)).save(tmp_path / "wall.png")
  _bomb_png(tmp_path / "bomb.png")
  (tmp_path / "big.png").write_bytes(b"\x00" * 1_200_000)
  expected = {"not_an_image.png": "cannot read image", "truncated.png": "cannot read image",
              "too_small.png": "at least 16 pixels", "wall.png": "no face found",
              "bomb.png": "too many pixels"}
  for name, words in expected.items():
    page.locator("#hdb-upload input[type=file]").set_input_files(str(tmp_path / name))
    page.get_by_text(f"Refused: {name}").wait_for()
    text = _message(page).inner_text()
    assert words in text and "Traceback" not in text, (name, text)
  kept = [name for _, _, names in os.walk(uploads) for name in names if name in expected]
  assert not kept, kept  # a refused upload is deleted
  # Over --max-upload-mb: refused before it is sent (the server refuses it too: 413)
  page.locator("#hdb-upload input[type=file]").set_input_files(str(tmp_path / "big.png"))
  page.get_by_text("exceed the maximum allowed size").wait_for()
  assert "big.png" in page.locator("body").inner_text()
  page.close()


@pytest.mark.slow  # two personalizations at once; the README command's time is at its 600 s
def test_two_clients_personalize_at_once_each_with_its_own_result(server):
  """gradio_client: two sessions personalize two photos at the same time; the queue runs
  both, each gets the result of its own photo, and neither can fetch the other's files."""
  server, _ = server
  import httpx
  from gradio_client import Client, handle_file
  photos = [PHOTO, os.path.join(REPO, "assets", "mini_subject", "photo_1.png")]

  def one(photo):
    client = Client(server, verbose=False, download_files=False)
    _, message, _ = client.predict(handle_file(photo), api_name="/check")
    assert "is what the hypernetwork sees" in message, message
    return client, client.predict(None, None, None, None, api_name="/run")

  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    results = list(pool.map(one, photos))
  urls = []
  for photo, (client, out) in zip(photos, results):
    gallery, timings, own, peft, kohya, message = out
    assert f"Personalized **{os.path.basename(photo)}**" in message, message
    assert [item["caption"] for item in gallery][1] == "a sks face on a blue background"
    assert len(gallery) == 6 and "**Done** in" in timings
    stem = os.path.splitext(os.path.basename(photo))[0]
    assert [f["orig_name"] for f in (own, peft, kohya)] == [
        f"{stem}_hdb.safetensors", f"{stem}_peft.safetensors", f"{stem}_kohya.safetensors"]
    urls.append(kohya["url"])
  assert urls[0] != urls[1]
  big = httpx.post(server + "/gradio_api/upload",
                   files={"files": ("big.png", b"\0" * (2**20 + 1))})
  assert big.status_code == 413  # over --max-upload-mb, refused by the server
  assert httpx.get(urls[0]).status_code == 403  # no session cookie: refused
  other = Client(server, verbose=False, download_files=False)
  assert httpx.get(urls[0], cookies=other.cookies).status_code == 403  # another session's
  client, _ = results[0]
  assert httpx.get(urls[0], cookies=client.cookies).status_code == 200  # its own


@pytest.mark.slow
def test_requests_waiting_together_go_through_one_block(tmp_path):
  """`hdb demo --batch 2`: three sessions ask at once; the worker takes one, and the two
  waiting meanwhile (or arriving within its gathering window) are personalized as one
  block (personalize_block); each gets its own photo's result."""
  from gradio_client import Client, handle_file
  port = _free_port()
  env = dict(os.environ, GRADIO_TEMP_DIR=str(tmp_path / "gradio"), PYTHONPATH=REPO,
             GRADIO_ANALYTICS_ENABLED="False")
  log = open(tmp_path / "server.log", "w+")
  process = subprocess.Popen(
      [sys.executable, "-m", "hdb_jax.cli", "demo", "--port", str(port), "--cache-dir",
       str(tmp_path / "cache"), "--batch", "2"] + FAST, cwd=REPO, env=env, stdout=log,
      stderr=subprocess.STDOUT)
  url = f"http://127.0.0.1:{port}"
  try:
    deadline = time.monotonic() + 600
    while True:
      log.seek(0)
      text = log.read()
      if "Running on local URL" in text:
        break
      assert process.poll() is None and time.monotonic() < deadline, text[-3000:]
      time.sleep(0.5)
    photos = [os.path.join(REPO, "assets", "mini_subject", f"photo_{i}.png") for i in range(3)]
    clients = [Client(url, verbose=False, download_files=False) for _ in photos]
    for client, photo in zip(clients, photos):
      client.predict(handle_file(photo), api_name="/check")
    jobs = [client.submit(None, None, None, None, api_name="/run") for client in clients]
    outs = [job.result(timeout=600) for job in jobs]
    for photo, out in zip(photos, outs):
      assert out[2]["orig_name"] == os.path.splitext(os.path.basename(photo))[0] + (
          "_hdb.safetensors")
    blocks = ["personalized in one block with 1 other request" in out[1] for out in outs]
    assert sum(blocks) >= 2, [out[1] for out in outs]
  finally:
    process.terminate()
    process.wait(timeout=60)
    log.close()
