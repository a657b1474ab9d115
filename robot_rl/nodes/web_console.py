"""`web_console`: the operator console in a browser (a tablet works). Served on 127.0.0.1 by default;
bound anywhere else it requires a token (`?token=` once, then a cookie). Stdlib HTTP server, no
front-end build: one page with

- live camera views (`/camera/<name>.mjpg`, MJPEG from `<camera>/image_raw`, JPEG-encoded here),
- robot state, episode, safety state, policy version, intervention rate, recorder statistics
  (`/state`, JSON, polled by the page),
- a big takeover button and a virtual joystick (x/y on the pad, z on a slider, gripper toggle): with
  `teleop.device` web the console is the teleop device — it publishes `teleop/twist` and `teleop/state` (like
  `teleop_node`) at `teleop.rate_hz`; browser input older than `STALE_S` counts as released,
- reset / start / stop (success, failure) / abort / discard, calling the episode manager's and the
  recorder's services.
"""

from __future__ import annotations

import hmac
import json
import threading
import time
from http import cookies
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from urllib.parse import parse_qs, urlparse

import numpy as np

from robot_rl.drivers.teleop import Engagement
from robot_rl.hardware import TeleopSection, section_from_params
from robot_rl.nodes.common import Diagnostics, TeleopOutput, declare, json_state, msg_to_pose, qos, run_node

STALE_S = 0.3  # browser input older than this is a released joystick
MJPEG_HZ = 10.0
LOOPBACK = ("127.0.0.1", "localhost", "::1")
SERVICES = {"reset": "episode/reset", "start": "episode/start", "abort": "episode/abort",
            "discard": "recorder/discard", "success": "episode/stop", "failure": "episode/stop"}


