"""`sim_world`: the one process owning the MuJoCo cell. Publishes /clock and its diagnostics (real-time
factor, refused targets, watchdog holds, frames rendered per camera, link datagrams dropped on a full
consumer queue — never in lock-step); the camera, F/T, arm and episode nodes reach it over the sim link."""

from __future__ import annotations

from robot_rl.nodes.common import Diagnostics, declare, pose_to_msg, qos, run_node, sec_to_stamp, sim_link_dir


def build(cfg, _rt_note, stop):
    from geometry_msgs.msg import PoseStamped
    from rclpy.node import Node
    from rosgraph_msgs.msg import Clock

    from robot_rl.sim.world import SimCamera, SimWorld

    node = Node("sim_world")
    p = declare(node, {"hardware_config": cfg.source, **cfg.ros_params("sim_world")})
    cams = tuple(SimCamera(c.name, c.width, c.height, c.rate_hz) for c in cfg.cameras if c.backend == "mujoco")
    a = cfg.arm
    world = SimWorld(
        task=p["sim.task"], link_dir=sim_link_dir(node, p["sim.link"]), mode=p["sim.mode"], cameras=cams,
        command_hz=p["rates.command_hz"], target_period=1.0 / p["rates.policy_hz"], limits=cfg.safety_limits(),
        seed=p["sim.seed"], render_geometry=p["sim.render_geometry"],
        task_setup={"controller_hz": cfg.rates.controller_hz, "gains": {
            "translational_stiffness": a.translational_stiffness, "rotational_stiffness": a.rotational_stiffness,
            "damping_ratio": a.damping_ratio, "max_pos_error": a.max_pos_error, "max_rot_error": a.max_rot_error}},
    )
    clock_pub = node.create_publisher(Clock, "/clock", qos("clock"))
    object_pubs = {name: node.create_publisher(PoseStamped, f"sim/object/{name}", qos("state"))
                   for name in world.env.objects}  # sim-only observations (state.object.<name>)
    pose_msg = PoseStamped()
    pose_msg.header.frame_id = "base"
    diag = Diagnostics(node)
    clock = Clock()
    node.close = world.close
    node.get_logger().info(f"sim_world: task {p['sim.task']}, {p['sim.mode']} mode, link {world.link.dir}")

    def on_tick(w: SimWorld) -> None:
        sec_to_stamp(w.t, clock.clock)
        clock_pub.publish(clock)
        pose_msg.header.stamp = clock.clock
        for name, pose in w.env.object_poses().items():
            pose_to_msg(pose, pose_msg.pose)
            object_pubs[name].publish(pose_msg)
        diag.maybe_publish({"sim_time": w.t, "real_time_factor": w.rtf, "episode": w.episode,
                            "refused_targets": w.targets.refused, "watchdog_holds": w.targets.stale_holds, "holding": w.holding,
                            "mode": w.mode, "link_dropped": w.link.ep.dropped,
                            **{f"frames_rendered.{c}": n for c, n in w.frames_rendered.items()}})

    world.on_state = on_tick  # after every tick, reset and lock-step heartbeat
    return node, lambda: world.run(stop.is_set)


def main() -> int:
    return run_node(build)


if __name__ == "__main__":
    raise SystemExit(main())
