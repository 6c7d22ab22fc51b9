"""Publishing trained PCAA models: export folders and Hub uploads.

`write_export` writes model, image processor and model card into a folder atomically. `HubPublisher` uploads such
folders with retries and never raises: a training job keeps running when the Hub is unreachable, and the failed
uploads stay pending for `retry_pending`.
"""

import logging
import time
from pathlib import Path

from huggingface_hub import HfApi, ModelCard
from safetensors import safe_open

from pcaa_hf.utils.atomic_folders import write_folder_atomically

logger = logging.getLogger(__name__)


def check_export(folder, model, image_processor):
    """Raise unless `folder` reloads: config and image processor parse, the weights hold every tensor of `model`."""
    type(model.config).from_pretrained(folder)
    type(image_processor).from_pretrained(folder)
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise RuntimeError(f"The export {folder} has no model.safetensors.")
    with safe_open(str(weights), framework="pt") as stored:
        stored_names = set(stored.keys())
    expected_names = set(model.state_dict())
    if stored_names != expected_names:
        raise RuntimeError(f"The export's model.safetensors lacks {sorted(expected_names - stored_names)} and has "
                           f"unexpected {sorted(stored_names - expected_names)}.")
    ModelCard((folder / "README.md").read_text(encoding="utf-8"))


def write_export(folder, model, image_processor, card, overwrite=True):
    """
    Write `model` (config, safetensors and its code files), `image_processor` (with its code file) and `card`
    (README.md) into `folder` atomically: the new contents are written and checked to reload in a sibling folder,
    which then replaces `folder`; a failure leaves the previous export as it was.

    folder: the export folder; model: a `PCAAForSemanticSegmentation` (unwrapped from DDP/Accelerate; call this on
    the main process only); image_processor: its `PCAAImageProcessor`; card: a `ModelCard` (see
    `render_model_card`); overwrite: replace an existing non-empty `folder` (otherwise `FileExistsError`).
    Returns the resolved folder path.
    """
    def write_and_check(staging):
        model.save_pretrained(staging)
        image_processor.save_pretrained(staging)
        card.save(staging / "README.md")
        check_export(staging, model, image_processor)

    return write_folder_atomically(write_and_check, folder, overwrite)


class HubPublisher:
    """
    Uploads export folders to one Hub model repository, retrying failures and never raising, so that a training job
    keeps going when the Hub is unreachable. Local folders are only read.

    repo_id: the model repository ("owner/name"), created on the first upload (exist_ok).
    api: an object with `HfApi`'s `create_repo` and `upload_folder`; default `HfApi(token=token)`.
    token: the Hub token for the default api (None: the locally saved one).
    private: whether a newly created repository is private.
    attempts: how many times one upload is tried before it is kept as pending (at least 1).
    wait_seconds: the wait before the second try; it doubles before each further one (2, 4, 8, ... s).
    sleep: the function that waits (tests pass a recorder).

    An upload that fails `attempts` times is logged as a warning and kept in `pending` for `retry_pending()`. A later
    push to the same `path_in_repo` replaces the pending one, so a retry never puts older files over newer ones.
    """

    def __init__(self, repo_id, api=None, token=None, private=False, attempts=3, wait_seconds=2.0, sleep=time.sleep):
        if attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {attempts}.")
        self.repo_id = repo_id
        self.api = api if api is not None else HfApi(token=token)
        self.private = private
        self.attempts = attempts
        self.wait_seconds = wait_seconds
        self.sleep = sleep
        self.repo_created = False
        self.pending = {}  # path_in_repo -> (folder, commit_message, path_in_repo)

    def push(self, folder, commit_message, path_in_repo=None):
        """
        Upload `folder` to the repository (under `path_in_repo`, default its root) in one commit with
        `commit_message`, creating the repository first if this publisher has not yet. Returns True on success;
        on failure after all attempts, logs a warning, keeps the upload pending and returns False. Never raises
        (except KeyboardInterrupt/SystemExit).
        """
        folder = Path(folder)
        for attempt in range(self.attempts):
            if attempt:
                self.sleep(self.wait_seconds * 2 ** (attempt - 1))
            try:
                if not self.repo_created:
                    self.api.create_repo(repo_id=self.repo_id, repo_type="model", private=self.private,
                                         exist_ok=True)
                    self.repo_created = True
                self.api.upload_folder(repo_id=self.repo_id, repo_type="model", folder_path=str(folder),
                                       path_in_repo=path_in_repo, commit_message=commit_message)
            except Exception as error:  # any failure (HTTP, connection, OS, a bad folder) must not stop training
                last_error = error
                logger.info("Upload of %s to %s failed (attempt %d of %d): %r", folder, self.repo_id, attempt + 1,
                            self.attempts, error)
                continue
            self.pending.pop(path_in_repo, None)
            logger.info("Uploaded %s to the Hub repository %s (%s).", folder, self.repo_id, commit_message)
            return True
        self.pending[path_in_repo] = (folder, commit_message, path_in_repo)
        logger.warning("Could not upload %s to the Hub repository %s after %d attempts: %r. The local folder is kept "
                       "and the upload is pending (HubPublisher.retry_pending() tries again).", folder, self.repo_id,
                       self.attempts, last_error)
        return False

    def retry_pending(self):
        """
        Try every pending upload again, with the same retry policy. Returns the (folder, commit_message,
        path_in_repo) tuples that still failed (an empty list when all went through). A pending upload whose local
        folder no longer exists (e.g. a checkpoint rotated away) is dropped with a warning: it can never succeed.
        """
        still_failing = []
        for folder, commit_message, path_in_repo in list(self.pending.values()):
            if not folder.is_dir():
                del self.pending[path_in_repo]
                logger.warning("Dropping the pending upload of %s to %s (%s): the folder no longer exists.", folder,
                               self.repo_id, commit_message)
            elif not self.push(folder, commit_message, path_in_repo):
                still_failing.append((folder, commit_message, path_in_repo))
        return still_failing


__all__ = ["HubPublisher", "write_export"]
