"""``ovseg demo`` driven in a real headless browser (Debian's ``chromium`` + ``chromium-driver``, selenium): a toy
image uploaded, two vocabularies typed one after the other; for each method, the classes and pixel shares of the
rendered legend and the label map downloaded from the page are those of ``ovseg predict`` on the same image and words.
A screenshot of the page after each query is kept (``outputs/demo/ovseg_demo_query{1,2}.png``; the README shows
the first as ``docs/demo.png``).

Skipped where gradio, selenium, chromium or chromedriver is missing; ``make test-demo`` installs them."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
CONFIGS = ["configs/toyworld/maskclip.yaml", "configs/toyworld/clip.yaml"]
VOCABULARIES = ["sky, grass;lawn, wall, house, tree, road", "snow, water, sand, floor;ground, car, flower"]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = [
    pytest.mark.slow,  # ~2 min on 2 shared CPU cores: the app's start, four `ovseg predict` runs, the browser
    pytest.mark.skipif(importlib.util.find_spec("gradio") is None, reason="gradio not installed (make test-demo)"),
    pytest.mark.skipif(importlib.util.find_spec("selenium") is None, reason="selenium not installed (make test-demo)"),
    pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="chromium / chromedriver missing (make test-demo)"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def app(tmp_path):
    """``ovseg demo`` with two toy methods, in its own process; yields its URL."""
    log = (tmp_path / "app.log").open("w+")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    env.pop("GRADIO_TEMP_DIR", None)
    command = [sys.executable, "-m", "ovseg", "demo", *[a for c in CONFIGS for a in ("--config", str(REPO / c))],
               "--port", str(_free_port()), "--device", "cpu", "--print-url"]
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    try:
        deadline = time.time() + 300
        url = None
        while url is None:
            log.seek(0)
            url = next((line.split("ovseg demo: ", 1)[1].strip() for line in log if line.startswith("ovseg demo: ")),
                       None)
            if proc.poll() is not None or time.time() > deadline:
                log.seek(0)
                pytest.fail(f"ovseg demo did not start:\n{log.read()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _predicted(config: str, image: Path, words: str, out: Path) -> np.ndarray:
    from ovseg.cli import main

    main(["predict", "--config", str(REPO / config), "--images", str(image), "--classes", words,
          "--model.init_args.predict_dir", str(out), "--trainer.default_root_dir", str(out),
          "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"])
    return np.asarray(Image.open(out / f"{image.stem}_label.png"))


def _names(words: str) -> list[str]:
    return [item.split(";")[0].strip() for item in words.split(",")]


def test_the_page_shows_what_ovseg_predict_predicts(app, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    from ovseg.toyworld.generate import make_image

    image = tmp_path / "toy.jpg"
    image.write_bytes(make_image(0, "val", 0).jpeg)
    expected = {(c, w): _predicted(c, image, w, tmp_path / f"predict{i}_{j}")
                for i, c in enumerate(CONFIGS) for j, w in enumerate(VOCABULARIES)}

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1600,1250"):
        options.add_argument(arg)
    options.binary_location = CHROMIUM
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        wait = WebDriverWait(driver, 180)
        driver.get(app)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#ovseg-run"))
        driver.find_element(By.CSS_SELECTOR, "#ovseg-image input[type=file]").send_keys(str(image))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#ovseg-image img"))
        words_box = driver.find_element(By.CSS_SELECTOR, "#ovseg-classes textarea")
        status = lambda: driver.find_element(By.CSS_SELECTOR, "#ovseg-status").text  # noqa: E731

        # empty words: one line in the page, no picture
        words_box.send_keys(Keys.CONTROL, "a", Keys.BACKSPACE)
        driver.find_element(By.CSS_SELECTOR, "#ovseg-run").click()
        wait.until(lambda d: "error" in status())
        assert status().startswith("error: no class names") and "\n" not in status()

        for query, words in enumerate(VOCABULARIES, 1):
            words_box.send_keys(Keys.CONTROL, "a", Keys.BACKSPACE)
            words_box.send_keys(words)
            driver.find_element(By.CSS_SELECTOR, "#ovseg-run").click()
            wait.until(lambda d, q=query: status().startswith(f"query {q} "))
            for index, config in enumerate(CONFIGS):
                reference = expected[config, words]
                names = _names(words)
                counts = np.bincount(reference.ravel(), minlength=len(names))
                rows = driver.find_elements(By.CSS_SELECTOR, f"#ovseg-legend-{index} tr.ovseg-class")
                shown = {r.get_attribute("data-class"): float(r.get_attribute("data-share")) for r in rows}
                assert set(shown) == {names[c] for c in np.flatnonzero(counts)}, (config, words)
                for name, share in shown.items():
                    assert share == pytest.approx(counts[names.index(name)] / reference.size, abs=1e-6)
                link = driver.find_element(By.CSS_SELECTOR, f"#ovseg-download-{index} a[download]")
                assert link.get_attribute("download").startswith(f"query{query}_{index}_")
                with urllib.request.urlopen(link.get_attribute("href"), timeout=30) as response:
                    downloaded = np.asarray(Image.open(response))
                assert np.array_equal(downloaded, reference), (config, words)
                header = driver.find_element(By.CSS_SELECTOR, f"#ovseg-header-{index}").text
                assert "protocol toyworld v1" in header and "toyworld-vit" in header
                assert Path(config).name in header
                if query == 2:  # the same image, new words: only the text side ran
                    assert "image features reused" in header
            out = REPO / "outputs" / "demo"
            out.mkdir(parents=True, exist_ok=True)
            shot = tmp_path / f"ovseg_demo_query{query}.png"
            driver.save_screenshot(str(shot))
            assert Image.open(shot).size[0] >= 1200
            shutil.copy(shot, out / shot.name)
    finally:
        driver.quit()
