"""
Every tool ends a mistake in its input (a file, a folder, an argument, a model folder) with one `error:` line naming
it and exit status 2, before any work starts: never a traceback. The cases are the ones found by issue 18's review,
each run in-process through the tool's `main(argv)`.
"""

import json
import tempfile
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState

from pcaa_hf.cli import evaluate, export, main_job, make_synthetic, predict
from pcaa_hf.data.synthetic import write_cityscapes_tree
from pcaa_testing import writable_copy


def run_tool(main, arguments, capsys):
    """(exit status, stderr) of a tool's `main`; a parser's refusal (SystemExit) counts as a returned status."""
    try:
        status = main([str(argument) for argument in arguments])
    except SystemExit as exit:
        status = exit.code
    return status, capsys.readouterr().err


def assert_one_error_line(status, stderr, expected):
    assert status == 2, stderr
    assert "Traceback" not in stderr, stderr
    error_lines = [line for line in stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1, stderr
    assert expected in error_lines[0], stderr


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "a_file.txt"
    path.write_text("not a folder")
    return path


@pytest.fixture
def unwritable_folder(tmp_path):
    """A folder no file can be created in: read-only by its mode, or /sys where the mode binds even root."""
    folder = tmp_path / "read_only"
    folder.mkdir(mode=0o555)
    for candidate in (folder, Path("/sys")):
        try:
            with tempfile.TemporaryFile(dir=candidate):
                pass
        except OSError:
            return candidate
    pytest.skip("no folder here refuses writes to this user")


def tool_arguments(tool, output):
    """The arguments of `tool` with `output` as its output folder; the other inputs are never reached."""
    return {
        "evaluate": (evaluate.main, ["--model", "m", "--dataset", "cityscapes", "--data", "d", "--output_dir", output]),
        "predict": (predict.main, ["m", "image.png", "--output_dir", output]),
        "export": (export.main, ["--model", "m", "--format", "dynamo", "--output_dir", output]),
        "make_synthetic_cityscapes": (make_synthetic.cityscapes, ["--output", output]),
        "make_synthetic_ade20k": (make_synthetic.ade20k, ["--output", output]),
        "main_job": (main_job.main, ["--output_dir", output]),
    }[tool]


TOOLS = ("evaluate", "predict", "export", "make_synthetic_cityscapes", "make_synthetic_ade20k", "main_job")


@pytest.mark.parametrize("tool", TOOLS)
def test_an_output_folder_that_is_a_file_is_refused(tool, a_file, capsys):
    main, arguments = tool_arguments(tool, a_file)
    assert_one_error_line(*run_tool(main, arguments, capsys), f"{a_file} is a file, not a folder")
    main, arguments = tool_arguments(tool, a_file / "inside")
    assert_one_error_line(*run_tool(main, arguments, capsys), f"{a_file} is a file, not a folder, so")


@pytest.mark.parametrize("tool", TOOLS)
def test_an_unwritable_output_folder_is_refused(tool, unwritable_folder, capsys):
    main, arguments = tool_arguments(tool, unwritable_folder / "output")
    assert_one_error_line(*run_tool(main, arguments, capsys), f"cannot write into {unwritable_folder}")


@pytest.mark.parametrize(("main", "arguments", "expected"), [
    (evaluate.main, ["--model", "m", "--dataset", "cityscapes", "--data", "d", "--scales", "1", "1000"],
     "a scale is at most 4, got '1000': memory grows with the square of the scale"),
    (predict.main, ["m", "image.png", "--output_dir", "o", "--scales", "1000"], "a scale is at most 4"),
    (evaluate.main, ["--model", "m", "--dataset", "cityscapes", "--data", "d", "--scales", "-1"],
     "expected a positive number, got '-1'"),
    (evaluate.main, ["--model", "m", "--dataset", "cityscapes", "--data", "d", "--crop_size", "0", "768"],
     "expected a positive integer, got '0'"),
    (make_synthetic.cityscapes, ["--output", "o", "--num-train", "-1"],
     "argument --num_train: expected 0 or a positive integer, got '-1'"),
    (make_synthetic.ade20k, ["--output", "o", "--num_val", "-3"], "expected 0 or a positive integer, got '-3'"),
    (main_job.main, ["--num_train", "0"], "argument --num_train: expected a positive integer, got '0'"),
    (main_job.main, ["--num_val", "-1"], "argument --num_val: expected a positive integer, got '-1'"),
    (main_job.main, ["--max_train_steps", "0"], "argument --max_train_steps: expected a positive integer"),
])
def test_arguments_out_of_range_are_refused_by_the_parser(main, arguments, expected, capsys):
    assert_one_error_line(*run_tool(main, arguments, capsys), expected)


def test_evaluate_refuses_fp16_on_a_cpu_as_training_does(tmp_path, capsys):
    arguments = ["--model", tmp_path / "m", "--dataset", "cityscapes", "--data", tmp_path / "d",
                 "--mixed_precision", "fp16", "--output_dir", tmp_path / "out"]
    AcceleratorState._reset_state(reset_partial_state=True)  # an earlier test's state would keep its precision
    try:
        assert_one_error_line(*run_tool(evaluate.main, arguments, capsys), "mixed_precision fp16 does nothing on CPUs")
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)  # the process-wide state keeps the precision
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# Model folders, loaded by `pcaa_hf.inference.model_folders` for evaluate and export
# ---------------------------------------------------------------------------------------------------------------


