"""The training loop: OneCycle, per-epoch evaluation, atomic resumable checkpoints, DDP under torchrun.

Every file is written atomically. ``last.ckpt`` is saved after each epoch with the model,
optimiser, scheduler, epoch, RNG states and history, so ``resume=True`` continues a run killed at
any point (even by SIGKILL) from its last completed epoch.

:func:`train` is a short list of steps, each a function of small typed values a test can call:
:func:`setup` -> :func:`resume_state` -> :func:`load_data` -> :func:`build_model` ->
:func:`choose_lr` (the LR range test) -> :func:`make_learner` -> :func:`restore` ->
:func:`run_epochs` -> :func:`final_confusion` -> :func:`finish` (model and card, reports).
"""

from __future__ import annotations

import csv
import datetime
import math
import random
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from explainkit.data.datasets import (
    check_image_folder,
    data_dir_from_env,
    dataset_size,
    eval_transform,
    evenly_spaced,
    open_split,
)
from explainkit.errors import DataError, ExplainkitError
from explainkit.models.card import ModelCard
from explainkit.models.store import resnet18_cifar, save_model
from explainkit.runtime.device import device_layout
from explainkit.runtime.distributed import DistContext, init_distributed
from explainkit.runtime.io import atomic_path, ensure_writable_dir
from explainkit.training import figures as report_figures
from explainkit.training.augment import AlbumentationsTransform, train_augmentation
from explainkit.training.device_data import (
    DeviceAugment,
    DeviceBatches,
    DeviceSplit,
    Shard,
    SplitDataset,
    decode_image_folder,
    split_from_dataset,
)
from explainkit.training.ema import WeightsEMA
from explainkit.training.lr_find import find_lr
from explainkit.training.recipes import Recipe

HISTORY_FIELDS = ["epoch", "lr", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "seconds"]
DATA_PATHS = ("auto", "loader", "device")


@dataclass(frozen=True)
class TrainConfig:
    """Where and how one run trains (the :class:`Recipe` says what it trains).

    ``data_path``: ``"loader"`` (PIL + albumentations in DataLoader workers), ``"device"`` (the split as
    a uint8 tensor on the device, augmented with torch ops) or ``"auto"`` (device on CUDA).
    ``compile``: wrap the model in ``torch.compile`` (a string names its backend, e.g. ``"eager"`` in tests).
    ``splits``: already decoded ``(train, test)`` splits for the device path (several runs, one decode).
    ``reports``: write the report figures. ``progress``: a progress bar per epoch (rank 0).
    """

    out: Path
    data_dir: str | Path | None = None
    device: torch.device | None = None  # None: the CPU
    seed: int = 0
    resume: bool = False
    workers: int | None = None  # DataLoader workers (None: 1 on CPU, up to 8 on CUDA)
    data_path: str = "auto"
    compile: bool | str = False
    lr_find_iters: int | None = None  # None: the recipe's (200 for reference, as the course ran it)
    splits: tuple[DeviceSplit, DeviceSplit] | None = None
    reports: bool = True
    progress: bool = True


@dataclass(frozen=True)
class Run:
    """This process's part of a run: its config, output folder, device (this rank's GPU under torchrun), process group."""

    config: TrainConfig
    out: Path
    device: torch.device
    ctx: DistContext

    @property
    def amp(self) -> bool:
        return self.device.type == "cuda"

    @property
    def checkpoint_path(self) -> Path:
        return self.out / "last.ckpt"

    @property
    def shard(self) -> Shard:
        return Shard(self.ctx.rank, self.ctx.world_size)


@dataclass
class TrainData:
    """The batches one training run iterates, whichever data path made them.

    ``train``/``test`` yield ``(images, labels)`` already on the device for the device path
    (moved by the loop otherwise); ``report_test``/``report_train`` are map-style datasets of
    this rank's test shard and the training split for the report figures.
    """

    path: str  # "loader" | "device"
    train: Iterable
    test: Iterable
    report_test: Dataset
    report_train: Dataset
    classes: list[str]
    start_epoch: Callable[[int], None]

    @property
    def steps(self) -> int:
        """Training batches per epoch."""
        return len(self.train)  # type: ignore[arg-type]


