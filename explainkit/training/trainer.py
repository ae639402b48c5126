"""The training loop: OneCycle, per-epoch evaluation, atomic resumable checkpoints, DDP under torchrun.

Every file is written atomically. ``last.ckpt`` is saved after each epoch with the model,
optimiser, scheduler, epoch, RNG states and history, so ``--resume`` continues a run killed at
any point (even by SIGKILL) from its last completed epoch.
"""

from __future__ import annotations

import csv
import datetime
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from explainkit.data.datasets import check_image_folder, data_dir_from_env, dataset_size, eval_transform, open_split
from explainkit.errors import DataError, ExplainkitError
from explainkit.models.card import ModelCard
from explainkit.models.store import resnet18_cifar, save_model
from explainkit.runtime.distributed import DistContext, init_distributed
from explainkit.runtime.io import atomic_path
from explainkit.training import figures as reports
from explainkit.training.augment import AlbumentationsTransform, train_augmentation
from explainkit.training.device_data import (
    DeviceAugment,
    DeviceBatches,
    DeviceSplit,
    SplitDataset,
    decode_image_folder,
    split_from_dataset,
)
from explainkit.training.lr_find import find_lr
from explainkit.training.recipes import Recipe

HISTORY_FIELDS = ["epoch", "lr", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "seconds"]


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
        raise DataError(f"--data-dir {root}: train/ and test/ have different classes")
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


def _reseed_worker(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    if info is None:
        return
    transform = getattr(getattr(info.dataset, "dataset", info.dataset), "transform", None)
    reseed = getattr(transform, "reseed", None)
    if callable(reseed):
        reseed(torch.initial_seed() % 2**32)  # distinct per worker and per epoch


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


# --- the loop -----------------------------------------------------------------------------------
def make_optimizer(recipe: Recipe, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    if recipe.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=recipe.weight_decay)
    return torch.optim.SGD(
        model.parameters(), lr=lr, momentum=recipe.momentum, nesterov=recipe.nesterov, weight_decay=recipe.weight_decay
    )


def _scheduler(recipe: Recipe, optimizer: torch.optim.Optimizer, max_lr: float, total_steps: int):
    if recipe.schedule == "constant" or total_steps < 4:  # OneCycle needs a few steps per phase
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    # OneCycleLR divides by zero when the warm-up rounds to under two steps (tiny subsets).
    pct_start = min(max(recipe.pct_start, 2.0 / total_steps), 0.5)
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=max_lr,
        total_steps=total_steps,
        pct_start=pct_start,
        div_factor=recipe.div_factor,
        final_div_factor=recipe.final_div_factor,
        anneal_strategy="cos" if recipe.anneal_strategy == "cos" else "linear",
        three_phase=False,
    )


def evaluate(
    model: nn.Module, loader: Iterable, device: torch.device, num_classes: int, ctx: DistContext, amp: bool
) -> tuple[float, torch.Tensor]:
    """(summed loss, confusion matrix [true, predicted]) over every test image exactly once across ranks."""
    model.eval()
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.float64, device=device)
    loss = torch.zeros((), dtype=torch.float64, device=device)
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        for images, labels in loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            if device.type == "cuda":
                images = images.contiguous(memory_format=torch.channels_last)
            logits = model(images).float()
            loss += F.cross_entropy(logits, labels, reduction="sum")
            confusion += torch.bincount(labels * num_classes + logits.argmax(1), minlength=num_classes**2)
    if ctx.enabled:
        torch.distributed.all_reduce(confusion)
        torch.distributed.all_reduce(loss)
    return float(loss), confusion.view(num_classes, num_classes).cpu()


DATA_PATHS = ("auto", "loader", "device")


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


def subset_indices(count: int, limit: int | None, seed: int, spread: bool) -> list[int] | None:
    """Indices of a limited subset (None: all): evenly spaced if ``spread``, else a seeded random draw."""
    if limit is None or limit >= count:
        return None
    if spread:  # evenly spaced: every class of a class-sorted folder
        return torch.linspace(0, count - 1, limit).long().tolist()
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:limit].tolist()


