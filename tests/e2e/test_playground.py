"""The playground page in a real headless Chromium (driven by Playwright): it asks for the API key,
shows the model, and streams a chat reply token by token into the page."""

from __future__ import annotations

import os
import shutil

import httpx
import pytest

from tests.support.api_server import live_app, started_stack, tiny_settings
from tests.support.models import tiny_llama

pytestmark = pytest.mark.timeout(180)
KEY = "sk-playground"
CHROMIUM = os.environ.get("SHARDSERVE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="PLAYGROUND NOT TESTED: playwright is not installed"
    )
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"PLAYGROUND NOT TESTED: no Chromium at {CHROMIUM} (`apt-get install -y chromium`)")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    settings = tiny_settings(tiny_llama(tmp_path_factory), api_key=[KEY])
    with started_stack(settings) as stack, live_app(settings, stack) as srv:
        yield srv


def test_chat_streams_into_the_page(browser, server) -> None:
    prompt = "Hello, how are you today?"
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    # the server wants a key: the page asks for it, then shows the model
    page.wait_for_selector("#apikey-box:not([hidden])", timeout=10_000)
    page.fill("#apikey", KEY)
    page.click("#save-key")
    page.wait_for_function("document.getElementById('model').textContent === 'tiny'", timeout=10_000)
    assert "256" in page.text_content("#context")
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "40")
    # record every text the reply bubble shows while it streams
    page.evaluate(
        """() => {
            window.seen = [];
            new MutationObserver(() => {
                const b = document.querySelector('.msg.assistant');
                if (b && b.classList.contains('streaming')) window.seen.push(b.textContent);
            }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
        }"""
    )
    page.fill("#prompt", prompt)
    page.press("#prompt", "Enter")
    page.wait_for_selector(".msg.assistant.done", timeout=60_000)
    bubble_text = page.evaluate("document.querySelector('.msg.assistant').firstChild.textContent")
    seen = [s for s in page.evaluate("window.seen") if s]
    assert page.text_content(".msg.user") == prompt
    assert not page.query_selector(".msg.error") and errors == []
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "top_p": 1,
        "max_tokens": 40,
    }
    expected = httpx.post(
        server.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
    ).json()
    assert bubble_text == expected["choices"][0]["message"]["content"] != ""
    assert len(set(seen)) > 2, "the reply should grow piece by piece"
    assert all(bubble_text.startswith(s) for s in seen)
    assert "finish: " in page.text_content(".msg.assistant .meta")
    page.close()
