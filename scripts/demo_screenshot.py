"""docs/demo.png: the finished `hdb demo` page (the example photo personalized, a prompt
rendered), taken by Playwright with the system's chromium (no browser download).

    hdb demo --port 7860 &
    python scripts/demo_screenshot.py --url http://127.0.0.1:7860 --out docs/demo.png
"""

import argparse
import os

CHROMIUM = ("/usr/lib/chromium/chromium", "/usr/bin/chromium")


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--url", default="http://127.0.0.1:7860")
  parser.add_argument("--out", default="docs/demo.png")
  parser.add_argument("--prompt", default="a painting of a sks face on a green background")
  args = parser.parse_args()
  from playwright.sync_api import sync_playwright
  executable = os.environ.get("HDB_CHROMIUM") or next(p for p in CHROMIUM if os.path.exists(p))
  with sync_playwright() as p:
    browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
    page = browser.new_page(viewport={"width": 1000, "height": 900})
    page.set_default_timeout(300_000)
    page.goto(args.url)
    page.locator("#hdb-example").click()
    page.get_by_text("is what the hypernetwork sees").wait_for()
    page.locator("#hdb-personalize").click()
    page.get_by_text("Personalized photo_0.png").wait_for()
    timings = page.locator("#hdb-timings").inner_text()
    page.locator("#hdb-prompt textarea").fill(args.prompt)
    page.locator("#hdb-render").click()
    page.get_by_text("Rendered:").wait_for()
    page.wait_for_timeout(1500)
    page.screenshot(path=args.out, full_page=True)
    browser.close()
  print(f"{args.out}: {timings}")


if __name__ == "__main__":
  main()
