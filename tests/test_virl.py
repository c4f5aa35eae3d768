"""V-IRL environment and route loader: rail, instructions, rewards, budget, modalities, loader safety."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lit_sftrl.envs.base import REVISION_PREFIX
from lit_sftrl.envs.city import make_city
from lit_sftrl.envs.routes import (
    RestrictedUnpickler,
    RouteFolder,
    compass_word,
    load_pano_mapping,
    parse_milestone_blocks,
    wrap_degrees,
)
from lit_sftrl.envs.virl import (
    DEFAULT_REWARDS,
    FORWARD,
    INTERSECTION_TEXT,
    STOP,
    VIRLEnv,
    claims_intersection,
    normalize_action,
    relative_word,
)

INFO_KEYS = {"gt_action", "success", "correct", "feedback", "at_intersection", "attempt", "route_index", "recognized",
             "well_formed", "budget_exhausted"}


def milestone(landmarks: str, heading: int) -> str:
    return (
        "{\n"
        f'"intersection_idx": "0",\n"landmarks": "{landmarks}",\n"distance": "60 meters",\n'
        f'"human_heading": "{compass_word(heading)}",\n'
        f'"to_next_intersection_heading": "{heading} ({compass_word(heading)})",\n'
        "}"
    )


@pytest.fixture(scope="module")
def hand_routes(tmp_path_factory) -> Path:
    """A hand-written route_infos.json (text modality needs nothing else): turns across north."""
    folder = tmp_path_factory.mktemp("hand")
    route = {
        "start_place": {"relocated_geocode": [40.0, -73.0]},
        "init_heading": 350,
        "route_results": {"geocode_list": [[40.0005, -73.0], [40.0005, -73.0007], [40.001, -73.0007]]},
        "dest_place": {"name": "Cafe"},
        "milestone_info": "\n".join(
            [milestone("No landmark nearby", 20), milestone("Bank is on your right", 290),
             milestone("Cafe is on your left", 10)]
        ),
    }
    random_start = dict(route, init_heading=0)
    (folder / "route_infos.json").write_text(json.dumps([[route, random_start], 2]))
    return folder


@pytest.fixture(scope="module")
def city(tmp_path_factory) -> Path:
    return make_city(tmp_path_factory.mktemp("city") / "metro", "metro", num_routes=6, seed=3, grid_size=3,
                     pano_width=512)


def answer(action: str, observation: str = "No landmark nearby", instruction: str = "x") -> str:
    return json.dumps({"current observation": observation, "current instruction": instruction, "action": action})


def expert_actions(env: VIRLEnv, **reset) -> list[str]:
    env.reset(**reset)
    actions, done = [], False
    while not done:
        actions.append(env.gt_action())
        _, reward, terminated, truncated, info = env.step(env.expert_answer())
        assert reward == 1.0 and info["correct"]
        done = terminated or truncated
    assert info["success"] and terminated and not truncated
    return actions


# --------------------------------------------------------------------------------------------- rail


def test_rail_absolute_and_relative_across_north(hand_routes):
    # n = 3 on segments of 56-60 m: candidates at 1/3 and 2/3 kept, the one at 3/3 (the segment's end) never
    kwargs = dict(straight_line_length=3, drop_rate=0.0)
    absolute = expert_actions(VIRLEnv(str(hand_routes), **kwargs), options={"route_index": 0})
    relative = expert_actions(VIRLEnv(str(hand_routes), action_space="relative", **kwargs),
                              options={"route_index": 0})
    assert absolute == ["turn_direction(north)", FORWARD, FORWARD, "turn_direction(west)", FORWARD, FORWARD,
                        "turn_direction(north)", FORWARD, FORWARD, STOP]
    # 350 -> 20 is +30 (not -330), 20 -> 290 is -90, 290 -> 10 is +80
    assert relative == ["turn_direction(slightly right)", FORWARD, FORWARD, "turn_direction(left)", FORWARD, FORWARD,
                        "turn_direction(right)", FORWARD, FORWARD, STOP]


def test_instructions_and_text_observation(hand_routes):
    env = VIRLEnv(str(hand_routes), straight_line_length=2, drop_rate=0.0)
    obs, _ = env.reset(options={"route_index": 0})
    prompt = obs["messages"][0]["content"]
    assert "\n".join([
        "1. First, turn slightly right to face north.",
        "2. Move forward until you reach next intersection.",
        "3. Turn left to face west.",
        "4. Move forward until you reach next intersection where Bank is on your right.",
        "5. Turn right to face north.",
        "6. Move forward until you reach destination where Cafe is on your left.",
    ]) in prompt
    assert prompt.rstrip().count("O_1: No landmark nearby") == 1 and "image" not in obs
    for _ in range(2):  # turn, forward -> at the first intersection
        env.step(env.expert_answer())
    prompt = env._observation()["messages"][0]["content"]
    assert f"O_3: No landmark nearby; {INTERSECTION_TEXT}" in prompt
    assert "A_1: turn_direction(north)\nO_2: No landmark nearby\nA_2: forward()" in prompt
    assert json.loads(env.expert_answer())["current instruction"] == "Turn left to face west."


def test_relative_words_wrap():
    assert wrap_degrees(370) == 10 and wrap_degrees(-180) == 180 and wrap_degrees(190) == -170
    assert relative_word(20 - 350) == "slightly right" and relative_word(350 - 20) == "slightly left"
    assert relative_word(0) == "slightly left" and relative_word(46) == "right" and relative_word(-46) == "left"
    assert relative_word(180) == "right"


def test_drops_follow_the_seed(hand_routes):
    env = VIRLEnv(str(hand_routes), straight_line_length=5, drop_rate=0.5)
    rails = {seed: expert_actions(env, seed=seed, options={"route_index": 0}) for seed in range(6)}
    assert rails[0] == expert_actions(env, seed=0, options={"route_index": 0})
    assert len({tuple(r) for r in rails.values()}) > 1
    full = expert_actions(VIRLEnv(str(hand_routes), drop_rate=0.0), options={"route_index": 0})
    none = expert_actions(VIRLEnv(str(hand_routes), drop_rate=1.0), options={"route_index": 0})
    assert full.count(FORWARD) == 12 and none.count(FORWARD) == 0  # i/5, i = 1..4, on each of 3 segments


def test_random_init_heading_is_seeded(hand_routes):
    env = VIRLEnv(str(hand_routes), action_space="relative")
    firsts = {seed: expert_actions(env, seed=seed, options={"route_index": 1})[0] for seed in range(12)}
    assert firsts[5] == expert_actions(env, seed=5, options={"route_index": 1})[0]
    assert len(set(firsts.values())) > 1


# --------------------------------------------------------------------------------------------- rewards


def test_every_reward_case(hand_routes):
    env = VIRLEnv(str(hand_routes), straight_line_length=2, drop_rate=0.0, verify_iter=10)
    env.reset(options={"route_index": 0})
    cases = [
        ("no json here", "malformed"),
        ('{"current observation": "No landmark nearby"}', "malformed"),
        (answer("forward()"), "wrong_action"),
        (answer("jump()"), "wrong_action"),
        (answer("forward()", "You observe an intersection"), "wrong_observation"),
    ]
    for text, outcome in cases:
        _, reward, terminated, truncated, info = env.step(text)
        assert (reward, info["outcome"], info["correct"]) == (DEFAULT_REWARDS[outcome], outcome, False)
        assert info["feedback"] and not (terminated or truncated) and info["well_formed"] == (outcome != "malformed")
        assert env._observation()["messages"][-1]["content"] == REVISION_PREFIX + info["feedback"]
    assert "not an action" in env.step(answer("jump()"))[4]["feedback"]
    _, reward, *_ , info = env.step(answer(" Turn_Direction( 'North' ) "))  # normalised: right
    assert reward == 1.0 and info["correct"] and info["feedback"] is None
    env.step(env.expert_answer())  # forward -> intersection
    _, reward, *_, info = env.step(answer("forward()", "No landmark nearby"))  # missed the intersection
    assert (reward, info["outcome"], info["at_intersection"]) == (-1.5, "wrong_observation", True)
    _, reward, *_, info = env.step(answer("forward()", f"Bank is on your right; {INTERSECTION_TEXT}"))
    assert (reward, info["outcome"]) == (-1.0, "wrong_action")


def test_rewards_are_configurable(hand_routes):
    env = VIRLEnv(str(hand_routes), rewards={"malformed": -2.0, "correct": 3.0})
    env.reset(seed=0)
    assert env.step("???")[1] == -2.0
    assert env.step(env.expert_answer())[1] == 3.0
    with pytest.raises(ValueError, match="rewards key 'bonus'"):
        VIRLEnv(str(hand_routes), rewards={"bonus": 1.0})


def test_intersection_claims():
    assert claims_intersection("Bank is on your right; You observe an intersection")
    assert not claims_intersection("No landmark nearby") and not claims_intersection(None)
    assert not claims_intersection("I am not at an intersection") and not claims_intersection("no intersection")
    assert claims_intersection("No landmark nearby and you observe an intersection")
    assert normalize_action("Turn_Direction( Slightly  Left ).") == "turn_direction(slightly left)"


def test_suboptimal_answer_is_a_plausible_mistake(hand_routes):
    env = VIRLEnv(str(hand_routes), straight_line_length=2, drop_rate=0.0)
    env.reset(options={"route_index": 0})
    done = False
    while not done:
        wrong = json.loads(env.suboptimal_answer())
        assert wrong["action"] != env.gt_action() and wrong["action"] in env._valid
        _, reward, *_ = env.step(env.suboptimal_answer())
        assert reward == DEFAULT_REWARDS["wrong_action"]
        _, _, terminated, truncated, _ = env.step(env.expert_answer())  # budget 2: the second attempt is right
        done = terminated or truncated
    assert terminated


# --------------------------------------------------------------------------------------------- budget


def test_revision_then_budget_exhaustion(hand_routes):
    env = VIRLEnv(str(hand_routes), verify_iter=2)
    obs, info = env.reset(seed=1)
    assert INFO_KEYS <= set(info) and info["attempt"] == 0 and info["recognized"] is None
    obs, _, terminated, truncated, info = env.step(answer("stop()"))
    assert not (terminated or truncated) and info["attempt"] == 1 and len(obs["messages"]) == 3
    assert obs["messages"][1] == {"role": "assistant", "content": answer("stop()")}
    obs, reward, terminated, truncated, info = env.step(answer("stop()"))
    # The budget's end terminates the (failed) route; the attempt carries its verdict plus the budget penalty.
    assert terminated and not truncated and not info["success"] and info["attempt"] == 2 and reward == -2.0
    assert INFO_KEYS <= set(info) and info["budget_exhausted"] and info["well_formed"]
    with pytest.raises(RuntimeError, match="reset"):
        env.step(env.expert_answer())


def test_correct_action_gives_fresh_prompt(hand_routes):
    env = VIRLEnv(str(hand_routes), verify_iter=3)
    env.reset(seed=2)
    env.step(answer("stop()"))
    obs, _, _, _, info = env.step(env.expert_answer())
    assert info["correct"] and info["attempt"] == 2 and info["rail_index"] == 0
    assert len(obs["messages"]) == 1 and "O_2:" in obs["messages"][0]["content"]


# --------------------------------------------------------------------------------------------- generated routes


@pytest.mark.parametrize("modality", ["text", "image"])
@pytest.mark.parametrize("action_space", ["absolute", "relative"])
def test_expert_succeeds_on_generated_routes(city, modality, action_space):
    env = VIRLEnv(str(city), action_space=action_space, modality=modality, image_size=96, route_order="sequential",
                  drop_rate=0.0 if modality == "image" else 0.5)
    attempts = correct = successes = 0
    for episode in range(env.num_routes):
        obs, info = env.reset(seed=episode)
        assert info["route_index"] == episode
        done = False
        while not done:
            if modality == "image":
                assert obs["image"].shape == (96, 96, 3) and obs["image"].dtype == np.uint8
                prompt = obs["messages"][0]["content"]
                current = prompt.split("[Observations and actions]\n")[1].split("\n\n")[0].splitlines()[-1]
                assert " is " not in current  # the landmark must be read from the views
            obs, _, terminated, truncated, info = env.step(env.expert_answer())
            attempts, correct = attempts + 1, correct + info["correct"]
            done = terminated or truncated
        successes += info["success"]
    assert successes == env.num_routes and correct == attempts


def test_image_prompt_states_grid_order(city):
    env = VIRLEnv(str(city), modality="image", image_size=64)
    obs, _ = env.reset(seed=0)
    assert "top left = front view, top right = right view, bottom left = back view, bottom right = left view" in (
        obs["messages"][0]["content"]
    )


def test_route_order_and_forced_index(city):
    env = VIRLEnv(str(city), route_order="sequential")
    order = [env.reset(seed=0)[1]["route_index"] for _ in range(env.num_routes + 1)]
    assert order == [*range(env.num_routes), 0]
    assert env.reset(options={"route_index": 4})[1]["route_index"] == 4
    assert env.reset()[1]["route_index"] == 1  # forcing did not advance the walk
    with pytest.raises(ValueError, match="route_index"):
        env.reset(options={"route_index": env.num_routes})
    random_env = VIRLEnv(str(city))
    assert [random_env.reset(seed=s)[1]["route_index"] for s in range(8)] == [
        random_env.reset(seed=s)[1]["route_index"] for s in range(8)
    ]


def test_folder_is_parsed_once(city, tmp_path):
    assert VIRLEnv(str(city)).folder is VIRLEnv(str(city) + "/").folder
    copy = shutil.copytree(city, tmp_path / "copy")
    first = VIRLEnv(str(copy)).num_routes
    data = json.loads((copy / "route_infos.json").read_text())
    (copy / "route_infos.json").write_text(json.dumps([data[0][:2], 2]))  # regenerated in place
    assert (first, VIRLEnv(str(copy)).num_routes) == (6, 2)


# --------------------------------------------------------------------------------------------- arguments, loader


@pytest.mark.parametrize(
    "kwargs, name",
    [({"action_space": "cardinal"}, "action_space"), ({"modality": "video"}, "modality"),
     ({"route_order": "shuffled"}, "route_order"), ({"verify_iter": 0}, "verify_iter"),
     ({"drop_rate": 1.5}, "drop_rate"), ({"straight_line_length": -1}, "straight_line_length"),
     ({"image_size": 0}, "image_size")],
)
def test_invalid_arguments(hand_routes, kwargs, name):
    with pytest.raises(ValueError, match=name):
        VIRLEnv(str(hand_routes), **kwargs)


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        VIRLEnv(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="route_infos.json"):
        VIRLEnv(str(tmp_path))


@pytest.mark.filterwarnings("ignore::lit_sftrl.envs.virl.MissingPanoramaWarning")  # forward points: skipped
def test_missing_panorama_names_route_and_point(city, tmp_path):
    """A start, turn or destination with no panorama is an error naming the route and the point."""
    unmapped = shutil.copytree(city, tmp_path / "unmapped")
    mapping = load_pano_mapping(unmapped / "gps_pano_mapping.pkl")
    (unmapped / "gps_pano_mapping.pkl").write_bytes(pickle.dumps(dict(list(mapping.items())[:3])))
    env = VIRLEnv(str(unmapped), modality="image", image_size=32)
    with pytest.raises(LookupError, match=r"route \d+ .*rail point \d+ at .*no panorama within 20 m"):
        for seed in range(6):
            env.reset(seed=seed)
    missing = shutil.copytree(city, tmp_path / "missing")
    for jpg in (missing / "street_views").glob("*.jpg"):
        jpg.unlink()
    with pytest.raises(FileNotFoundError, match=r"route \d+ .*rail point 0 .*panorama '.+' file .*\.jpg is missing"):
        VIRLEnv(str(missing), modality="image").reset(seed=0)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_restricted_unpickler_refuses_code(tmp_path):
    path = tmp_path / "gps_pano_mapping.pkl"
    path.write_bytes(pickle.dumps({(40.0, -73.0): _Evil()}))
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load (posix|nt|os)\.system"):
        load_pano_mapping(path)
    path.write_bytes(pickle.dumps({(40.0, -73.0): "pano_a", (40.1, -73.1): "pano_b"}))
    assert load_pano_mapping(path) == {(40.0, -73.0): "pano_a", (40.1, -73.1): "pano_b"}
    assert RestrictedUnpickler.ALLOWED == {"dict", "tuple", "list", "float", "int", "str"}


def test_milestone_parsing_and_bad_routes(tmp_path):
    blocks = parse_milestone_blocks(milestone("Joe's Pizza is on your right", 177) + "\n" + milestone("x", 3))
    assert blocks[0]["landmarks"] == "Joe's Pizza is on your right"
    assert blocks[0]["to_next_intersection_heading"] == "177 (south)" and len(blocks) == 2
    (tmp_path / "route_infos.json").write_text(json.dumps([[{"start_place": {}}], 1]))
    with pytest.raises(ValueError, match="route 0"):
        RouteFolder(tmp_path)


def test_no_torch_import():
    code = "import sys, lit_sftrl.envs.virl, lit_sftrl.envs.city, lit_sftrl.envs.routes; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