@dataclass
class Learner:
    """What one optimisation step touches."""

    model: nn.Module  # the bare model: checkpoints and the saved model
    net: nn.Module  # what the loop calls: the model, or its DDP / compiled wrapper
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler
    criterion: nn.Module
    ema: WeightsEMA | None = None  # the recipe's weights EMA: evaluated and saved instead of ``model``

    @property
    def evaluated(self) -> nn.Module:
        """What evaluation runs and the run saves: the EMA weights if the recipe keeps them, else the network."""
        return self.ema.model if self.ema is not None else self.net

    @property
    def saved(self) -> nn.Module:
        return self.ema.model if self.ema is not None else self.model


@dataclass
class Progress:
    """Where the epochs stand: the history so far, and the last evaluation with the loop's wall time."""

    history: list[dict[str, float]] = field(default_factory=list)
    epoch: int = 0  # epochs completed
    confusion: torch.Tensor | None = None  # [true, predicted] of the last evaluation
    seconds: float = 0.0  # the epochs' wall time in this process (evaluation included)

    def evaluation(self) -> torch.Tensor:
        """The confusion matrix of the last evaluation (after :func:`final_confusion`, always there)."""
        if self.confusion is None:
            raise ExplainkitError("no evaluation yet: run final_confusion first")
        return self.confusion

    @property
    def test_accuracy(self) -> float:
        confusion = self.evaluation()
        return float(confusion.diag().sum() / confusion.sum())


class EpochTotals(NamedTuple):
    """One epoch's training sums across ranks."""

    loss: float  # summed over images
    correct: float
    seen: float


@dataclass
class TrainResult:
    model_path: Path
    history: list[dict[str, float]]
    test_accuracy: float
    outputs: list[Path] = field(default_factory=list)
    train_seconds: float = 0.0  # the epochs' wall time (evaluation included), without data loading or reports


# --- data -------------------------------------------------------------------------------------
def load_datasets(
    data_dir: str | Path | None, recipe: Recipe, card: ModelCard, download: bool = True
) -> tuple[Dataset, Dataset, list[str]]:
    """(augmented train, plain test, classes) from an ImageFolder tree or torchvision's CIFAR-10."""
    root = data_dir_from_env(data_dir)
    if root is not None:  # both splits checked before either is read
        check_image_folder(root, ("train", "test"))
    augment = AlbumentationsTransform(train_augmentation(recipe, card.mean, card.std, card.image_size[0]))
    train, classes = open_split("train", augment, data_dir, download)
    test, test_classes = open_split("test", eval_transform(card), data_dir, download)
    if classes != test_classes:
        raise DataError(f"data_dir={root}: train/ and test/ have different classes")
    return train, test, classes


def limit_dataset(dataset: Dataset, limit: int | None, seed: int, spread: bool) -> Dataset:
    indices = subset_indices(dataset_size(dataset), limit, seed, spread)
    return dataset if indices is None else Subset(dataset, indices)


def load_device_splits(data_dir: str | Path | None, download: bool = True) -> tuple[DeviceSplit, DeviceSplit]:
    """(train, test) decoded into uint8 CPU tensors, from an ImageFolder tree or torchvision's CIFAR-10."""
    root = data_dir_from_env(data_dir)
    if root is not None:
        check_image_folder(root, ("train", "test"))
        return decode_image_folder(root / "train"), decode_image_folder(root / "test")
    train_set, _ = open_split("train", None, None, download)
    test_set, _ = open_split("test", None, None, download)
    return split_from_dataset(train_set), split_from_dataset(test_set)


def _reseed(dataset: Dataset, seed: int) -> None:
    """Reseed the augmentation of ``dataset`` (or of the dataset under a Subset), if it has one."""
    transform = getattr(getattr(dataset, "dataset", dataset), "transform", None)
    reseed = getattr(transform, "reseed", None)
    if callable(reseed):
        reseed(seed)


