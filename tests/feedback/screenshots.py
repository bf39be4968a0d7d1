"""Takes the README's screenshots of the rater and admin pages (docs/label_rater.png,
docs/label_admin.png) with headless chromium, on a small fake candidates file and a few labels.

  python tests/feedback/screenshots.py [--out docs]
"""

import argparse
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

# pylint: disable=wrong-import-position
from lmtrain.feedback import db  # noqa: E402
from conftest import Server  # noqa: E402
from test_label_browser import chromium_driver, quit_driver  # noqa: E402

SOURCE = {"stage": "sft", "path": "runs/demo/sft", "step": 1200}
CANDIDATES = [
    {"prompt": "Explain in two sentences why the sky is blue.",
     "responses": [
         "Sunlight is scattered by the molecules of the air, and short (blue) wavelengths scatter "
         "far more than long (red) ones. So blue light reaches our eyes from every direction of "
         "the sky.",
         "The sky is blue because it reflects the oceans.",
         "Rayleigh scattering: the scattered intensity goes as 1/wavelength^4, so blue light is "
         "scattered about five times more than red.\nThat scattered light is what we see.",
         "Blue is a calm colour, and the sky is calm, which is why it is blue most days."]},
    {"prompt": "Write a haiku about autumn rain.",
     "responses": ["Cold rain on red leaves\nthe gutter hums a low song\nsummer washes out",
                   "Autumn rain falls down. It is wet. The end.",
                   "grey sky, soft drumming\nmaple leaves stick to the glass\ntea going cold"]},
    {"prompt": "What is 17 * 24?",
     "responses": ["408", "17 * 24 = 17 * 20 + 17 * 4 = 340 + 68 = 408.", "398"]},
    {"prompt": "Give one tip for writing clear commit messages.",
     "responses": ["Say why the change was made, not only what changed.", "Use emojis.",
                   "Keep the subject line short and in the imperative: 'Fix crash on empty "
                   "input'."]},
]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.path.join(HERE, "..", "..", "docs"))
  args = parser.parse_args()
  work = tempfile.mkdtemp(prefix="lmtrain-shots-")
  url = f"sqlite:///{os.path.join(work, 'labels.db')}"
  engine = db.open_db(url)
  # The first three go to two raters (agreement for the admin page); the "sky" question, last,
  # is the one left for the rater page.
  records = [{**c, "source": SOURCE} for c in CANDIDATES[1:] + CANDIDATES[:1]]
  db.add_tasks(engine, records, {0, 1, 2})
  admin_token = db.new_admin_token(engine)
  raters = {name: db.add_rater(engine, name) for name in ("ann", "bob", "chen")}
  rater_ids = {name: db.rater_by_token(engine, token).id for name, token in raters.items()}
  rankings = {"ann": [[1, 3, 2], [2, 1, 3], [2, 3, 1]], "bob": [[1, 2, 3], [2, 1, 3], [1, 2, 1]]}
  for name, ranked in rankings.items():
    for ranking in ranked:
      task = db.next_task(engine, rater_ids[name])
      db.submit(engine, rater_ids[name], task["id"], ranking=ranking)
  server = Server(url, os.path.join(work, "server.log"))
  driver = chromium_driver(1400, 700)
  try:
    from selenium.webdriver.common.by import By
    # chen's first task is the one no one has: the "sky" question.
    driver.get(f"{server.url}/rate?token={raters['chen']}")
    for index in (2, 0):
      driver.find_element(By.CSS_SELECTOR, f"#card-{index} .pick").click()
    driver.find_element(By.CSS_SELECTOR, "#score-2 option[value='7']").click()
    driver.find_element(By.ID, "flag-factually_wrong-1").click()
    driver.save_screenshot(os.path.join(args.out, "label_rater.png"))
    driver.get(f"{server.url}/admin?token={admin_token}")
    driver.save_screenshot(os.path.join(args.out, "label_admin.png"))
  finally:
    quit_driver(driver)
    server.stop()
    engine.dispose()


if __name__ == "__main__":
  main()
