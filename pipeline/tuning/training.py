"""Optional stage: train the backbone itself, with a new head for the dataset's classes.

Strategies (the question every transfer-learning tutorial ends with: are frozen features enough?):
  full     all layers, starting from the pretrained weights
  partial  the first N stages frozen, the rest and the head trained
  head     the backbone frozen, only the head trained: the on-the-fly counterpart of stage two
  scratch  random init (`weights none`), all layers trained: the baseline pretraining must beat

The best epoch by val accuracy is kept and evaluated once on test (on val when there is no test split).
Multi-label data (`multi_label`: a labels file listing several labels per image, pipeline.data.tags) trains
each class's own sigmoid with BCE, keeps the best epoch by val macro average precision, and fits each class's
temperature and decision threshold on val, as stage two's multi-label heads do (pipeline.heads.multilabel).
Under torchrun (WORLD_SIZE > 1) training runs as DistributedDataParallel; see pipeline.runtime.distributed.
"""
from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from scipy.special import expit
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from pipeline.data.folders import Dataset, dataset_digest, label_text
from pipeline.data.images import ImageFiles, collate, worker_init
from pipeline.features.backbones.loading import Backbone, Preprocessing, load_backbone, recorded_backbone
from pipeline.features.engines.torch import FeatureHook
from pipeline.features.spec import BackboneSpec
from pipeline.tuning.settings import FinetuneSettings
from pipeline.heads import calibration, multilabel
from pipeline.heads.familiarity import Familiarity
from pipeline.heads.metrics import confusion_png, confusion_rows, headline, macro_ap, precision_recall_png
from pipeline.heads.metrics import evaluate as score_metrics
from pipeline.runtime import distributed
from pipeline.runtime.devices import default_workers, resolve_device
from pipeline.runtime.errors import Interrupted, InputError, warn
from pipeline.runtime.files import replaced_atomically, write_atomically
from pipeline.runtime.settings import validate
from pipeline.storage import modeldir, statefile

CROP_SCALE = (0.5, 1.0)   # area range of the random resized crop: small datasets suffer from harsher crops


