"""Fuzz: bad inputs for every `raynas` command, generated from the config schemas, meet the user-error rule.

For each config kind (train, search, tune, pipeline, devices file, space file) every field of its schema
tables gets values of the wrong type, out of range, and an unknown key beside it; every file argument of
every subcommand gets a file of random bytes; every typed or choice flag gets bad values; unknown flags and
missing arguments are given. The invariants, for each input: exit code 2, exactly one line on stderr that
starts with `raynas: error:` and names the field, flag or file, no traceback, and Ray never started (the
input is refused before any compute). Inputs run in-process through `raynas.cli.main`; a few run as real
`python -m raynas.cli` processes for the true end-to-end stderr.
"""

from __future__ import annotations

import argparse
import copy
import random
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import ray
import yaml

from raynas.cli import build_parser, main
from raynas.data.config import COMMON_DEFAULTS, SOURCE_DEFAULTS
from raynas.end_to_end.hw_nas import DEFAULTS as PIPELINE
from raynas.hw.devices import MeasurementProtocol
from raynas.search.algorithms import algorithm_class
from raynas.search.config import ALGORITHMS, PARAM_RANGES
from raynas.search.config import DEFAULTS as SEARCH
from raynas.space.loader import COMMON_KEYS, builtin_spaces_dir
from raynas.train.config import REQUIRED, SECTIONS, TOP_LEVEL
from raynas.train.strategies import get_strategy_class, strategy_names
from raynas.tune.config import DEFAULTS as TUNE

REPO = Path(__file__).resolve().parents[1]
SEED = 20261203
UNKNOWN = "no_such_field"
# Values every field is given in the base configs where the schema default is REQUIRED.
REQUIRED_VALUES = {"space": "nb201", "epochs": 2}


@pytest.fixture(autouse=True)
def no_compute(monkeypatch):
    """A tripwire: an input the validation let through would start Ray; fail at once instead of training."""
    if ray.is_initialized():  # left by an earlier test module: the check below must see a fresh process state
        ray.shutdown()

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was about to start: the input passed validation")

    monkeypatch.setattr(ray, "init", refuse)


