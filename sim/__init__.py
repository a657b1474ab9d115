"""MuJoCo tasks, scenes and scripted experts (import as robot_rl.sim)."""
