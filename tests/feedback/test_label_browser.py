"""A real headless browser (Debian's chromium through chromedriver, driven by Selenium; nothing is
downloaded) logs in with a rater link, ranks three tasks by clicking (ties, undo, a score and a
flag on the way) and a fourth from the keyboard, skips a fifth; the database then holds exactly
those rankings, and the export has them in the reward stage's format."""

import json
import os
import shutil
import tempfile

import pytest

from lmtrain import cli
from lmtrain.feedback import db
from label_fakes import SOURCE, write_candidates

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WAIT_S = 30


def chromium_driver(width=1280, height=900):
  """A headless chromium WebDriver; the caller quits it. Fails (not skips) without the binaries."""
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service
  for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
    if not os.path.exists(path):
      pytest.fail(f"{path} not found: .ci/run installs it (apt-get install {package})")
  profile = tempfile.mkdtemp(prefix="lmtrain-chromium-")
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run",
               "--disable-dev-shm-usage", f"--user-data-dir={profile}",
               f"--window-size={width},{height}"):
    options.add_argument(flag)
  # An explicit driver path: selenium-manager then looks nothing up and downloads nothing.
  driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
  driver.set_page_load_timeout(WAIT_S)
  driver.profile_dir = profile
  return driver


def quit_driver(driver):
  driver.quit()
  shutil.rmtree(driver.profile_dir, ignore_errors=True)


@pytest.fixture
def browser():
  driver = chromium_driver()
  yield driver
  quit_driver(driver)


def test_a_rater_ranks_three_tasks_by_clicking(tmp_path, browser, start_server):
  from selenium.webdriver.common.by import By
  from selenium.webdriver.common.keys import Keys
  from selenium.webdriver.support import expected_conditions
  from selenium.webdriver.support.ui import WebDriverWait
  url = f"sqlite:///{tmp_path / 'labels.db'}"
  records = write_candidates(tmp_path / "c.jsonl", 5, k=3)
  cli.main(["label", "init", "--db", url, "--candidates", str(tmp_path / "c.jsonl"), "--overlap",
            "0"])
  engine = db.open_db(url)
  token = db.add_rater(engine, "ann")
  server = start_server(url)
  wait = WebDriverWait(browser, WAIT_S)

  browser.get(f"{server.url}/rate?token={token}")
  # The token moved into a cookie and out of the address bar.
  assert browser.current_url == f"{server.url}/rate"
  assert browser.find_element(By.ID, "progress").text == "Task 1 of 5"

  def click(*actions):
    for action in actions:
      target = "tie" if action == "tie" else f"#card-{action} .pick"
      browser.find_element(By.ID if action == "tie" else By.CSS_SELECTOR, target).click()

  def submit(task_id):
    browser.find_element(By.ID, "submit").click()
    wait.until(expected_conditions.text_to_be_present_in_element(
        (By.ID, "saved"), f"Saved task {task_id}."))

  # Task 1: clicked best to worst as 2, 3, 1; a quality score and a flag on the way.
  click(1, 2, 0)
  browser.find_element(By.CSS_SELECTOR, "#score-1 option[value='6']").click()
  browser.find_element(By.ID, "flag-harmful-0").click()
  assert browser.find_element(By.ID, "rank-1").text == "#1"
  submit(1)
  # Task 2: a slip undone, then 1 and 3 tied for first, 2 last.
  click(1)
  browser.find_element(By.ID, "undo").click()
  assert browser.find_element(By.ID, "rank-1").text == ""
  click(0, "tie", 2, 1)
  submit(2)
  # Task 3: submitting too early is refused on the page; then 3, 2, 1.
  click(2)
  browser.find_element(By.ID, "submit").click()
  assert browser.find_element(By.ID, "status").text == "Rank all 3 responses first."
  click(1, 0)
  submit(3)
  assert browser.find_element(By.ID, "progress").text == "Task 4 of 5"
  # Task 4 from the keyboard: 2, tie, 1, then 3; Enter submits. Task 5: s skips it.
  body = browser.find_element(By.TAG_NAME, "body")
  body.send_keys("2", "t", "1", "3", Keys.ENTER)
  wait.until(expected_conditions.text_to_be_present_in_element((By.ID, "saved"), "Saved task 4."))
  browser.find_element(By.TAG_NAME, "body").send_keys("s")
  wait.until(expected_conditions.presence_of_element_located((By.ID, "all-done")))

  labels = db.all_labels(engine)
  engine.dispose()
  assert [(l["task_id"], l["rater"], l["ranking"]) for l in labels] == [
      (1, "ann", [3, 1, 2]), (2, "ann", [1, 2, 1]), (3, "ann", [3, 2, 1]), (4, "ann", [1, 1, 2])]
  assert labels[0]["scores"] == [None, 6, None]
  assert labels[0]["flags"]["harmful"] == [True, False, False]

  out = tmp_path / "rankings.jsonl"
  cli.main(["label", "export", "--db", url, "--output", str(out)])
  exported = [json.loads(line) for line in out.read_text().splitlines()]
  assert [(r["prompt"], r["responses"], r["ranking"], r["rater"], r["task_id"], r["source"])
          for r in exported] == [
      (records[i]["prompt"], records[i]["responses"], ranking, "ann", i + 1, SOURCE)
      for i, ranking in enumerate(([3, 1, 2], [1, 2, 1], [3, 2, 1], [1, 1, 2]))]
  assert all(r["labeled_at"].endswith("Z") for r in exported)
