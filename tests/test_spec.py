"""The robot spec: validation with one clear error, JSON round trip, policy-subset hash."""

from dataclasses import replace

import numpy as np
import pytest

from robot_rl.spec import (
    ActionSpec,
    Camera,
    ObsKey,
    Rates,
    RobotSpec,
    SpecError,
    arm_state_keys,
    check_compatible,
    image_key,
    object_key,
)


def make_spec(**kw) -> RobotSpec:
    cam = Camera("front", 640, 480)
    base = dict(name="cell", observations=(*arm_state_keys(10.0), object_key("cube", 10.0), image_key(cam)),
                cameras=(cam,))
    base.update(kw)
    return RobotSpec(**base)


def test_valid_spec_round_trips_through_json():
    spec = make_spec().validate()
    back = RobotSpec.from_json(spec.to_json())
    assert back == spec
    assert back.sim_only_keys == ["state.object.cube"]
    assert back.image_keys == ["image.front"]


@pytest.mark.parametrize("bad, words", [
    (dict(observations=(ObsKey("state.object.cube", (7,)),)), "sim_only"),
    (dict(observations=(ObsKey("image.side", (84, 84, 3), "uint8"),)), "no camera 'side'"),
    (dict(observations=(ObsKey("image.front", (84, 84), "uint8"),)), "uint8 HxWx3"),
    (dict(observations=(ObsKey("State.Joint", (7,)),)), "bad key name"),
    (dict(observations=(ObsKey("state.x", (7,)), ObsKey("state.x", (7,)))), "duplicate"),
    (dict(observations=(ObsKey("state.x", (7,), dtype="float16"),)), "dtype"),
    (dict(action=ActionSpec(mask=(False,) * 7)), "mask uses no dimension"),
    (dict(action=ActionSpec(scale=(1.0,) * 6)), "scale has 6 entries"),
    (dict(rates=Rates(policy_hz=10, command_hz=200)), "<= 100 Hz"),
])
def test_invalid_specs_give_one_clear_error(bad, words):
    with pytest.raises(SpecError) as e:
        make_spec(**bad).validate()
    msg = str(e.value)
    assert words in msg and "\n" not in msg and "spec 'cell'" in msg


def test_malformed_json_is_one_error():
    with pytest.raises(SpecError, match="not valid JSON"):
        RobotSpec.from_json("{nope")
    with pytest.raises(SpecError, match="malformed"):
        RobotSpec.from_json('{"name": "x"}')


def test_policy_hash_depends_only_on_the_policy_subset():
    spec = make_spec()
    keys = ["state.ee_pose", "state.object.cube"]
    h = spec.policy_hash(keys)
    assert h == spec.policy_hash(reversed(keys))
    # an unrelated change (camera serial, a key the policy does not read) keeps the hash
    other = replace(spec, cameras=(replace(spec.cameras[0], serial="123"),))
    assert other.policy_hash(keys) == h
    # a change the policy sees (action scale, key shape) changes it
    assert replace(spec, action=ActionSpec(scale=(0.1,) * 3 + (0.25,) * 3 + (1.0,))).policy_hash(keys) != h
    assert spec.policy_hash(["state.ee_pose"]) != h
    # a rate written as 10 (YAML, Hydra) is the same spec as 10.0
    as_int = replace(spec, rates=replace(spec.rates, policy_hz=int(spec.rates.policy_hz)))
    assert as_int.policy_hash(keys) == h


def test_compatibility_refuses_missing_and_sim_only_keys():
    spec = make_spec()
    subset = spec.policy_subset(["state.ee_pose", "state.object.cube"])
    check_compatible(subset, spec, hardware=False)
    with pytest.raises(SpecError, match="sim-only key 'state.object.cube'"):
        check_compatible(subset, spec, hardware=True)
    hw = spec.without_sim_only()
    with pytest.raises(SpecError, match="no such key"):
        check_compatible(subset, hw, hardware=True)


def test_check_observation_names_the_key():
    spec = make_spec()
    obs = {k.name: np.zeros(k.shape, k.dtype) for k in spec.observations}
    spec.check_observation(obs)
    obs["state.ee_pose"] = np.zeros(6, np.float32)
    with pytest.raises(SpecError, match="'state.ee_pose': shape"):
        spec.check_observation(obs, where="store x episode 3")
