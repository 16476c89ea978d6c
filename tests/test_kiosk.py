"""The kiosk page in a real headless Chromium (Debian's chromium and chromium-driver, through selenium),
talking MQTT over a real Mosquitto's WebSockets listener to `edged serve` with the real model: a question
typed in, the answer streamed in, the node's status and temperature, and what a person reads when the node
is too hot or the question comes too fast."""

from __future__ import annotations

import itertools
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from edged.web import KIOSK_DIR
from tests import sysfs
from tests.mqttlab import Mosquitto, contract_node, free_port, wait_port

pytestmark = pytest.mark.model

# Set to a path (docs/kiosk.png) to keep the screenshot the README shows; the test run always takes one.
SCREENSHOT_ENV = "EDGED_KIOSK_SCREENSHOT"
# Records every text the answer box shows, so the test can tell a streamed answer from one put in at once.
RECORD = """
window.snapshots = [];
new MutationObserver(() => window.snapshots.push(document.getElementById("answer").textContent))
  .observe(document.getElementById("answer"), {childList: true, characterData: true, subtree: true});
"""


@pytest.fixture(scope="module")
def ws_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Mosquitto, int]]:
    ws_port = free_port()
    b = Mosquitto(tmp_path_factory.mktemp("broker"), extra_conf=f"listener {ws_port} 127.0.0.1\nprotocol websockets\n")
    b.start()
    wait_port(ws_port)
    yield b, ws_port
    b.stop()


