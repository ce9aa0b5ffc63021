"""Every input is checked before anything is created: flag ranges, output paths, data-dependent settings.

The numeric flags and output paths of every script are enumerated from the parsers
themselves (each script's build_parser()), so a flag added without a range or a path
check fails here; each is parsed in-process with a bad value and must exit 2 with one
line naming it.
"""

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

import evaluator
import extract_features
import sample
import sample_ddp
import train
import train_accelerate
from conftest import ROOT, TINY_UDIT_KWARGS
from udit.cli import number, output_dir, output_file


def load_script(path):
    spec = importlib.util.spec_from_file_location(Path(path).stem, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PARSERS = {"train.py": train.build_parser, "train_accelerate.py": train_accelerate.build_parser,
           "sample.py": sample.build_parser, "sample_ddp.py": sample_ddp.build_parser,
           "extract_features.py": extract_features.build_parser, "evaluator.py": evaluator.build_parser,
           **{path: load_script(path).build_parser for path in
              ("scripts/demo.py", "bench/bench.py", "bench/gpu_check.py", "bench/logging_overhead.py",
               "bench/objectives_demo.py", "bench/sampler_speed.py", "bench/sampling_front.py")}}

# The flags that name something a script writes, and what it is. The --out of scripts/demo.py and
# bench/objectives_demo.py is relative to the repository: checked after parsing (below).
OUTPUTS = {
    ("train.py", "--results-dir"): output_dir, ("train.py", "--resume"): output_dir,
    ("train_accelerate.py", "--results-dir"): output_dir, ("train_accelerate.py", "--resume"): output_dir,
    ("sample.py", "--output"): output_file, ("sample.py", "--save-individual"): output_dir,
    ("sample_ddp.py", "--sample-dir"): output_dir, ("extract_features.py", "--features-path"): output_dir,
    ("evaluator.py", "--json"): output_file, ("scripts/demo.py", "--json"): output_file,
    ("bench/bench.py", "--json"): output_file, ("bench/gpu_check.py", "--out"): output_dir,
    ("bench/logging_overhead.py", "--json"): output_file, ("bench/sampler_speed.py", "--json"): output_file,
    ("bench/sampling_front.py", "--json"): output_file,
}


def flag_actions(parser):
    return [a for a in parser._actions if a.option_strings and a.dest != "help"]


def out_of_range(bounds):
    """Values just outside a number() type's range, plus NaN, infinity and a word where they are refused."""
    kind, low, high, low_inclusive, high_inclusive = bounds
    step = 1 if kind is int else 0.5
    values = ["x"]
    if low is not None:
        values.append(str(low - step if low_inclusive else low))
    if high is not None and high != math.inf:
        values.append(str(high + step if high_inclusive else high))
    if kind is float:
        values.append("nan")
        if high != math.inf:
            values.append("inf")
    return values


NUMERIC_CASES = [(script, action.option_strings[-1], action.nargs, value)
                 for script, build in PARSERS.items() for action in flag_actions(build())
                 if hasattr(action.type, "bounds") for value in out_of_range(action.type.bounds)]


def parse_error(build, argv, capsys):
    """The stderr lines of a parse that must fail with exit status 2."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        build().parse_args(argv)
    assert info.value.code == 2, argv
    return capsys.readouterr().err.strip().splitlines()


def test_every_numeric_flag_of_every_script_has_a_range():
    unchecked = [(script, a.option_strings[-1]) for script, build in PARSERS.items() for a in flag_actions(build())
                 if a.choices is None and not hasattr(a.type, "bounds")
                 and (a.type in (int, float) or isinstance(a.default, (int, float)) and not isinstance(a.default, bool))]
    assert not unchecked, f"numeric flags without a udit.cli.number range: {unchecked}"
    # The flags of the reports are among them.
    named = {(script, flag) for script, flag, _, _ in NUMERIC_CASES}
    assert {("train.py", "--num-workers"), ("train.py", "--sample-classes"), ("extract_features.py", "--batch-size"),
            ("extract_features.py", "--num-workers"), ("evaluator.py", "--batch-size"),
            ("sample_ddp.py", "--cfg-scale"), ("sample.py", "--cfg-interval")} <= named


@pytest.mark.parametrize("script, flag, nargs, value", NUMERIC_CASES)
def test_every_numeric_flag_refuses_values_out_of_its_range_in_one_line(script, flag, nargs, value, capsys):
    argv = [flag, value] + (["1"] * (nargs - 1) if isinstance(nargs, int) else [])
    lines = parse_error(PARSERS[script], argv, capsys)
    prog = Path(script).name
    assert lines[-1].startswith(f"{prog}: error: argument {flag}: must be ") and lines[-1].endswith(f"got {value}")
    assert len(lines) == 2 and lines[0].startswith("usage:") and len(lines[0]) < 80, lines


@pytest.mark.parametrize("script", sorted(PARSERS))
def test_argparse_errors_end_with_the_one_line_message_below_a_short_usage_line(script, capsys):
    lines = parse_error(PARSERS[script], ["--no-such-flag"], capsys)
    assert len(lines) == 2 and lines[0].startswith("usage:") and len(lines[0]) < 80, lines
    assert lines[1].startswith(f"{Path(script).name}: error: ") and "--help" in lines[0]


def test_every_output_path_is_a_checked_type():
    typed = {(script, a.option_strings[-1]): a.type for script, build in PARSERS.items() for a in flag_actions(build())
             if a.type in (output_dir, output_file)}
    assert typed == OUTPUTS


@pytest.mark.parametrize("script, flag", sorted(OUTPUTS))
def test_every_output_path_that_cannot_be_written_is_refused_in_one_line(script, flag, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    wrong_kind = tmp_path / ("file" if OUTPUTS[script, flag] is output_dir else ".")
    for path in (wrong_kind, tmp_path / "file" / "below"):
        lines = parse_error(PARSERS[script], [flag, str(path)], capsys)
        assert lines[-1].startswith(f"{Path(script).name}: error: argument {flag}: ") and str(path) in lines[-1]
        assert len(lines) == 2, lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.parametrize("script", ["scripts/demo.py", "bench/objectives_demo.py"])
def test_an_out_folder_relative_to_the_repository_is_checked_before_any_work(script, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as info:
        load_script(script).main(["--out", str(tmp_path / "file")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(lines) == 2 and lines[-1].startswith(f"{Path(script).name}: error: argument "
                                                                              f"--out: {tmp_path / 'file'} is a file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_output_paths_below_a_dangling_link_are_refused_and_new_folders_are_fine(tmp_path):
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    for check in (output_dir, output_file):
        with pytest.raises(Exception, match="is a dangling link"):
            check(str(tmp_path / "link" / "x"))
        assert check(str(tmp_path / "new" / "deeper" / "x")) == str(tmp_path / "new" / "deeper" / "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link"]


def test_number_ranges_and_messages():
    fraction = number(float, min=0, max=1, max_inclusive=False)
    assert fraction("0") == 0.0 and fraction("0.5") == 0.5
    for bad, message in (("1", "must be a number in [0, 1), got 1"), ("-0.1", "got -0.1"),
                         ("nan", "must be a finite number, got nan")):
        with pytest.raises(Exception, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            fraction(bad)
    open_top = number(float, min=0, max=math.inf)
    assert open_top("inf") == math.inf
    with pytest.raises(Exception, match="must be an integer >= 1, got 2.5"):
        number(int, min=1)("2.5")


# ----------------------------------------------------------------- checks that need the data or the files

PIXEL = ["--model", "U-DiT-S", "--model-kwargs", TINY_UDIT_KWARGS, "--vae", "none", "--image-size", "16",
         "--global-batch-size", "4", "--num-workers", "0", "--log-every", "1", "--sample-steps", "2",
         "--num-classes", "2", "--max-steps", "1"]


def test_grid_classes_the_data_lacks_leave_no_experiment_folder(tiny_data, tmp_path, capsys):
    results = tmp_path / "r"
    assert train.main(["--data-path", str(tiny_data["small_images"]), "--results-dir", str(results), *PIXEL,
                       "--sample-classes", "5"]) == 2
    assert "--sample-classes [5]: not among the classes this run trains (0, 1)" in capsys.readouterr().err
    assert not results.exists() or not list(results.iterdir())
    lines = parse_error(train.build_parser, ["--data-path", str(tiny_data["small_images"]), "--results-dir",
                                             str(results), *PIXEL, "--num-workers", "-1"], capsys)
    assert lines[-1] == "train.py: error: argument --num-workers: must be an integer >= 0, got -1"
    assert not results.exists() or not list(results.iterdir())
    # The next good run is the first experiment.
    assert train.main(["--data-path", str(tiny_data["small_images"]), "--results-dir", str(results), *PIXEL,
                       "--sample-every", "0", "--no-tensorboard"]) == 0
    assert [p.name for p in results.iterdir()] == ["000-U-DiT-S"]


def test_outputs_inside_the_input_folder_are_refused(tiny_data, tmp_path, capsys):
    images = tiny_data["small_images"]
    with pytest.raises(SystemExit) as info:
        train.main(["--data-path", str(images), "--results-dir", str(images / "results"), *PIXEL])
    lines = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and "--results-dir" in lines[-1] and "read its experiment folders as classes" in lines[-1]
    with pytest.raises(SystemExit) as info:
        extract_features.main(["--data-path", str(images), "--features-path", str(images / "features")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and "--features-path" in lines[-1] and "inside --data-path" in lines[-1]
    assert sorted(p.name for p in images.iterdir()) == ["class_0", "class_1"]


@pytest.mark.parametrize("batch_size", ["0", "-1"])
def test_feature_extraction_with_a_bad_batch_size_creates_no_store(tiny_data, tmp_path, capsys, batch_size):
    store = tmp_path / "features"
    for _ in range(2):  # the same message on a rerun
        with pytest.raises(SystemExit) as info:
            extract_features.main(["--data-path", str(tiny_data["images"]), "--features-path", str(store),
                                   "--vae-path", str(tiny_data["vae"]), "--batch-size", batch_size])
        assert info.value.code == 2 and not store.exists()
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1] == f"extract_features.py: error: argument --batch-size: must be an integer >= 1, got {batch_size}"


@pytest.mark.parametrize("count", [2, 3])
def test_evaluator_refuses_too_few_images_for_precision_and_recall_in_one_line(tmp_path, capsys, count):
    rng = np.random.default_rng(0)
    ref, samples = tmp_path / "ref.npz", tmp_path / "samples.npz"
    np.savez(ref, arr_0=rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8))
    np.savez(samples, arr_0=rng.integers(0, 256, (count, 8, 8, 3), dtype=np.uint8))
    with pytest.raises(SystemExit) as info:
        evaluator.main([str(ref), str(samples), "--json", str(tmp_path / "m.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1, err
    assert f"samples.npz: arr_0 holds {count} image(s); at least 4 are needed" in err[0]
    assert not (tmp_path / "m.json").exists()