class FinetuneNetwork(nn.Module):
    """The registry backbone with a new linear head on its hooked global-pool output.

    The hook makes this work for any registry or timm model without knowing where its own
    classifier sits; that classifier still runs but feeds nothing (a negligible cost)."""

    def __init__(self, backbone: Backbone, n_classes: int):
        super().__init__()
        self.backbone = backbone.model
        self.head = nn.Linear(backbone.feature_dim, n_classes)
        self._features = FeatureHook(self.backbone, backbone.layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate features [N, D]: what the head reads, and what familiarity compares."""
        self.backbone(x)
        return self._features.output


def stages(model: nn.Module, layer: str) -> list[tuple[str, nn.Module]]:
    """The backbone's stages with parameters, in order, up to the hooked layer: its top-level
    modules, with sequential trunks (timm's `blocks`, torchvision's `features`, `layerN`) split into blocks."""
    out = []
    for name, child in model.named_children():
        parts = list(child.named_children()) if isinstance(child, nn.Sequential) else [("", child)]
        for sub, module in parts:
            full = f"{name}.{sub}" if sub else name
            if full == layer or layer.startswith(full + "."):
                return out
            if any(True for _ in module.parameters()):
                out.append((full, module))
    return out


def frozen_stages(backbone: Backbone, s: FinetuneSettings) -> list[tuple[str, nn.Module]]:
    """The stages the strategy keeps frozen (head: all of them)."""
    all_stages = stages(backbone.model, backbone.layer)
    if s.strategy == "head":
        return all_stages
    if s.strategy != "partial":
        return []
    n = len(all_stages) // 2 if s.freeze is None else s.freeze
    if not 0 < n < len(all_stages):
        raise InputError(f"freeze must be between 1 and {len(all_stages) - 1} for {backbone.name} "
                        f"({len(all_stages)} stages: {', '.join(name for name, _ in all_stages)}), got {n}")
    return all_stages[:n]


def set_trainable(model: FinetuneNetwork, frozen: list[tuple[str, nn.Module]], head_only: bool) -> None:
    """Train mode and gradients for the trained parts; frozen parts stay in eval mode, so their
    batch-norm statistics stay those of pretraining."""
    model.train()
    model.backbone.requires_grad_(not head_only)
    if head_only:
        model.backbone.eval()
    for _, module in frozen:
        module.requires_grad_(False).eval()


class PlateauSchedule:
    """Step-on-plateau: multiply every learning rate by `factor` when the val score (`selected_by`) has not
    improved for `patience` epochs; once `max_decays` decays are spent, the next plateau ends training."""

    def __init__(self, optimizer: torch.optim.Optimizer, patience: int, factor: float, max_decays: int):
        self.optimizer, self.patience, self.factor, self.max_decays = optimizer, patience, factor, max_decays
        self.best, self.waited, self.decays = -math.inf, 0, 0

    def step(self, val_score: float) -> bool:
        """Record one epoch's val score; True means stop."""
        if val_score > self.best:
            self.best, self.waited = val_score, 0
            return False
        self.waited += 1
        if self.waited < self.patience:
            return False
        if self.decays == self.max_decays:
            return True
        self.decays, self.waited = self.decays + 1, 0
        for group in self.optimizer.param_groups:
            group["lr"] *= self.factor
        return False


def train_transform(pre: Preprocessing, s: FinetuneSettings):
    """Training augmentation as chosen; without a random crop, the eval resize and centre crop."""
    from torchvision import transforms as T
    mode = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}[pre.interpolation]
    ops = ([T.RandomResizedCrop(pre.image_size, scale=CROP_SCALE, interpolation=mode)] if s.random_crop
           else [T.Resize(pre.resize, interpolation=mode), T.CenterCrop(pre.image_size)])
    if s.flip:
        ops.append(T.RandomHorizontalFlip())
    if s.rotation:
        ops.append(T.RandomRotation(s.rotation, interpolation=mode))
    if s.color_jitter:
        ops.append(T.ColorJitter(s.color_jitter, s.color_jitter, s.color_jitter))
    return T.Compose([*ops, T.ToTensor(), T.Normalize(pre.mean, pre.std)])


class Batches:
    """A DataLoader over one split that records each image's SHA-256 and any file it cannot use."""

    def __init__(self, dataset: Dataset, split: str, transform, batch_size: int, workers: int, shuffle: bool,
                 seed: int, seen: dict, skipped: dict, sharded: bool = False, shortest: int | None = None):
        """Why so many parameters: the DataLoader's own options, and the records the batches keep (`seen`,
        `skipped`). `sharded`: each torchrun rank reads its share through a DistributedSampler (shuffled
        when `shuffle`); `set_epoch` reshuffles it. `shortest`: see `pipeline.data.images.decode_image`."""
        self.samples = dataset.split(split)
        self.n_classes = len(dataset.classes) if dataset.multi_label else None
        self.split, self.seen, self.skipped, self.seed = split, seen, skipped, seed
        files = ImageFiles(dataset.root, self.samples, transform, shortest=shortest)
        self.sampler = DistributedSampler(files, shuffle=shuffle, seed=seed) if sharded else None
        self.loader = DataLoader(files, batch_size=batch_size, shuffle=shuffle and not sharded,
                                 sampler=self.sampler, num_workers=workers, collate_fn=collate,
                                 generator=torch.Generator().manual_seed(seed), worker_init_fn=worker_init())

    def __len__(self) -> int:
        return len(self.sampler) if self.sampler else len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        """Make the epoch's batch order (and the workers' augmentation seeds) depend on (seed, epoch) alone."""
        if self.sampler:
            self.sampler.set_epoch(epoch)
        else:
            self.loader.generator.manual_seed(self.seed + epoch)

    def __iter__(self):
        for good, images, bad in self.loader:
            for i, reason in bad:
                self.skipped[self.samples[i].path] = reason
            for i, digest in good:
                self.seen[self.samples[i].path] = (self.samples[i].label, self.split, digest)
            if images is not None:
                yield images, targets([self.samples[i].label for i, _ in good], self.n_classes), len(bad)


