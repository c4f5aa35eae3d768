"""Red team: hostile and careless inputs, each typed at the ``lit-sftrl`` command in its own process.

    python -m bench.red_team [--only NAME ...] [--json] [--timeout 120] [--list]

Each case prepares its files in a scratch folder, runs one command as a user would type it, and reports what
happened: ``refused in one line`` (a non-zero exit whose message fits on two lines, no traceback), ``refused
after a traceback``, ``accepted`` (exit 0), or ``timed out`` (killed after ``--timeout`` seconds); then whether
the guarantee behind it held (files kept, no code ran). Time is the command's wall time; peak memory is the
child's own maximum resident set (``os.wait4``'s rusage, so one case's peak never hides another's). The cases are
those of issue 31 and a few of the earlier reliability work (tests/test_security.py, tests/test_limits.py).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.common import LIT_SFTRL

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Case:
    name: str
    what: str
    prepare: Callable[[Path, Callable[[], Path]], list[str]]  # (scratch folder, tiny model) -> argv after lit-sftrl
    holds: Callable[[Path], bool] | None = None  # the guarantee, checked after the run


@dataclass
class Result:
    name: str
    what: str
    outcome: str
    holds: bool | None
    seconds: float
    peak_mb: float
    message: str


# ----------------------------------------------------------------------------------------------- the cases


def _code_checkpoint(path: Path, marker: Path) -> None:
    """Write a checkpoint whose pickle runs ``exec`` (creating ``marker``) when loaded without weights_only.
    Written by a child process: this one stays small, so the cases' children (forked from it) start small too."""
    code = (
        "import builtins, sys, torch\n"
        "class RunsCode:\n"
        "    def __reduce__(self):\n"
        "        return (builtins.exec, (f'open({sys.argv[2]!r}, \"w\").close()',))\n"
        "torch.save({'state_dict': {}, 'global_step': 1,\n"
        "            'hyper_parameters': {'backbone': {'path': 'x'}, 'extra': RunsCode()}}, sys.argv[1])\n"
    )
    subprocess.run([sys.executable, "-c", code, str(path), str(marker)], check=True)


def _alias_bomb() -> str:
    names = "abcdefghi"
    parts = ["a: &a [1,1,1,1,1,1,1,1,1,1]"]
    parts += [f"{n}: &{n} [" + ",".join([f"*{p}"] * 10) + "]" for p, n in zip(names, names[1:])]
    return "{" + ", ".join(parts) + "}"


def _sft(model: Path, run: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(REPO / "configs/gp_l_sft.yaml"), "--model.init_args.backbone.path", str(model),
            "--trainer.default_root_dir", str(run), "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0",
            "--trainer.num_sanity_val_steps", "0", "--data.init_args.batch_size", "1", *extra]


def overwrite_home(scratch: Path, tiny: Callable[[], Path]) -> list[str]:
    home = scratch / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text("secret")
    (home / "Documents").mkdir()
    (home / "Documents" / "thesis.tex").write_text("years of work")
    (home / "metrics.csv").write_text("step\n")
    return _sft(tiny(), home, "--overwrite", "true")


def cli_alias_bomb(scratch: Path, tiny: Callable[[], Path]) -> list[str]:
    return ["fit", "--config", str(REPO / "configs/gp_l_sft.yaml"), "--data.init_args.task.env_kwargs", _alias_bomb()]


def file_alias_bomb(scratch: Path, tiny: Callable[[], Path]) -> list[str]:
    (scratch / "bomb.yaml").write_text("data:\n  init_args:\n    task:\n      env_kwargs: " + _alias_bomb() + "\n")
    return ["fit", "--config", str(REPO / "configs/gp_l_sft.yaml"), "--config", str(scratch / "bomb.yaml")]


def huge_config(scratch: Path, tiny: Callable[[], Path]) -> list[str]:
    with open(scratch / "huge.yaml", "wb") as file:
        file.truncate(3 << 30)  # sparse: no disk used
    return ["fit", "--config", str(REPO / "configs/gp_l_sft.yaml"), "--config", str(scratch / "huge.yaml")]