def one_line_error(argv: list[str], capsys) -> str:
    """Run the command; assert the user-error invariants; return the error line."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, (argv, err)
    assert len(lines) == 1 and lines[0].startswith("raynas: error: "), (argv, err)
    assert "Traceback" not in err and not ray.is_initialized(), (argv, err)
    return lines[0]


# ---- schema-driven config mutations ---------------------------------------------------------------------
def bad_values(default):
    """Values of the wrong type or out of range for a field whose schema default is `default`."""
    if isinstance(default, bool):
        return ["yes", 3]
    if isinstance(default, int):
        return ["many", True, -10**9, [1]]
    if isinstance(default, float):
        return ["fast", False, -1e9, float("nan")]
    if isinstance(default, str):
        return [12345, ["a"]]
    if isinstance(default, list):
        return ["not-a-list", [{"x": 1}]]
    if isinstance(default, dict):
        return [[1, 2], "text"]
    return [{"bad": {"x": 1}}]  # None: an optional field of any scalar type; a nested mapping is none of them


def mutations(schema: dict, path: tuple = (), sections: dict | None = None):
    """(field path, bad value) for every field of `schema`, recursing into `sections` (name -> sub-schema)."""
    sections = sections or {}
    yield (*path, UNKNOWN), 1
    for key, default in schema.items():
        default = REQUIRED_VALUES.get(key, default) if default is REQUIRED else default
        if key in sections:
            yield from mutations(sections[key], (*path, key))
        for bad in bad_values(default):
            yield (*path, key), bad


def put(cfg: dict, path: tuple, value) -> dict:
    cfg = copy.deepcopy(cfg)
    node = cfg
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value
    return cfg


def dotted(path: tuple) -> str:
    return ".".join(map(str, path))


def base_train(tmp_path: Path) -> dict:
    return {"space": "nb201", "epochs": 2, "name": "fz", "storage_path": str(tmp_path / "runs")}


def train_cases(tmp_path: Path):
    base = base_train(tmp_path)
    for path, bad in mutations(TOP_LEVEL, sections=SECTIONS):
        yield put(base, path, bad), dotted(path)
    for path, bad in mutations(COMMON_DEFAULTS, ("data",)):
        yield put(put(base, ("data", "name"), "digits"), path, bad), dotted(path)
    for path, bad in mutations(SOURCE_DEFAULTS["synthetic"], ("data",)):
        yield put(put(base, ("data", "name"), "synthetic"), path, bad), dotted(path)
    for name in strategy_names():  # option types are checked by the strategy protocol for every strategy
        for key, default in get_strategy_class(name).DEFAULTS.items():
            for bad in [] if default is None else bad_values(default)[:1]:  # the wrong type
                yield put(base, ("strategy",), {"name": name, key: bad}), f"strategy.{key}"
        yield put(base, ("strategy",), {"name": name, UNKNOWN: 1}), f"strategy.{UNKNOWN}"
    yield {k: v for k, v in base.items() if k != "space"}, "space"


def base_search(tmp_path: Path) -> dict:
    return {"checkpoint": str(tmp_path / "supernet.pt"), "run_dir": str(tmp_path / "search"),
            "latency": {"lut": str(tmp_path / "lut.parquet")}}


def search_cases(tmp_path: Path):
    base = base_search(tmp_path)
    sections = {k: v for k, v in SEARCH.items() if isinstance(v, dict) and k != "data"}
    for path, bad in mutations(SEARCH, sections=sections):
        yield put(base, path, bad), dotted(path)
    for path, bad in mutations(COMMON_DEFAULTS, ("data",)):
        yield put(base, path, bad), dotted(path)
    for algorithm in ALGORITHMS:  # every setting of every algorithm, out of range or of the wrong type
        for param in algorithm_class(algorithm).PARAMS:
            kind, low, high = PARAM_RANGES[param]
            if kind == "bool":
                values = ["yes", 1]
            else:  # below the range, above it where it has an end, and of the wrong type
                values = ["many", low - 1, -5] + ([] if high is None else [high + 6])
            for bad in values:
                cfg = put(put(base, ("search", "algorithm"), algorithm), ("search", "params"), {param: bad})
                yield cfg, f"search.params.{param}"


def base_tune(tmp_path: Path) -> dict:
    train = {**base_train(tmp_path), "strategy": {"name": "biglittle"}}
    return {"name": "sweep", "storage_path": str(tmp_path / "tune"), "train": train,
            "param_space": {"alpha": {"uniform": [0.5, 2.0]}}}


def tune_cases(tmp_path: Path):
    base = base_tune(tmp_path)
    sections = {k: v for k, v in TUNE.items() if isinstance(v, dict)}
    for path, bad in mutations(TUNE, sections=sections):
        yield put(base, path, bad), dotted(path)
    for path, bad in [(("param_space", "alpha"), {"uniform": [2, 1]}), (("param_space", "alpha"), {"normal": [0, 1]}),
                      (("param_space", "beta"), {"loguniform": [0, 1]}), (("param_space", "gamma"), 3)]:
        yield put(base, path, bad), dotted(path)


def pipeline_cases(tmp_path: Path, rng: random.Random):
    base = {"run_dir": str(tmp_path / "pipe"), "train": base_train(tmp_path), "search": {}}
    for path, bad in mutations(PIPELINE, sections={"profile": PIPELINE["profile"]}):
        yield put(base, path, bad), dotted(path)
    # the stages' own fields, named by their place in the pipeline config (a sample: they are fuzzed above)
    for cfg, field in rng.sample(list(train_cases(tmp_path)), 25):
        yield {**base, "train": cfg}, f"train.{field}"
    set_by_pipeline = ("checkpoint", "run_dir", "latency.lut")
    search = [(cfg, field) for cfg, field in search_cases(tmp_path) if field not in set_by_pipeline]
    for cfg, field in rng.sample(search, 25):
        cfg = {k: v for k, v in cfg.items() if k not in ("checkpoint", "run_dir")}
        if isinstance(cfg.get("latency"), dict):
            cfg["latency"] = {k: v for k, v in cfg["latency"].items() if k != "lut"}
        yield {**base, "search": cfg}, f"search.{field}"


def write_yaml(path: Path, cfg) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("kind", ["train", "search", "tune", "pipeline"])
def test_every_bad_config_field_is_one_line_naming_it(kind, tmp_path, capsys):
    rng = random.Random(SEED)
    cases = {"train": lambda: train_cases(tmp_path), "search": lambda: search_cases(tmp_path),
             "tune": lambda: tune_cases(tmp_path), "pipeline": lambda: pipeline_cases(tmp_path, rng)}[kind]()
    count = 0
    for cfg, field in cases:
        path = write_yaml(tmp_path / f"{kind}.yaml", cfg)
        line = one_line_error([kind, path], capsys)
        assert field in line, (field, cfg, line)
        count += 1
    assert count > 40  # the schemas really were walked
    assert not (tmp_path / "runs").exists() and not (tmp_path / "pipe").exists()  # nothing written


def test_every_bad_devices_file_field_is_one_line_naming_file_and_field(tmp_path, capsys):
    protocol = asdict(MeasurementProtocol())
    device = {"runtime": "cpu", "threads": 1, "batch_size": 1, "description": "a board", "resource": "device:edge",
              "protocol": {}}
    base = {"devices": {"edge": {}}}
    cases = [*mutations({"protocol": {}, "devices": {}}, sections={"protocol": protocol}),
             *mutations(device, ("devices", "edge"), sections={"protocol": protocol}),
             (("devices", "bad name!"), {})]
    path = tmp_path / "devices.yaml"
    for field, bad in cases:
        write_yaml(path, put(base, field, bad))
        line = one_line_error(["profile", "devices", "--devices-file", path], capsys)
        assert str(path) in line and dotted(field) in line, (field, bad, line)


def test_every_bad_space_file_field_is_one_line_naming_it(tmp_path, capsys):
    base = yaml.safe_load((builtin_spaces_dir() / "nb201.yaml").read_text())
    path = tmp_path / "space.yaml"
    cases = [*mutations({k: base[k] for k in COMMON_KEYS if k in base and k != "description"})]
    for (key,), bad in cases:
        write_yaml(path, {**base, key: bad})
        line = one_line_error(["spaces", "show", path], capsys)
        assert key in line, (key, bad, line)
    write_yaml(path, {k: v for k, v in base.items() if k != "family"})
    assert "family" in one_line_error(["spaces", "show", path], capsys)


# ---- random bytes for every file argument ----------------------------------------------------------------
def file_arguments(tmp_path: Path, good_search: Path) -> list[tuple[list[str], str]]:
    """(argv with {F} where the file goes, the file's suffix) for every file argument of every subcommand."""
    out = str(tmp_path / "out")
    return [
        (["spaces", "show", "{F}"], ".yaml"),
        (["spaces", "sample", "{F}"], ".yaml"),
        (["arch", "cost", "--space", "{F}", "--arch", "{}"], ".yaml"),
        (["arch", "cost", "--space", "nb201", "--arch", "{F}"], ".json"),
        (["export", "--space", "{F}", "--arch", "{}", "--out", out], ".yaml"),
        (["export", "--space", "nb201", "--arch", "{F}", "--out", out], ".json"),
        (["export", "--space", "nb201", "--arch", "{}", "--out", out, "--checkpoint", "{F}"], ".pt"),
        (["train", "{F}"], ".yaml"),
        (["train-sizes", "{F}"], ".yaml"),
        (["profile", "devices", "--devices-file", "{F}"], ".yaml"),
        (["profile", "lut", "--space", "{F}", "--out", f"{out}.parquet"], ".yaml"),
        (["profile", "lut", "--space", "nb201", "--out", f"{out}.parquet", "--devices-file", "{F}"], ".yaml"),
        (["profile", "lut", "--space", "nb201", "--out", "{F}"], ".parquet"),
        (["profile", "lut", "--space", "nb201", "--out", f"{out}.parquet", "--checkpoint", "{F}"], ".pt"),
        (["profile", "calibrate", "--space", "nb201", "--lut", "{F}"], ".parquet"),
        (["profile", "validate", "--space", "nb201", "--lut", "{F}"], ".parquet"),
        (["search", "{F}"], ".yaml"),
        (["search", good_search, "--checkpoint", "{F}"], ".pt"),
        (["tune", "{F}"], ".yaml"),
        (["pipeline", "{F}"], ".yaml"),
        (["biglittle", "search", "{F}"], ".yaml"),
        (["biglittle", "evaluate", "--checkpoint", "{F}"], ".pt"),
        (["biglittle", "export", "--checkpoint", "{F}", "--out", out], ".pt"),
        (["biglittle", "run", "--models", out, "--data", "{F}"], ".yaml"),
    ]


def test_random_bytes_in_every_file_argument_are_one_line_naming_the_file(tmp_path, capsys):
    rng = random.Random(SEED)
    good_search = write_yaml(tmp_path / "good_search.yaml", base_search(tmp_path))
    for i, (template, suffix) in enumerate(file_arguments(tmp_path, good_search)):
        for j, content in enumerate((rng.randbytes(rng.randint(1, 600)),  # binary garbage
                                     "".join(rng.choice(":{[ -,'\"\n\tab1") for _ in range(80)).encode())):
            bad = tmp_path / f"bad{i}_{j}{suffix}"
            bad.write_bytes(content)
            line = one_line_error([str(bad) if a == "{F}" else a for a in template], capsys)
            assert str(bad) in line or bad.name in line, (template, line)


# ---- command-line arguments ----------------------------------------------------------------------------------
def leaf_parsers(parser: argparse.ArgumentParser, prefix: tuple = ()):
    """(command words, parser) of every subcommand that runs something."""
    subcommands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subcommands:
        yield prefix, parser
    for action in subcommands:
        for name, sub in action.choices.items():
            yield from leaf_parsers(sub, (*prefix, name))


def test_bad_argument_values_unknown_flags_and_missing_arguments_are_one_line(capsys):
    checked = 0
    for words, parser in leaf_parsers(build_parser()):
        required = [a for a in parser._actions if a.required or not a.option_strings]
        filled = [x for a in required for x in ([a.option_strings[0]] if a.option_strings else []) + ["x"]]
        line = one_line_error([*words, *filled, "--no-such-flag"], capsys)
        assert "--no-such-flag" in line and "unknown argument" in line
        if required:
            line = one_line_error(list(words), capsys)
            assert "missing" in line and any((a.option_strings or [a.dest])[0] in line for a in required), line
        for action in parser._actions:
            if not action.option_strings or (action.type is None and action.choices is None):
                continue
            flag = action.option_strings[0]
            for bad in ("abc", "-7", "1e999") if action.type is not None else ("no-such-choice",):
                line = one_line_error([*words, flag, bad], capsys)
                assert line.startswith(f"raynas: error: {flag}: ") and "; allowed: " in line, line
                checked += 1
    assert checked >= 30


def test_help_still_prints_usage(capsys):
    with pytest.raises(SystemExit) as done:
        main(["profile", "lut", "--help"])
    assert done.value.code == 0 and "--passes" in capsys.readouterr().out


# ---- outputs that cannot be written ------------------------------------------------------------------------
def test_unwritable_storage_is_one_line_before_ray(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    under_file = str(blocker / "runs")
    cases = [("train", {**base_train(tmp_path), "storage_path": under_file}, "storage_path"),
             ("search", {**base_search(tmp_path), "run_dir": under_file}, "run_dir"),
             ("tune", {**base_tune(tmp_path), "storage_path": under_file}, "storage_path"),
             ("pipeline", {"run_dir": under_file, "train": base_train(tmp_path)}, "run_dir")]
    for kind, cfg, field in cases:
        line = one_line_error([kind, write_yaml(tmp_path / f"{kind}.yaml", cfg)], capsys)
        assert line.startswith(f"raynas: error: {field}: ") and "not writable" in line, line


# ---- end to end, as a user runs it ----------------------------------------------------------------------------
def test_real_processes_print_one_line(tmp_path):
    rng = random.Random(SEED)
    (tmp_path / "random.yaml").write_bytes(rng.randbytes(300))
    population = write_yaml(tmp_path / "s.yaml", put(base_search(tmp_path), ("search", "params"), {"population": 0}))
    cases = [(["spaces", "sample", "nb201", "--seed", "-1"], "--seed"),
             (["train", tmp_path / "random.yaml"], "random.yaml"),
             (["search", population], "search.params.population"),
             (["profile", "lut", "--space", "nb201", "--out", "x.parquet", "--passes", "0"], "--passes")]
    procs = [(subprocess.Popen([sys.executable, "-m", "raynas.cli", *map(str, argv)], cwd=tmp_path, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE), field) for argv, field in cases]
    for proc, field in procs:
        out, err = proc.communicate(timeout=120)
        lines = err.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in err, err
        assert lines[0].startswith("raynas: error: ") and field in lines[0] and out == "", err
    assert not (tmp_path / "search").exists()  # refused before the run directory was made
