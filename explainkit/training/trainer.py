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
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from explainkit.card import ModelCard
from explainkit.data import check_image_folder, data_dir_from_env, eval_transform, open_split
from explainkit.errors import DataError, ExplainkitError
from explainkit.io import atomic_path
from explainkit.models import resnet18_cifar, save_model
from explainkit.training import reports
from explainkit.training.augment import AlbumentationsTransform, train_augmentation
from explainkit.training.distributed import DistContext, init_distributed
from explainkit.training.lr_find import find_lr
from explainkit.training.recipes import Recipe

HISTORY_FIELDS = ["epoch", "lr", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "seconds"]


@dataclass
class TrainResult:
    model_path: Path
    history: list[dict[str, float]]
    test_accuracy: float
    outputs: list[Path] = field(default_factory=list)


# --- data -------------------------------------------------------------------------------------
def load_datasets(data_dir: str | Path | None, recipe: Recipe, card: ModelCard, download: bool = True) -> tuple[Dataset, Dataset, list[str]]:
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
    if limit is None or limit >= len(dataset):
        return dataset
    if spread:  # evenly spaced: every class of a class-sorted folder
        return Subset(dataset, torch.linspace(0, len(dataset) - 1, limit).long().tolist())
    return Subset(dataset, torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:limit].tolist())


def _reseed_worker(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    transform = getattr(getattr(info.dataset, "dataset", info.dataset), "transform", None)
    if hasattr(transform, "reseed"):
        transform.reseed(torch.initial_seed() % 2**32)  # distinct per worker and per epoch


# --- checkpoints --------------------------------------------------------------------------------
def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
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
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ExplainkitError(f"cannot resume: {path} is unreadable ({type(exc).__name__}); delete it to start over") from None


# --- the loop -----------------------------------------------------------------------------------
def make_optimizer(recipe: Recipe, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    if recipe.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=recipe.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=recipe.momentum, nesterov=recipe.nesterov, weight_decay=recipe.weight_decay)


def _scheduler(recipe: Recipe, optimizer: torch.optim.Optimizer, max_lr: float, total_steps: int):
    if recipe.schedule == "constant" or total_steps < 4:  # OneCycle needs a few steps per phase
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    # OneCycleLR divides by zero when the warm-up rounds to under two steps (tiny subsets).
    pct_start = min(max(recipe.pct_start, 2.0 / total_steps), 0.5)
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=max_lr, total_steps=total_steps, pct_start=pct_start, div_factor=recipe.div_factor,
        final_div_factor=recipe.final_div_factor, anneal_strategy=recipe.anneal_strategy, three_phase=False,
    )


def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, num_classes: int, ctx: DistContext, amp: bool) -> tuple[float, torch.Tensor]:
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


