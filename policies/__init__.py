"""Networks and samplers (pure PyTorch): diffusion teacher, consistency student, checkpoints.
Never imports rclpy, drivers, sim or nodes: a checkpoint loads anywhere PyTorch runs."""