def _reseed_worker(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    if info is not None:
        _reseed(info.dataset, torch.initial_seed() % 2**32)  # distinct per worker and per epoch


def subset_indices(count: int, limit: int | None, seed: int, spread: bool) -> list[int] | None:
    """Indices of a limited subset (None: all): evenly spaced if ``spread``, else a seeded random draw."""
    if limit is None or limit >= count:
        return None
    if spread:  # evenly spaced: every class of a class-sorted folder
        return evenly_spaced(count, limit)
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:limit].tolist()


def resolve_data_path(data_path: str, device: torch.device) -> str:
    """``auto``: device-resident tensors on CUDA (the GPU outruns a PIL DataLoader), the loader elsewhere."""
    if data_path not in DATA_PATHS:
        raise ExplainkitError(f"data_path={data_path!r}: must be one of {', '.join(DATA_PATHS)}")
    if data_path == "auto":
        return "device" if device.type == "cuda" else "loader"
    return data_path


def loader_data(recipe: Recipe, run: Run) -> TrainData:
    """PIL images through albumentations in DataLoader workers (the CPU path)."""
    config, device, ctx = run.config, run.device, run.ctx
    train_set, test_set, classes = load_datasets(config.data_dir, recipe, ModelCard())
    train_set = limit_dataset(train_set, recipe.train_limit, config.seed, spread=False)
    test_set = limit_dataset(test_set, recipe.test_limit, config.seed, spread=True)
    test_shard = Subset(test_set, list(run.shard.indices(dataset_size(test_set))))  # no padded duplicates
    workers = config.workers
    if workers is None:
        workers = min(8, torch.get_num_threads() * 2) if device.type == "cuda" else 1
    generator = torch.Generator()
    sampler = (
        DistributedSampler(train_set, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=config.seed)
        if ctx.enabled
        else RandomSampler(train_set, generator=generator)  # type: ignore[arg-type]  # map-style: sized
    )
    loader_args: dict[str, Any] = dict(num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=False)
    train_loader = DataLoader(
        train_set,
        batch_size=recipe.batch_size,
        sampler=sampler,
        drop_last=False,
        worker_init_fn=_reseed_worker,
        generator=generator,
        **loader_args,
    )
    test_loader = DataLoader(test_shard, batch_size=max(recipe.batch_size, 256), **loader_args)

    def start_epoch(epoch: int) -> None:
        generator.manual_seed(config.seed * 1000 + epoch)
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
        if workers == 0:  # no worker_init_fn runs: seed the augmentation here
            _reseed(train_set, config.seed * 1000 + epoch)

    return TrainData("loader", train_loader, test_loader, test_shard, train_set, classes, start_epoch)


def device_resident_data(recipe: Recipe, run: Run) -> TrainData:
    """Both splits decoded once into uint8 tensors on the device, augmented there (``device_data.py``);
    ``run.config.splits``, when given, are reused instead of decoding."""
    card, seed, shard = ModelCard(), run.config.seed, run.shard
    splits = run.config.splits
    train_split, test_split = splits if splits is not None else load_device_splits(run.config.data_dir)
    if train_split.classes != test_split.classes:
        where = data_dir_from_env(run.config.data_dir) if splits is None else None
        raise DataError(f"{f'data_dir={where}: ' if where else ''}train/ and test/ have different classes")
    train_split, test_split = train_split.to(run.device), test_split.to(run.device)
    if (keep := subset_indices(len(train_split), recipe.train_limit, seed, spread=False)) is not None:
        train_split = train_split.subset(keep)
    if (keep := subset_indices(len(test_split), recipe.test_limit, seed, spread=True)) is not None:
        test_split = test_split.subset(keep)
    augment = DeviceAugment(recipe, card.mean, card.image_size[0])
    train = DeviceBatches(train_split, recipe.batch_size, card.mean, card.std, augment, shuffle=True, seed=seed, shard=shard)
    test = DeviceBatches(test_split, max(recipe.batch_size, 256), card.mean, card.std, shard=shard)
    test_shard = test_split.subset(list(shard.indices(len(test_split))))
    return TrainData(
        "device",
        train,
        test,
        SplitDataset(test_shard, card.mean, card.std),
        SplitDataset(train_split, card.mean, card.std, augment, seed),
        list(train_split.classes),
        train.set_epoch,
    )