def targets(labels: list, n_classes: int | None) -> torch.Tensor:
    """A batch's labels as the loss reads them: class indices or, given `n_classes` (multi-label data, each label
    a tuple of class indices), a 0/1 float matrix [N, n_classes]."""
    if n_classes is None:
        return torch.tensor(labels)
    out = torch.zeros(len(labels), n_classes)
    for row, tags in enumerate(labels):
        out[row, list(tags)] = 1
    return out


class LabelsBCE(nn.Module):
    """BCE of each class's own sigmoid, summed over the classes and averaged over the images: each logit's
    gradient has the scale cross-entropy gives it (the mean over all entries would divide it by the number of
    classes), so the same learning rates serve single- and multi-label data."""

    def __init__(self):
        super().__init__()
        self.bce = nn.BCEWithLogitsLoss(reduction="none")

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.bce(logits, labels).sum(1).mean()


def loss_function(multi_label: bool) -> nn.Module:
    """Cross-entropy of the softmax over the classes, or (multi-label data) `LabelsBCE`."""
    return LabelsBCE() if multi_label else nn.CrossEntropyLoss()


def selected_by(multi_label: bool) -> str:
    """The history column whose best value chooses the epoch kept."""
    return "val_macro_ap" if multi_label else "val_acc"


def decisions(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(right, made): one decision per image (the top class), or per image and class of a label matrix (a
    logit of at least 0: a sigmoid of at least 0.5)."""
    if labels.dim() == 2:
        return int(((logits >= 0) == labels.bool()).sum()), labels.numel()
    return int((logits.argmax(1) == labels).sum()), len(labels)


def _autocast(dev: torch.device):
    return torch.autocast(dev.type, dtype=torch.float16, enabled=dev.type == "cuda")


def _to(images: torch.Tensor, dev: torch.device) -> torch.Tensor:
    return images.to(dev, non_blocking=True).contiguous(memory_format=torch.channels_last)


def train_one_epoch(model: nn.Module, batches, loss_fn, optimizer, scaler, dev: torch.device,
                    desc: str, quiet: bool) -> dict:
    """One pass over the training split; returns its mean loss, accuracy (`decisions`), images and seconds."""
    total_loss, correct, made, n, start = 0.0, 0, 0, 0, time.perf_counter()
    with tqdm(total=len(batches), unit="img", desc=desc, disable=quiet, leave=False) as bar:
        for images, labels, n_bad in batches:
            images, labels = _to(images, dev), labels.to(dev)
            with _autocast(dev):
                logits = model(images)
                loss = loss_fn(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            total_loss += loss.item() * len(labels)
            right, total = decisions(logits, labels)
            correct, made, n = correct + right, made + total, n + len(labels)
            bar.update(len(labels) + n_bad)
    seconds = time.perf_counter() - start
    return {"train_loss": total_loss / max(n, 1), "train_acc": correct / max(made, 1),
            "images": n, "train_seconds": seconds}


class Evaluation(NamedTuple):
    loss: float
    accuracy: float        # as `decisions` counts
    logits: np.ndarray
    features: np.ndarray   # the penultimate ones
    labels: np.ndarray     # class indices, or a 0/1 matrix [N, classes]

    @property
    def score(self) -> float:
        """What chooses the best epoch: accuracy, or macro average precision of a label matrix."""
        return macro_ap(self.labels, self.logits) if self.labels.ndim == 2 else self.accuracy


@torch.inference_mode()
def evaluate(model: FinetuneNetwork, batches, loss_fn, dev: torch.device) -> Evaluation:
    """The mean loss, accuracy, logits, features and labels of one split, in eval mode."""
    model.eval()
    logits, features, labels = [], [], []
    for images, y, _ in batches:
        with _autocast(dev):
            f = model.features(_to(images, dev))
            logits.append(model.head(f).float().cpu())
        features.append(f.float().cpu())
        labels.append(y)
    if not logits:
        raise InputError(f"no usable image in the {batches.split} split")
    out, y = torch.cat(logits), torch.cat(labels)
    right, made = decisions(out, y)
    return Evaluation(loss_fn(out, y).item(), right / made, out.numpy(), torch.cat(features).numpy(),
                      y.numpy().astype(np.uint8) if y.dim() == 2 else y.numpy())


def make_optimizer(model: FinetuneNetwork, s: FinetuneSettings) -> torch.optim.Optimizer:
    """Two parameter groups: the head at `lr`, the backbone at `lr * backbone_lr_scale` (scratch: `lr`)."""
    scale = 1.0 if s.strategy == "scratch" else s.backbone_lr_scale
    groups = [{"params": list(model.head.parameters()), "lr": s.lr},
              {"params": list(model.backbone.parameters()), "lr": s.lr * scale}]
    if s.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    return torch.optim.AdamW(groups, lr=s.lr, weight_decay=s.weight_decay)


def network(info: dict, state: dict) -> FinetuneNetwork:
    """Rebuild a fine-tuned model directory's network (model.json + state dict) in eval mode."""
    spec = BackboneSpec.from_dict(info["backbone"])
    model = FinetuneNetwork(recorded_backbone(spec, weights="none"),
                       len(info["classes"]))
    model.load_state_dict(state)
    return model.eval()


def curves(history: list[dict], title: str):
    """The loss and accuracy curves of train and val per epoch (and val macro AP, where the history has it), as a
    matplotlib figure (whole epochs on x)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, what in zip(axes, ("loss", "acc")):
        ax.plot(epochs, [h[f"train_{what}"] for h in history], "o-", label="train")
        ax.plot(epochs, [h[f"val_{what}"] for h in history], "o-", label="val")
        if what == "acc" and "val_macro_ap" in history[0]:
            ax.plot(epochs, [h["val_macro_ap"] for h in history], "o-", label="val macro AP")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy" if what == "acc" else "loss")
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def write_history(history: list[dict], folder: Path, title: str) -> None:
    """history.csv (one row per epoch, for `dvc plots`) and curves.png."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    write_atomically(folder / "history.csv", text.getvalue())
    import matplotlib.pyplot as plt
    fig = curves(history, title)
    fig.savefig(folder / "curves.png", dpi=100)
    plt.close(fig)


def fit(model: nn.Module, train_batches, val_batches, frozen: list, s: FinetuneSettings, dev: torch.device,
        name: str, quiet: bool, checkpoint: Path | None = None, resume: dict | None = None
        ) -> tuple[list[dict], dict, int]:
    """Why so long and why so many parameters: one epoch loop whose whole state (model, optimizer, scaler,
    schedules, history, best epoch) a checkpoint captures after every epoch and `resume` restores, kept in one
    place so that a resumed run repeats an uninterrupted one.
    Train for up to `s.epochs` epochs; return the per-epoch history, the state dict of the best
    epoch by the val score (`selected_by`; the first of equals) and that epoch's number. `model` is a FinetuneNetwork or
    its DistributedDataParallel wrapper. `checkpoint`: a file rewritten after every epoch (on rank 0)
    with what `resume` needs to carry on after that epoch."""
    net = model.module if isinstance(model, DistributedDataParallel) else model
    loss_fn = loss_function(s.multi_label)
    optimizer = make_optimizer(net, s)
    scaler = torch.amp.GradScaler(dev.type, enabled=dev.type == "cuda")
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, s.epochs) if s.schedule == "cosine" else None
    plateau = PlateauSchedule(optimizer, s.plateau_patience, s.plateau_factor, s.max_decays)
    history, best, best_state, best_epoch, done = [], -1.0, None, 0, False
    if resume:
        net.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scaler.load_state_dict(resume["scaler"])
        if cosine:
            cosine.load_state_dict(resume["cosine"])
        plateau.best, plateau.waited, plateau.decays = resume["plateau"]
        history, best, best_state, best_epoch, done = (resume[k] for k in ("history", "best", "best_state",
                                                                           "best_epoch", "done"))
    for epoch in range(len(history) + 1, 1 if done else s.epochs + 1):
        head_only = epoch <= s.head_epochs
        model.train()   # the DDP wrapper's own mode; set_trainable sets its parts'
        set_trainable(net, frozen, head_only)
        # every random draw of the epoch depends on (seed, epoch) alone, so a run resumed from a
        # checkpoint repeats the epochs an uninterrupted run would have trained
        train_batches.set_epoch(epoch)
        torch.manual_seed(s.seed + epoch)   # augmentation in this process (workers=0), dropout
        lr, t = optimizer.param_groups[0]["lr"], time.perf_counter()
        # join: a rank may take fewer steps (a batch of unreadable images yields none)
        with model.join() if model is not net else contextlib.nullcontext():
            row = train_one_epoch(model, train_batches, loss_fn, optimizer, scaler, dev,
                                  f"{name} epoch {epoch}/{s.epochs}", quiet)
        row = distributed.train_totals(row)
        val = evaluate(net, val_batches, loss_fn, dev)
        val_loss, val_acc, val_score = distributed.agree((val.loss, val.accuracy, val.score))
        history.append({"epoch": epoch, "phase": "head" if head_only else s.strategy, "lr": lr,
                        "train_loss": row["train_loss"], "train_acc": row["train_acc"],
                        "val_loss": val_loss, "val_acc": val_acc, **({"val_macro_ap": val_score} if s.multi_label
                                                                   else {}),
                        "epoch_seconds": time.perf_counter() - t,
                        "images_per_second": row["images"] / row["train_seconds"]})
        if not quiet:
            tqdm.write(f"{name} epoch {epoch}: train loss {row['train_loss']:.3f} acc {row['train_acc']:.3f}, "
                       f"val loss {val_loss:.3f} acc {val_acc:.3f}"
                       f"{f' macro AP {val_score:.3f}' if s.multi_label else ''}, "
                       f"{history[-1]['images_per_second']:.0f} images/s")
        if val_score > best:
            best, best_epoch = val_score, epoch
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}
        if cosine:
            cosine.step()
        else:
            done = plateau.step(val_score)
        done = done or epoch == s.epochs or (s.patience is not None and epoch - best_epoch >= s.patience)
        if checkpoint and distributed.rank() == 0:
            save_checkpoint(checkpoint, {
                "settings": asdict(s), "model": net.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "cosine": cosine.state_dict() if cosine else {},
                "plateau": [plateau.best, plateau.waited, plateau.decays], "history": history, "best": best,
                "best_state": best_state, "best_epoch": best_epoch, "done": done})
        if done:
            break
    return history, best_state, best_epoch


