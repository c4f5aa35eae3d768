"""Every command block the README and the documentation mark as runnable runs, at tiny sizes, so a page cannot go
stale: a renamed flag, a moved config or a changed output path fails here.

A block is marked by an HTML comment on the line before its fence, which neither GitHub nor MkDocs shows:

    <!-- runnable: NAME -->
    ```bash
    lit-sftrl fit --config configs/gp_l_sft.yaml
    ```

Each command of a block runs as written, in a scratch directory that holds the repository's ``configs/`` and the
tiny test model at ``checkpoints/tiny-mllama`` (where the configs look for it), with the size-reducing flags that
``TINY`` below lists for it appended: later flags win, so the documented ones are all parsed and checked, and only
sizes change. A block may need the files another block leaves (``NEEDS``): that block runs first, in its own
directory, which is copied. A marked ```python block runs as it is, and ``PYTHON_CHECKS`` checks what it computed.
"""

from __future__ import annotations

import contextlib
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from lit_sftrl.cli import run

REPO = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^<!-- runnable: ([\w-]+) -->$")
FENCES = {"```bash": "bash", "```python": "python"}

SFT = ["--trainer.max_steps", "2", "--data.init_args.batch_size", "2"]
PPO = ["--trainer.max_epochs", "1", "--data.init_args.num_envs", "2", "--data.init_args.rollout_steps", "4",
       "--model.init_args.ppo.ppo_epochs", "1", "--model.init_args.ppo.minibatch_size", "4",
       "--model.init_args.ppo.micro_batch_size", "2", "--model.init_args.sampling.max_new_tokens", "8"]
NO_EVALUATION = ["--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0"]
# The configs' evaluation before the first step, on 2 episodes per variant: a record for the report to read.
SMALL_EVALUATION = ["--data.init_args.evaluation.val_episodes", "2", "--data.init_args.evaluation.chunk", "2",
                    "--model.init_args.eval_sampling.max_new_tokens", "8"]
TEST = ["--data.init_args.evaluation.test_episodes", "2", "--data.init_args.evaluation.chunk", "2",
        "--model.init_args.eval_sampling.max_new_tokens", "8"]
# One list of flags per command of the block, in order; [] runs the command unchanged.
TINY: dict[str, list[list[str]]] = {
    "main-job": [SFT + SMALL_EVALUATION],
    "sft-rl-test-report": [SFT + SMALL_EVALUATION, PPO + SMALL_EVALUATION, TEST, []],
    "print-config": [[], SFT + NO_EVALUATION],
    "export": [[]],
    "report": [[]],
    "tool-config": [["--routes", "1"], ["--routes", "1"]],
    "pretrain-small": [["--base.max_steps", "2", "--base.warmup_steps", "1", "--base.batch_size", "2",
                        "--base.skills.size", "40", "--base.skills.image_share", "0.0", "--base.log_every", "1"]],
}
NEEDS = {"export": "main-job", "report": "sft-rl-test-report"}  # the run directories a block reads
def _rule_examples_are_on_the_page(namespace: dict) -> bool:
    """The rule skills' examples docs/results/tiny-base.md shows are what the corpus holds."""
    page = (REPO / "docs" / "results" / "tiny-base.md").read_text()
    return len(namespace["examples"]) == 3 and all(
        body in page and all(f"{rule} -> {item['messages'][-1]['content']}" in page for rule, item in by_rule.items())
        for body, by_rule in namespace["examples"].values())


PYTHON_CHECKS = {  # what a python block's comments promise
    "environment": lambda ns: ns["reward"] == 5 and ns["info"]["success"] and ns["terminated"],
    "rule-skills": _rule_examples_are_on_the_page,
}


@dataclass(frozen=True)
class Block:
    name: str
    page: str
    line: int
    language: str  # bash: commands run one by one; python: the code runs as a whole
    commands: tuple[str, ...]
    code: str = ""


def commands_of(lines: list[str]) -> tuple[str, ...]:
    """The block's commands: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return tuple(c for c in (shlex.join(shlex.split(line, comments=True)) for line in joined.splitlines()) if c)


def collect(paths: list[Path], root: Path = REPO) -> list[Block]:
    """Every marked block of ``paths`` (named relative to ``root``); a marker not followed by a ```bash fence is an
    error naming its line."""
    blocks = []
    for path in paths:
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines):
            if not (match := MARKER.match(line.strip())):
                continue
            where = f"{path.relative_to(root)}:{number + 1}"
            fence = lines[number + 1].strip() if number + 1 < len(lines) else ""
            if fence not in FENCES:
                raise ValueError(f"{where}: a runnable marker must be followed by a ```bash or ```python fence")
            end = next((i for i in range(number + 2, len(lines)) if lines[i].strip() == "```"), None)
            if end is None:
                raise ValueError(f"{where}: the runnable block is never closed")
            body = lines[number + 2:end]
            language = FENCES[fence]
            blocks.append(Block(match[1], str(path.relative_to(root)), number + 1, language,
                                commands_of(body) if language == "bash" else (), "\n".join(body)))
    return blocks


def documentation() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


BLOCKS = {block.name: block for block in collect(documentation())}


