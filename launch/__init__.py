"""Launch files, shipped as package data so `robot-rl launch <name>` finds them (see README.md)."""