@pytest.fixture(scope="module")
def board(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sysfs")
    sysfs.pi4(root, throttled="0x0")  # no under-voltage: the governor says normal
    return root


@pytest.fixture(scope="module")
def kiosk_url(
    ws_broker: tuple[Mosquitto, int],
    board: Path,
    smollm2_dirs: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    broker, ws_port = ws_broker
    port = free_port()
    node = contract_node(
        tmp_path_factory.mktemp("node"),
        broker,
        smollm2_dirs["int4"].parent,
        sysfs_root=str(board),
        sensor_interval_s=0.3,
        rate_limit_per_min=6.0,
        rate_limit_burst=3,
        http_enabled=True,
        http_listen=f"127.0.0.1:{port}",
        http_kiosk_broker=f"ws://127.0.0.1:{ws_port}",
    )
    wait_port(port)
    yield f"http://127.0.0.1:{port}/kiosk"
    assert node.stop() == 0, node.log.read_text()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1100,700",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
    ):
        options.add_argument(flag)
    os.environ.setdefault("SE_OFFLINE", "true")  # Debian's driver and browser: selenium must fetch nothing
    service = Service(shutil.which("chromedriver") or "/usr/bin/chromedriver")
    driver = webdriver.Chrome(options=options, service=service)
    yield driver
    driver.quit()


def text(browser: webdriver.Chrome, element_id: str) -> str:
    return str(browser.find_element(By.ID, element_id).text)


def until(browser: webdriver.Chrome, what: str, check: object, timeout_s: float = 60) -> None:
    try:
        WebDriverWait(browser, timeout_s, poll_frequency=0.1).until(check)  # type: ignore[arg-type]
    except TimeoutException:
        shown = {i: text(browser, i) for i in ("node", "temperature", "queue", "notice", "answer", "figures")}
        logs = browser.get_log("browser")
        raise AssertionError(f"waited {timeout_s} s for {what}; the page shows {shown}; console: {logs}") from None


def ask(browser: webdriver.Chrome, question: str) -> None:
    box = browser.find_element(By.ID, "question")
    box.clear()
    box.send_keys(question)
    browser.find_element(By.ID, "send").click()


def test_a_question_typed_in_gets_its_answer_streamed_with_the_node_status(
    browser: webdriver.Chrome, kiosk_url: str, tmp_path: Path
) -> None:
    """The page a browser kiosk opens: served by the front door, mqtt.js from the node itself."""
    browser.get(kiosk_url)
    until(browser, "the node's status", lambda b: text(b, "node") == "pi: online")
    until(browser, "the temperature from telemetry", lambda b: text(b, "temperature") == "48.3 °C")
    assert text(browser, "queue") == "queue 0/2"
    browser.execute_script(RECORD)
    ask(browser, "What is the capital of Japan?")
    until(browser, "the answer's figures", lambda b: text(b, "figures").startswith("Answered in"))
    answer = text(browser, "answer")
    assert "Tokyo" in answer
    snapshots = [s for s in browser.execute_script("return window.snapshots") if s]
    assert len(set(snapshots)) >= 3, f"not streamed: {snapshots}"
    assert all(later.startswith(earlier) for earlier, later in itertools.pairwise(snapshots))
    assert text(browser, "notice") == "" and browser.find_element(By.ID, "send").is_enabled()
    shot = tmp_path / "kiosk.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get(SCREENSHOT_ENV):
        shutil.copy(shot, os.environ[SCREENSHOT_ENV])


def test_a_hot_node_and_a_fast_asker_get_messages_a_person_understands(
    browser: webdriver.Chrome, kiosk_url: str, board: Path
) -> None:
    browser.get(kiosk_url)
    until(browser, "online", lambda b: text(b, "node") == "pi: online")
    temp = board / "sys/class/thermal/thermal_zone0/temp"
    temp.write_text("90000\n")
    try:
        until(browser, "the hot status", lambda b: text(b, "node") == "pi: degraded")
        until(browser, "the temperature", lambda b: text(b, "temperature") == "90.0 °C")
        assert "too hot" in text(browser, "notice")
        ask(browser, "Is basil a perennial?")
        until(browser, "the thermal refusal", lambda b: "too hot to answer right now" in text(b, "notice"))
        assert "try again in about 60 seconds" in text(browser, "notice")
    finally:
        temp.write_text("48312\n")
    until(browser, "cooled down", lambda b: text(b, "node") == "pi: online")
    for _ in range(4):  # a burst of 3 is allowed (the thermal refusal took one), then 6 a minute
        until(browser, "ready to ask", lambda b: b.find_element(By.ID, "send").is_enabled())
        ask(browser, "Hi")
        until(browser, "an answer or a refusal", lambda b: b.find_element(By.ID, "send").is_enabled())
        if "asking very quickly" in text(browser, "notice"):
            break
    assert "You are asking very quickly. Please try again in about" in text(browser, "notice")


def test_the_page_works_from_a_file_with_the_settings_in_the_query(
    browser: webdriver.Chrome, kiosk_url: str, ws_broker: tuple[Mosquitto, int]
) -> None:
    """A kiosk may open the page from its own disk; mqtt.js sits beside it, no network but the broker's."""
    started = time.monotonic()
    browser.get(f"file://{KIOSK_DIR / 'index.html'}?broker=ws://127.0.0.1:{ws_broker[1]}&client=kiosk7")
    until(browser, "the node found by its status", lambda b: text(b, "node") == "pi: online")
    ask(browser, "What is the capital of Japan?")
    until(browser, "the answer", lambda b: "Tokyo" in text(b, "answer") and text(b, "figures"))
    assert time.monotonic() - started < 60


def test_the_private_broker_opens_a_websockets_listener_when_asked(tmp_path: Path) -> None:
    """`broker.local_ws_port`: the kiosk page can reach a node that runs its own Mosquitto."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from edged.broker import LocalBroker

    broker = LocalBroker(tmp_path, free_port(), ws_port=free_port())
    broker.start()
    try:
        wait_port(broker.ws_port)
        ws = paho.Client(CallbackAPIVersion.VERSION2, transport="websockets", protocol=paho.MQTTv5)
        ws.connect("127.0.0.1", broker.ws_port)
        ws.loop_start()
        assert ws.publish("kiosk/k1/hello", b"hi", qos=1).wait_for_publish(10) is None
        ws.loop_stop()
    finally:
        broker.stop()
    assert "protocol websockets" in (tmp_path / "broker" / "mosquitto.conf").read_text()
