"""The web operator console in a real browser (Debian's headless Chromium driven by Selenium) on
the whole HIL graph (`launch/sim_hil`, teleop:=web): the page shows live camera frames, the takeover
button gives the human control, dragging the virtual joystick moves the arm, and the ROS graph sees
the intervention. Plus the console's access rules: loopback by default, a token anywhere else."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

pytest.importorskip("rclpy", reason="ROS 2 wheels are part of `make test` (extra 'ros')")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is part of `make test` (extra 'dev')")

from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from geometry_msgs.msg import PoseStamped  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402
from std_msgs.msg import Header  # noqa: E402
from std_srvs.srv import Trigger  # noqa: E402

from robot_rl.nodes.common import msg_to_pose, qos  # noqa: E402
from tests.helpers.ros import ROOT, Probe, free_port, fresh_domain, launched, ros_env  # noqa: E402
from tests.test_hil import CELL, still_checkpoint, who  # noqa: E402

CHROMEDRIVER = "/usr/bin/chromedriver"


@pytest.fixture
def browser(tmp_path):
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1280,900",
                 f"--user-data-dir={tmp_path / 'chromium'}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def wait(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (out := pred()):
            return out
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def test_browser_sees_the_cameras_takes_over_and_drives_the_arm(tmp_path, browser):
    still_checkpoint(tmp_path / "ckpt")
    port, domain, log = free_port(), fresh_domain(), tmp_path / "launch.log"
    args = ["sim_hil", f"ckpt:={tmp_path / 'ckpt'}", "task:=reach", f"hardware_config:={CELL}", "teleop:=web",
            f"console_port:={port}", f"store:={tmp_path / 'hil.zarr'}"]
    with launched(args, ros_env(domain), log) as proc:
        probe = Probe(domain)
        try:
            probe.subscribe("/arm/ee_pose", PoseStamped, qos("state"))
            probe.subscribe("/intervention", Header, qos("state"))
            probe.subscribe("/front/image_policy", Image, qos("image"))
            probe.subscribe("/diagnostics", DiagnosticArray, 50)
            probe.wait_for(lambda: probe.count("/front/image_policy") > 10, 120, "the front camera", proc, log)
            assert probe.call(Trigger, "/episode/reset", Trigger.Request(), timeout=90).success
            assert probe.call(Trigger, "/episode/start", Trigger.Request()).success
            probe.wait_for(lambda: who(probe) == "policy" and probe.latest("/arm/ee_pose") is not None, 60,
                           "the policy in control and the arm's pose", proc, log)

            browser.get(f"http://127.0.0.1:{port}/")
            live = "const i = document.getElementById('cam-front'); return i && i.complete ? i.naturalWidth : 0;"
            assert wait(lambda: browser.execute_script(live), 30, "a camera frame in the page") == 160
            first = browser.find_element(By.ID, "cam-front").get_attribute("src")
            wait(lambda: browser.find_element(By.ID, "cam-front").get_attribute("src") != first, 10, "a newer frame")
            wait(lambda: "running" in browser.find_element(By.ID, "episode").text, 10, "the episode state in the page")

            p0 = msg_to_pose(probe.latest("/arm/ee_pose").pose)[:3]
            browser.find_element(By.ID, "takeover").click()
            probe.wait_for(lambda: who(probe) == "human", 10, "the takeover seen by the ROS graph", proc, log)
            wait(lambda: browser.find_element(By.ID, "takeover").text == "HAND BACK", 5, "the button to say HAND BACK")
            pad = browser.find_element(By.ID, "pad")
            ActionChains(browser).click_and_hold(pad).move_by_offset(0, -110).pause(2.0).release().perform()  # up: +x
            time.sleep(1.5)  # and a fresh round of /diagnostics (1 Hz) to explain a failure
            p1 = msg_to_pose(probe.latest("/arm/ee_pose").pose)[:3]
            why = {n: probe.diagnostic(n) for n in ("web_console", "intervention_mux", "safety_filter", "arm_node")}
            why["page"] = browser.find_element(By.ID, "log").text
            assert 0.02 < p1[0] - p0[0] < 0.25 and abs(p1[1] - p0[1]) < 0.01, (p0, p1, why, log.read_text()[-2000:])
            assert who(probe) == "human"

            browser.find_element(By.ID, "takeover").click()
            probe.wait_for(lambda: who(probe) == "policy", 10, "control handed back", proc, log)
            time.sleep(1.0)
            p2 = msg_to_pose(probe.latest("/arm/ee_pose").pose)[:3]
            assert np.linalg.norm(p2 - p1) < 0.005, "the arm moved after the hand-back"
            rate = float(browser.find_element(By.ID, "rate").text.rstrip(" %"))
            assert 0 < rate < 100  # the page shows this episode's intervention rate
        finally:
            probe.close()


def _console(args: list[str], domain: int):
    return subprocess.Popen([sys.executable, "-m", "robot_rl.nodes.web_console", "--ros-args", *args],
                            env=ros_env(domain), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_console_binds_loopback_and_needs_a_token_anywhere_else():
    domain = fresh_domain()
    exposed = _console(["-p", "host:=0.0.0.0"], domain)
    _, err = exposed.communicate(timeout=60)
    assert exposed.returncode == 2 and "token" in err and len(err.strip().splitlines()) == 1, err

    port = free_port()
    proc = _console(["-p", f"port:={port}", "-p", "token:=s3cret"], domain)
    try:
        url = f"http://127.0.0.1:{port}"

        def get(path: str, headers: dict | None = None) -> tuple[int, bytes]:
            try:
                with urllib.request.urlopen(urllib.request.Request(url + path, headers=headers or {}), timeout=5) as r:
                    return r.status, r.read()
            except urllib.error.HTTPError as e:
                return e.code, e.read()
            except OSError:
                return 0, b""

        wait(lambda: get("/state")[0] != 0, 60, "the console to listen")
        assert get("/state")[0] == 403 and get("/?token=wrong")[0] == 403
        status, body = get("/state?token=s3cret")
        assert status == 200 and json.loads(body)["teleop"] is False  # keyboard is this cell's device
        assert get("/state", {"X-Token": "s3cret"})[0] == 200
        req = urllib.request.Request(f"{url}/teleop?token=s3cret", data=b"[1, 2", method="POST")
        with pytest.raises(urllib.error.HTTPError) as bad:
            urllib.request.urlopen(req, timeout=5)
        assert bad.value.code == 400  # malformed input: one clear error, the console keeps running
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(15)
