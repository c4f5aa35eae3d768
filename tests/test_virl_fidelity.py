"""V-IRL as the original code ran it: its rail, its panorama heading convention, skipped points without a
panorama, the paper's per-step count, and replaceable prompt templates."""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
from gymnasium.utils import seeding
from PIL import Image

from lit_sftrl.envs.rail import FORWARD, STOP
from lit_sftrl.envs.routes import RouteFolder, compass_word, haversine_m, offset_geocode
from lit_sftrl.envs.virl import MissingPanoramaWarning, VIRLEnv

START = (40.0, -73.0)
# Segments: 30 m north, 4 m east (too short for forward points), 100 m east.
TURNS = [offset_geocode(START, 0.0, 30.0), offset_geocode(START, 4.0, 30.0), offset_geocode(START, 104.0, 30.0)]
HEADINGS = [0, 90, 90]
MARKER_RED = (230, 20, 20)
MILESTONE_PANORAMAS = [(START, "p0")] + [(g, f"p{i + 1}") for i, g in enumerate(TURNS)]


def _milestone(heading: int, landmarks: str = "No landmark nearby") -> str:
    word = compass_word(heading)
    return (f'{{\n"landmarks": "{landmarks}",\n"distance": "30 meters",\n"human_heading": "{word}",\n'
            f'"to_next_intersection_heading": "{heading} ({word})",\n}}')


def _route_folder(folder: Path, init_heading: int = 240, panoramas: list | None = None) -> Path:
    """A hand-made route folder; ``panoramas`` maps geocodes to panorama ids (a gray panorama each, with a red
    marker at column 540 of 720 and rotation 30)."""
    route = {"start_place": {"relocated_geocode": list(START)}, "init_heading": init_heading,
             "route_results": {"geocode_list": [list(g) for g in TURNS], "landmark_list": []},
             "dest_place": {"name": "Cafe"},
             "milestone_info": "\n".join(_milestone(h) for h in HEADINGS)}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "route_infos.json").write_text(json.dumps([[route], 1]))
    if panoramas is not None:
        (folder / "street_views").mkdir(exist_ok=True)
        pano = np.full((360, 720, 3), 128, np.uint8)
        pano[:, 536:545] = MARKER_RED  # columns 536..544: centred on 540.5, i.e. compass 540.5/2 - 30 = 240.25
        for geocode, pano_id in panoramas:
            Image.fromarray(pano).save(folder / "street_views" / f"{pano_id}.jpg", quality=95)
            (folder / "street_views" / f"{pano_id}.metadata.json").write_text(json.dumps({"rotation": 30.0}))
        (folder / "gps_pano_mapping.pkl").write_bytes(pickle.dumps({tuple(g): i for g, i in panoramas}))
    return folder


def _original_rail(n: int, drop_rate: float, seed: int) -> list[tuple[float, float]]:
    """The forward() points of the original code (relocation on): i/n along each segment longer than 5 m, each
    dropped with probability drop_rate (one draw per candidate), kept if more than 8 m from both ends."""
    rng, _ = seeding.np_random(seed)
    points, previous = [], START
    for target in TURNS:
        if haversine_m(*previous, *target) > 5:
            for i in range(1, n + 1):
                if rng.random() < drop_rate:
                    continue
                point = (
                    previous[0] * (1 - i / n) + target[0] * (i / n), previous[1] * (1 - i / n) + target[1] * (i / n)
                )
                if haversine_m(*previous, *point) > 8 and haversine_m(*point, *target) > 8:
                    points.append(point)
        previous = target
    return points


def _walk(env: VIRLEnv, **reset) -> list:
    env.reset(**reset)
    rail = [point.geocode for point in env._rail if point.absolute_action == FORWARD]
    return rail


@pytest.mark.parametrize(("drop_rate", "seed"), [(0.0, 0), (0.5, 3), (0.5, 11)])
def test_a_hand_made_route_has_the_original_rail(tmp_path, drop_rate, seed):
    env = VIRLEnv(str(_route_folder(tmp_path / "r")), drop_rate=drop_rate)
    forward = _walk(env, seed=seed, options={"route_index": 0})
    expected = _original_rail(5, drop_rate, seed)
    assert np.allclose(forward, expected, atol=1e-9, rtol=0) and len(forward) == len(expected)
    if drop_rate == 0.0:  # 30 m: 2/5 and 3/5 only; 4 m: none; 100 m: 1/5 .. 4/5
        assert len(forward) == 6
        actions = [p.absolute_action for p in env._rail]
        assert actions == ["turn_direction(north)", FORWARD, FORWARD, "turn_direction(east)", "turn_direction(east)",
                           FORWARD, FORWARD, FORWARD, FORWARD, STOP]


def test_a_marker_shows_in_the_view_facing_its_compass_heading(tmp_path):
    """Compass h lies at column (h + rotation) / 360 x width: the marker at column 540 of 720 with rotation 30
    faces 240 degrees, so it is centred in a view facing 240 and absent from views facing elsewhere."""
    folder = RouteFolder(_route_folder(tmp_path / "p", panoramas=MILESTONE_PANORAMAS))

    def red(view: np.ndarray) -> np.ndarray:
        return (view[..., 0] > 180) & (view[..., 1] < 80) & (view[..., 2] < 80)

    views = folder.views(START, [240.0, 330.0, 60.0, 150.0], 64, "test")
    columns = np.nonzero(red(views[0]).any(axis=0))[0]
    assert columns.size and abs(columns.mean() - 31.5) < 1.5  # centred
    assert not any(red(view).any() for view in views[1:])
    # The env's 2x2 grid at the start faces the initial heading (240): the marker is in the front (top-left) tile.
    env = VIRLEnv(str(tmp_path / "p"), modality="image", image_size=128, drop_rate=1.0)
    grid = env.reset(seed=0)[0]["image"]
    tiles = [grid[r:r + 64, c:c + 64] for r in (0, 64) for c in (0, 64)]
    assert red(tiles[0]).sum() > 50 and not any(red(tile).any() for tile in tiles[1:])


