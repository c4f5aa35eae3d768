"""SFT data as people ship it: ``messages`` JSONL and Hugging Face ``datasets`` directories and parquet files.

The records are checked as the LLaVA reader's are (images inside the data's folder, header pixel limit, one-line
errors naming the record); the loss covers assistant tokens only, checked token by token against the rendered
conversation; an SFT fit runs through the CLI on each format.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from lit_sftrl.data.messages import read_messages
from lit_sftrl.models.encoding import IGNORE

CONVERSATION = [
    {"role": "system", "content": "Answer in a word."},
    {"role": "user", "content": "Colour?"},
    {"role": "assistant", "content": "red"},
    {"role": "user", "content": "And twice?"},
    {"role": "assistant", "content": "red red"},
]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


@pytest.fixture
def data_folder(tmp_path) -> Path:
    folder = tmp_path / "data"
    (folder / "imgs").mkdir(parents=True)
    Image.new("RGB", (16, 12), (255, 0, 0)).save(folder / "imgs" / "red.png")
    return folder


def records() -> list[dict]:
    return [{"messages": CONVERSATION, "images": ["imgs/red.png"]},
            {"messages": [{"role": "user", "content": "Say 3."}, {"role": "assistant", "content": "3"}],
             "images": []}]


def save_dataset(folder: Path) -> Path:
    import datasets

    datasets.Dataset.from_list(records()).save_to_disk(str(folder / "hf"))
    return folder / "hf"


def test_messages_jsonl_is_read_with_its_image_relative_to_the_file(data_folder):
    first, second = read_messages(write_jsonl(data_folder / "sft.jsonl", records()))
    assert first["messages"] == CONVERSATION and second["image"] is None
    assert first["image"].shape == (12, 16, 3) and first["image"][0, 0].tolist() == [255, 0, 0]
    lazy = read_messages(data_folder / "sft.jsonl", lazy=True)[0]["image"]
    assert lazy == str((data_folder / "imgs" / "red.png").resolve())


def test_a_datasets_directory_and_a_parquet_file_read_as_the_jsonl_does(data_folder):
    import datasets

    from_jsonl = read_messages(write_jsonl(data_folder / "sft.jsonl", records()), lazy=True)
    datasets.Dataset.from_list(records()).to_parquet(str(data_folder / "sft.parquet"))
    # save_to_disk: image paths are relative to the dataset directory, which holds no images: put one there.
    directory = save_dataset(data_folder)
    (directory / "imgs").mkdir()
    Image.new("RGB", (16, 12), (255, 0, 0)).save(directory / "imgs" / "red.png")
    for path in (directory, data_folder / "sft.parquet"):
        read = read_messages(path, lazy=True)
        assert [r["messages"] for r in read] == [r["messages"] for r in from_jsonl]
        assert Path(read[0]["image"]).name == "red.png" and read[1]["image"] is None


def trl_style_rows(image) -> list[dict]:
    """TRL's vision layout: content as parts, the image stored in the dataset (datasets' Image feature)."""
    return [{"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "red"}]}],
             "images": [image]}]


def test_content_parts_and_images_stored_in_a_dataset_are_read_without_writing_beside_it(tmp_path):
    import datasets

    datasets.Dataset.from_list(trl_style_rows(Image.new("RGB", (16, 12), (255, 0, 0)))).save_to_disk(
        str(tmp_path / "hf"))
    before = sorted(p.name for p in (tmp_path / "hf").iterdir())
    (lazy,) = read_messages(tmp_path / "hf", lazy=True)
    (decoded,) = read_messages(tmp_path / "hf")
    assert lazy["messages"] == decoded["messages"] == [{"role": "user", "content": "Colour?"},
                                                       {"role": "assistant", "content": "red"}]
    assert isinstance(lazy["image"], bytes) and decoded["image"].shape == (12, 16, 3)
    assert decoded["image"][0, 0].tolist() == [255, 0, 0]
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == before  # no cache files in the user's data
    with pytest.raises(ValueError, match=r"hf\[0\]: image 'stored in the dataset' is 16 x 12 pixels"):
        read_messages(tmp_path / "hf", max_image_pixels=100)


def test_a_truncated_image_is_refused_when_the_data_is_read(data_folder):
    """Its header reads fine: without a whole check the run would die mid-training, naming neither file nor line."""
    import numpy as np

    whole = data_folder / "imgs" / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(whole)
    (data_folder / "imgs" / "cut.png").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    cut = [{"messages": CONVERSATION, "images": ["imgs/cut.png"]}]
    with pytest.raises(ValueError, match=r"sft.jsonl:1: image .*cut.png' is damaged or truncated"):
        read_messages(write_jsonl(data_folder / "sft.jsonl", cut), lazy=True)


def test_an_image_path_that_leaves_the_data_folder_is_refused(data_folder):
    Image.new("RGB", (4, 4)).save(data_folder.parent / "outside.png")
    escaping = [{"messages": CONVERSATION, "images": ["../outside.png"]}]
    with pytest.raises(ValueError, match=r"sft.jsonl:1: '../outside.png' points outside its folder"):
        read_messages(write_jsonl(data_folder / "sft.jsonl", escaping))
    import datasets

    datasets.Dataset.from_list(escaping).save_to_disk(str(data_folder / "hf"))
    with pytest.raises(ValueError, match=r"hf\[0\]: '../outside.png' points outside its folder"):
        read_messages(data_folder / "hf")


@pytest.mark.parametrize("line, message", [
    ('{"messages": []}', "sft.jsonl:2: needs a non-empty 'messages' list"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "sft.jsonl:2: each message needs a 'role'"),
    ('{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]}',
     "'content' must be a string or a list of parts"),
    ('{"messages": [{"role": "user", "content": "q"}]}', "the last message must be the assistant's"),
    ('{"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]}',
     "first message after any system message must be the user's"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], '
     '"images": ["imgs/red.png", "imgs/red.png"]}', "at most one"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], '
     '"images": ["missing.png"]}', "cannot read image"),
    ("{not json", "sft.jsonl:2: not a JSON object"),
    ('{"messages": [{"role": "user", "content": [{"type": "video"}]}, {"role": "assistant", "content": "a"}]}',
     "a content part must be"),
    ('{"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]}, '
     '{"role": "assistant", "content": "a"}]}', "the image part has no image in 'images'"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, '
     '{"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": "b"}], '
     '"images": ["imgs/red.png"]}', "the image part is in message 2; it must be in the first user message"),
])
def test_malformed_records_are_one_line_naming_the_line(data_folder, line, message):
    path = data_folder / "sft.jsonl"
    path.write_text(json.dumps(records()[1]) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=message.replace("[", r"\[")) as error:
        read_messages(path)
    assert "\n" not in str(error.value)


def test_an_image_over_the_pixel_limit_and_unknown_formats_are_refused(data_folder, tmp_path):
    with pytest.raises(ValueError, match=r"16 x 12 pixels, more than the limit of 100"):
        read_messages(write_jsonl(data_folder / "sft.jsonl", records()), max_image_pixels=100)
    with pytest.raises(ValueError, match="expected a .jsonl file, a .parquet file or a datasets directory"):
        read_messages(write_jsonl(tmp_path / "sft.txt", records()))
    import datasets

    datasets.Dataset.from_list([{"text": "x"}]).save_to_disk(str(tmp_path / "plain"))
    with pytest.raises(ValueError, match="needs a 'messages' column"):
        read_messages(tmp_path / "plain")


# ------------------------------------------------------------------------------------------ labels


def assistant_spans(ids: list[int], tokenizer) -> list[tuple[int, int]]:
    """Where each assistant turn's content and end-of-turn token lie in a rendered Llama-3-style conversation:
    after ``<|start_header_id|>assistant<|end_header_id|>``, through the next ``<|eot_id|>``; found from the
    token ids alone, independently of how the encoder placed the labels."""
    header = tokenizer("<|start_header_id|>assistant<|end_header_id|>", add_special_tokens=False)["input_ids"]
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    spans = []
    for start in range(len(ids) - len(header) + 1):
        if ids[start:start + len(header)] == header:
            begin = start + len(header)
            spans.append((begin, ids.index(eot, begin) + 1))
    return spans


@pytest.mark.parametrize("assistant_turns", ["all", "last"])
def test_labels_cover_the_assistant_tokens_only_token_by_token(data_folder, tiny_dir_factory, assistant_turns):
    """A batch from the JSONL (one row with an image and a system prompt, one text-only) through the backbone
    the SFT module uses: every label equals the input token inside the trained assistant turns (content and
    end-of-turn token), and IGNORE everywhere else (system, user, template, image and padding tokens)."""
    from lit_sftrl.models.backbone import Backbone
    from lit_sftrl.models.config import BackboneConfig

    backbone = Backbone(BackboneConfig(path=str(tiny_dir_factory("mllama"))))
    tokenizer = backbone.encoder.tokenizer
    for sample in read_messages(write_jsonl(data_folder / "sft.jsonl", records())):
        batch = backbone.sft_batch([(sample["messages"], sample["image"])], all_turns=[assistant_turns == "all"])
        ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0]
        spans = assistant_spans(ids, tokenizer)
        assert len(spans) == sum(m["role"] == "assistant" for m in sample["messages"])
        trained = spans if assistant_turns == "all" else spans[-1:]
        expected = torch.full_like(labels, IGNORE)
        for begin, end in trained:
            expected[begin:end] = torch.tensor(ids[begin:end])
        assert torch.equal(labels, expected)
        # and the trained tokens are exactly the answers, each followed by the end-of-turn token
        answers = [m["content"] for m in sample["messages"] if m["role"] == "assistant"]
        texts = [tokenizer.decode(ids[begin:end]) for begin, end in trained]
        assert texts == [f"{answer}<|eot_id|>" for answer in answers[-len(trained):]]


def test_the_datamodule_tags_samples_with_the_turns_to_train_on(data_folder):
    from lit_sftrl.data.datamodules import SFTDataModule

    path = str(write_jsonl(data_folder / "sft.jsonl", records()))
    default = next(iter(SFTDataModule(messages=path, batch_size=3).train_dataloader()))
    assert [s["assistant_turns"] for s in default] == ["all"] * 3  # messages data: every assistant turn
    last = next(iter(SFTDataModule(messages=path, batch_size=2, assistant_turns="last").train_dataloader()))
    assert {s["assistant_turns"] for s in last} == {"last"}
    assert all(s["image"] is None or s["image"].shape == (12, 16, 3) for s in default)
    with pytest.raises(ValueError, match="give one"):
        SFTDataModule(messages=path, llava_json=path)


# ------------------------------------------------------------------------------------------ fits


@pytest.mark.parametrize("kind", ["jsonl", "datasets", "stored images"])
def test_an_sft_fit_on_messages_data_runs_through_the_cli(tmp_path, data_folder, tiny_dir_factory, kind):
    from test_sft import small_config

    from lit_sftrl.cli import run

    if kind == "jsonl":
        data = write_jsonl(data_folder / "sft.jsonl", records())
    elif kind == "stored images":
        import datasets

        data = data_folder / "trl"
        datasets.Dataset.from_list(trl_style_rows(Image.new("RGB", (16, 12), (0, 0, 255)))).save_to_disk(str(data))
    else:
        data = save_dataset(data_folder)
        (data / "imgs").mkdir()
        Image.new("RGB", (16, 12), (0, 0, 255)).save(data / "imgs" / "red.png")
    config = small_config(tmp_path / "run", tiny_dir_factory("mllama"), steps=2, batch_size=2)
    cli = run(["fit", "--config", str(config), "--data.init_args.messages", str(data)])
    assert cli.trainer.global_step == 2 and cli.datamodule.assistant_turns == "all"
    assert math.isfinite(float(cli.trainer.callback_metrics["train/loss"]))


def test_a_missing_messages_path_stops_before_any_model(tmp_path):
    from test_sft import REPO

    from lit_sftrl.cli import run

    with pytest.raises(SystemExit) as exit_info:
        run(["fit", "--config", str(REPO / "configs/gp_l_sft.yaml"), "--data.init_args.messages", "/nonexistent.jsonl",
             "--trainer.default_root_dir", str(tmp_path / "run")])
    assert "data.messages: '/nonexistent.jsonl' does not exist" in str(exit_info.value.code)
    assert not (tmp_path / "run").exists()


def test_a_malformed_record_ends_a_fit_from_the_shell_with_one_line(tmp_path, data_folder, tiny_dir_factory):
    """Records are read when the fit asks for its first batch, inside Lightning: the line naming the record is
    still all the user sees, not a traceback."""
    import subprocess
    import sys

    from test_sft import small_config

    bad = write_jsonl(data_folder / "sft.jsonl", [records()[1], {"messages": [{"role": "user", "content": "q"}]}])
    config = small_config(tmp_path / "run", tiny_dir_factory("mllama"), steps=2)
    result = subprocess.run([str(Path(sys.executable).with_name("lit-sftrl")), "fit", "--config", str(config),
                             "--data.init_args.messages", str(bad)], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        f"lit-sftrl fit: {bad}:2: the last message must be the assistant's")
    assert "Traceback" not in result.stderr