def build(cfg, _rt_note, stop):
    import cv2
    from geometry_msgs.msg import PoseStamped
    from rclpy.node import Node
    from sensor_msgs.msg import Image
    from std_msgs.msg import Header, String
    from std_srvs.srv import SetBool, Trigger

    node = Node("web_console")
    p = declare(node, {"hardware_config": cfg.source, "host": "127.0.0.1", "port": 8080, "token": "",
                       **cfg.ros_params("web_console")})
    if p["host"] not in LOOPBACK and not p["token"]:
        raise ValueError(f"web_console: bound to {p['host']} the console needs a token: -p token:=<secret> "
                         "(operators open http://<host>:<port>/?token=<secret>)")
    t = section_from_params(TeleopSection, p, "teleop")
    mapping, engagement = t.web, Engagement(t.engage, t.release_after_s)
    lock = threading.Lock()
    frames: dict[str, tuple[float, bytes]] = {}  # camera -> (receive time, JPEG)
    raw: dict[str, Image] = {}  # the newest frame per camera, and the one last encoded
    encoded: dict[str, Image] = {}
    view: dict = {"episode": {}, "safety": {}, "recorder": {}, "policy": {}, "ee": None, "human": False,
                  "steps": 0, "human_steps": 0}
    web = {"axes": np.zeros(6), "t": 0.0, "engage": False, "gripper": None}
    out = TeleopOutput(node) if t.device == "web" else None  # the console is the teleop device
    diag = Diagnostics(node)
    counts = {"requests": 0, "refused": 0, "teleop_posts": 0, "frames_served": 0}

    def latched(topic: str, key: str) -> None:
        def cb(m) -> None:
            if (value := json_state(m)) is None:
                return
            with lock:
                if key == "episode" and value.get("episode") != view["episode"].get("episode"):
                    view["steps"] = view["human_steps"] = 0  # the intervention rate is per episode
                view[key] = value
        node.create_subscription(String, topic, cb, qos("latched"))

    for topic, key in (("episode/state", "episode"), ("safety/state", "safety"), ("recorder/status", "recorder"),
                       ("policy/info", "policy")):
        latched(topic, key)

    def on_flag(m: Header) -> None:
        with lock:
            view["human"] = m.frame_id == "human"
            if view["episode"].get("state") == "running":
                view["steps"] += 1
                view["human_steps"] += int(view["human"])

    node.create_subscription(Header, "intervention", on_flag, qos("state"))
    node.create_subscription(PoseStamped, "arm/ee_pose", lambda m: view.update(ee=msg_to_pose(m.pose).round(4).tolist()),
                             qos("state"))
    for cam in cfg.cameras:
        node.create_subscription(Image, f"{cam.name}/image_raw", lambda m, c=cam.name: raw.__setitem__(c, m),
                                 qos("image"))
    clients = {"trigger": {}, "stop": node.create_client(SetBool, "episode/stop")}

    def call(action: str) -> tuple[bool, str]:
        """An episode or recorder service; waits for the answer (HTTP threads, not the executor)."""
        if action in ("success", "failure"):
            client, req = clients["stop"], SetBool.Request(data=action == "success")
        else:
            name = SERVICES[action]
            if name not in clients["trigger"]:
                clients["trigger"][name] = node.create_client(Trigger, name)
            client, req = clients["trigger"][name], Trigger.Request()
        if not client.wait_for_service(timeout_sec=2.0):
            return False, f"{client.srv_name} is not available"
        fut = client.call_async(req)
        deadline = time.monotonic() + 15.0
        while not fut.done() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not fut.done():
            return False, f"{client.srv_name} did not answer within 15 s"
        return fut.result().success, fut.result().message

    def encode_frames() -> None:
        """JPEG-encode the newest frame of each camera at MJPEG_HZ (only what the page shows)."""
        for name, m in list(raw.items()):
            if m is encoded.get(name):
                continue  # no new frame since the last encode
            encoded[name] = m
            img = np.frombuffer(m.data, np.uint8).reshape(m.height, m.width, 3)
            ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 80])
            if ok:
                with lock:
                    frames[name] = (time.monotonic(), jpg.tobytes())

    def state_json() -> dict:
        with lock:
            rate = view["human_steps"] / view["steps"] if view["steps"] else 0.0
            return {"episode": view["episode"], "safety": view["safety"], "recorder": view["recorder"],
                    "policy": {k: view["policy"].get(k) for k in ("version", "ckpt", "kind", "sampler", "device")},
                    "ee_pose": view["ee"], "human": view["human"], "intervention_rate": rate,
                    "engaged": engagement.engaged, "cameras": sorted(frames), "teleop": out is not None}

    page = (resources.files("robot_rl.nodes") / "web_console.html").read_text()

    class Handler(BaseHTTPRequestHandler):
        server_version = "robot_rl"

        def log_message(self, *_args) -> None:  # requests are counted, not printed
            return

        def _authorised(self, query: dict) -> bool:
            if not p["token"]:
                return True
            given = query.get("token", [""])[0]
            if not given:
                jar = cookies.SimpleCookie(self.headers.get("Cookie", ""))
                given = jar["robot_rl_token"].value if "robot_rl_token" in jar else self.headers.get("X-Token", "")
            return hmac.compare_digest(given.encode(), p["token"].encode())

        def _send(self, code: int, body: bytes, ctype: str = "application/json", extra: dict | None = None) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def _json(self, code: int, obj) -> None:
            self._send(code, json.dumps(obj).encode())

        def _gate(self) -> tuple[str, dict] | None:
            url = urlparse(self.path)
            query = parse_qs(url.query)
            counts["requests"] += 1
            if not self._authorised(query):
                counts["refused"] += 1
                self._json(403, {"error": "a token is required: open /?token=<secret>"})
                return None
            return url.path, query

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            gated = self._gate()
            if gated is None:
                return
            path, query = gated
            if path == "/":
                extra = {}
                if p["token"] and "token" in query:
                    extra["Set-Cookie"] = f"robot_rl_token={query['token'][0]}; HttpOnly; SameSite=Strict; Path=/"
                self._send(200, page.encode(), "text/html; charset=utf-8", extra)
            elif path == "/state":
                self._json(200, state_json())
            elif path.startswith("/camera/") and path.endswith(".jpg"):
                with lock:
                    hit = frames.get(path[len("/camera/"):-4])
                if hit is None:
                    self._json(404, {"error": f"no frame from camera '{path[8:-4]}' yet"})
                else:
                    counts["frames_served"] += 1
                    self._send(200, hit[1], "image/jpeg")
            elif path.startswith("/camera/") and path.endswith(".mjpg"):
                self._mjpeg(path[len("/camera/"):-5])
            else:
                self._json(404, {"error": f"no page {path}"})

        def _mjpeg(self, name: str) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            last = 0.0
            try:
                while not stop.is_set():
                    with lock:
                        hit = frames.get(name)
                    if hit is not None and hit[0] != last:
                        last = hit[0]
                        self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: " +
                                         str(len(hit[1])).encode() + b"\r\n\r\n" + hit[1] + b"\r\n")
                        counts["frames_served"] += 1
                    time.sleep(1.0 / MJPEG_HZ)
            except (BrokenPipeError, ConnectionResetError):
                return  # the page went away

        def do_POST(self) -> None:  # noqa: N802
            gated = self._gate()
            if gated is None:
                return
            path, _ = gated
            try:
                length = min(int(self.headers.get("Content-Length", "0")), 4096)
                body = json.loads(self.rfile.read(length) or b"{}")
                if not isinstance(body, dict):
                    raise ValueError("the body must be a JSON object")
            except ValueError as e:
                self._json(400, {"error": f"bad request body ({e})"})
                return
            if path == "/teleop":
                if out is None:
                    self._json(409, {"error": f"the teleop device is the {t.device}, not this console "
                                              "(launch with teleop:=web)"})
                    return
                try:
                    axes = np.clip(np.asarray(body.get("axes", [0.0] * 6), dtype=np.float64).reshape(6), -1.0, 1.0)
                    gripper = body.get("gripper")
                    gripper = None if gripper is None else float(np.clip(float(gripper), -1.0, 1.0))
                except (ValueError, TypeError) as e:
                    self._json(400, {"error": f"teleop: axes must be 6 numbers, gripper a number or null ({e})"})
                    return
                with lock:
                    web.update(axes=np.nan_to_num(axes), t=time.monotonic(),
                               engage=web["engage"] or bool(body.get("takeover")),
                               gripper=gripper if gripper is not None else web["gripper"])
                counts["teleop_posts"] += 1
                self._json(200, {"engaged": engagement.engaged})
            elif path.startswith("/action/") and path[len("/action/"):] in SERVICES:
                ok, message = call(path[len("/action/"):])
                self._json(200 if ok else 409, {"success": ok, "message": message})
            else:
                self._json(404, {"error": f"no action {path}"})

    server = ThreadingHTTPServer((p["host"], int(p["port"])), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://{p['host']}:{server.server_address[1]}/"
    node.get_logger().info(f"web console on {url}" + ("?token=<token>" if p["token"] else ""))
    print(f"web console: {url}", flush=True)

    def close() -> None:
        server.shutdown()
        server.server_close()

    node.close = close

    def loop() -> None:
        period, next_frame = 1.0 / t.rate_hz, 0.0
        next_t = time.monotonic()
        while not stop.is_set():
            next_t += period
            time.sleep(max(0.0, next_t - time.monotonic()))
            now = time.monotonic()
            if now >= next_frame:
                next_frame = now + 1.0 / MJPEG_HZ
                encode_frames()
            if out is not None:
                with lock:
                    fresh = now - web["t"] <= STALE_S
                    axes = web["axes"] if fresh else np.zeros(6)
                    press, web["engage"] = web["engage"], False
                    gripper, web["gripper"] = web["gripper"], None
                engaged = engagement.update(now, fresh and mapping.moving(axes), press)
                out.publish(mapping.shape(axes), gripper, engaged)
            diag.maybe_publish({"url": url, **counts, "engaged": engagement.engaged})

    return node, loop


def main() -> int:
    return run_node(build)


if __name__ == "__main__":
    raise SystemExit(main())