def test_forward_points_without_a_panorama_are_skipped_with_a_counted_warning(tmp_path):
    """Panoramas at the start, the turns and the destination only: the forward() points 40 m and 60 m along the
    100 m segment are more than 20 m from all of them and are left off; the others snap to a milestone's."""
    folder = _route_folder(tmp_path / "gaps", panoramas=MILESTONE_PANORAMAS)
    for modality in ("text", "image"):
        env = VIRLEnv(str(folder), modality=modality, drop_rate=0.0, image_size=64)
        with pytest.warns(MissingPanoramaWarning, match=r"route 0 .*2 forward\(\) point\(s\) with no panorama"):
            _, info = env.reset(seed=0)
        assert info["skipped_rail_points"] == 2 and env.skipped_rail_points == 2
        assert [p.absolute_action for p in env._rail] == [
            "turn_direction(north)", FORWARD, FORWARD, "turn_direction(east)", "turn_direction(east)", FORWARD, FORWARD,
            STOP]
        with pytest.warns(MissingPanoramaWarning):
            env.reset(seed=1)
        assert env.skipped_rail_points == 4
        done = False
        while not done:  # the shortened rail is still walked to the end
            _, _, done, _, info = env.step(env.expert_answer())
        assert info["success"]
    with warnings.catch_warnings():  # a folder without a mapping (text only) keeps every point, silently
        warnings.simplefilter("error")
        assert len(_walk(VIRLEnv(str(_route_folder(tmp_path / "plain")), drop_rate=0.0), seed=0)) == 6


def _answer(action: str) -> str:
    return json.dumps({"current observation": "No landmark nearby", "current instruction": "x", "action": action})


def test_both_per_step_counts_on_a_scripted_failed_route(tmp_path):
    """Ours: correct / attempts. The paper's: the call past a point's budget is one more wrong step."""
    env = VIRLEnv(str(_route_folder(tmp_path / "s")), drop_rate=0.0, verify_iter=2)
    env.reset(seed=0)
    script = [env.expert_answer, lambda: _answer("stop()"), env.expert_answer, lambda: _answer("stop()"),
              lambda: _answer("turn_direction(west)")]
    infos, rewards, ends = [], [], []
    for make in script:
        _, reward, terminated, truncated, info = env.step(make())
        infos.append(info), rewards.append(reward), ends.append((terminated, truncated))
    attempts, correct = len(infos), sum(info["correct"] for info in infos)
    exceeded = sum(info["budget_exhausted"] for info in infos)
    assert (attempts, correct, exceeded) == (5, 2, 1) and not infos[-1]["success"]
    assert correct / attempts == 0.4 and correct / (attempts + exceeded) == pytest.approx(1 / 3)
    assert ends == [(False, False)] * 4 + [(True, False)] and rewards[-1] == -2.0
    assert all(info["well_formed"] and info["recognized"] is None for info in infos)


ORIGINAL_L = (
    "[Task Description]\nYou are an expert in navigation.\n\n[Instruction]\n{instruction}\n\n[Action space]\n"
    "{action_space}\n\n[Observations and actions sequence]\n{obs_act_seq}\n\n[Output]\n{{\n  \"current observation\": "
    "latest observation from the observation sequence,\n  \"action\": the action to be taken,\n}}"
)


def test_a_template_override_changes_the_prompt_and_the_env_still_judges(tmp_path):
    env = VIRLEnv(str(_route_folder(tmp_path / "t")), drop_rate=0.0,
                  templates={"prompt_text": ORIGINAL_L, "action_space": "{choices}, forward(), stop()",
                             "feedback_wrong_action": "wrong: {action}"})
    prompt = env.reset(seed=0)[0]["messages"][0]["content"]
    assert prompt.startswith("[Task Description]\nYou are an expert in navigation.\n\n[Instruction]\n1. First, turn ")
    assert (
        "[Action space]\nnorth, northeast, east, southeast, south, southwest, west, northwest, forward(), stop()"
        in prompt
    )
    assert "[Observations and actions sequence]\nO_1: No landmark nearby\n\n[Output]\n{\n" in prompt
    assert env.step(_answer("stop()"))[4]["feedback"] == "wrong: 'stop()'"
    # The original answer layout (trailing commas, a leading newline) is read and judged.
    original = (
        '\n{\n  "current observation": "No landmark nearby",\n  "current instruction": "x",\n  "action": "%s",\n}'
    )
    _, reward, _, _, info = env.step(original % env.gt_action())
    assert reward == 1.0 and info["correct"] and info["well_formed"]
    with pytest.raises(ValueError, match="templates key 'prompt'"):
        VIRLEnv(str(tmp_path / "t"), templates={"prompt": "{history}"})
    with pytest.raises(ValueError, match=r"unknown field\(s\) cards"):
        VIRLEnv(str(tmp_path / "t"), templates={"prompt_image": "{cards}"})
