"""A subscriber restricted to UDPv4 (as on another machine: no shared memory with the publishers).
Prints one JSON line with what arrived: python udp_subscriber.py <seconds> <topic>..."""

import json
import sys
import time

import rclpy
from sensor_msgs.msg import Image, JointState

from robot_rl.nodes.common import qos

rclpy.init()
node = rclpy.create_node("udp_probe")
got: dict[str, list] = {}


def record(topic: str, m) -> None:
    got.setdefault(topic, []).append([m.height, m.width, len(m.data)] if isinstance(m, Image) else len(m.position))


for topic in sys.argv[2:]:
    kind = JointState if topic == "/joint_states" else Image
    node.create_subscription(kind, topic, lambda m, t=topic: record(t, m), qos("image" if kind is Image else "state"))
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    rclpy.spin_once(node, timeout_sec=0.1)
print(json.dumps({t: {"count": len(v), "last": v[-1]} for t, v in got.items()}))
