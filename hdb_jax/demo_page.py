"""`hdb demo`'s page (Gradio blocks) and its server; the handlers are hdb_jax/demo.py's.

Needs the [demo] extra: pip install -e '.[demo]'.
"""

# No `from __future__ import annotations`: Gradio finds `gr.Request` parameters by their
# annotations, which must be objects.
import os
import tempfile
import time

import numpy as np

from hdb_jax import api, demo as demo_lib

DEFAULT_PORT = 7860
ELEM = {  # elem_id of what the browser test drives
    "upload": "hdb-upload", "example": "hdb-example", "crop": "hdb-crop",
    "message": "hdb-message", "personalize": "hdb-personalize", "gallery": "hdb-gallery",
    "timings": "hdb-timings", "prompt": "hdb-prompt", "render": "hdb-render",
    "rendered": "hdb-rendered", "download_hdb": "hdb-download-hdb",
    "download_peft": "hdb-download-peft", "download_kohya": "hdb-download-kohya"}


def build(handlers: demo_lib.Demo):
  """The page: upload + crop, settings, personalize, gallery, downloads, prompt box."""
  import gradio as gr
  pipeline = handlers.pipeline
  defaults = handlers.defaults()
  token = pipeline.config.token
  # delete_cache: Gradio's copies of uploads go after half an hour
  with gr.Blocks(title="hdb-jax: personalize from one photo", delete_cache=(300, 1800)) as page:
    gr.Markdown(
        "# hdb-jax: one photo in, a personalized model out\n"
        "HyperDreamBooth: a hypernetwork predicts a person's LiDB weights from one "
        "photo, then fast finetuning refines them as a rank-"
        f"{pipeline.cfg.rank} LoRA. Upload a face photo or use the example, press "
        f"**Personalize**, then try your own prompts with the identifier **{token}**.")
    photo_state, result_state = gr.State(None), gr.State(None)
    with gr.Row():
      with gr.Column(scale=1):
        upload = gr.File(label="Face photo", file_types=["image"], type="filepath",
                         elem_id=ELEM["upload"])
        example = gr.Button("Use the example photo", size="sm", elem_id=ELEM["example"])
        crop = gr.Image(label="The crop it will use", interactive=False, height=256,
                        elem_id=ELEM["crop"])
      with gr.Column(scale=1):
        with gr.Accordion("Settings (the config's defaults)", open=False):
          steps = gr.Number(defaults["steps"], label="Finetuning steps", precision=0,
                            minimum=0, maximum=1000)
          iterations = gr.Number(defaults["iterations"], label="Hypernetwork iterations s",
                                 precision=0, minimum=1, maximum=16)
          seed = gr.Number(defaults["seed"], label="Seed", precision=0)
          guidance = gr.Number(defaults["guidance"], label="Guidance scale", minimum=0,
                               maximum=30)
        go = gr.Button("Personalize", variant="primary", elem_id=ELEM["personalize"])
        message = gr.Markdown("", elem_id=ELEM["message"])
        timings = gr.Markdown("", elem_id=ELEM["timings"])
        download_hdb = gr.DownloadButton("Personalization (hdb-jax)", value=None,
                                         elem_id=ELEM["download_hdb"])
        download_peft = gr.DownloadButton("PyTorch LoRA: PEFT / diffusers", value=None,
                                          elem_id=ELEM["download_peft"])
        download_kohya = gr.DownloadButton("PyTorch LoRA: kohya (A1111, ComfyUI)",
                                           value=None, elem_id=ELEM["download_kohya"])
    gallery = gr.Gallery(label="Samples of the six prompts (as in samples.png)", columns=3,
                         height=560, object_fit="contain", elem_id=ELEM["gallery"])
    with gr.Row():
      prompt = gr.Textbox(label=f"Your prompt (use {token!r} for the person)",
                          value=f"a painting of a {token} {pipeline.config.class_name}",
                          elem_id=ELEM["prompt"], scale=4)
      render = gr.Button("Render", elem_id=ELEM["render"], scale=1)
    rendered = gr.Gallery(label="Your prompt", columns=3, height=320,
                          object_fit="contain", elem_id=ELEM["rendered"])

    def check(upload, request: gr.Request):  # the upload box is emptied: nothing is kept
      return (*handlers.check_photo(upload, request), None)

    def use_example(request: gr.Request):
      return (*handlers.check_photo(handlers.example, request), None)

    def run(photo, steps, iterations, seed, guidance, request: gr.Request,
            progress=gr.Progress()):
      out = handlers.personalize(photo, steps, iterations, seed, guidance, request, progress)
      gallery_items, timing, own, peft, kohya, result, text = out
      return (gallery_items, timing, own, peft, kohya, result, text)

    def draw(result, prompt, seed, guidance, request: gr.Request):
      return handlers.render(result, prompt, seed, guidance, request)

    def close(request: gr.Request):
      handlers.close_session(request)

    upload.upload(check, [upload], [crop, photo_state, message, upload])
    example.click(use_example, None, [crop, photo_state, message, upload])
    go.click(run, [photo_state, steps, iterations, seed, guidance],
             [gallery, timings, download_hdb, download_peft, download_kohya, result_state,
              message], concurrency_limit=None, concurrency_id="personalize")
    render.click(draw, [result_state, prompt, seed, guidance], [rendered, message])
    prompt.submit(draw, [result_state, prompt, seed, guidance], [rendered, message])
    page.unload(close)
  return page


def serve(config, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
          share: bool = False, cache_dir: str | None = None, crop: bool = True,
          batch: int = 1, max_upload_mb: float = 10.0, example: str = demo_lib.EXAMPLE,
          block_thread: bool = True):
  """Load and compile the programs, then serve the page -> (page, start-up seconds).
  `example`: the photo of the example button. `block_thread` False returns at once with
  the server running."""
  from starlette.middleware import Middleware
  began = time.perf_counter()
  pipeline = api.load(config, cache_dir=cache_dir, crop=crop, ready=True,
                      render_batch=int(config.personalize.per_prompt))
  if batch > 1:  # the block programs are traced and compiled now, not at the first block
    photo = api.Photo(np.zeros((pipeline.image_size,) * 2 + (3,), np.float32), "warm-up",
                      "", {})
    list(pipeline.personalize_many([photo] * batch, block=batch, fixed_block=True))
  worker = demo_lib.Worker(pipeline, batch)
  cache = os.environ.get("GRADIO_TEMP_DIR") or os.path.join(tempfile.gettempdir(), "gradio")
  files_root = os.path.join(cache, demo_lib.SESSIONS)
  os.makedirs(files_root, exist_ok=True)
  handlers = demo_lib.Demo(pipeline, worker, int(max_upload_mb * 2**20), files_root,
                           os.path.abspath(example))
  page = build(handlers)
  if os.path.realpath(page.GRADIO_CACHE) != os.path.realpath(cache):
    handlers.files_root = files_root = os.path.join(page.GRADIO_CACHE, demo_lib.SESSIONS)
    os.makedirs(files_root, exist_ok=True)
  startup = time.perf_counter() - began
  page.queue(default_concurrency_limit=1)
  page.launch(server_name=host, server_port=port, share=share,
              max_file_size=int(max_upload_mb * 2**20), allowed_paths=[os.path.abspath(example)],
              app_kwargs={"middleware": [Middleware(demo_lib.SessionFiles, root=files_root)]},
              prevent_thread_lock=not block_thread, quiet=not block_thread,
              show_error=False)
  if block_thread:  # the server has stopped: no session's files outlive it
    import shutil
    shutil.rmtree(files_root, ignore_errors=True)
  return page, startup
