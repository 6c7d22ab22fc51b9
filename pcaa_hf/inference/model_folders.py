"""Loading a saved model folder (or a Hub id) and its image processor, with errors that say what is wrong.

`from_pretrained` alone reports a local folder that does not exist as an invalid Hub repo id, a truncated weights
file as a safetensors header error naming no file, and a config whose `num_labels` does not match the weights as "look
at the above report". `load_saved_model` and `load_saved_image_processor` check the folder first and name the
folder, the file or the mismatched weights instead. The tools (evaluate, predict, export) and training's
`--model_name_or_path` load models through them.
"""

import pickle
from pathlib import Path

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from safetensors import SafetensorError, safe_open
from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

from pcaa_hf.utils.safe_loading import weights_only_refusal


def check_safetensors_file(path):
    """Raise a ValueError naming `path` when it is no complete safetensors file (truncated, or not one at all)."""
    try:
        with safe_open(str(path), framework="pt"):  # reads the header, which must cover the whole file
            pass
    except SafetensorError as error:
        raise ValueError(f"{path} is not a complete safetensors file ({error}): it is truncated or corrupt; write "
                         "or copy it again.") from None


def check_model_source(name):
    """
    Check that `name` is a folder written by save_pretrained (config.json and complete safetensors files) or has the
    form of a Hub id; raise FileNotFoundError, NotADirectoryError or ValueError naming what is wrong.
    """
    path = Path(name)
    if path.is_file():
        raise NotADirectoryError(f"model {name} is a file; give a folder written by save_pretrained or a Hub id.")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model folder {name} has no config.json: it is not a folder written by "
                                    "save_pretrained.")
        for weights in sorted(path.glob("*.safetensors")):
            check_safetensors_file(weights)
        return
    try:
        validate_repo_id(str(name))
    except HFValidationError:
        raise FileNotFoundError(f"model folder {name} does not exist.") from None


def one_line(error):
    """An error's message on one line (transformers' span several), for a tool's one `error:` line."""
    return " ".join(str(error).split())


def loading_error(what, name, error):
    """An OSError saying `what` of `name` could not be loaded, and that a name with no folder was tried on the Hub."""
    tried = "" if Path(name).exists() else " (no folder of that name here, so it was tried as a Hub id)"
    return OSError(f"cannot load {what} {name}{tried}: {one_line(error)}")


def listing(items, limit=4):
    items = sorted(items)
    return "; ".join(items[:limit]) + (f"; and {len(items) - limit} more" if len(items) > limit else "")


def load_saved_model(name, model_class=AutoModelForSemanticSegmentation, trust_remote_code=False):
    """
    `model_class.from_pretrained(name)` for a save_pretrained folder or Hub id, refusing weights that do not fit the
    config (such as a `num_labels` other than the classifier's) or that it lacks, with the keys and shapes.
    """
    check_model_source(name)
    try:
        model, info = model_class.from_pretrained(name, trust_remote_code=trust_remote_code,
                                                  ignore_mismatched_sizes=True, output_loading_info=True)
    except OSError as error:
        raise loading_error("the model", name, error) from error
    except pickle.UnpicklingError as error:  # a .bin weights file holding more than tensors: possibly code
        raise ValueError(f"the weights of {name} are a pickle holding objects other than tensors, which could run "
                         f"code when loaded: refused ({weights_only_refusal(error)}).") from None
    if info["mismatched_keys"]:
        raise ValueError(f"the weights of {name} do not fit its config.json (num_labels={model.config.num_labels}): "
                         + listing(f"{key}: weights {tuple(saved)}, config {tuple(expected)}"
                                   for key, saved, expected in info["mismatched_keys"]))
    if info["missing_keys"]:
        raise ValueError(f"the weights of {name} lack tensors of the model its config.json describes: "
                         + listing(info["missing_keys"]))
    return model


def load_saved_image_processor(name, trust_remote_code=False):
    """`AutoImageProcessor.from_pretrained(name)`, naming the model when it has no (readable) image processor."""
    check_model_source(name)
    if Path(name).is_dir() and not (Path(name) / "preprocessor_config.json").is_file():
        raise FileNotFoundError(f"model folder {name} has no preprocessor_config.json: save the image processor "
                                "beside the model (image_processor.save_pretrained).")
    try:
        return AutoImageProcessor.from_pretrained(name, trust_remote_code=trust_remote_code)
    except OSError as error:
        raise loading_error("the image processor of", name, error) from error


__all__ = ["check_model_source", "check_safetensors_file", "load_saved_image_processor", "load_saved_model"]