def resolve_data_path(data_path: str, device: torch.device) -> str:
    """``auto``: device-resident tensors on CUDA (the GPU outruns a PIL DataLoader), the loader elsewhere."""
    if data_path not in DATA_PATHS:
        raise ExplainkitError(f"--data-path must be one of {', '.join(DATA_PATHS)}, got {data_path!r}")
    if data_path == "auto":
        return "device" if device.type == "cuda" else "loader"
    return data_path


def loader_data(recipe: Recipe, data_dir, device: torch.device, seed: int, ctx: DistContext, workers: int | None) -> TrainData:
    """PIL images through albumentations in DataLoader workers (the CPU path)."""
    train_set, test_set, classes = load_datasets(data_dir, recipe, ModelCard())
    train_set = limit_dataset(train_set, recipe.train_limit, seed, spread=False)
    test_set = limit_dataset(test_set, recipe.test_limit, seed, spread=True)
    test_shard = Subset(test_set, list(range(ctx.rank, dataset_size(test_set), ctx.world_size)))  # no padded duplicates
    workers = workers if workers is not None else (min(8, torch.get_num_threads() * 2) if device.type == "cuda" else 1)
    generator = torch.Generator()
    sampler = (
        DistributedSampler(train_set, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed)
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
        generator.manual_seed(seed * 1000 + epoch)
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
        if workers == 0:  # no worker_init_fn runs: seed the augmentation here
            transform = getattr(getattr(train_set, "dataset", train_set), "transform", None)
            reseed = getattr(transform, "reseed", None)
            if callable(reseed):
                reseed(seed * 1000 + epoch)

    return TrainData("loader", train_loader, test_loader, test_shard, train_set, classes, start_epoch)


def device_data(recipe: Recipe, data_dir, device: torch.device, seed: int, ctx: DistContext, splits=None) -> TrainData:
    """Both splits decoded once into uint8 tensors on ``device``, augmented there (``device_data.py``).

    ``splits``: already decoded ``(train, test)`` :class:`DeviceSplit` s to reuse (the GPU script
    trains several runs from one decode)."""
    card = ModelCard()
    train_split, test_split = splits if splits is not None else load_device_splits(data_dir)
    if train_split.classes != test_split.classes:
        raise DataError("train/ and test/ have different classes")
    train_split, test_split = train_split.to(device), test_split.to(device)
    if (keep := subset_indices(len(train_split), recipe.train_limit, seed, spread=False)) is not None:
        train_split = train_split.subset(keep)
    if (keep := subset_indices(len(test_split), recipe.test_limit, seed, spread=True)) is not None:
        test_split = test_split.subset(keep)
    augment = DeviceAugment(recipe, card.mean, card.image_size[0])
    train = DeviceBatches(
        train_split,
        recipe.batch_size,
        card.mean,
        card.std,
        augment,
        shuffle=True,
        seed=seed,
        rank=ctx.rank,
        world_size=ctx.world_size,
    )
    test = DeviceBatches(test_split, max(recipe.batch_size, 256), card.mean, card.std, rank=ctx.rank, world_size=ctx.world_size)
    test_shard = test_split.subset(torch.arange(ctx.rank, len(test_split), ctx.world_size))
    report_train = SplitDataset(train_split, card.mean, card.std, augment, seed)
    return TrainData(
        "device",
        train,
        test,
        SplitDataset(test_shard, card.mean, card.std),
        report_train,
        list(train_split.classes),
        train.set_epoch,
    )


def _resume_state(recipe: Recipe, checkpoint_path: Path, resume: bool) -> tuple[Recipe, dict[str, Any] | None]:
    if not resume:
        return recipe, None
    if not checkpoint_path.exists():
        raise ExplainkitError(f"--resume: no {checkpoint_path} to continue from; run without --resume")
    checkpoint = load_checkpoint(checkpoint_path)
    saved = checkpoint["recipe"]
    recipe = replace(recipe, **{k: saved[k] for k in ("lr", "batch_size", "optimizer", "schedule", "train_limit", "test_limit")})
    return recipe, checkpoint


def _search_lr(recipe, model, criterion, data: TrainData, device, out: Path, ctx: DistContext, iters: int) -> float:
    """Rank 0 runs the LR range test; every rank gets its answer."""
    suggestion = [0.0]
    if ctx.is_main:
        probe = make_optimizer(recipe, model, 1e-7)
        suggestion[0] = find_lr(model, probe, criterion, data.train, device, out, num_iter=iters)
        print(f"LR range test: steepest gradient at {suggestion[0]:.3e}; OneCycle max_lr = that", flush=True)
    if ctx.enabled:
        torch.distributed.broadcast_object_list(suggestion, src=0)
    return float(suggestion[0])


def train_one_epoch(
    net, data: TrainData, optimizer, scheduler, criterion, device, amp: bool, ctx: DistContext, desc: str, progress: bool = True
) -> tuple[float, float, float]:
    """One pass over the training batches; returns (summed loss, correct, seen) across ranks."""
    net.train()
    seen = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    loss_sum = torch.zeros((), device=device)
    total = len(data.train)  # type: ignore[arg-type]
    bar = tqdm(data.train, total=total, desc=desc, disable=not (ctx.is_main and progress), dynamic_ncols=True)
    for batch_id, (images, labels) in enumerate(bar):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = net(images)
            loss = criterion(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        seen += labels.numel()
        correct += (logits.argmax(1) == labels).sum()
        loss_sum += loss.detach() * labels.numel()
        if ctx.is_main and (batch_id % 10 == 0 or batch_id == total - 1):  # .item() syncs: not every step
            bar.set_postfix_str(f"Loss={loss.item():.4f} Batch_id={batch_id} Accuracy={100 * float(correct / seen):.2f}")
    loss_total, correct_total, seen_total = ctx.sum(float(loss_sum), float(correct), float(seen), device=device)
    return loss_total, correct_total, seen_total


def train(
    recipe: Recipe,
    out: Path,
    data_dir: str | Path | None = None,
    device: torch.device | None = None,
    seed: int = 0,
    resume: bool = False,
    workers: int | None = None,
    lr_find_iters: int = 100,
    data_path: str = "auto",
    compile: bool | str = False,
    splits=None,
    reports_enabled: bool = True,
    progress: bool = True,
) -> TrainResult:
    """Train a CIFAR-style ResNet18 with ``recipe`` and write the model, card, checkpoint and reports to ``out``.

    ``data_path``: ``"loader"`` (PIL + albumentations in DataLoader workers), ``"device"`` (the split as
    a uint8 tensor on the device, augmented with torch ops) or ``"auto"`` (device on CUDA).
    ``progress``: show a progress bar per epoch (rank 0). ``compile``: wrap the model in ``torch.compile`` (a string names its backend, e.g. ``"eager"`` in tests).
    """
    device = device or torch.device("cpu")
    ctx = init_distributed(device.type)
    if ctx.enabled and device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
    out = Path(out)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
    checkpoint_path = out / "last.ckpt"
    recipe, checkpoint = _resume_state(recipe, checkpoint_path, resume)
    path = resolve_data_path(data_path, device)
    if path == "device":
        data = device_data(recipe, data_dir, device, seed, ctx, splits)
    else:
        data = loader_data(recipe, data_dir, device, seed, ctx, workers)
    if len(data.train) == 0:  # type: ignore[arg-type]
        raise DataError("the training split is empty")
    num_classes = len(data.classes)

    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    model = resnet18_cifar(num_classes).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    amp = device.type == "cuda"
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)

    outputs: list[Path] = []
    max_lr = recipe.lr
    if max_lr == "auto" and checkpoint is None:
        max_lr = _search_lr(recipe, model, criterion, data, device, out, ctx, lr_find_iters)
        recipe = replace(recipe, lr=max_lr)
        if ctx.is_main:
            outputs.append(out / "lr_find.png")
    net: nn.Module = (
        DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) if ctx.enabled else model
    )
    if compile:
        net = torch.compile(net, backend=compile if isinstance(compile, str) else "inductor")  # type: ignore[assignment]
    optimizer = make_optimizer(recipe, model, float(max_lr))
    scheduler = _scheduler(recipe, optimizer, float(max_lr), recipe.epochs * len(data.train))  # type: ignore[arg-type]
    history: list[dict[str, float]] = []
    start_epoch = 0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        history = list(checkpoint["history"])
        start_epoch = int(checkpoint["epoch"])
        _set_rng_state(checkpoint["rng"])
        if start_epoch >= recipe.epochs and ctx.is_main:
            print(f"{checkpoint_path} already holds {start_epoch} epochs; writing the final outputs", flush=True)

    confusion = None
    loop_started = time.perf_counter()
    for epoch in range(start_epoch, recipe.epochs):
        started = time.perf_counter()
        data.start_epoch(epoch)
        train_loss, train_correct, train_seen = train_one_epoch(
            net, data, optimizer, scheduler, criterion, device, amp, ctx, f"Epoch {epoch + 1}/{recipe.epochs}", progress
        )
        test_loss, confusion = evaluate(net, data.test, device, num_classes, ctx, amp)
        test_total = float(confusion.sum())
        test_correct = float(confusion.diag().sum())
        row = {
            "epoch": epoch + 1,
            "lr": optimizer.param_groups[0]["lr"],
            "train_loss": train_loss / train_seen,
            "train_accuracy": train_correct / train_seen,
            "test_loss": test_loss / test_total,
            "test_accuracy": test_correct / test_total,
            "seconds": time.perf_counter() - started,
        }
        history.append(row)
        if ctx.is_main:
            tqdm.write(
                f"Test set: Average loss: {row['test_loss']:.4f}, Accuracy: {int(test_correct)}/{int(test_total)} "
                f"({100 * row['test_accuracy']:.2f}%)  [{row['seconds']:.1f}s]"
            )
            save_checkpoint(
                checkpoint_path,
                model=model.state_dict(),
                optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict(),
                epoch=epoch + 1,
                rng=_rng_state(),
                history=history,
                recipe=recipe.to_dict(),
                seed=seed,
            )
            _write_history(out / "history.csv", history)
        ctx.barrier()
    loop_seconds = time.perf_counter() - loop_started

    if confusion is None:  # resumed a finished run: evaluate once for the reports
        _, confusion = evaluate(net, data.test, device, num_classes, ctx, amp)
    test_accuracy = float(confusion.diag().sum() / confusion.sum())
    model_path = out / "model.pt"
    if ctx.is_main:
        card = _card(recipe, data, data_dir, confusion, test_accuracy, seed, device, ctx, path, loop_seconds)
        save_model(model, card, model_path)
        outputs += [model_path, model_path.with_suffix(".json"), checkpoint_path, out / "history.csv"]
        if reports_enabled:
            outputs += reports.write_reports(out, history, confusion, model, data.report_test, data.report_train, card, device)
    ctx.barrier()
    ctx.close()
    return TrainResult(model_path, history, test_accuracy, outputs, loop_seconds)


def _card(recipe, data: TrainData, data_dir, confusion, test_accuracy, seed, device, ctx, path, loop_seconds) -> ModelCard:
    template = ModelCard()
    return ModelCard(
        architecture="resnet18-cifar",
        num_classes=len(data.classes),
        classes=data.classes,
        mean=template.mean,
        std=template.std,
        input_size=template.input_size,
        test_accuracy=round(test_accuracy, 6),
        epochs=recipe.epochs,
        extra={
            "recipe": recipe.to_dict(),
            "seed": seed,
            "device": str(device),
            "world_size": ctx.world_size,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "data_path": path,
            "train_seconds": round(loop_seconds, 2),
            "dataset": str(data_dir_from_env(data_dir) or "torchvision CIFAR-10"),
            "test_images": int(confusion.sum()),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
    )


def _write_history(path: Path, history: list[dict[str, float]]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=HISTORY_FIELDS)
            writer.writeheader()
            writer.writerows(history)