# --- checkpoints --------------------------------------------------------------------------------
def _rng_state() -> dict[str, Any]:
    np_state: Any = np.random.get_state()  # the legacy tuple form
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))


def save_checkpoint(path: Path, **state: Any) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
        return state
    except Exception as exc:
        raise ExplainkitError(f"cannot resume: {path} is unreadable ({type(exc).__name__}); delete it to start over") from None


def _write_history(path: Path, history: list[dict[str, float]]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=HISTORY_FIELDS)
            writer.writeheader()
            writer.writerows(history)


# --- optimisation -------------------------------------------------------------------------------
def param_groups(recipe: Recipe, model: nn.Module, lr: float) -> list[dict[str, Any]]:
    """The optimiser's parameter groups: one group unless the recipe sets ``no_decay_bn_bias`` or
    ``bn_bias_lr_mult``; then conv/linear weights (the recipe's weight decay), BatchNorm weights and
    other biases (no decay with ``no_decay_bn_bias``) and BatchNorm biases (also ``bn_bias_lr_mult``
    times the LR). Each group's ``lr_mult`` scales the schedule's max LR."""
    if not recipe.no_decay_bn_bias and recipe.bn_bias_lr_mult == 1.0:
        return [{"params": list(model.parameters()), "weight_decay": recipe.weight_decay, "lr": lr, "lr_mult": 1.0}]
    bn_bias: list[nn.Parameter] = []
    plain: list[nn.Parameter] = []  # BatchNorm weights and the biases of other layers
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._NormBase):
            bn_bias += [module.bias] if module.bias is not None else []
            plain += [module.weight] if module.weight is not None else []
        elif getattr(module, "bias", None) is not None and isinstance(module.bias, nn.Parameter):
            plain.append(module.bias)
    ids = {id(p) for p in bn_bias + plain}
    weights = [p for p in model.parameters() if id(p) not in ids]
    small_decay = 0.0 if recipe.no_decay_bn_bias else recipe.weight_decay
    groups = [
        {"params": weights, "weight_decay": recipe.weight_decay, "lr": lr, "lr_mult": 1.0},
        {"params": plain, "weight_decay": small_decay, "lr": lr, "lr_mult": 1.0},
        {"params": bn_bias, "weight_decay": small_decay, "lr": lr * recipe.bn_bias_lr_mult, "lr_mult": recipe.bn_bias_lr_mult},
    ]
    return [group for group in groups if group["params"]]


def make_optimizer(recipe: Recipe, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    groups = param_groups(recipe, model, lr)
    if recipe.optimizer == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=recipe.weight_decay)
    return torch.optim.SGD(groups, lr=lr, momentum=recipe.momentum, nesterov=recipe.nesterov, weight_decay=recipe.weight_decay)


def _scheduler(recipe: Recipe, optimizer: torch.optim.Optimizer, max_lr: float, total_steps: int) -> LRScheduler:
    if recipe.schedule == "constant" or total_steps < 4:  # OneCycle needs a few steps per phase
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    # OneCycleLR divides by zero when the warm-up rounds to under two steps (tiny subsets).
    pct_start = min(max(recipe.pct_start, 2.0 / total_steps), 0.5)
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=[max_lr * group.get("lr_mult", 1.0) for group in optimizer.param_groups],
        total_steps=total_steps,
        pct_start=pct_start,
        div_factor=recipe.div_factor,
        final_div_factor=recipe.final_div_factor,
        anneal_strategy="cos" if recipe.anneal_strategy == "cos" else "linear",
        three_phase=False,
    )


def _criterion(recipe: Recipe) -> nn.Module:
    return nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)


def predict_logits(model: nn.Module, images: torch.Tensor, tta_flip: bool = False) -> torch.Tensor:
    """float32 logits; with ``tta_flip`` the mean of the logits of the images and of their horizontal flips."""
    logits: torch.Tensor = model(images).float()
    if tta_flip:
        logits = (logits + model(images.flip(-1)).float()) / 2
    return logits