def self_including_config(scratch: Path, tiny: Callable[[], Path]) -> list[str]:
    (scratch / "self.yaml").write_text(f"config: {scratch / 'self.yaml'}\n")
    return ["fit", "--config", str(scratch / "self.yaml")]


def huge_max_new_tokens(scratch: Path, tiny: Callable[[], Path]) -> list[str]:
    return ["fit", "--config", str(REPO / "configs/gp_l_ppo.yaml"),
            "--model.init_args.sampling.max_new_tokens", "1000000000"]


def nan_lr(scratch: Path, tiny: Callable[[], Path]) -> list[str]:
    return ["fit", "--config", str(REPO / "configs/gp_l_sft.yaml"), "--model.init_args.optim.lr", "nan"]


def class_path_in_env_kwargs(scratch: Path, tiny: Callable[[], Path]) -> list[str]:
    return ["fit", "--config", str(REPO / "configs/gp_l_sft.yaml"), "--data.init_args.task.env_kwargs",
            "{x: {class_path: subprocess.Popen, init_args: {args: [touch, " + str(scratch / "ran") + "]}}}"]


def _llava(scratch: Path, turn: str = "Colour?", image: str | None = None) -> Path:
    entry = {"conversations": [{"from": "human", "value": turn}, {"from": "gpt", "value": "red"}]}
    if image:
        entry["image"] = image
    (scratch / "data.json").write_text(json.dumps([entry]))
    return scratch / "data.json"


def long_turn(scratch: Path, tiny: Callable[[], Path]) -> list[str]:
    data = _llava(scratch, turn="x" * 20_000_000)
    return _sft(tiny(), scratch / "run", "--data.init_args.llava_json", str(data))


def truncated_png(scratch: Path, tiny: Callable[[], Path]) -> list[str]:
    code = ("import sys, numpy as np; from PIL import Image; noise = np.random.default_rng(0).integers("
            "0, 255, (256, 256, 3), dtype=np.uint8); Image.fromarray(noise).save(sys.argv[1])")
    subprocess.run([sys.executable, "-c", code, str(scratch / "a.png")], check=True)
    (scratch / "cut.png").write_bytes((scratch / "a.png").read_bytes()[:100_000])
    data = _llava(scratch, image="cut.png")
    return _sft(tiny(), scratch / "run", "--data.init_args.llava_json", str(data))


def image_outside_folder(scratch: Path, tiny: Callable[[], Path]) -> list[str]:
    data = _llava(scratch, image="../../../../etc/passwd")
    return _sft(tiny(), scratch / "run", "--data.init_args.llava_json", str(data))


def _route(milestone_info: str) -> dict:
    return {"start_place": {"relocated_geocode": [40.0, -73.0]},
            "route_results": {"geocode_list": [[40.0, -73.0]]}, "milestone_info": milestone_info}


def brace_route(scratch: Path, tiny: Callable[[], Path]) -> list[str]:
    folder = scratch / "routes"
    folder.mkdir()
    (folder / "route_infos.json").write_text(json.dumps([[_route("{" * 300_000)], 1]))  # 310 KB
    return ["fit", "--config", str(REPO / "configs/virl_l_sft.yaml"), "--data.init_args.task.routes", str(folder)]


def shared_list_pickle(scratch: Path, tiny: Callable[[], Path]) -> list[str]:
    folder = scratch / "routes"
    folder.mkdir()
    block = '{\n"landmarks": "x",\n"to_next_intersection_heading": "0 (north)",\n"distance": "1 m",\n}'
    (folder / "route_infos.json").write_text(json.dumps([[_route(block)], 1]))
    value: object = ["pano"]
    for _ in range(5):
        value = [value] * 200
    (folder / "gps_pano_mapping.pkl").write_bytes(pickle.dumps({(40.0, -73.0): value}))  # ~5 KB
    (folder / "street_views").mkdir()
    whole = scratch / "ood_routes"  # the same route with a plain mapping: only the hostile folder is refused
    shutil.copytree(folder, whole)
    (whole / "gps_pano_mapping.pkl").write_bytes(pickle.dumps({(40.0, -73.0): "pano"}))
    return ["fit", "--config", str(REPO / "configs/virl_vl_sft.yaml"), "--data.init_args.task.routes", str(folder),
            "--data.init_args.task.ood_routes", str(whole)]


