"""The web demo in a headless Chromium (Debian's chromium + chromium-driver, driven by selenium): upload an image,
submit an instruction, read the streamed answer and the attention overlay from the page; a bad upload shows its
message. Screenshots go to $IBLIP_TEST_ARTIFACTS (default runs/test-artifacts/). `make test-browser` installs the
browser; without one this test skips."""
import base64
import os
import shutil
import time

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (test extra) drives the browser")
pytest.importorskip("gradio", reason="the web demo needs the serve extra")

from selenium.webdriver.common.by import By                  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait      # noqa: E402

import test_serve                                            # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")
ARTIFACTS = os.environ.get("IBLIP_TEST_ARTIFACTS") or os.path.join(test_serve.ROOT, "runs", "test-artifacts")


@pytest.fixture(scope="module")
def browser():
  if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip("no Chromium and chromedriver on PATH (make test-browser installs Debian's)")
  from selenium.webdriver.chrome.service import Service
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1300",
               "--disable-extensions", "--no-first-run"):
    options.add_argument(flag)
  driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
  yield driver
  driver.quit()


def _wait(driver, what, timeout=240):
  return WebDriverWait(driver, timeout, poll_frequency=0.25).until(what)


def _upload(driver, path):
  field = _wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, "#upload input[type=file]"))
  field.send_keys(os.path.abspath(path))


def _value(driver, elem_id: str) -> str:
  return driver.find_element(By.CSS_SELECTOR, f"#{elem_id} textarea").get_attribute("value")


def _image_width(driver, elem_id: str) -> int:
  """naturalWidth of the image shown in component `elem_id` (0 while none is loaded)."""
  return driver.execute_script(
      "const im = document.querySelector(arguments[0]); return im && im.complete ? im.naturalWidth : 0;",
      f"#{elem_id} img")


def _screenshot(driver, name: str) -> str:
  os.makedirs(ARTIFACTS, exist_ok=True)
  path = os.path.join(ARTIFACTS, name)
  # the whole page, not only the window: Chromium's DevTools capture beyond the viewport
  metrics = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})
  size = metrics["cssContentSize"]
  shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                                          "clip": {"x": 0, "y": 0, "width": size["width"],
                                                                   "height": size["height"], "scale": 1}})
  with open(path, "wb") as f:
    f.write(base64.b64decode(shot["data"]))
  return path


def test_upload_ask_read_answer_and_overlay(browser, tmp_path_factory):
  from iblip_jax.inference import Pipeline
  root = tmp_path_factory.mktemp("browser")
  port = test_serve._free_port()
  server = test_serve.start_server(port, root / "server.log")
  try:
    image = test_serve.demo_image(root / "square.png")
    prompt = "what color is the shape?"
    want = Pipeline.from_pretrained(test_serve.DEMO)(image, prompt, num_beams=1, max_new_tokens=30,
                                                     repetition_penalty=1.5)   # the form's defaults
    browser.get(f"http://127.0.0.1:{port}/")
    _upload(browser, image)
    _wait(browser, lambda d: _image_width(d, "preview") > 0)
    assert "96 x 96 pixels" in browser.find_element(By.ID, "notes").text
    box = browser.find_element(By.CSS_SELECTOR, "#prompt textarea")
    box.send_keys(prompt)
    browser.find_element(By.ID, "ask").click()
    _wait(browser, lambda d: _value(d, "answer") == want and _image_width(d, "overlay") > 0)
    conversation = browser.find_element(By.ID, "conversation").text
    assert prompt in conversation and want in conversation
    shot = _screenshot(browser, "serve_browser_answer.png")
    assert os.path.getsize(shot) > 10_000
    # a file that is not an image: its message in the page, and the app still answers
    bad = root / "notes.png"
    bad.write_text("not an image")
    browser.get(f"http://127.0.0.1:{port}/")   # a fresh page: the file field is replaced by the uploaded file's name
    _upload(browser, bad)
    _wait(browser, lambda d: "notes.png: not an image" in d.find_element(By.TAG_NAME, "body").text, timeout=60)
    _screenshot(browser, "serve_browser_bad_upload.png")
    assert server.poll() is None
  finally:
    server.terminate()
    server.wait(timeout=30)