def evaluate(
    model: nn.Module,
    loader: Iterable,
    device: torch.device,
    num_classes: int,
    ctx: DistContext,
    amp: bool,
    tta_flip: bool = False,
) -> tuple[float, torch.Tensor]:
    """(summed loss, confusion matrix [true, predicted]) over every test image exactly once across ranks
    (``tta_flip``: on the mean logits of each image and its horizontal flip)."""
    model.eval()
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.float64, device=device)
    loss = torch.zeros((), dtype=torch.float64, device=device)
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        for images, labels in loader:
            images, labels = device_layout(images.to(device, non_blocking=True), device), labels.to(device, non_blocking=True)
            logits = predict_logits(model, images, tta_flip)
            loss += F.cross_entropy(logits, labels, reduction="sum")
            confusion += torch.bincount(labels * num_classes + logits.argmax(1), minlength=num_classes**2)
    if ctx.enabled:
        torch.distributed.all_reduce(confusion)
        torch.distributed.all_reduce(loss)
    return float(loss), confusion.view(num_classes, num_classes).cpu()


def train_one_epoch(learner: Learner, data: TrainData, run: Run, desc: str) -> EpochTotals:
    """One pass over the training batches; returns the (summed loss, correct, seen) across ranks."""
    net, device, ctx = learner.net, run.device, run.ctx
    net.train()
    seen = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    loss_sum = torch.zeros((), device=device)
    total = data.steps
    bar = tqdm(data.train, total=total, desc=desc, disable=not (ctx.is_main and run.config.progress), dynamic_ncols=True)
    for batch_id, (images, labels) in enumerate(bar):
        images, labels = device_layout(images.to(device, non_blocking=True), device), labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=run.amp):
            logits = net(images)
            loss = learner.criterion(logits.float(), labels)
        learner.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        learner.optimizer.step()
        learner.scheduler.step()
        if learner.ema is not None:
            learner.ema.update(learner.model)
        seen += labels.numel()
        correct += (logits.argmax(1) == labels).sum()
        loss_sum += loss.detach() * labels.numel()
        if ctx.is_main and (batch_id % 10 == 0 or batch_id == total - 1):  # .item() syncs: not every step
            bar.set_postfix_str(f"Loss={loss.item():.4f} Batch_id={batch_id} Accuracy={100 * float(correct / seen):.2f}")
    loss_total, correct_total, seen_total = ctx.sum(float(loss_sum), float(correct), float(seen), device=device)
    return EpochTotals(loss_total, correct_total, seen_total)


# --- the steps of a run -------------------------------------------------------------------------
def setup(recipe: Recipe, config: TrainConfig) -> Run:
    """Check the data folder, then the output folder (before creating anything), join the process
    group under torchrun and pick this rank's device."""
    root = data_dir_from_env(config.data_dir)
    if root is not None and config.splits is None:  # a bad layout fails before any folder is made
        check_image_folder(root, ("train", "test"))
    out = ensure_writable_dir(config.out)
    device = config.device or torch.device("cpu")
    ctx = init_distributed(device.type)
    if ctx.enabled and device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
    if ctx.is_main and config.progress:
        print(f"training resnet18-cifar with the {recipe.name!r} recipe on {device} into {out}/", file=sys.stderr, flush=True)
    return Run(config, out, device, ctx)


def resume_state(recipe: Recipe, run: Run) -> tuple[Recipe, dict[str, Any] | None]:
    """With ``resume``: the checkpoint, and the recipe with the fields the run was started with."""
    if not run.config.resume:
        return recipe, None
    path = run.checkpoint_path
    if not path.exists():
        raise ExplainkitError(f"resume=True: no {path} to continue from; pass resume=False")
    checkpoint = load_checkpoint(path)
    saved = checkpoint["recipe"]
    kept = (
        "lr",
        "batch_size",
        "optimizer",
        "schedule",
        "train_limit",
        "test_limit",
        "no_decay_bn_bias",
        "bn_bias_lr_mult",
        "ema_decay",
    )
    recipe = replace(recipe, **{k: saved[k] for k in kept if k in saved})  # what the optimizer state's shape depends on
    return recipe, checkpoint


def load_data(recipe: Recipe, run: Run) -> TrainData:
    """The run's batches through the data path ``run.config.data_path`` resolves to."""
    path = resolve_data_path(run.config.data_path, run.device)
    data = device_resident_data(recipe, run) if path == "device" else loader_data(recipe, run)
    if data.steps == 0:
        raise DataError("the training split is empty")
    return data


