import json

import pytest
from PIL import Image

from lit_sftrl.data.llava_data import read_llava_json


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


def test_an_sft_fit_on_a_file_mixing_image_and_text_only_samples_runs(tmp_path, tiny_dir_factory):
    """Valid LLaVA-style data mixes both kinds; a model input holds images for all rows or none, so a mixed
    batch used to crash the first step. The stream here draws mixed batches (checked), and the fit trains."""
    import math

    from test_sft import small_config

    from lit_sftrl.cli import run
    from lit_sftrl.data.datamodules import LlavaSource, SFTBatches

    Image.new("RGB", (16, 12), (255, 0, 0)).save(tmp_path / "red.png")
    entries = [{"image": "red.png", "conversations": [{"from": "human", "value": "<image>\nColour?"},
                                                      {"from": "gpt", "value": '{"colour": "red"}'}]}] * 3
    entries += [{"conversations": [{"from": "human", "value": f"Say {i}."}, {"from": "gpt", "value": str(i)}]}
                for i in range(3)]
    data = tmp_path / "mixed.json"
    data.write_text(json.dumps(entries))
    stream = iter(SFTBatches(LlavaSource(str(data), None), batch_size=4, seed=0, rank=0, start=0))
    kinds = [{sample["image"] is None for sample in next(stream)} for _ in range(3)]
    assert {True, False} in kinds, kinds  # at least one of the three steps' batches mixes them

    config = small_config(tmp_path / "run", tiny_dir_factory("mllama"), steps=3, batch_size=4)
    cli = run(["fit", "--config", str(config), "--data.init_args.llava_json", str(data)])
    assert cli.trainer.global_step == 3
    assert math.isfinite(float(cli.trainer.callback_metrics["train/loss"]))
