import json

import pytest
from PIL import Image

from lit_sftrl.llava_data import read_llava_json


def test_reads_conversations_and_images_relative_to_the_folder(tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    Image.new("RGB", (8, 6), (255, 0, 0)).save(images / "a.png")
    entries = [
        {
            "image": "a.png",
            "conversations": [{"from": "human", "value": "<image>\nWhat cards?"}, {"from": "gpt", "value": "{}"}],
        },
        {"conversations": [
            {"from": "human", "value": "hi"}, {"from": "gpt", "value": "a"},
            {"from": "human", "value": "b"}, {"from": "gpt", "value": "c"},
        ]},
    ]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(entries))
    samples = read_llava_json(path, images)
    assert samples[0]["messages"] == [
        {"role": "user", "content": "What cards?"}, {"role": "assistant", "content": "{}"}
    ]
    assert samples[0]["image"].shape == (6, 8, 3) and samples[0]["image"][0, 0].tolist() == [255, 0, 0]
    assert samples[1]["image"] is None and [m["role"] for m in samples[1]["messages"]] == ["user", "assistant"] * 2


def test_message_text_is_kept_exactly_as_released(tmp_path):
    """Only the image marker and its newline go; the released answers' leading newline and any other
    whitespace stay (the original code did not strip either)."""
    answer = "\n{\n  \"cards\": ['3', '8', '3', '8'],\n  \"formula\": \"8/(3-8/3)\",\n}  "
    entries = [{"conversations": [{"from": "human", "value": "<image>\n[Task]\n  Cards: 3 8\n"},
                                  {"from": "gpt", "value": answer}]},
               {"conversations": [{"from": "human", "value": " before<image>after "}, {"from": "gpt", "value": " x"}]}]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(entries))
    first, second = read_llava_json(path)
    assert first["messages"] == [{"role": "user", "content": "[Task]\n  Cards: 3 8\n"},
                                 {"role": "assistant", "content": answer}]
    assert second["messages"] == [{"role": "user", "content": " beforeafter "}, {"role": "assistant", "content": " x"}]


@pytest.mark.parametrize(
    "entries, message",
    [
        ("not a list", "expected a JSON array"),
        ([{"conversations": []}], r"data.json\[0\]: needs a non-empty"),
        ([{"conversations": [{"from": "robot", "value": "x"}]}], "each turn needs"),
        ([{"conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]}], "last turn"),
        (
            [{"image": "missing.png",
              "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}],
            "cannot read image",
        ),
    ],
)
def test_malformed_files_name_the_entry(tmp_path, entries, message):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(entries))
    with pytest.raises(ValueError, match=message):
        read_llava_json(path)