def new_model(num_classes: int, init: str = "torchvision") -> nn.Module:
    """A fresh CIFAR ResNet18. ``init="torchvision"``: torchvision's (kaiming normal, fan_out, for the
    convolutions); ``"pytorch"``: every convolution re-initialised with ``nn.Conv2d``'s own default
    (kaiming uniform, a=sqrt(5)), as the course's kuangliu-style ResNet18 had: 2.4x smaller weights in
    the 3x3 convolutions, so the same Adam step moves them relatively further (BatchNorm follows each)."""
    model = resnet18_cifar(num_classes)
    if init == "pytorch":
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                module.reset_parameters()
    elif init != "torchvision":
        raise ExplainkitError(f"init={init!r}: must be one of torchvision, pytorch")
    return model


def build_model(num_classes: int, run: Run, init: str = "torchvision") -> nn.Module:
    """Seed every generator, then a fresh CIFAR ResNet18 (``init``: see :func:`new_model`) on the device
    (channels_last on CUDA)."""
    seed = run.config.seed
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    model = device_layout(new_model(num_classes, init).to(run.device), run.device)
    if run.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return model


def choose_lr(recipe: Recipe, model: nn.Module, data: TrainData, run: Run, fresh: bool = True) -> tuple[Recipe, list[Path]]:
    """``lr="auto"`` on a fresh run: the LR range test on rank 0 (every rank gets its answer) sets the
    recipe's max LR; returns the recipe and the figure it wrote (rank 0)."""
    if recipe.lr != "auto" or not fresh:
        return recipe, []
    ctx = run.ctx
    suggestion = [0.0]
    if ctx.is_main:
        probe = make_optimizer(recipe, model, recipe.lr_find_start)
        iters = run.config.lr_find_iters or recipe.lr_find_iters
        suggestion[0] = find_lr(
            model, probe, _criterion(recipe), data.train, run.device, run.out, iters, start_lr=recipe.lr_find_start
        )
        print(f"LR range test: steepest gradient at {suggestion[0]:.3e}; OneCycle max_lr = that", flush=True)
    if ctx.enabled:
        torch.distributed.broadcast_object_list(suggestion, src=0)
    return replace(recipe, lr=float(suggestion[0])), [run.out / "lr_find.png"] if ctx.is_main else []


