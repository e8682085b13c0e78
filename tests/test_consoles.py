"""Each service's web console (/ui) in a real headless Chromium, against real served processes.

Chromium and its driver come from Debian (`make test` installs them as root); without them
the tests skip, saying so. Every test saves a screenshot under its tmp_path, or under
CONSOLE_SCREENSHOTS when set (the README's pictures: `CONSOLE_SCREENSHOTS=docs/images
.venv/bin/python -m pytest tests/test_consoles.py`).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import requests

from browser import screenshot, text, wait_for
from conftest import running_service

pytestmark = pytest.mark.slow  # drives a real Chromium: `pytest -m "not slow"` leaves it out

FACES = Path(__file__).parent / "fixtures" / "faces"


def test_the_policy_console_balances_the_pole_for_a_whole_episode(browser, tmp_path):
    with running_service("policy", tmp_path) as server:
        browser.get(f"{server.url}/ui")
        wait_for(browser, lambda d: d.find_elements("css selector", "#model option"), what="the model list")
        assert [o.text for o in browser.find_elements("css selector", "#model option")] == ["cartpole"]
        assert "500" in text(browser, "card")  # the card's measured mean return
        browser.find_element("css selector", "#speed option[value='0']").click()
        browser.find_element("id", "run").click()
        wait_for(browser, lambda d: "limit" in text(d, "state") or "fell" in text(d, "state"), 120,
                 "the episode to end")
        assert int(text(browser, "return")) >= 475, text(browser, "state")
        assert text(browser, "version") == "cartpole version 1"
        screenshot(browser, tmp_path, "policy")

        # A push knocks the pole; the policy recovers.
        browser.find_element("id", "reset").click()
        for _ in range(5):
            browser.find_element("id", "step").click()
        wait_for(browser, lambda d: text(d, "steps") == "5", what="five steps")
        browser.find_element("id", "push-right").click()
        browser.find_element("id", "run").click()
        wait_for(browser, lambda d: "limit" in text(d, "state") or "fell" in text(d, "state"), 120,
                 "the pushed episode to end")
        assert int(text(browser, "return")) >= 475


def test_the_generator_console_shows_different_images_for_two_seeds(browser, tmp_path):
    with running_service("generator", tmp_path) as server:
        browser.get(f"{server.url}/ui")
        wait_for(browser, lambda d: len(d.find_elements("css selector", "#grid img")) == 16, what="the first grid")
        grid = "return [...document.querySelectorAll('#grid img')].map(image => image.src)"  # read at once
        first = browser.execute_script(grid)
        seed = browser.find_element("id", "seed")
        seed.clear()
        seed.send_keys("7\n")
        browser.execute_script("document.getElementById('seed').dispatchEvent(new Event('change'))")
        wait_for(browser, lambda d: d.execute_script("return document.querySelector('#grid img').alt") == "seed 7",
                 what="the grid of seed 7")
        second = browser.execute_script(grid)
        assert len(second) == 16 and first[0] != second[0] and first[7] == second[0]  # image i is seed s + i
        # The served bytes, unchanged: what /generate answers for seed 7.
        answer = requests.post(f"{server.url}/generate", json={"n": 1, "seed": 7}, timeout=30).json()
        assert second[0] == "data:image/png;base64," + answer["images"][0]

        browser.find_element("id", "interpolate").click()
        wait_for(browser, lambda d: text(d, "frame").startswith("3 of 16"), what="the animation to play")
        screenshot(browser, tmp_path, "generator")

        # Downloads: the GIF the page saves is the one /interpolate makes.
        downloads = tmp_path / "downloads"
        downloads.mkdir()
        browser.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
        browser.find_element("id", "download-gif").click()
        saved = downloads / "interpolation-0-1.gif"
        wait_for(browser, lambda d: saved.is_file() and saved.stat().st_size > 0, what="the GIF download")
        served = requests.post(f"{server.url}/interpolate", json={"seed_a": 0, "seed_b": 1, "steps": 16,
                                                                  "format": "gif"}, timeout=30).content
        assert saved.read_bytes()[:6] == b"GIF89a" and saved.read_bytes() == served

        # A class-conditional generator: the class select asks /generate for that class.
        classes = requests.get(f"{server.url}/info", timeout=30).json()["generators"]["fashion"].get("classes")
        if classes:
            from selenium.webdriver.support.ui import Select

            # (seed 7's own class is 7, Sneaker: ask for another one). The caption is read in one
            # script call: the grid is replaced whole, so a found element can go stale before .text.
            caption = "return document.querySelector('#grid figcaption').textContent"
            assert browser.execute_script(caption) == "seed 7, Sneaker"
            Select(browser.find_element("id", "label")).select_by_visible_text("Trouser")
            wait_for(browser, lambda d: d.execute_script(caption) == "seed 7, Trouser", what="the grid of trousers")
            trousers = browser.execute_script(grid)
            answer = requests.post(f"{server.url}/generate", json={"n": 1, "seed": 7, "label": "Trouser"},
                                   timeout=30).json()
            assert trousers[0] == "data:image/png;base64," + answer["images"][0] and trousers[0] != second[0]


def test_the_classifier_console_classifies_teaches_and_names(browser, tmp_path):
    from classifier_helpers import encode, fashion_images

    images, labels = fashion_images(3)
    trouser = tmp_path / "trouser.png"  # Fashion-MNIST test image 2 is a trouser (label 1)
    assert labels[2] == 1
    trouser.write_bytes(encode(images[2], "PNG"))
    env = {"TEACH_STORE": f"sqlite:///{tmp_path / 'taught.db'}"}
    with running_service("classifier", tmp_path, env=env) as server:
        browser.get(f"{server.url}/ui")
        wait_for(browser, lambda d: "nothing taught to faces" in text(d, "taught"), what="the taught list")
        # The webcam (Chromium's fake camera here): a frame taken becomes the photo.
        browser.find_element("id", "camera").click()
        wait_for(browser, lambda d: d.execute_script("return document.getElementById('video').videoWidth") > 0,
                 what="the camera")
        browser.find_element("id", "snap").click()
        wait_for(browser, lambda d: d.find_elements("css selector", "#classes th") and
                 text(d, "faces-note") == "no face found", what="the webcam frame's classes and faces")
        upload = browser.find_element("id", "file")
        upload.send_keys(str(trouser))
        wait_for(browser, lambda d: d.execute_script("return document.querySelector('#classes th').textContent")
                 == "Trouser", what="the trouser's classes")

        upload.send_keys(str(FACES / "obama.jpg"))
        wait_for(browser, lambda d: text(d, "faces-note").startswith("1 face"), what="the face")
        wait_for(browser, lambda d: text(d, "classes").startswith("Not clothing"), what="not clothing")
        browser.find_element("id", "name").send_keys("Barack Obama")
        browser.find_element("id", "teach").click()
        wait_for(browser, lambda d: d.find_elements("css selector", "#taught tr[data-name='Barack Obama']"),
                 what="the taught name")
        assert "1 example" in text(browser, "taught")
        taught = requests.post(f"{server.url}/taught", json={"model": "faces"}, timeout=30).json()
        assert taught["names"] == [{"name": "Barack Obama", "examples": 1}]

        # Another photo of him: his box carries his name (the page draws what /check answered).
        upload.send_keys(str(FACES / "obama2.jpg"))
        wait_for(browser, lambda d: "0: Barack Obama (within" in text(d, "faces-note"), what="the name on the face")
        screenshot(browser, tmp_path, "classifier")

        browser.find_element("css selector", "#taught tr[data-name='Barack Obama'] button").click()
        wait_for(browser, lambda d: "nothing taught to faces" in text(d, "taught"), what="the name forgotten")


def test_behind_an_api_key_the_console_asks_once_and_sends_it(browser, tmp_path):
    with running_service("policy", tmp_path, env={"API_KEY": "console-key"}) as server:
        browser.get(f"{server.url}/ui")
        browser.execute_script("sessionStorage.clear()")
        browser.refresh()
        form = wait_for(browser, lambda d: d.find_element("id", "key-form").is_displayed() and
                        d.find_element("id", "key-form"), what="the key form")
        form.find_element("css selector", "input").send_keys("wrong-key\n")
        browser.find_element("id", "step").click()  # refused: the form asks again
        wait_for(browser, lambda d: "refused" in d.find_element("id", "key-form").text, what="the second ask")
        form.find_element("css selector", "input").clear()
        form.find_element("css selector", "input").send_keys("console-key\n")
        wait_for(browser, lambda d: text(d, "steps") == "1", what="the step, with the key")
        for _ in range(3):
            browser.find_element("id", "step").click()
        wait_for(browser, lambda d: text(d, "steps") == "4", what="more steps, without asking again")
        assert not browser.find_element("id", "key-form").is_displayed()


def test_each_service_serves_its_own_console_and_nothing_else(policy_server):
    page = requests.get(f"{policy_server.url}/ui", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "default-src 'none'" in policy
    assert "<script src=\"/ui/policy.js\">" in page.text
    for asset in ("console.js", "console.css", "cartpole.js", "policy.js"):
        assert requests.get(f"{policy_server.url}/ui/{asset}", timeout=10).status_code == 200, asset
    for missing in ("classifier.html", "../policy.py", "nope.js"):
        r = requests.get(f"{policy_server.url}/ui/{missing}", timeout=10)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", missing