CHECKPOINT = "checkpoint.safetensors"
RESUME_MAY_CHANGE = ("device", "workers", "calibration", "novelty_quantile")   # none changes the training


def save_checkpoint(path: Path, state: dict) -> None:
    """Write `state` (tensors, numbers, strings) atomically as a state file (pipeline.storage.statefile)."""
    with replaced_atomically(path) as tmp:
        statefile.save(state, tmp)


def load_checkpoint(path: Path, s: FinetuneSettings) -> dict:
    """A checkpoint written by `fit`, refused when it was made with other settings. The pickles of earlier
    versions (checkpoint.pt) are refused unread."""
    if not Path(path).is_file():
        raise InputError(f"checkpoint {path} does not exist")
    if Path(path).suffix in (".pt", ".pth"):
        raise InputError(f"checkpoint {path} is a pickle, which this version never loads; run the same command "
                        f"with --checkpoint instead of --resume to start again (it writes {CHECKPOINT})")
    try:
        state = statefile.load(path)
    except Exception as exc:   # any unreadable or foreign file
        raise InputError(f"checkpoint {path} is not a readable fine-tuning checkpoint "
                        f"({' '.join(str(exc).split())[:200] or type(exc).__name__})")
    if not isinstance(state, dict) or "settings" not in state:
        raise InputError(f"checkpoint {path} is not a fine-tuning checkpoint")
    diffs = [f"{k}: {v} != {getattr(s, k, None)}" for k, v in state["settings"].items()
             if k not in RESUME_MAY_CHANGE and v != getattr(s, k, None)]
    if diffs:
        raise InputError(f"checkpoint {path} was made with other settings (checkpoint != now): {'; '.join(diffs)}")
    return state