def run_command(command: str, extra: list[str]) -> None:
    """Run one documented ``lit-sftrl`` command in-process; ``> FILE`` sends its output there. Exit status 0
    (``--print_config`` exits) passes; any other ends the test with the command."""
    words = shlex.split(command)
    assert words[0] == "lit-sftrl", f"a runnable block runs lit-sftrl commands only, not {command!r}"
    out = None
    if ">" in words:
        words, out = words[:words.index(">")], Path(words[words.index(">") + 1])
    with contextlib.ExitStack() as stack:
        if out is not None:
            stack.enter_context(contextlib.redirect_stdout(stack.enter_context(out.open("w"))))
        try:
            run(words[1:] + extra)
        except SystemExit as exit_:
            if exit_.code not in (0, None):
                raise AssertionError(f"`{command}` exited with {exit_.code!r}") from exit_


def run_block(block: Block, where: Path) -> None:
    if block.language == "python":
        namespace: dict = {}
        with pytest.MonkeyPatch.context() as patch:
            patch.chdir(where)
            exec(compile(block.code, f"{block.page}:{block.line}", "exec"), namespace)
        assert PYTHON_CHECKS[block.name](namespace), f"{block.page}:{block.line}: {block.name!r} computed otherwise"
        return
    flags = TINY.get(block.name)
    assert flags is not None, f"{block.page}:{block.line}: block {block.name!r} has no entry in TINY"
    assert len(flags) == len(block.commands), (
        f"{block.page}:{block.line}: block {block.name!r} has {len(block.commands)} commands, TINY lists "
        f"flags for {len(flags)}")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(where)
        for command, extra in zip(block.commands, flags):
            run_command(command, extra)


@pytest.fixture(scope="module")
def workspaces(tmp_path_factory, tiny_dir_factory):
    """``workspace(name)``: a directory where block ``name`` has run (after the block it needs)."""
    done: dict[str, Path] = {}

    def workspace(name: str) -> Path:
        if name not in done:
            where = tmp_path_factory.mktemp(name)
            (where / "configs").symlink_to(REPO / "configs")
            if name in NEEDS:  # the runs the needed block made, not its other outputs
                shutil.copytree(workspace(NEEDS[name]) / "checkpoints", where / "checkpoints", symlinks=True)
            else:
                (where / "checkpoints").mkdir()
                (where / "checkpoints" / "tiny-mllama").symlink_to(tiny_dir_factory("mllama"))
            run_block(BLOCKS[name], where)
            done[name] = where
        return done[name]

    return workspace


def test_every_marked_block_is_collected_and_has_its_tiny_sizes():
    found = collect(documentation())
    names = [block.name for block in found]
    assert len(names) == len(set(names)), f"two blocks share a name: {names}"
    shell = sorted(block.name for block in found if block.language == "bash")
    assert shell == sorted(TINY), f"marked command blocks {shell} against TINY {sorted(TINY)}"
    python = sorted(block.name for block in found if block.language == "python")
    assert python == sorted(PYTHON_CHECKS), f"marked python blocks {python} against PYTHON_CHECKS"
    assert {block.page for block in found} >= {"README.md", "docs/getting-started.md"}
    assert set(NEEDS) | set(NEEDS.values()) <= set(names)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*hit the cap")  # 8 new tokens cut every answer: the sizes, not the page
@pytest.mark.parametrize("name", sorted(TINY) + sorted(PYTHON_CHECKS))
def test_the_documented_block_runs(name, workspaces):
    where = workspaces(name)
    expected = {  # what each block's commands leave behind
        "main-job": ["checkpoints/gp_l_sft/checkpoints/last.ckpt", "checkpoints/gp_l_sft/eval"],
        "sft-rl-test-report": ["checkpoints/gp_l_ppo/checkpoints/last.ckpt", "reports/gp_l/report.md"],
        "print-config": ["printed.yaml"],
        "export": ["exported/gp_l_sft/config.json"],
        "report": ["reports/gp_l/curves.png"],
        "tool-config": ["city.yaml", "data/virl/harbor/route_infos.json"],
        "pretrain-small": ["checkpoints/my-base/config.json", "checkpoints/my-base/lit_sftrl_base.json"],
        "environment": [],
        "rule-skills": [],
    }[name]
    missing = [path for path in expected if not (where / path).exists()]
    assert not missing, f"block {name!r} left no {missing}"


@pytest.mark.parametrize("name, flag, renamed", [
    ("sft-rl-test-report", "--model.init_from", "--model.init_from_run"),   # a trainer key
    ("export", "--ckpt", "--checkpoint"),                                    # a tool's option
])
def test_a_renamed_flag_fails_its_block(name, flag, renamed, tmp_path, monkeypatch):
    """A documented block as it would read if the code renamed one of its flags (the page keeping the old name
    is the same mismatch): the block fails, naming the command. Refused while parsing, before any model is built."""
    documented = BLOCKS[name]
    index = next(i for i, command in enumerate(documented.commands) if flag in shlex.split(command))
    stale = documented.commands[index].replace(f"{flag} ", f"{renamed} ")
    (tmp_path / "configs").symlink_to(REPO / "configs")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AssertionError, match="exited with"):
        run_command(stale, TINY[name][index])


def test_a_marker_without_a_bash_fence_is_refused(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("<!-- runnable: lost -->\n\n```bash\nlit-sftrl --help\n```\n")
    with pytest.raises(ValueError, match="page.md:1: a runnable marker must be followed by a ```bash or"):
        collect([page], root=tmp_path)


def test_continuation_lines_and_comments_are_joined_and_dropped():
    lines = ["lit-sftrl fit --config a.yaml \\", "    --trainer.max_steps 3   # three steps", "", "# a comment"]
    assert commands_of(lines) == ("lit-sftrl fit --config a.yaml --trainer.max_steps 3",)
