"""Hardware configs, shipped as package data so nodes accept `hardware_config:=<name>` (see README.md)."""