def finetune(data: Path, out_dir: Path, s: FinetuneSettings, quiet: bool = False, checkpoint: bool = False,
             resume: Path | None = None, force: bool = False) -> dict | None:
    """Fine-tune (or train from scratch) on an image folder and write a model directory (replacing one
    already at `out_dir` only with `force`, or when resuming from the checkpoint inside it).
    `checkpoint`: rewrite OUT/checkpoint.safetensors after every epoch; `resume`: carry on from such a file
    (and keep rewriting it). Under torchrun every rank trains and rank 0 alone writes and returns
    the metrics (the others return None)."""
    s = validate(s)
    resuming_here = resume is not None and Path(resume).resolve().parent == Path(out_dir).resolve()
    modeldir.check_out(out_dir, force or resuming_here, managed=(CHECKPOINT, f"{CHECKPOINT}.tmp"))
    try:
        if not distributed.is_distributed():
            return _finetune(data, Path(out_dir), s, quiet, checkpoint, resume)
        device = distributed.start(s.device)
        try:
            n = distributed.world_size()
            return _finetune(data, Path(out_dir), replace(s, device=device, lr=s.lr * n if s.scale_lr else s.lr),
                             quiet or distributed.rank() > 0, checkpoint, resume)
        finally:
            distributed.stop()
    except KeyboardInterrupt:
        saved = Path(out_dir) / CHECKPOINT
        if (checkpoint or resume) and saved.is_file():
            raise Interrupted(f"interrupted: fine-tuning stopped; {saved} holds the last finished epoch: run the "
                              f"same command with --resume {saved} to carry on")
        raise Interrupted(f"interrupted: fine-tuning stopped before {out_dir} was written"
                          f"{'' if checkpoint or resume else ' (with --checkpoint a run can be resumed)'}")


