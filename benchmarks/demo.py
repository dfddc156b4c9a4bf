"""`hdb demo` under load: start-up, time to the first result, throughput at 1, 2 and 4
concurrent users, one at a time (--batch 1) and batched (--batch 4).

    python benchmarks/demo.py --out benchmarks/results/demo_mini.json

Each setting starts `hdb demo` (the embedded default, configs/mini.py, its 40 steps and
6 prompts x 4 samples) as a new process on a program cache that already holds its
programs (a first start fills it and is not timed), as a user's second start would.
Users are gradio_client sessions in threads, each uploading the shipped photo and
personalizing it `--per-user` times; throughput = photos finished / wall time.
"""

import argparse
import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHOTO = os.path.join(REPO, "assets", "mini_subject", "photo_0.png")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start(batch: int, cache: str, log_path: str):
  """`hdb demo` -> (process, url, seconds from launch to serving)."""
  port = _free_port()
  began = time.perf_counter()
  log = open(log_path, "w+")
  process = subprocess.Popen(
      [sys.executable, "-m", "hdb_jax.cli", "demo", "--port", str(port), "--cache-dir", cache,
       "--batch", str(batch)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
      env=dict(os.environ, PYTHONPATH=REPO, GRADIO_ANALYTICS_ENABLED="False"))
  while True:
    log.seek(0)
    if "Running on local URL" in log.read():
      return process, f"http://127.0.0.1:{port}", time.perf_counter() - began
    if process.poll() is not None:
      log.seek(0)
      raise RuntimeError(log.read()[-3000:])
    time.sleep(0.1)


def user(url: str, times: int) -> list[float]:
  """One session: upload the photo, personalize it `times` times -> seconds of each."""
  from gradio_client import Client, handle_file
  client = Client(url, verbose=False, download_files=False)
  client.predict(handle_file(PHOTO), api_name="/check")
  seconds = []
  for _ in range(times):
    tick = time.perf_counter()
    out = client.predict(None, None, None, None, api_name="/run")
    assert "Personalized" in out[-1], out[-1]
    seconds.append(time.perf_counter() - tick)
  return seconds


def measure(batch: int, users: list[int], per_user: int, cache: str, logs: str) -> dict:
  process, url, startup = start(batch, cache, os.path.join(logs, f"batch{batch}.log"))
  try:
    first = user(url, 1)[0]  # the first click after start-up
    rows = {}
    for count in users:
      tick = time.perf_counter()
      with concurrent.futures.ThreadPoolExecutor(count) as pool:
        latencies = [s for got in pool.map(lambda _: user(url, per_user), range(count))
                     for s in got]
      wall = time.perf_counter() - tick
      rows[str(count)] = {"photos": count * per_user, "wall_seconds": round(wall, 2),
                          "photos_per_second": round(count * per_user / wall, 3),
                          "latency_seconds_max": round(max(latencies), 2),
                          "latency_seconds_median": round(sorted(latencies)[len(latencies) // 2], 2)}
      print(f"batch {batch}, {count} users: {rows[str(count)]}", flush=True)
  finally:
    process.terminate()
    process.wait(timeout=60)
  return {"startup_seconds": round(startup, 2), "first_result_seconds": round(first, 2),
          "users": rows}


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--out", required=True)
  parser.add_argument("--users", default="1,2,4")
  parser.add_argument("--batches", default="1,4")
  parser.add_argument("--per-user", type=int, default=2)
  args = parser.parse_args()
  users = [int(x) for x in args.users.split(",")]
  cache = tempfile.mkdtemp(prefix="hdb-demo-bench-")
  logs = tempfile.mkdtemp(prefix="hdb-demo-logs-")
  result = {"command": " ".join(["python", "benchmarks/demo.py"] + sys.argv[1:]),
            "cpus": os.cpu_count(), "per_user": args.per_user, "rows": {}}
  for batch in [int(x) for x in args.batches.split(",")]:
    process, _, _ = start(batch, cache, os.path.join(logs, f"fill{batch}.log"))  # stores
    process.terminate()
    process.wait(timeout=60)
    result["rows"][f"batch{batch}"] = measure(batch, users, args.per_user, cache, logs)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()
