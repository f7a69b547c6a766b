"""Screenshot of the `skinclf serve` page with results, for the README, taken by headless Chromium.

    python bench/serve_screenshot.py --out docs/serve.png

Serves the bundled model on a free loopback port, uploads a few of the full-size HAM10000
samples beside the repository plus one corrupt file and one 28x28 thumbnail (far too small for
the model: its row shows a warning), sorts by melanoma probability, waits for every row, and
saves the page (palette PNG, small enough for the repository).
Needs `pip install ".[serve,test]"` and Debian's chromium + chromium-driver.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO.parent / "shared" / "data" / "ham10000-fullres"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "serve.png")
    parser.add_argument("--samples", type=Path, default=SAMPLES)
    parser.add_argument("--images", type=int, default=4, help="how many sample images to upload")
    parser.add_argument("--width", type=int, default=1100)
    parser.add_argument("--height", type=int, default=1000)
    parser.add_argument("--max-height", type=int, default=2400)
    parser.add_argument("--zoom", type=float, default=1.0, help="device scale factor (2: the page at 200%%)")
    args = parser.parse_args()

    from PIL import Image
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from skinclf.data.layout import default_model_path
    from skinclf.engines.load import load_engine
    from skinclf.web.routes import create_app
    from skinclf.web.server import background_server

    samples = sorted(args.samples.glob("*.jpg"))[: args.images]
    if not samples:
        sys.exit(f"no sample images in {args.samples}")
    engine = load_engine(default_model_path())
    with tempfile.TemporaryDirectory() as tmp:
        corrupt = Path(tmp) / "scan_0001.jpg"
        corrupt.write_bytes(samples[0].read_bytes()[:2000])
        thumbnail = Path(tmp) / "thumbnail_28x28.jpg"
        Image.open(samples[-1]).convert("RGB").resize((28, 28)).save(thumbnail, quality=95)
        options = webdriver.ChromeOptions()
        options.binary_location = "/usr/bin/chromium"
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                    f"--window-size={args.width},{args.height}", "--hide-scrollbars", f"--force-device-scale-factor={args.zoom}"):
            options.add_argument(arg)
        driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
        try:
            with background_server(create_app(engine)) as url:
                driver.get(url + "/")
                wait = WebDriverWait(driver, 300)
                wait.until(lambda d: d.find_element(By.ID, "model-sha").text not in ("", "\u2013"))
                files = [str(p) for p in samples] + [str(corrupt), str(thumbnail)]
                driver.find_element(By.ID, "files").send_keys("\n".join(files))
                done = "li.result[data-state='done'], li.result[data-state='error']"
                wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, done)) == len(files))
                wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "li.result[data-warning='true']"))
                Select(driver.find_element(By.ID, "sort")).select_by_value("mel")
                driver.execute_script("document.activeElement.blur()")
                height = driver.execute_script("return document.documentElement.scrollHeight")
                driver.set_window_size(args.width, min(int(height) + 140, args.max_height))
                png = driver.get_screenshot_as_png()
        finally:
            driver.quit()
    image = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    image.save(args.out, optimize=True)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KB, {image.width}x{image.height})")


if __name__ == "__main__":
    main()