def _finetune(data: Path, out_dir: Path, s: FinetuneSettings, quiet: bool, checkpoint: bool,
              resume: Path | None) -> dict | None:
    """Why so long: the fine-tune run from settings to model directory in the order its checks must come
    (data, device, checkpoint, network, batches), then training and writing; each step is a call."""
    state = load_checkpoint(resume, s) if resume else None
    dataset = s.scan(Path(data))
    if "val" not in dataset.splits():
        raise InputError(f"{data} has no val split; fine-tuning chooses its best epoch on val")
    calibration.method(s.calibration, s.multi_label)   # refused now, not after training
    dev = resolve_device(s.device)
    backbone = load_backbone(replace(s, weights="none") if s.strategy == "scratch" else s)
    frozen = frozen_stages(backbone, s)
    torch.manual_seed(s.seed)
    model = FinetuneNetwork(backbone, len(dataset.classes)).to(dev, memory_format=torch.channels_last)  # faster on CPU too
    sharded = distributed.is_distributed()
    if sharded:   # DDP synchronises the parameters that require gradients when it wraps: all it may train
        set_trainable(model, frozen, head_only=False)
    # find_unused_parameters: the backbone's own classifier (and, in head-only epochs, the backbone) get no gradient
    trained = (DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None,
                                       find_unused_parameters=True) if sharded else model)
    seen, skipped = {}, dict(dataset.skipped)
    workers = default_workers(dev) if s.workers is None else s.workers
    pre = backbone.preprocessing

    def batches(split, augment=None):
        """Training: shuffled, augmented, sharded under torchrun. Else resize and centre crop, as `extract`."""
        train = split == "train" if augment is None else augment
        return Batches(dataset, split, train_transform(pre, s) if train else pre.transform(), s.batch_size, workers,
                       train, s.seed, seen, skipped, sharded=sharded and train, shortest=None if train else pre.resize)

    val_batches = batches("val")
    start = time.perf_counter()
    if checkpoint or resume:
        out_dir.mkdir(parents=True, exist_ok=True)
    history, best_state, best_epoch = fit(trained, batches("train"), val_batches, frozen, s, dev, out_dir.name, quiet,
                                          out_dir / CHECKPOINT if checkpoint or resume else None, state)
    fit_seconds = time.perf_counter() - start
    seen, skipped = distributed.gather_dicts(seen), distributed.gather_dicts(skipped)
    if distributed.rank() > 0:
        return None
    model.load_state_dict(best_state)
    eval_split = "test" if "test" in dataset.splits() else "val"
    evaluation, val, metrics, scoring, familiarity = score(model, batches, eval_split, dataset.classes, s, dev)
    n = {split: sum(1 for v in seen.values() if v[1] == split) for split in ("train", "val", "test")}
    # the score that chose the epoch
    val_score = next(h[selected_by(s.multi_label)] for h in history if h["epoch"] == best_epoch)
    metrics.update(val_score=val_score, eval_split=eval_split, n_train=n["train"], n_val=n["val"], n_test=n["test"],
                   n_eval=n[eval_split],
                   n_skipped=len(skipped), fit_seconds=fit_seconds,
                   best_epoch=best_epoch, epochs_run=len(history), selection="val", device=str(dev),
                   hyperparameters={k: v for k, v in asdict(s).items() if k not in ("device", "workers")})
    if sharded:
        metrics["world_size"] = distributed.world_size()   # hyperparameters hold the scaled lr
    info = {"strategy": s.strategy, "classes": dataset.classes, "backbone": backbone.spec().to_dict(),
            "fingerprint": None, "frozen_stages": [name for name, _ in frozen],
            "dataset": dataset_digest((p, label_text(dataset, label), split, digest)
                                      for p, (label, split, digest) in seen.items()),
            "skipped": sorted(skipped.items()), **scoring}
    write_model_directory(out_dir, best_state, info, metrics, (evaluation, val), familiarity, history)
    return metrics


