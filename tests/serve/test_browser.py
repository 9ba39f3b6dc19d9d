"""The chat page in a real browser (headless Chromium through selenium): it lists the model, streams
a reply as it is written, starts a new chat and keeps the old one in its history; it fits a phone."""

from __future__ import annotations

import os
import shutil
import time

import pytest
from serve_fixtures import serve_checkpoints, server  # noqa: F401  (fixtures, imported by name: a conftest.py here would shadow tests/conftest.py)

CHROMEDRIVER = "/usr/bin/chromedriver"


@pytest.fixture
def browser():
    if not (shutil.which("chromium") and os.path.exists(CHROMEDRIVER)):
        if os.environ.get("CI"):
            pytest.fail("chromium and chromium-driver are missing (make test installs them)")
        pytest.skip("chromium / chromium-driver not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1100,800"):
        options.add_argument(flag)
    options.binary_location = shutil.which("chromium")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(20)
    yield driver
    driver.quit()


def _wait(predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out waiting for the page")


def test_the_chat_page_streams_a_reply_and_starts_a_new_chat(server, browser, tmp_path, monkeypatch):
    from selenium.webdriver.common.by import By

    url, state = server
    scheduler = state.models["bot"].scheduler
    step = scheduler.decoder.step

    def slow_step(tokens):  # a reply takes long enough for the page to show it growing
        time.sleep(0.03)
        return step(tokens)

    monkeypatch.setattr(scheduler.decoder, "step", slow_step)
    browser.get(url + "/")
    _wait(lambda: browser.find_element(By.ID, "model-name").text)
    assert "bot" in browser.find_element(By.ID, "model-name").text
    options = [o.text for o in browser.find_elements(By.CSS_SELECTOR, "#model option")]
    assert options == ["bot"]  # the BERT and the classifier cannot chat
    browser.find_element(By.ID, "toggle-settings").click()
    for field, value in (("temperature", "0"), ("max-tokens", "30")):
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    browser.execute_script("""
        window.seen = [];
        new MutationObserver(() => {
          const last = [...document.querySelectorAll('.msg.assistant')].pop();
          if (last) window.seen.push(last.textContent.length);
        }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});""")
    browser.find_element(By.ID, "input").send_keys("good morning, my lord")
    browser.find_element(By.ID, "send").click()
    _wait(lambda: browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")
          and not browser.find_elements(By.CSS_SELECTOR, ".msg.streaming"), timeout=15)
    reply = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1].text
    assert reply.strip()
    lengths = sorted(set(browser.execute_script("return window.seen;")) - {0})
    assert len(lengths) >= 3  # the reply appeared piece by piece
    assert not browser.find_elements(By.CSS_SELECTOR, ".msg.error")
    browser.save_screenshot(str(tmp_path / "chat.png"))

    browser.find_element(By.ID, "new-chat").click()
    assert not browser.find_elements(By.CSS_SELECTOR, ".msg.user")
    history = browser.find_elements(By.CSS_SELECTOR, "#history li")
    assert len(history) == 1 and "good morning" in history[0].text
    history[0].click()
    assert [m.text for m in browser.find_elements(By.CSS_SELECTOR, ".msg")] == ["good morning, my lord", reply]

    browser.set_window_size(390, 844)  # a phone
    assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth;")
    browser.save_screenshot(str(tmp_path / "chat-phone.png"))
    assert (tmp_path / "chat.png").stat().st_size > 1000