def train(
    recipe: Recipe,
    out: Path,
    data_dir: str | Path | None = None,
    device: torch.device | None = None,
    seed: int = 0,
    resume: bool = False,
    workers: int | None = None,
    lr_find_iters: int = 100,
) -> TrainResult:
    """Train a CIFAR-style ResNet18 with ``recipe`` and write the model, card, checkpoint and reports to ``out``."""
    device = device or torch.device("cpu")
    ctx = init_distributed(device.type)
    if ctx.enabled and device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
    out = Path(out)
    checkpoint_path = out / "last.ckpt"
    checkpoint = None
    if resume:
        if not checkpoint_path.exists():
            raise ExplainkitError(f"--resume: no {checkpoint_path} to continue from; run without --resume")
        checkpoint = load_checkpoint(checkpoint_path)
        saved = checkpoint["recipe"]
        recipe = replace(recipe, **{k: saved[k] for k in ("lr", "batch_size", "optimizer", "schedule", "train_limit", "test_limit")})

    card_template = ModelCard()
    train_set, test_set, classes = load_datasets(data_dir, recipe, card_template)
    num_classes = len(classes)
    train_set = limit_dataset(train_set, recipe.train_limit, seed, spread=False)
    test_set = limit_dataset(test_set, recipe.test_limit, seed, spread=True)
    test_shard = Subset(test_set, list(range(ctx.rank, len(test_set), ctx.world_size)))  # no padded duplicates

    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    model = resnet18_cifar(num_classes).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    amp = device.type == "cuda"
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    workers = workers if workers is not None else (min(8, torch.get_num_threads() * 2) if device.type == "cuda" else 1)
    generator = torch.Generator()
    sampler = (
        DistributedSampler(train_set, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed)
        if ctx.enabled else RandomSampler(train_set, generator=generator)
    )
    loader_args = dict(num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=False)
    train_loader = DataLoader(train_set, batch_size=recipe.batch_size, sampler=sampler, drop_last=False,
                              worker_init_fn=_reseed_worker, generator=generator, **loader_args)
    test_loader = DataLoader(test_shard, batch_size=max(recipe.batch_size, 256), **loader_args)
    if len(train_loader) == 0:
        raise DataError("the training split is empty")

    outputs: list[Path] = []
    max_lr = recipe.lr
    if max_lr == "auto" and checkpoint is None:
        suggestion = [0.0]
        if ctx.is_main:
            probe = make_optimizer(recipe, model, 1e-7)
            suggestion[0] = find_lr(model, probe, criterion, train_loader, device, out, num_iter=lr_find_iters)
            outputs.append(out / "lr_find.png")
            print(f"LR range test: steepest gradient at {suggestion[0]:.3e}; OneCycle max_lr = that", flush=True)
        if ctx.enabled:
            torch.distributed.broadcast_object_list(suggestion, src=0)
        max_lr = suggestion[0]
        recipe = replace(recipe, lr=max_lr)
    net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) if ctx.enabled else model
    optimizer = make_optimizer(recipe, model, float(max_lr))
    scheduler = _scheduler(recipe, optimizer, float(max_lr), recipe.epochs * len(train_loader))
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
    for epoch in range(start_epoch, recipe.epochs):
        started = time.perf_counter()
        generator.manual_seed(seed * 1000 + epoch)
        if ctx.enabled:
            sampler.set_epoch(epoch)
        if workers == 0:  # no worker_init_fn runs: seed the augmentation here
            transform = getattr(getattr(train_set, "dataset", train_set), "transform", None)
            if hasattr(transform, "reseed"):
                transform.reseed(seed * 1000 + epoch)
        net.train()
        seen = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        loss_sum = torch.zeros((), device=device)
        bar = tqdm(train_loader, desc=f"Epoch {epoch + 1}/{recipe.epochs}", disable=not ctx.is_main, dynamic_ncols=True)
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
            if ctx.is_main and (batch_id % 10 == 0 or batch_id == len(train_loader) - 1):
                bar.set_postfix_str(f"Loss={loss.item():.4f} Batch_id={batch_id} Accuracy={100 * float(correct / seen):.2f}")
        train_loss, train_correct, train_seen = ctx.sum(float(loss_sum), float(correct), float(seen), device=device)
        test_loss, confusion = evaluate(net, test_loader, device, num_classes, ctx, amp)
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
                f"({100 * row['test_accuracy']:.2f}%)  [{row['seconds']:.0f}s]"
            )
            save_checkpoint(
                checkpoint_path, model=model.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                epoch=epoch + 1, rng=_rng_state(), history=history, recipe=recipe.to_dict(), seed=seed,
            )
            _write_history(out / "history.csv", history)
        ctx.barrier()

    if confusion is None:  # resumed a finished run: evaluate once for the reports
        _, confusion = evaluate(net, test_loader, device, num_classes, ctx, amp)
    test_accuracy = float(confusion.diag().sum() / confusion.sum())
    model_path = out / "model.pt"
    if ctx.is_main:
        card = ModelCard(
            architecture="resnet18-cifar", num_classes=num_classes, classes=classes, mean=card_template.mean,
            std=card_template.std, input_size=card_template.input_size, test_accuracy=round(test_accuracy, 6),
            epochs=recipe.epochs,
            extra={
                "recipe": recipe.to_dict(), "seed": seed, "device": str(device), "world_size": ctx.world_size,
                "dataset": str(data_dir_from_env(data_dir) or "torchvision CIFAR-10"),
                "test_images": int(confusion.sum()), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            },
        )
        save_model(model, card, model_path)
        outputs += [model_path, model_path.with_suffix(".json"), checkpoint_path, out / "history.csv"]
        outputs += reports.write_reports(out, history, confusion, model, test_shard, train_set, card, device)
    ctx.barrier()
    ctx.close()
    return TrainResult(model_path, history, test_accuracy, outputs)


def _write_history(path: Path, history: list[dict[str, float]]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=HISTORY_FIELDS)
            writer.writeheader()
            writer.writerows(history)
