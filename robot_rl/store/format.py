"""The episode store format (documented for users in datasets/README.md).

One zarr v3 group per store:

    <store>/zarr.json           root attributes: format, schema_version, spec, codecs, and the
                                commit record `commit: {n_episodes, n_steps, stream_lengths}`,
                                the only thing a reader trusts, rewritten in one atomic write.
    data/<obs key>              (capacity, *shape) per observation key of the spec, time-major
    data/action                 (capacity, A) the executed action
    data/action_policy          (capacity, A) what the policy proposed (NaN where no policy ran)
    data/timestamp              (capacity,) float64 device time of the step's observation (s)
    data/intervention, terminated, truncated   (capacity,) bool
    data/reward                 (capacity,) float32
    episodes/ends               (K,) int64, exclusive end step of each episode
    episodes/meta               (K,) JSON strings: source, success, task, robot, operator, start_time…
    streams/<key>/value|stamp   optional native-rate samples (e.g. 100 Hz state beside 30 Hz steps)
    prepared/<key>              derived policy-resolution arrays (`robot-rl data prepare`)

Writes are atomic per file (zarr's LocalStore writes a temporary file and renames it). Steps of
the episode in progress land beyond the committed length; the commit record moves last. A crash
therefore loses at most the episode in progress, and committed bytes are never rewritten with
different content.
"""

from __future__ import annotations

FORMAT = "robot_rl.episode_store"
SCHEMA_VERSION = 1
SOURCES = ("scripted", "teleop", "policy", "hil")
FLAG_KEYS = ("intervention", "terminated", "truncated")
STEP_KEYS = ("action", "action_policy", "timestamp", "reward", *FLAG_KEYS)
STATE_CHUNK = 4096  # steps per chunk for state arrays
GROW = 4096  # capacity grows in blocks of this many steps


class StoreError(ValueError):
    """Bad store or bad data for a store. One line: what, where (store, episode, key), what to do."""
