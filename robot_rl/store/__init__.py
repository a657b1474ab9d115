"""Episode stores on zarr v3: crash-safe writer, refreshable reader, window samplers, tools.

Imports the spec only (no ROS, no policies)."""

from robot_rl.store.format import SCHEMA_VERSION, SOURCES, StoreError
from robot_rl.store.reader import EpisodeStore
from robot_rl.store.writer import EpisodeWriter

__all__ = ["SCHEMA_VERSION", "SOURCES", "EpisodeStore", "EpisodeWriter", "StoreError"]