def score(model: FinetuneNetwork, batches, eval_split: str, classes: list[str], s: FinetuneSettings,
          dev: torch.device) -> tuple[Evaluation, Evaluation, dict, dict, Familiarity]:
    """The kept network on the evaluation split, with what makes its scores trustworthy: that evaluation, val's,
    its metrics, what model.json records of its scores (`class_scores` or `label_scores`) and the familiarity: the
    penultimate features of the training images that new ones are compared with, the novelty threshold set on
    val's. `batches(split, augment)`: a split's batches. Every train and val image is read once more,
    unaugmented (which also records them where no epoch ran)."""
    loss_fn = loss_function(s.multi_label)
    t = time.perf_counter()
    evaluation = evaluate(model, batches(eval_split), loss_fn, dev)
    predict_seconds = time.perf_counter() - t
    val = evaluation if eval_split == "val" else evaluate(model, batches("val"), loss_fn, dev)
    train = evaluate(model, batches("train", augment=False), loss_fn, dev)
    metrics, scoring = (label_scores if s.multi_label else class_scores)(evaluation, val, classes, s)
    metrics["predict_seconds"] = predict_seconds
    return evaluation, val, metrics, scoring, Familiarity.fit(train.features, val.features, s.novelty_quantile)


def class_scores(evaluation: Evaluation, val: Evaluation, classes: list[str], s: FinetuneSettings
                 ) -> tuple[dict, dict]:
    """The metrics of the softmax scores, calibrated as for stage two's heads by a temperature fitted on val's
    logits (unless `s.calibration` is none), and the `calibration` model.json records."""
    temperature = calibration.fitted(s.calibration, False, val.logits, val.labels, probabilities=False)
    raw = evaluation.logits
    scores = temperature.apply(raw) if temperature else calibration.uncalibrated(raw, False)
    metrics = score_metrics(evaluation.labels, scores, classes, True)
    metrics.update(calibration.assess(evaluation.labels, raw, scores, False))
    return metrics, {"calibration": temperature.to_dict()} if temperature else {}


