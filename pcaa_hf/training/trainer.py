"""Training PCAA with Accelerate: one CPU to many GPUs, resumable to the exact weights, with periodic evaluation.

The loop is the authors': SGD (momentum 0.9) with the learning rate decayed per iteration by (1 - i / max)^0.9,
SyncBatchNorm across processes, the paper's augmentation. What it adds:
- Exact resume. Batches are a pure function of (seed, epoch): every epoch's order comes from a generator seeded
  with both, and each example's augmentation from (seed, epoch, example index). A checkpoint stores the model,
  optimiser, schedule and every process's RNG states; resuming skips the consumed batches of the epoch without
  loading them. A run killed at any point and resumed ends with the weights of an uninterrupted run. A resumed run
  must have the arguments it started with (`TrainingArguments.changes_breaking_resume`).
- Safe, atomic, verified checkpoints (`checkpoints.py`): only safetensors and JSON, nothing unpickled; written to
  `checkpoints/.checkpoint-N.partial`, flushed to disk and renamed to `checkpoint-N` once complete, with a manifest
  of checksums; resuming skips a broken newest checkpoint with a warning. The last `checkpoints_total_limit` are kept.
  A full disk ends the run with one message, the partial checkpoint removed, the earlier ones kept.
- One run per output folder: a lock held for the run (free again when its process dies), and a fresh run refuses a
  folder that holds another run's outputs unless told to resume or overwrite.
- Divergence stops the run at the step its loss turns non-finite, naming the step and the term; non-finite weights
  are never written into a checkpoint or an export.
- Evaluation every `eval_steps` with `pcaa_hf.evaluation.scoring` (each validation image counted once across processes),
  the best model by mIoU exported to `best/`, the final one to `model/`, each with a model card; optional Hub
  uploads that never stop training when the Hub cannot be reached.
"""

import logging
import math
import resource
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from safetensors import SafetensorError
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from pcaa_hf.conversion.openmmlab_backbones import load_pretrained_backbone
from pcaa_hf.data.builders import label_names, open_dataset, select_split
from pcaa_hf.data.label_sets import IMAGE_PROCESSOR_SETTINGS, label_maps
from pcaa_hf.data.synthetic import is_generated
from pcaa_hf.data.transforms import EvalTransform, TrainTransform, as_arrays, collate
from pcaa_hf.evaluation.scoring import evaluate_segmentation, metrics_to_json, results_table
from pcaa_hf.inference.model_folders import load_saved_model
from pcaa_hf.inference.segmentation_inference import SegmentationInference
from pcaa_hf.model.configuration_pcaa import PCAAConfig
from pcaa_hf.model.image_processing_pcaa import PCAAImageProcessor
from pcaa_hf.model.modeling_pcaa import PCAAForSemanticSegmentation
from pcaa_hf.publishing.hub import write_export
from pcaa_hf.publishing.model_cards import backbone_name, default_template, render_model_card
from pcaa_hf.utils.atomic_folders import (
    remove_interrupted_writes,
    sync_file,
    sync_folder,
    write_error,
    write_json_atomically,
    write_manifest,
)
from pcaa_hf.utils.folder_lock import FolderLock
from pcaa_hf.utils.process_settings import check_mixed_precision, end_processes
from pcaa_hf.utils.tensor_checks import non_finite_tensors

from .arguments import TrainingArguments
from .checkpoints import (
    TRAINER_STATE,
    checkpoints_in,
    load_training_state,
    read_json,
    resolve_checkpoint,
    save_rng_state,
    save_training_state,
)
from .sync_batch_norm import convert_sync_batch_norm

logger = logging.getLogger(__name__)

LOSS_TERMS = ("loss", "segmentation_loss", "auxiliary_loss", "region_loss")
RUN_FILE = "run.json"  # the arguments of the run that owns the output folder
# What a run writes into its output folder: a fresh run refuses a folder holding any of them (another run's).
RUN_OUTPUTS = ("checkpoints", "best", "model", "all_results.json", RUN_FILE)