def make_learner(recipe: Recipe, model: nn.Module, run: Run, total_steps: int) -> Learner:
    """The model wrapped for DDP (under torchrun) and ``torch.compile`` (if asked), its optimizer and schedule."""
    net: nn.Module = model
    if run.ctx.enabled:
        net = DistributedDataParallel(model, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    if run.config.compile:
        backend = run.config.compile if isinstance(run.config.compile, str) else "inductor"
        net = torch.compile(net, backend=backend)  # type: ignore[assignment]
    max_lr = float(recipe.lr)
    optimizer = make_optimizer(recipe, model, max_lr)
    ema = WeightsEMA(model, recipe.ema_decay) if recipe.ema_decay > 0 else None
    return Learner(model, net, optimizer, _scheduler(recipe, optimizer, max_lr, total_steps), _criterion(recipe), ema)


def restore(learner: Learner, checkpoint: dict[str, Any] | None, run: Run, epochs: int) -> Progress:
    """The learner's and the RNGs' state from ``checkpoint`` (if any); where the epochs stand."""
    if checkpoint is None:
        return Progress()
    learner.model.load_state_dict(checkpoint["model"])
    learner.optimizer.load_state_dict(checkpoint["optimizer"])
    learner.scheduler.load_state_dict(checkpoint["scheduler"])
    if learner.ema is not None:
        learner.ema.load_state_dict(checkpoint.get("ema") or checkpoint["model"])
    _set_rng_state(checkpoint["rng"])
    progress = Progress(history=list(checkpoint["history"]), epoch=int(checkpoint["epoch"]))
    if progress.epoch >= epochs and run.ctx.is_main:
        print(f"{run.checkpoint_path} already holds {progress.epoch} epochs; writing the final outputs", flush=True)
    return progress


def evaluate_learner(learner: Learner, data: TrainData, run: Run, tta_flip: bool = False) -> tuple[float, torch.Tensor]:
    """:func:`evaluate` on what the run evaluates (the EMA weights if kept), with the recipe's TTA."""
    return evaluate(learner.evaluated, data.test, run.device, len(data.classes), run.ctx, run.amp, tta_flip)


def run_epoch(
    learner: Learner, data: TrainData, run: Run, epoch: int, epochs: int, tta_flip: bool = False
) -> tuple[dict[str, float], torch.Tensor]:
    """Train one epoch, then evaluate: (the history row, the test confusion matrix)."""
    started = time.perf_counter()
    data.start_epoch(epoch)
    totals = train_one_epoch(learner, data, run, f"Epoch {epoch + 1}/{epochs}")
    test_loss, confusion = evaluate_learner(learner, data, run, tta_flip)
    test_total = float(confusion.sum())
    row = {
        "epoch": epoch + 1,
        "lr": learner.optimizer.param_groups[0]["lr"],
        "train_loss": totals.loss / totals.seen,
        "train_accuracy": totals.correct / totals.seen,
        "test_loss": test_loss / test_total,
        "test_accuracy": float(confusion.diag().sum()) / test_total,
        "seconds": time.perf_counter() - started,
    }
    return row, confusion


def save_progress(recipe: Recipe, learner: Learner, run: Run, progress: Progress) -> None:
    """``last.ckpt`` (everything a resume needs) and ``history.csv``, each written atomically."""
    save_checkpoint(
        run.checkpoint_path,
        model=learner.model.state_dict(),
        optimizer=learner.optimizer.state_dict(),
        scheduler=learner.scheduler.state_dict(),
        ema=learner.ema.state_dict() if learner.ema is not None else None,
        epoch=progress.epoch,
        rng=_rng_state(),
        history=progress.history,
        recipe=recipe.to_dict(),
        seed=run.config.seed,
    )
    _write_history(run.out / "history.csv", progress.history)


def run_epochs(recipe: Recipe, learner: Learner, data: TrainData, run: Run, progress: Progress) -> Progress:
    """The remaining epochs; rank 0 logs each and checkpoints after it."""
    started = time.perf_counter()
    for epoch in range(progress.epoch, recipe.epochs):
        row, confusion = run_epoch(learner, data, run, epoch, recipe.epochs, recipe.tta_flip)
        check_finite_loss(row, run, progress)  # before anything is saved: the last good checkpoint stays
        progress.confusion = confusion
        progress.history.append(row)
        progress.epoch = epoch + 1
        if run.ctx.is_main:
            total, correct = int(progress.confusion.sum()), int(progress.confusion.diag().sum())
            tqdm.write(
                f"Test set: Average loss: {row['test_loss']:.4f}, Accuracy: {correct}/{total} "
                f"({100 * row['test_accuracy']:.2f}%)  [{row['seconds']:.1f}s]"
            )
            save_progress(recipe, learner, run, progress)
        run.ctx.barrier()
    progress.seconds = time.perf_counter() - started
    return progress


def check_finite_loss(row: dict[str, float], run: Run, progress: Progress) -> None:
    """Stop with a clear error when an epoch's training loss is NaN or Inf (it diverged): the
    sums are already all-reduced, so every rank stops alike; ``last.ckpt`` keeps the last good epoch."""
    if math.isfinite(row["train_loss"]):
        return
    kept = (
        f"{run.checkpoint_path} keeps epoch {progress.epoch}"
        if progress.epoch and run.checkpoint_path.exists()
        else "no epoch finished, nothing was saved"
    )
    raise ExplainkitError(
        f"training diverged: epoch {row['epoch']}'s loss is {row['train_loss']}; stopped ({kept}); "
        "try a lower lr= (then resume=True continues from the kept epoch)"
    )


def final_confusion(learner: Learner, data: TrainData, run: Run, progress: Progress, tta_flip: bool = False) -> torch.Tensor:
    """The last epoch's confusion matrix; a resumed finished run has none, so evaluate once for the reports."""
    if progress.confusion is None:
        _, progress.confusion = evaluate_learner(learner, data, run, tta_flip)
    return progress.confusion


def make_card(recipe: Recipe, data: TrainData, run: Run, progress: Progress) -> ModelCard:
    """The card saved with the model: what it was trained on, how, where and how well."""
    template = ModelCard()
    confusion = progress.evaluation()
    device = run.device
    return ModelCard(
        architecture="resnet18-cifar",
        num_classes=len(data.classes),
        classes=data.classes,
        mean=template.mean,
        std=template.std,
        input_size=template.input_size,
        test_accuracy=round(progress.test_accuracy, 6),
        epochs=recipe.epochs,
        extra={
            "recipe": recipe.to_dict(),
            "seed": run.config.seed,
            "device": str(device),
            "world_size": run.ctx.world_size,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "data_path": data.path,
            "train_seconds": round(progress.seconds, 2),
            "dataset": str(data_dir_from_env(run.config.data_dir) or "torchvision CIFAR-10"),
            "test_images": int(confusion.sum()),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
    )


def finish(recipe: Recipe, learner: Learner, data: TrainData, run: Run, progress: Progress) -> list[Path]:
    """Rank 0: the model with its card, and the report figures if asked; the paths written."""
    model_path = run.out / "model.pt"
    card = make_card(recipe, data, run, progress)
    save_model(learner.saved, card, model_path)
    outputs = [model_path, model_path.with_suffix(".json"), run.checkpoint_path, run.out / "history.csv"]
    if run.config.reports:
        outputs += report_figures.write_reports(
            run.out, progress.history, progress.evaluation(), learner.saved, data.report_test, data.report_train, card, run.device
        )
    return outputs


def train(recipe: Recipe, config: TrainConfig) -> TrainResult:
    """Train a CIFAR-style ResNet18 with ``recipe`` and write the model, card, checkpoint and reports to ``config.out``."""
    run = setup(recipe, config)
    recipe, checkpoint = resume_state(recipe, run)
    data = load_data(recipe, run)
    model = build_model(len(data.classes), run, recipe.init)
    recipe, outputs = choose_lr(recipe, model, data, run, fresh=checkpoint is None)
    learner = make_learner(recipe, model, run, total_steps=recipe.epochs * data.steps)
    progress = run_epochs(recipe, learner, data, run, restore(learner, checkpoint, run, recipe.epochs))
    final_confusion(learner, data, run, progress, recipe.tta_flip)
    if run.ctx.is_main:
        outputs += finish(recipe, learner, data, run, progress)
    run.ctx.barrier()
    run.ctx.close()
    return TrainResult(run.out / "model.pt", progress.history, progress.test_accuracy, outputs, progress.seconds)


# --- the LR range test on its own ---------------------------------------------------------------
def lr_range_test(recipe: Recipe, config: TrainConfig, num_iter: int | None = None) -> float:
    """The LR range test alone (``explainkit lr-find``): a fresh model (the recipe's ``init``) over the
    recipe's augmented training split (``train_limit``: a seeded random subset), from the recipe's
    ``lr_find_start`` to 10 over ``num_iter`` (default the recipe's ``lr_find_iters``) batches, with
    the recipe's optimizer and loss; writes ``lr_find.png`` into ``config.out``."""
    device = config.device or torch.device("cpu")
    out = ensure_writable_dir(config.out)
    train_set, _, classes = load_datasets(config.data_dir, recipe, ModelCard())
    train_set = limit_dataset(train_set, recipe.train_limit, config.seed, spread=False)
    torch.manual_seed(config.seed)
    workers = config.workers if config.workers is not None else (1 if device.type == "cpu" else 8)
    loader = DataLoader(
        train_set,
        batch_size=recipe.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(config.seed),
        num_workers=workers,
        pin_memory=device.type == "cuda",
    )
    model = new_model(len(classes), recipe.init).to(device)
    optimizer = make_optimizer(recipe, model, recipe.lr_find_start)
    iters = num_iter or config.lr_find_iters or recipe.lr_find_iters
    return find_lr(model, optimizer, _criterion(recipe), loader, device, out, num_iter=iters, start_lr=recipe.lr_find_start)
