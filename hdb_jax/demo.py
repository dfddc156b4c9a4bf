"""`hdb demo`: the personalization as a web page (Gradio), on `api.Pipeline`.

    hdb demo                                   # http://127.0.0.1:7860, the mini world
    hdb demo --config configs/sd15.py --set model.path=/data/sd15 \\
        --set personalize.hypernet=/data/hypernet

A photo is uploaded (or the shipped example picked) and checked at once: the page shows
the crop the job will use, or says why the photo is refused (not an image, truncated,
too small, too many pixels, no face, over the upload limit); a refused upload is deleted.
Personalize runs the job with a progress bar over its stages and finetuning steps, then
shows the samples of the config's prompts (labelled as in samples.png), the timings, and
three downloads named after the photo: the personalization (hdb-jax's own file) and the PyTorch
LoRA in the PEFT/diffusers and kohya formats. A prompt box renders any prompt with the
person's LoRA.

Requests queue (`Worker`): one job runs at a time on the compiled programs; with
`--batch N` (> 1) up to N requests waiting together with the default settings go
through `personalize_block` as one batch (faster on accelerators, not on a 2-core CPU:
docs/demo.md has the measured throughput).

Files: everything a session makes is written under <gradio cache>/hdb-sessions/<browser
token>/<session>/, served from there (never copied), and deleted when the page is
closed. `SessionFiles` (middleware) refuses a file of that folder to a request whose
cookie is not the token it was made for, so no session can fetch another's files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import queue
import re
import secrets
import shutil
import threading
import time
import urllib.parse

import numpy as np
from PIL import Image

from hdb_jax import api, files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(REPO, "assets", "mini_subject", "photo_0.png")
COOKIE = "hdb_session"
SESSIONS = "hdb-sessions"


# -- the queue ------------------------------------------------------------------------
@dataclasses.dataclass
class Job:
  photo: api.Photo
  settings: dict            # steps, iterations, seed, guidance (None: the config's)
  stage: str = "waiting in the queue"
  fraction: float = 0.0
  result: api.Personalization | None = None
  error: Exception | None = None
  submitted: float = dataclasses.field(default_factory=time.perf_counter)
  started: float | None = None
  done: threading.Event = dataclasses.field(default_factory=threading.Event)


class Worker:
  """One thread runs the jobs in the order they came; with `batch` > 1, jobs waiting
  together with the default settings run as one block (`Pipeline.personalize_many`)."""

  def __init__(self, pipeline: api.Pipeline, batch: int = 1, gather_seconds: float = 0.25):
    self.pipeline, self.batch, self.gather_seconds = pipeline, max(1, batch), gather_seconds
    self.jobs: queue.Queue[Job] = queue.Queue()
    self.waiting: list[Job] = []
    self._thread = threading.Thread(target=self._loop, name="hdb-demo-worker", daemon=True)
    self._thread.start()

  def submit(self, photo: api.Photo, settings: dict) -> Job:
    job = Job(photo=photo, settings=settings)
    self.waiting.append(job)
    self.jobs.put(job)
    return job

  def position(self, job: Job) -> int:
    """Jobs ahead of `job` (0: running or next)."""
    try:
      return self.waiting.index(job)
    except ValueError:
      return 0

  def _defaults(self, job: Job) -> bool:
    return all(v is None for v in job.settings.values())

  def _loop(self) -> None:
    while True:
      jobs = [self.jobs.get()]
      if self.batch > 1 and self._defaults(jobs[0]):
        # the jobs waiting now with the same settings, and those arriving within
        # `gather_seconds` (requests sent together reach the server a few ms apart)
        until = time.perf_counter() + self.gather_seconds
        while len(jobs) < self.batch:
          try:
            job = self.jobs.get(timeout=max(0.0, until - time.perf_counter()))
          except queue.Empty:
            break
          if not self._defaults(job):
            self.jobs.put(job)  # runs alone, after this block
            break
          jobs.append(job)
      for job in jobs:
        job.started = time.perf_counter()
      try:
        if len(jobs) == 1:
          self._run_one(jobs[0])
        else:
          self._run_block(jobs)
      except Exception as e:  # reported in each page, the worker goes on
        for job in jobs:
          job.error = e
      finally:
        for job in jobs:
          if job in self.waiting:
            self.waiting.remove(job)
          job.done.set()

  def _run_one(self, job: Job) -> None:
    steps = job.settings.get("steps")
    steps = self.pipeline.cfg.steps if steps is None else steps

    def progress(iterable):
      for step in iterable:
        job.stage, job.fraction = f"finetuning: step {step + 1} of {steps}", 0.1 + 0.8 * (
            step / max(steps, 1))
        yield step
      job.stage, job.fraction = "sampling the prompts", 0.9

    job.stage, job.fraction = "predicting the weights (hypernetwork)", 0.05
    job.result = self.pipeline.personalize(job.photo, progress=progress, **job.settings)

  def _run_block(self, jobs: list[Job]) -> None:
    for job in jobs:
      job.stage, job.fraction = f"personalizing as a block of {len(jobs)}", 0.1
    results = self.pipeline.personalize_many([job.photo for job in jobs], block=self.batch,
                                             fixed_block=True)
    for job, result in zip(jobs, results):
      job.result = result


# -- one browser's files --------------------------------------------------------------
class SessionFiles:
  """ASGI middleware: gives each browser a random token (cookie) and refuses the files of
  <root>/<token>/ to any request without that token."""

  def __init__(self, app, root: str):
    self.app, self.root = app, os.path.realpath(root)

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    cookies = _cookies(scope)
    token = cookies.get(COOKIE)
    path = scope.get("path", "")
    marker = "/file="
    if marker in path:
      requested = os.path.realpath(urllib.parse.unquote(path.split(marker, 1)[1]))
      if requested.startswith(self.root + os.sep):
        owner = os.path.relpath(requested, self.root).split(os.sep)[0]
        if not token or not secrets.compare_digest(owner, _safe(token)):
          await send({"type": "http.response.start", "status": 403,
                      "headers": [(b"content-type", b"text/plain")]})
          return await send({"type": "http.response.body",
                             "body": b"this file belongs to another session"})
    if token:
      return await self.app(scope, receive, send)
    new_token = secrets.token_urlsafe(18)

    async def send_with_cookie(message):
      if message["type"] == "http.response.start":
        headers = list(message.get("headers", []))
        headers.append((b"set-cookie", f"{COOKIE}={new_token}; Path=/; HttpOnly; "
                        "SameSite=Strict".encode()))
        message = dict(message, headers=headers)
      await send(message)
    return await self.app(scope, receive, send_with_cookie)


def _cookies(scope) -> dict:
  for name, value in scope.get("headers", []):
    if name == b"cookie":
      pairs = [part.strip().split("=", 1) for part in value.decode("latin-1").split(";")]
      return {p[0]: p[1] for p in pairs if len(p) == 2}
  return {}


# -- the page -------------------------------------------------------------------------
class Demo:
  """The page's handlers over a `Pipeline` and a `Worker`."""

  def __init__(self, pipeline: api.Pipeline, worker: Worker, max_upload_bytes: int,
               files_root: str, example: str = EXAMPLE):
    self.pipeline, self.worker, self.example = pipeline, worker, example
    self.max_upload_bytes, self.files_root = max_upload_bytes, files_root

  def _session_folder(self, request) -> str:
    """<root>/<browser token>/<session hash>/: names sent by the client, made safe."""
    token = request.cookies.get(COOKIE) if request is not None else None
    session = getattr(request, "session_hash", None) if request is not None else None
    return os.path.join(self.files_root, _safe(token or "anonymous"),
                        _safe(session or "no-session"))

  def _folder(self, request) -> str:
    """A new folder for one result in this session's folder (its own URLs: a browser
    never shows an earlier result's cached image)."""
    folder = os.path.join(self._session_folder(request), secrets.token_hex(6))
    os.makedirs(folder)
    return folder

  def _display(self, pixels: np.ndarray, side: int = 256) -> np.ndarray:
    """[-1, 1] float [H, W, 3] -> uint8, enlarged (nearest) to at least `side` px."""
    image = files.to_uint8(pixels)
    scale = max(1, side // image.shape[0])
    return image.repeat(scale, 0).repeat(scale, 1)

  def _tile(self, samples: np.ndarray, path: str) -> str:
    """Samples [k, H, W, 3] -> a near-square grid (2 x 2 for 4) at >= 256 px, as `path`."""
    k = len(samples)
    rows = max(r for r in range(1, int(np.sqrt(k)) + 1) if k % r == 0)
    grid = files.grid_image(samples, rows)
    scale = max(1, 256 // grid.shape[0])
    Image.fromarray(grid.repeat(scale, 0).repeat(scale, 1)).save(path)
    return path

  def check_photo(self, upload, request=None):
    """An upload (or the example) -> (crop to show, the Photo, message). A refused upload
    is deleted: nothing of it is kept."""
    if upload is None:
      return None, None, ""
    path = upload if isinstance(upload, str) else getattr(upload, "name", str(upload))
    is_example = os.path.realpath(path) == os.path.realpath(self.example)
    try:
      size = os.path.getsize(path)
      if size > self.max_upload_bytes:
        raise ValueError(f"{os.path.basename(path)}: {size / 2**20:.1f} MB is over the "
                         f"upload limit of {self.max_upload_bytes / 2**20:g} MB")
      photo = self.pipeline.read_photo(path)
    except (OSError, ValueError) as e:
      if not is_example:
        _remove(path)  # nothing of a refused photo is kept
      return None, None, f"**Refused:** {_short(e, path)}"
    # An accepted upload stays in Gradio's cache (deleted after half an hour, `build`):
    # identical uploads of two sessions share one file there (named by its content's
    # hash), so the first session's check must not delete it from under the second's.
    message = (f"Photo **{photo.name}** read: this {photo.pixels.shape[0]} px crop is what "
               "the hypernetwork sees. Press **Personalize**.")
    return self._display(photo.pixels), photo, message

  def personalize(self, photo, steps, iterations, seed, guidance, request=None,
                  progress=None):
    """-> gallery, timings, three downloads, the result (state), message."""
    empty = ([], "", None, None, None, None)
    if photo is None:
      return (*empty, "Upload a photo (or use the example) first.")
    defaults = self.defaults()
    settings = {k: (None if v is None or v == defaults[k] else v) for k, v in
                (("steps", _int(steps)), ("iterations", _int(iterations)),
                 ("seed", _int(seed)), ("guidance", _float(guidance)))}
    job = self.worker.submit(photo, settings)
    while not job.done.wait(0.1):
      if progress is not None:
        ahead = self.worker.position(job)
        progress(job.fraction, desc=f"{ahead} ahead in the queue" if ahead and
                 job.started is None else job.stage)
    if job.error is not None:
      return (*empty, f"**Failed:** {job.error}")
    result = job.result
    folder = self._folder(request)
    gallery = []
    for k, (prompt, row) in enumerate(zip(result.prompts, result.samples)):
      gallery.append((self._tile(row, os.path.join(folder, f"sample_{k}.png")), prompt))
    stem = result.stem
    own = os.path.join(folder, f"{stem}_hdb.safetensors")
    result.save_weights(own)
    peft = result.export(os.path.join(folder, f"{stem}_peft.safetensors"), "peft")
    kohya = result.export(os.path.join(folder, f"{stem}_kohya.safetensors"), "kohya")
    waited = (job.started or job.submitted) - job.submitted
    timings = " · ".join(f"{stage} {seconds:.2f} s" for stage, seconds in
                         result.seconds.items() if stage not in ("read", "detect"))
    together = (f", personalized in one block with {result.together - 1} other "
                f"request{'s' if result.together > 2 else ''}" if result.together > 1 else "")
    timings = (f"**Done** in {time.perf_counter() - job.submitted:.1f} s "
               f"(waited {waited:.1f} s in the queue{together}): {timings}")
    return (gallery, timings, own, peft, kohya, result,
            f"Personalized **{result.photo.name}**: samples below, downloads on the right.")

  def render(self, result, prompt, seed, guidance, request=None):
    """-> the samples of `prompt` (gallery), message."""
    if result is None:
      return [], "Personalize a photo first."
    prompt = (prompt or "").strip()
    if not prompt:
      return [], "Type a prompt (the identifier is **{}**).".format(self.pipeline.config.token)
    images = self.pipeline.render(result, prompt, seed=_int(seed), guidance=_float(guidance))
    folder = self._folder(request)
    path = self._tile(images, os.path.join(folder, "render.png"))
    return [(path, prompt)], f"Rendered: *{prompt}*"

  def close_session(self, request=None):
    """The page was closed: its folder goes."""
    if request is None or not getattr(request, "session_hash", None):
      return
    shutil.rmtree(self._session_folder(request), ignore_errors=True)

  def defaults(self) -> dict:
    cfg, p = self.pipeline.cfg, self.pipeline.programs()
    return {"steps": int(cfg.steps), "seed": int(cfg.seed),
            "guidance": float(cfg.guidance_scale),
            "iterations": int(cfg.iterations or p.hypernet_info["hypernet"]["iterations"])}


def _int(value):
  return None if value is None or value == "" else int(value)


def _float(value):
  return None if value is None or value == "" else float(value)


def _safe(name: str) -> str:
  """A client-sent name as a folder name: as it is when plain, else a hash of it."""
  if re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
    return name
  return hashlib.sha256(name.encode()).hexdigest()[:32]


def _remove(path: str) -> None:
  try:
    os.remove(path)
  except OSError:
    pass


def _short(error: Exception, path: str) -> str:
  """The error with the upload's temporary folder left out (the file name stays)."""
  return str(error).replace(path, os.path.basename(path))