def code_checkpoint(scratch: Path, tiny: Callable[[], Path]) -> list[str]:
    _code_checkpoint(scratch / "hostile.ckpt", scratch / "ran")
    return _sft(tiny(), scratch / "run", "--ckpt_path", str(scratch / "hostile.ckpt"))


def code_checkpoint_hpc(scratch: Path, tiny: Callable[[], Path]) -> list[str]:
    (scratch / "run").mkdir()
    _code_checkpoint(scratch / "run" / "hpc_ckpt_1.ckpt", scratch / "ran")
    return _sft(tiny(), scratch / "run", "--ckpt_path", "hpc")


def model_with_own_code(scratch: Path, tiny: Callable[[], Path]) -> list[str]:
    copy = scratch / "remote-code"
    shutil.copytree(tiny(), copy)
    config = json.loads((copy / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig"}
    (copy / "config.json").write_text(json.dumps(config))
    (copy / "evil.py").write_text(f"open({str(scratch / 'ran')!r}, 'w').close()\n")
    return _sft(copy, scratch / "run")


def truncated_gguf(scratch: Path, tiny: Callable[[], Path]) -> list[str]:
    (scratch / "model.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 20)
    return _sft(scratch / "model.gguf", scratch / "run")


def export_into_a_file(scratch: Path, tiny: Callable[[], Path]) -> list[str]:
    (scratch / "a_file").write_text("mine")
    return ["export", "--ckpt", str(scratch / "missing.ckpt"), "--out", str(scratch / "a_file")]


def make_tiny_into_a_full_folder(scratch: Path, tiny: Callable[[], Path]) -> list[str]:
    (scratch / "full").mkdir()
    (scratch / "full" / "notes.txt").write_text("mine")
    return ["make-tiny", "--out", str(scratch / "full")]


def _files_kept(*names: str) -> Callable[[Path], bool]:
    return lambda scratch: all((scratch / name).exists() for name in names)


def _no_code_ran(scratch: Path) -> bool:
    return not (scratch / "ran").exists()


CASES = [
    Case("overwrite-home", "--overwrite true on a folder holding .ssh/ and Documents/", overwrite_home,
         _files_kept("home/.ssh/id_ed25519", "home/Documents/thesis.tex")),
    Case("cli-alias-bomb", "YAML alias bomb (10^9 values) as a command-line value", cli_alias_bomb),
    Case("file-alias-bomb", "YAML alias bomb in a --config file", file_alias_bomb),
    Case("huge-config", "3 GB (sparse) --config file", huge_config),
    Case("self-including-config", "a config file that includes itself", self_including_config),
    Case("max-new-tokens", "sampling.max_new_tokens 1000000000 (768 GB of KV cache)", huge_max_new_tokens),
    Case("lr-nan", "--model.init_args.optim.lr nan", nan_lr),
    Case("env-kwargs-class-path", "class_path: subprocess.Popen inside task.env_kwargs", class_path_in_env_kwargs,
         _no_code_ran),
    Case("long-turn", "a 20 MB text turn in LLaVA data", long_turn),
    Case("truncated-png", "a truncated PNG in LLaVA data", truncated_png),
    Case("image-outside", "a LLaVA image path ../../../../etc/passwd", image_outside_folder),
    Case("brace-route", "route_infos.json: milestone_info of 300,000 '{' (310 KB)", brace_route),
    Case("shared-pickle", "gps_pano_mapping.pkl: 5 KB of shared nested lists (200 refs, 5 levels)",
         shared_list_pickle),
    Case("code-checkpoint", "--ckpt_path: a checkpoint whose pickle runs code", code_checkpoint, _no_code_ran),
    Case("code-checkpoint-hpc", "--ckpt_path hpc resolving to a checkpoint that runs code", code_checkpoint_hpc,
         _no_code_ran),
    Case("model-own-code", "a model folder with auto_map and its own Python", model_with_own_code, _no_code_ran),
    Case("truncated-gguf", "a GGUF file cut after its header as the backbone", truncated_gguf),
    Case("export-into-file", "export --out naming an existing file", export_into_a_file, _files_kept("a_file")),
    Case("make-tiny-full", "make-tiny --out a folder that holds files", make_tiny_into_a_full_folder,
         _files_kept("full/notes.txt")),
]


# ----------------------------------------------------------------------------------------------- running them


def run_case(case: Case, root: Path, tiny: Callable[[], Path], timeout: float) -> Result:
    scratch = root / case.name
    scratch.mkdir()
    argv = case.prepare(scratch, tiny)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("LIT_SFTRL_VERBOSE", None)
    with open(scratch / "output.txt", "wb") as output:
        start = time.perf_counter()
        child = subprocess.Popen([LIT_SFTRL, *argv], stdout=output, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                 start_new_session=True)
        timed_out = False
        deadline = start + timeout
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                os.killpg(child.pid, signal.SIGKILL)
                pid, status, usage = os.wait4(child.pid, 0)
                timed_out = True
                break
            time.sleep(0.05)
        seconds = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    text = (scratch / "output.txt").read_text(errors="replace")
    lines = [line for line in text.splitlines() if line.strip()]
    if timed_out:
        outcome = "timed out"
    elif child.returncode == 0:
        outcome = "accepted"
    elif "Traceback (most recent call last)" in text:
        outcome = "refused after a traceback"
    else:
        outcome = "refused in one line" if len(_message_lines(lines)) <= 2 else "refused in several lines"
    message = next((line for line in reversed(lines) if "--help lists" not in line), "")
    holds = case.holds(scratch) if case.holds else None
    return Result(case.name, case.what, outcome, holds, round(seconds, 2), round(usage.ru_maxrss / 1024, 1),
                  message.strip()[:300])


def _message_lines(lines: list[str]) -> list[str]:
    """The lines of the refusal itself: the library's own log lines before it (seed, warnings) left out."""
    noise = ("Seed set to", "Warning", "warnings.warn", "UserWarning", "INFO", "[rank")
    return [line for line in lines if not any(line.lstrip().startswith(n) or n in line for n in noise)]


def tiny_model(root: Path) -> Callable[[], Path]:
    """A tiny Mllama built on first use (one per red-team run)."""
    path = root / "tiny-mllama"

    def get() -> Path:
        if not path.exists():
            subprocess.run([LIT_SFTRL, "make-tiny", "--out", str(path)], check=True, capture_output=True,
                           env=dict(os.environ, HF_HUB_OFFLINE="1"))
        return path

    return get


def format_table(results: list[Result]) -> str:
    lines = ["| case | what | outcome | holds | s | peak MB | message |", "|---|---|---|---|---:|---:|---|"]
    for r in results:
        holds = "" if r.holds is None else ("yes" if r.holds else "NO")
        message = r.message.replace("|", "\\|")
        lines.append(f"| {r.name} | {r.what} | {r.outcome} | {holds} | {r.seconds:.1f} | {r.peak_mb:.0f} | "
                     f"{message} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run these cases only (see --list)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds before a case is killed")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(f"{case.name:<24} {case.what}" for case in CASES))
        return []
    unknown = set(args.only or ()) - {case.name for case in CASES}
    if unknown:
        parser.error(f"no such case: {', '.join(sorted(unknown))} (--list shows them)")
    cases = [case for case in CASES if not args.only or case.name in args.only]
    results = []
    with tempfile.TemporaryDirectory(prefix="red_team_") as folder:
        root = Path(folder)
        tiny = tiny_model(root)
        for case in cases:
            results.append(result := run_case(case, root, tiny, args.timeout))
            if not args.json:
                print(f"{result.name:<24} {result.outcome:<28} {result.seconds:7.1f} s {result.peak_mb:7.0f} MB",
                      file=sys.stderr, flush=True)
    print(json.dumps([asdict(r) for r in results], indent=1) if args.json else format_table(results))
    return results


if __name__ == "__main__":
    main()