def label_scores(evaluation: Evaluation, val: Evaluation, classes: list[str], s: FinetuneSettings
                 ) -> tuple[dict, dict]:
    """The metrics of each class's sigmoid score, calibrated and thresholded as stage two's multi-label heads do
    (pipeline.heads.multilabel.decision_rule), on val's scores: calibrated per class (Platt scaling by default;
    none when `s.calibration` is none) and each class's threshold; and the `thresholds` and `calibration` model.json
    records."""
    calibrated_by, thresholds, untuned = multilabel.decision_rule(s, "finetune", expit(val.logits), val.labels, True)
    if untuned:
        warn(f"no positive in val for {', '.join(classes[c] for c in untuned)}: kept the default threshold 0.5")
    _, metrics = multilabel.calibrated_metrics(evaluation.labels, expit(evaluation.logits), calibrated_by,
                                               thresholds, classes, True)
    return metrics, {"multi_label": True, "thresholds": {c: float(v) for c, v in zip(classes, thresholds)},
                     **({"calibration": calibrated_by.to_dict()} if calibrated_by else {})}


def write_model_directory(out_dir: Path, state: dict, info: dict, metrics: dict,
                          evaluations: tuple[Evaluation, Evaluation], familiarity: Familiarity,
                          history: list[dict]) -> None:
    """The model directory, with its plots and the checkpoint, when there is one (for --resume). `evaluations`:
    of the evaluation split and of val, whose labels and scores it keeps (modeldir.HELD_OUT, for compare). A
    multi-label network's confusion.png is each class's precision and recall, and it has no confusion rows."""
    (evaluation, val), classes = evaluations, info["classes"]
    y, y_pred = evaluation.labels, evaluation.logits.argmax(1)
    name = f"{out_dir.name} ({info['strategy']}) on {metrics['eval_split']}"
    multi_label = info.get("multi_label", False)
    with modeldir.staged(out_dir) as folder:
        info = {**info, **familiarity.save(folder, "the network's penultimate features")}
        held_out = expit(val.logits) if multi_label else val.logits   # the network's own scores, as a head's
        info["files"] = {**info["files"], **modeldir.write_held_out(folder, val.labels, held_out)}
        modeldir.write(folder, modeldir.FINETUNED, state, info, metrics,
                       [] if multi_label else confusion_rows(y, y_pred, classes))
        if multi_label:
            precision_recall_png(metrics["per_class"], folder / "confusion.png", f"{name}: {headline(metrics)}")
        else:
            confusion_png(y, y_pred, classes, folder / "confusion.png", f"{name}: {headline(metrics)}")
        calibration.reliability_png(metrics["reliability"], folder / "reliability.png",
                                    f"{name}: {'mean per-class ECE' if multi_label else 'ECE'} {metrics['ece']:.3f} "
                                    f"({metrics['ece_uncalibrated']:.3f} uncalibrated)")
        write_history(history, folder, out_dir.name)
        if (out_dir / CHECKPOINT).is_file():
            os.link(out_dir / CHECKPOINT, folder / CHECKPOINT)
