"""ROS 2 test helpers: an isolated DDS domain per test, `robot-rl launch` in a subprocess that is always
stopped, and a probe node in the test process that records topics and waits with deadlines."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_domain_counter = [0]


def ros_env(domain: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(ROS_DOMAIN_ID=str(domain), ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST", MUJOCO_GL="egl",
               PYTHONUNBUFFERED="1")
    env.pop("FASTDDS_DEFAULT_PROFILES_FILE", None)
    return env


def free_port() -> int:
    """A TCP port nobody listens on now (for a web console under test)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fresh_domain() -> int:
    """A domain id unique to this pytest process and call (0..101)."""
    _domain_counter[0] += 1
    return 1 + (os.getpid() * 7 + _domain_counter[0] * 13) % 100


@contextlib.contextmanager
def launched(args: list[str], env: dict[str, str], log: Path):
    """`robot-rl launch ...` as a subprocess; SIGINT then SIGKILL on the way out, whatever happened."""
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "robot_rl.cli", "launch", *args], env=env, cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield proc
        finally:
            stop(proc)


def stop(proc: subprocess.Popen, grace: float = 15.0) -> int:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


def node_pid(launcher: subprocess.Popen, name: str) -> int:
    """The pid of the launched node named `name` (a child of the launcher: `-r __node:=<name>`)."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (d / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == launcher.pid and f"__node:={name}".encode() in cmd:
            return int(d.name)
    raise AssertionError(f"no running node '{name}' under launcher pid {launcher.pid}")


class Probe:
    """A test-side node: subscribe to anything, record (receive time, message), call services."""

    def __init__(self, domain: int, name: str = "probe"):
        import rclpy
        from rclpy.executors import SingleThreadedExecutor

        from robot_rl.nodes.common import use_fast_transport

        use_fast_transport()
        self.rclpy = rclpy
        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=domain)
        self.node = rclpy.create_node(name, context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.msgs: dict[str, list] = defaultdict(list)
        self.subs: dict[str, object] = {}
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        while not self._stop.is_set():
            self.executor.spin_once(timeout_sec=0.05)

    def subscribe(self, topic: str, msg_type, qos, raw: bool = False) -> None:
        def cb(msg, topic=topic):
            with self.lock:
                self.msgs[topic].append((time.monotonic(), msg))
        self.subs[topic] = self.node.create_subscription(msg_type, topic, cb, qos, raw=raw)

    def unsubscribe(self, topic: str) -> None:
        self.node.destroy_subscription(self.subs.pop(topic))

    def latest(self, topic: str):
        with self.lock:
            return self.msgs[topic][-1][1] if self.msgs[topic] else None

    def count(self, topic: str) -> int:
        with self.lock:
            return len(self.msgs[topic])

    def clear(self, topic: str | None = None) -> None:
        with self.lock:
            for t in [topic] if topic else list(self.msgs):
                self.msgs[t] = []

    def wait_for(self, predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"launch exited ({proc.returncode}) while waiting for {what}:\n"
                                     f"{log.read_text()[-3000:] if log else ''}")
            time.sleep(0.02)
        tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{tail}")

    def call(self, srv_type, name: str, request, timeout: float = 15.0):
        client = self.node.create_client(srv_type, name)
        self.wait_for(client.service_is_ready, timeout, f"service {name}")
        future = client.call_async(request)
        self.wait_for(future.done, timeout, f"answer from {name}")
        return future.result()

    def diagnostic(self, node: str) -> dict:
        """The newest /diagnostics status of `node` (subscribe to /diagnostics first): message + values."""
        with self.lock:
            for _, arr in reversed(self.msgs["/diagnostics"]):
                for st in arr.status:
                    if st.name.endswith(node):
                        return {"message": st.message, **{kv.key: kv.value for kv in st.values}}
        return {}

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.node.destroy_node()
        self.rclpy.shutdown(context=self.context)
