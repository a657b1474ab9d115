"""ROS 2 nodes: thin shells mapping topics, parameters and services onto the plain classes in
`robot_rl.drivers` and `robot_rl.sim`. Each module has `main()`; `robot-rl launch` and colcon find
them through the `robot_rl.nodes` entry points."""