def truncated_weights(folder):
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return weights


def num_labels_mismatch(folder):
    config = json.loads((folder / "config.json").read_text())
    config["num_labels"] = 7
    del config["id2label"], config["label2id"]
    (folder / "config.json").write_text(json.dumps(config))


def no_config(folder):
    (folder / "config.json").unlink()


MODEL_FOLDER_CASES = {
    "missing": (None, "model folder {folder}/nothing/here does not exist"),
    "truncated safetensors": (truncated_weights, "{folder}/model.safetensors is not a complete safetensors file"),
    "num_labels mismatch": (num_labels_mismatch, "the weights of {folder} do not fit its config.json (num_labels=7): "
                                                 "auxiliary_head.classifier.bias: weights (5,), config (7,)"),
    "no config.json": (no_config, "model folder {folder} has no config.json"),
}


def model_tool_arguments(tool, model, tmp_path):
    return {
        "evaluate": (evaluate.main, ["--model", model, "--dataset", "cityscapes", "--data", tmp_path / "data",
                                     "--output_dir", tmp_path / "out"]),
        "export": (export.main, ["--model", model, "--format", "dynamo", "--output_dir", tmp_path / "out"]),
    }[tool]


@pytest.mark.parametrize("tool", ["evaluate", "export"])
@pytest.mark.parametrize("case", sorted(MODEL_FOLDER_CASES))
def test_a_broken_model_folder_is_named(tool, case, small_pcaa_folder, tmp_path, capsys):
    damage, expected = MODEL_FOLDER_CASES[case]
    folder = writable_copy(small_pcaa_folder, tmp_path / "model")
    model = folder / "nothing" / "here" if damage is None else folder
    if damage is not None:
        damage(folder)
    main, arguments = model_tool_arguments(tool, model, tmp_path)
    assert_one_error_line(*run_tool(main, arguments, capsys), expected.format(folder=folder))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ---------------------------------------------------------------------------------------------------------------
# The generators
# ---------------------------------------------------------------------------------------------------------------


def test_generators_refuse_a_folder_holding_data_unless_told_to_overwrite(tmp_path, capsys):
    root = tmp_path / "cityscapes"
    write_cityscapes_tree(root, num_train=3, num_val=1, size=(32, 16))
    arguments = ["--output", root, "--num_train", "1", "--num_val", "1", "--size", "32", "16"]
    assert_one_error_line(*run_tool(make_synthetic.cityscapes, arguments, capsys),
                          f"{root} already holds leftImg8bit/ and gtFine/; choose another folder, or overwrite=True "
                          "(--overwrite) to delete them first")
    assert len(list(root.glob("leftImg8bit/train/*/*.png"))) == 3  # untouched

    assert run_tool(make_synthetic.cityscapes, [*arguments, "--overwrite"], capsys)[0] == 0
    assert len(list(root.glob("leftImg8bit/train/*/*.png"))) == 1  # no frame of the old tree left among the new

    ade = tmp_path / "ade"
    arguments = ["--output", ade, "--num_train", "1", "--num_val", "1", "--size", "32", "16"]
    assert run_tool(make_synthetic.ade20k, arguments, capsys)[0] == 0
    assert_one_error_line(*run_tool(make_synthetic.ade20k, arguments, capsys),
                          "ADEChallengeData2016 already holds images/ and annotations/")