class TrainingDivergedError(FloatingPointError):
    """The loss or the weights became non-finite (NaN or infinite)."""


class OtherProcessFailedError(RuntimeError):
    """Another process of the run failed; its own error names the cause."""


def open_datasets(args):
    """The train and evaluation splits of `args.data` and their label names."""
    splits = open_dataset(args.dataset_type, args.data, image_column=args.image_column, label_column=args.label_column)
    return (select_split(splits, args.train_split, args.data),
            select_split(splits, args.eval_split, args.data, args.max_eval_samples), label_names(splits))


def image_processor_for(dataset_type):
    """The processor exported with the model: the data set's raw-file conventions (label ids, ADE20K resize)."""
    return PCAAImageProcessor(**IMAGE_PROCESSOR_SETTINGS.get(dataset_type, {}))


def build_model(args, id2label):
    """
    A new PCAA model for `id2label` (its backbone from ImageNet weights with `pretrained_backbone`), or the weights
    of `model_name_or_path` (fine-tuning: the data set must have as many classes; the model takes its names).
    """
    id2label, label2id = label_maps([id2label[index] for index in sorted(id2label)])
    if args.model_name_or_path:
        model = load_saved_model(args.model_name_or_path, model_class=PCAAForSemanticSegmentation)
        if model.config.num_labels != len(id2label):
            raise ValueError(f"--model_name_or_path {args.model_name_or_path} predicts {model.config.num_labels} "
                             f"classes; the data set has {len(id2label)}.")
        renamed = {index: (model.config.id2label.get(index), name) for index, name in id2label.items()
                   if model.config.id2label.get(index) != name}
        if renamed:
            logger.warning("Fine-tuning %s on other classes: %d of %d renamed after the data set (%s)",
                           args.model_name_or_path, len(renamed), len(id2label), ", ".join(
                               f"{index}: {old} -> {new}" for index, (old, new) in list(renamed.items())[:5]))
            model.config.id2label, model.config.label2id = id2label, label2id
        return model
    config = PCAAConfig(
        decode_head_type=args.decode_head_type, backbone_depth=args.backbone_depth, output_stride=args.output_stride,
        multi_grid=args.multi_grid, bins=[tuple(grid) for grid in args.bins], hidden_size=args.hidden_size,
        auxiliary_hidden_size=args.auxiliary_hidden_size, classifier_dropout=args.classifier_dropout,
        use_ohem=args.use_ohem, num_labels=len(id2label), id2label=id2label, label2id=label2id,
    )
    model = PCAAForSemanticSegmentation(config)
    if args.pretrained_backbone:
        load_pretrained_backbone(model, args.pretrained_backbone)
        logger.info("Backbone initialised from %s", args.pretrained_backbone)
    return model


def poly_schedule(optimizer, max_steps, power):
    """The authors' per-iteration decay: lr_i = lr * (1 - i / max_steps) ** power for update i = 0, 1, ..."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1 - step / max_steps) ** power)


class AugmentedExamples(Dataset):
    """
    Items are (epoch, index) pairs: example `index` of `split`, augmented by `transform` with a generator seeded by
    (seed, epoch, index) — the same pixels however the run was split, resumed or distributed.
    """

    def __init__(self, split, transform, seed):
        self.split, self.transform, self.seed = split, transform, seed

    def __len__(self):
        return len(self.split)

    def __getitem__(self, item):
        epoch, index = item
        example = self.split[index]
        rng = np.random.default_rng([self.seed, epoch, index])
        pixel_values, labels = self.transform.augment(*as_arrays(example["image"], example["label"]), rng)
        return {"pixel_values": pixel_values, "labels": labels}


def epoch_batches(num_examples, batch_size, num_processes, process_index, seed, epoch):
    """
    This process's batches of one epoch, as lists of (epoch, index): a permutation seeded by (seed, epoch) cut into
    global batches of `batch_size * num_processes` (the incomplete last one dropped), each process taking its slice.
    """
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(num_examples, generator=generator).tolist()
    global_size = batch_size * num_processes
    return [[(epoch, index) for index in order[start + process_index * batch_size:
                                                 start + (process_index + 1) * batch_size]]
            for start in range(0, num_examples - global_size + 1, global_size)]


def peak_memory_gib(device):
    """Peak memory of this process so far: allocated GPU memory, or the resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class Trainer:
    """Runs `TrainingArguments`: `Trainer(args).train()` returns the final evaluation metrics (or None)."""

    def __init__(self, args, accelerator=None, publisher=None):
        self.args = args
        self.accelerator = accelerator or Accelerator(
            gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
            log_with=args.report_to if args.with_tracking else None, project_dir=args.output_dir)
        self.output_dir = Path(args.output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        self.publisher = publisher
        self.start_time = time.perf_counter()
        self.earlier_seconds = 0.0  # wall time of the run segments before a resume
        self.state = {"completed_steps": 0, "best_mean_iou": None, "best_step": None, "evaluations": [],
                      "settings": None}
        self.model = None
        self.lock = FolderLock(self.output_dir, purpose="pcaa training")

    # ---- setup -------------------------------------------------------------------------------------------------
    def prepare(self):
        """Take the output folder, then build data, model and optimiser and resume; release the folder on failure."""
        try:
            self.agree_on_failure(self.take_output_folder)
            self.build()
            self.agree_on_failure(self.resume_if_asked)
            # A template that cannot be rendered must fail now, not after the training it would describe.
            self.model_card(self.accelerator.unwrap_model(self.model), None)
            if self.accelerator.is_main_process:  # the folder's owner from now on: a run that could start
                write_json_atomically(self.output_dir / RUN_FILE, {"arguments": self.args.to_dict()})
        except BaseException:
            self.lock.release()
            raise

    def take_output_folder(self):
        """
        Lock the output folder (main process), clean up what a killed run left half-written, and make sure it holds
        no other run's outputs: they are deleted with `overwrite_output_dir`, continued with `resume_from_checkpoint`.
        """
        if not self.accelerator.is_main_process:
            return
        args = self.args
        self.lock.acquire()
        for folder in ("model", "best"):
            for name in remove_interrupted_writes(self.output_dir / folder):
                logger.info("Cleaned up %s, left by an export that was interrupted.", name)
        for partial in self.checkpoint_dir.glob(".checkpoint-*"):  # being written, replaced or deleted
            shutil.rmtree(partial, ignore_errors=True)
            logger.info("Removed %s, left by a checkpoint write or removal that was interrupted.", partial.name)
        earlier = [name for name in RUN_OUTPUTS if (self.output_dir / name).exists()]
        if earlier and args.overwrite_output_dir:
            logger.warning("--overwrite_output_dir: deleting %s in %s", ", ".join(earlier), self.output_dir)
            for name in earlier:
                path = self.output_dir / name
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
        elif earlier and not args.resume_from_checkpoint:
            raise FileExistsError(
                f"--output_dir {self.output_dir} holds another run ({', '.join(earlier)}). Continue it with "
                "--resume_from_checkpoint latest, delete it and start afresh with --overwrite_output_dir, or choose "
                "another --output_dir.")
        elif earlier and not checkpoints_in(self.checkpoint_dir):
            # Resuming a run killed before its first checkpoint starts it again: only with the same arguments.
            run_file = self.output_dir / RUN_FILE
            if not run_file.is_file():
                raise FileExistsError(f"--output_dir {self.output_dir} holds outputs of a run with unknown arguments "
                                      f"(no {RUN_FILE}): delete them with --overwrite_output_dir, or choose another "
                                      "--output_dir.")
            self.check_unchanged(read_json(run_file), run_file)

    def agree_on_failure(self, step):
        """
        Run `step` on every process; if it failed on any, raise on all (its own error where it failed), so that no
        process waits forever for one that has stopped.
        """
        error = None
        try:
            step()
        except Exception as caught:  # re-raised below, on every process
            error = caught
        if self.accelerator.num_processes > 1:
            reports = gather_object([None if error is None else f"{type(error).__name__}: {error}"])
            failures = [report for report in reports if report is not None]
            if error is None and failures:
                raise OtherProcessFailedError(f"Stopped because another process failed: {failures[0]}")
        if error is not None:
            raise error

    def check_unchanged(self, earlier, source):
        """Raise a ValueError naming each argument that differs from the run's, as `source` recorded them."""
        if not isinstance(earlier, dict) or not isinstance(earlier.get("arguments"), dict):
            raise ValueError(f"{source} does not record the run's arguments.")
        changes = self.args.changes_breaking_resume(earlier["arguments"])
        if changes:
            raise ValueError(
                f"Cannot resume from {source}: the run was started with other arguments (" + "; ".join(
                    f"{name} {old!r} -> {new!r}" for name, old, new in changes) + "). A resumed run continues "
                "exactly as it started: pass its arguments. To train on from its weights with other settings, "
                "fine-tune in a new --output_dir with --model_name_or_path <its checkpoint-N or model/ folder>.")

    def build(self):
        args, accelerator = self.args, self.accelerator
        check_mixed_precision(accelerator)
        set_seed(args.seed)
        self.train_split, self.eval_split, self.id2label = open_datasets(args)
        global_batch = args.per_device_train_batch_size * accelerator.num_processes
        if len(self.train_split) < global_batch:
            raise ValueError(f"The train split has {len(self.train_split)} images, fewer than one batch of "
                             f"{global_batch} ({args.per_device_train_batch_size} per process).")
        self.processor = image_processor_for(args.dataset_type)
        model = build_model(args, self.id2label)
        if args.gradient_checkpointing:
            model.activation_checkpointing_enable()
        if accelerator.num_processes > 1:
            model = convert_sync_batch_norm(model, accelerator.device)
            synced = sum("SyncBatchNorm" in type(module).__name__ for module in model.modules())
            logger.info("SyncBatchNorm: %d BatchNorm layers synchronised across %d processes (%s)", synced,
                        accelerator.num_processes, accelerator.device.type)
        optimizer = torch.optim.SGD(model.parameters(), lr=args.learning_rate, momentum=args.momentum,
                                    weight_decay=args.weight_decay)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        # Not prepared: accelerate would step a prepared scheduler once per process at every update.
        self.scheduler = poly_schedule(self.optimizer.optimizer, args.max_train_steps, args.poly_power)
        self.examples = AugmentedExamples(
            self.train_split, TrainTransform(args.base_size, args.crop_size, image_processor=self.processor), args.seed)
        self.evaluation = self.eval_split.with_transform(EvalTransform(image_processor=self.processor))
        self.inference = SegmentationInference(args.eval_mode, tuple(args.eval_crop_size),
                                               args.eval_stride and tuple(args.eval_stride))
        if args.with_tracking:
            accelerator.init_trackers("pcaa", config={k: str(v) for k, v in args.to_dict().items()})
        self.state["settings"] = self.settings()

    def resume_if_asked(self):
        if self.args.resume_from_checkpoint:
            checkpoint = resolve_checkpoint(self.args.resume_from_checkpoint, self.checkpoint_dir)
            if checkpoint is None:
                logger.info("No checkpoint in %s yet: starting from scratch.", self.checkpoint_dir)
            else:
                self.resume(checkpoint)

    def settings(self):
        """What fixes the data position besides the arguments: a resumed run must keep them."""
        return {"num_processes": self.accelerator.num_processes, "train_images": len(self.train_split),
                "mixed_precision": self.accelerator.mixed_precision}

    def resume(self, checkpoint):
        state = read_json(checkpoint / TRAINER_STATE)
        self.check_unchanged(state, checkpoint / TRAINER_STATE)
        changed = {name: (value, self.state["settings"][name]) for name, value in (state.get("settings") or {}).items()
                   if self.state["settings"].get(name) != value}
        if changed:
            raise ValueError(f"Cannot resume from {checkpoint}: the run changed " + ", ".join(
                f"{name} from {old} to {new}" for name, (old, new) in changed.items()) + " (resuming needs the "
                "same batches and schedule; start a new --output_dir or use --model_name_or_path to fine-tune).")
        state = load_training_state(checkpoint, model=self.accelerator.unwrap_model(self.model),
                                    optimizer=self.optimizer.optimizer, scheduler=self.scheduler,
                                    scaler=self.accelerator.scaler, process_index=self.accelerator.process_index)
        self.state = {**state, "settings": self.state["settings"]}
        self.earlier_seconds = state.get("wall_time_seconds", 0.0)
        logger.info("Resumed from %s at step %d.", checkpoint, self.state["completed_steps"])

    def batches(self):
        """This process's batches from the current position to the end of training, epoch after epoch."""
        args, accelerator = self.args, self.accelerator
        per_epoch = len(self.train_split) // (args.per_device_train_batch_size * accelerator.num_processes)
        consumed = self.state["completed_steps"] * args.gradient_accumulation_steps
        epoch, skip = divmod(consumed, per_epoch)
        # An explicit generator: DataLoader workers would otherwise draw their seed from the global RNG, whose state
        # the checkpoint restores for dropout.
        generator = torch.Generator().manual_seed(args.seed)
        while True:
            batches = epoch_batches(len(self.train_split), args.per_device_train_batch_size,
                                    accelerator.num_processes, accelerator.process_index, args.seed, epoch)[skip:]
            loader = DataLoader(self.examples, batch_sampler=batches, collate_fn=collate,
                                num_workers=args.num_workers, generator=generator,
                                pin_memory=accelerator.device.type == "cuda")
            for batch in loader:
                yield {key: value.to(accelerator.device, non_blocking=True) for key, value in batch.items()}
            epoch, skip = epoch + 1, 0

    # ---- the loop ----------------------------------------------------------------------------------------------
    def train(self):
        """Prepare (unless done), train, evaluate and export; the output folder is released at the end."""
        try:
            if self.model is None:
                self.prepare()
            return self.train_evaluate_export()
        finally:
            self.lock.release()

    def train_evaluate_export(self):
        args, accelerator = self.args, self.accelerator
        total_batch = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
        model = accelerator.unwrap_model(self.model)
        logger.info("Training %s (%s head) on %d images (%s), %d steps of %d images (%d process(es) x %d x %d "
                    "accumulated) on %s, mixed precision %s", type(model).__name__, model.config.decode_head_type,
                    len(self.train_split), args.data, args.max_train_steps, total_batch, accelerator.num_processes,
                    args.per_device_train_batch_size, args.gradient_accumulation_steps, accelerator.device.type,
                    accelerator.mixed_precision)
        with logging_redirect_tqdm():  # log lines above the progress bar, not glued to it
            self.run_steps()
        self.check_processes_agree()
        metrics = self.evaluate_and_keep_best(args.max_train_steps) if len(self.eval_split) else None
        self.export(self.output_dir / "model", metrics, "Final model")
        if accelerator.is_main_process:
            self.write_results(metrics)
        if self.publisher is not None and accelerator.is_main_process:
            for upload in self.publisher.retry_pending():
                logger.warning("Still could not upload %s to %s; upload it later with `huggingface-cli upload`.",
                               upload[0], self.publisher.repo_id)
        end_processes(accelerator)
        return metrics

    def run_steps(self):
        """Optimiser updates from the current step to `max_train_steps`, logging, evaluating and checkpointing."""
        args, accelerator = self.args, self.accelerator
        with tqdm(total=args.max_train_steps, initial=self.state["completed_steps"], desc="Training",
                  disable=not accelerator.is_local_main_process, unit="step") as progress:
            sums, micro_batches, interval_start = {}, 0, time.perf_counter()
            self.model.train()
            batches = self.batches()
            while self.state["completed_steps"] < args.max_train_steps:
                batch = next(batches)
                with accelerator.accumulate(self.model):
                    outputs = self.model(**batch)
                    terms = self.check_loss_is_finite(outputs)
                    accelerator.backward(outputs.loss)
                    self.optimizer.step()  # skipped by accelerate while gradients accumulate
                    self.optimizer.zero_grad()
                for name, value in terms.items():
                    sums[name] = sums.get(name, 0.0) + value
                micro_batches += 1
                if not accelerator.sync_gradients:
                    continue
                learning_rate = self.scheduler.get_last_lr()[0]  # the rate this update used
                self.scheduler.step()
                self.state["completed_steps"] += 1
                step = self.state["completed_steps"]
                progress.update(1)
                if step % args.logging_steps == 0 or step == args.max_train_steps:
                    elapsed = time.perf_counter() - interval_start
                    self.log_training(step, sums, micro_batches, elapsed, progress, learning_rate)
                    sums, micro_batches, interval_start = {}, 0, time.perf_counter()
                paused = time.perf_counter()
                if args.eval_steps and step % args.eval_steps == 0 and step != args.max_train_steps:
                    self.evaluate_and_keep_best(step)
                    self.model.train()
                if args.checkpointing_steps and step % args.checkpointing_steps == 0:
                    self.save_checkpoint(step)
                interval_start += time.perf_counter() - paused  # images/s counts training time only

    def check_loss_is_finite(self, outputs):
        """
        The loss terms of this micro-batch (detached, float32), after checking that none is NaN or infinite on any
        process: training stops at the step where the loss diverges, before its update reaches the weights.
        """
        terms = {name: getattr(outputs, name).detach().float() for name in LOSS_TERMS
                 if getattr(outputs, name) is not None}
        values = torch.stack(list(terms.values()))
        if self.accelerator.num_processes > 1:  # NaN and infinity survive the mean: every process stops together
            values = self.accelerator.reduce(values, reduction="mean")
        if not torch.isfinite(values).all():
            step = self.state["completed_steps"] + 1
            figures = ", ".join(f"{name.replace('_', ' ')} {value:.4g}" for name, value in zip(terms, values.tolist()))
            raise TrainingDivergedError(
                f"Training diverged at step {step}: the loss is no longer finite ({figures}). No weights of this step "
                f"were saved; {self.newest_checkpoint_text()}. Lower --learning_rate (now {self.args.learning_rate}) "
                "or check the data.")
        return terms

    def newest_checkpoint_text(self):
        checkpoints = checkpoints_in(self.checkpoint_dir)
        return (f"the newest checkpoint is {checkpoints[-1][1]}" if checkpoints
                else "there is no checkpoint of this run")

    def check_weights_are_finite(self, model, destination):
        """Refuse to write non-finite weights: the run diverged after its last loss check (in the last update)."""
        broken = non_finite_tensors(model.state_dict())
        if broken:
            raise TrainingDivergedError(
                f"Training diverged by step {self.state['completed_steps']}: {len(broken)} weight tensors are no "
                f"longer finite ({', '.join(broken[:5])}{', ...' if len(broken) > 5 else ''}), so {destination} was "
                f"not written; {self.newest_checkpoint_text()}. Lower --learning_rate (now {self.args.learning_rate}).")

    def check_processes_agree(self):
        """Every process must end with the same weights and statistics (DDP and SyncBatchNorm keep them equal)."""
        accelerator = self.accelerator
        if accelerator.num_processes == 1:
            return
        state = accelerator.unwrap_model(self.model).state_dict()
        checksum = torch.stack([tensor.double().sum() for tensor in state.values()])
        gathered = accelerator.gather(checksum[None]).cpu()
        if not torch.equal(gathered, gathered[:1].expand_as(gathered)):
            raise RuntimeError("The processes ended training with different weights; please report this.")
        logger.info("Weights and BatchNorm statistics agree across the %d processes.", accelerator.num_processes)

    def write_results(self, metrics):
        """all_results.json: the final figures and the evaluations made during training."""
        results = {"completed_steps": self.state["completed_steps"], "best_mean_iou": self.state["best_mean_iou"],
                   "best_step": self.state["best_step"], "evaluations": self.state["evaluations"]}
        if metrics is not None:
            results.update({f"eval_{key}": value for key, value in metrics_to_json(metrics, self.id2label).items()})
        write_json_atomically(self.output_dir / "all_results.json", results)

    def log_training(self, step, sums, micro_batches, elapsed, progress, learning_rate):
        args, accelerator = self.args, self.accelerator
        figures = {name: accelerator.reduce(total / micro_batches, reduction="mean").item()
                   for name, total in sums.items()}
        images = micro_batches * args.per_device_train_batch_size * accelerator.num_processes
        figures.update(learning_rate=learning_rate, images_per_second=images / elapsed,
                       peak_memory_gib=peak_memory_gib(accelerator.device))
        progress.set_postfix(loss=f"{figures['loss']:.4f}", lr=f"{figures['learning_rate']:.2e}")
        logger.info("step %d: %s", step, ", ".join(f"{name} {value:.4g}" for name, value in figures.items()))
        if args.with_tracking:
            accelerator.log({f"train/{name}": value for name, value in figures.items()}, step=step)

    # ---- evaluation, checkpoints, exports ----------------------------------------------------------------------
    def evaluate_and_keep_best(self, step):
        args, accelerator = self.args, self.accelerator
        metrics = evaluate_segmentation(self.model, self.evaluation, len(self.id2label), self.inference,
                                        accelerator=accelerator, batch_size=args.per_device_eval_batch_size,
                                        num_workers=args.num_workers, description=f"Evaluating at step {step}")
        mean_iou = float(metrics["mean_iou"])
        self.state["evaluations"].append({"step": step, "mean_iou": mean_iou if math.isfinite(mean_iou) else None,
                                          "num_images": metrics["num_images"]})
        if accelerator.is_main_process:
            logger.info("Evaluation at step %d on %d images:\n%s", step, metrics["num_images"],
                        results_table(metrics, self.id2label))
        if args.with_tracking:
            accelerator.log({"eval/mean_iou": mean_iou, "eval/mean_accuracy": float(metrics["mean_accuracy"]),
                             "eval/overall_accuracy": float(metrics["overall_accuracy"])}, step=step)
        best = self.state["best_mean_iou"]
        if math.isfinite(mean_iou) and (best is None or mean_iou > best):
            self.state.update(best_mean_iou=mean_iou, best_step=step)
            self.export(self.output_dir / "best", metrics, f"Best model (step {step}, mIoU {mean_iou:.4f})")
        return metrics

    def save_checkpoint(self, step):
        """
        Write `checkpoint-{step}` (see `checkpoints.py`) under a partial name, flush it to disk and rename it once
        every process is done. A failure (a full disk) removes the partial folder and stops every process with one
        message; earlier checkpoints and exports stay.
        """
        accelerator = self.accelerator
        final = self.checkpoint_dir / f"checkpoint-{step}"
        partial = self.checkpoint_dir / f".checkpoint-{step}.partial"
        model = accelerator.unwrap_model(self.model)
        self.check_weights_are_finite(model, final)

        def make_partial():
            if accelerator.is_main_process:
                shutil.rmtree(partial, ignore_errors=True)  # left by a run killed while writing it
                partial.mkdir(parents=True)

        def write_files():
            save_rng_state(partial, accelerator.process_index)
            if accelerator.is_main_process:
                self.state["wall_time_seconds"] = self.wall_time_seconds()
                save_training_state(partial, model=model, image_processor=self.processor,
                                    optimizer=self.optimizer.optimizer, scheduler=self.scheduler,
                                    scaler=accelerator.scaler,
                                    trainer_state={**self.state, "arguments": self.args.to_dict()})

        def complete():
            if accelerator.is_main_process:
                write_manifest(partial)
                sync_folder(partial)
                replaced = self.checkpoint_dir / f".checkpoint-{step}.replaced"
                if final.exists():  # written by an earlier segment of the run, resumed from an older checkpoint
                    final.replace(replaced)
                partial.replace(final)
                sync_file(self.checkpoint_dir)
                shutil.rmtree(replaced, ignore_errors=True)

        try:
            self.agree_on_failure(make_partial)
            self.agree_on_failure(write_files)
            self.agree_on_failure(complete)
        except (OSError, SafetensorError) as error:
            shutil.rmtree(partial, ignore_errors=True)
            kept = [path.name for _, path in checkpoints_in(self.checkpoint_dir)]
            raise write_error(final, error, f"the partial checkpoint was removed; kept: "
                              f"{', '.join(kept) or 'no earlier checkpoint'} and the exports") from error
        if accelerator.is_main_process:
            # Rotate among this run's checkpoints up to now: newer ones (left by an earlier run resumed from an older
            # checkpoint) are not this run's to delete, and the one just written is always kept.
            checkpoints = [(number, path) for number, path in checkpoints_in(self.checkpoint_dir) if number <= step]
            if self.args.checkpoints_total_limit:
                for number, old in checkpoints[: -self.args.checkpoints_total_limit]:
                    removed = old.replace(self.checkpoint_dir / f".checkpoint-{number}.removed")  # never half-deleted
                    shutil.rmtree(removed, ignore_errors=True)
            logger.info("Saved checkpoint %s", final)
            if self.publisher is not None and self.args.push_checkpoints:
                self.publisher.push(final, f"Checkpoint at step {step}", path_in_repo=f"checkpoints/{final.name}")
        accelerator.wait_for_everyone()

    def export(self, folder, metrics, description):
        """A `save_pretrained` folder with the processor, the code and a model card (main process only)."""
        accelerator = self.accelerator
        model = accelerator.unwrap_model(self.model)
        self.check_weights_are_finite(model, folder)
        accelerator.wait_for_everyone()

        def write():
            if accelerator.is_main_process:
                write_export(folder, model, self.processor, self.model_card(model, metrics))
                logger.info("%s written to %s", description, folder)
                if self.publisher is not None:  # the final model at the repository's root, the best one beside it
                    self.publisher.push(folder, description,
                                        path_in_repo=None if folder.name == "model" else folder.name)

        self.agree_on_failure(write)

    def model_card(self, model, metrics):
        template = self.args.model_card_template or default_template(model.config, self.args.dataset_type)
        return render_model_card(
            template, repo_id=self.repo_id(), config=model.config, id2label=self.id2label, metrics=metrics,
            evaluation=self.evaluation_facts(metrics), recipe=self.args.to_dict(), data=self.data_facts(),
            training=self.training_facts())

    def evaluation_facts(self, metrics):
        return {"dataset": self.args.dataset_type, "split": self.args.eval_split,
                "num_images": metrics["num_images"] if metrics else 0, **self.inference.to_dict()}

    def data_facts(self):
        generated = is_generated(self.args.data)
        name = "Generated scenes" if generated else (None if self.args.dataset_type != "datasets"
                                                     else Path(self.args.data).name)
        return {"dataset": name, "dataset_type": self.args.dataset_type, "source": self.args.data,
                "generated": generated, "train_images": len(self.train_split),
                "validation_images": len(self.eval_split)}

    def repo_id(self):
        """The card's model id: --hub_model_id, else a descriptive name."""
        if self.args.hub_model_id:
            return self.args.hub_model_id
        backbone = backbone_name(self.accelerator.unwrap_model(self.model).config).lower().replace("resnet-", "r")
        generated = "generated-" if is_generated(self.args.data) else ""
        return f"pcaa-{backbone}-{generated}{self.args.dataset_type}"

    def training_facts(self):
        accelerator, args = self.accelerator, self.args
        return {"steps": self.state["completed_steps"], "processes": accelerator.num_processes,
                "total_batch_size": args.per_device_train_batch_size * accelerator.num_processes
                * args.gradient_accumulation_steps, "mixed_precision": accelerator.mixed_precision,
                "hardware": str(accelerator.device), "wall_time_seconds": self.wall_time_seconds()}

    def wall_time_seconds(self):
        """The whole run's wall time so far, resumed segments included."""
        return self.earlier_seconds + time.perf_counter() - self.start_time



__all__ = ["OtherProcessFailedError", "Trainer", "TrainingArguments", "TrainingDivergedError", "epoch_batches",
           "poly_schedule"]
