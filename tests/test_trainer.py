"""Training: learning happens, checkpoints round-trip, SIGKILL + --resume, DDP with gloo."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import explainkit
from explainkit.training.recipes import resolve_recipe
from explainkit.training.trainer import (
    Progress,
    TrainConfig,
    build_model,
    choose_lr,
    final_confusion,
    load_checkpoint,
    load_data,
    make_learner,
    resume_state,
    run_epoch,
    setup,
    train,
    train_one_epoch,
)
from tests.conftest import REPO


def _recipe(**overrides):
    base = dict(epochs=3, batch_size=16, lr=0.01, test_limit=None, train_limit=None)
    base.update(overrides)
    return resolve_recipe("quick", **base)


@pytest.fixture(scope="module")
def trained_run(color_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    result = train(_recipe(), TrainConfig(out, data_dir=color_folder, workers=0))
    return out, result


def test_loss_decreases_and_outputs_exist(trained_run):
    out, result = trained_run
    losses = [row["train_loss"] for row in result.history]
    assert len(losses) == 3 and losses[-1] < losses[0]
    for name in (
        "model.pt",
        "model.json",
        "last.ckpt",
        "history.csv",
        "curves.png",
        "confusion_matrix.png",
        "misclassified.png",
        "samples.png",
    ):
        assert (out / name).is_file(), name
    assert not [p for p in out.iterdir() if ".tmp" in p.name]
    with open(out / "history.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]


def test_model_and_checkpoint_round_trip(trained_run, color_folder):
    out, result = trained_run
    model = explainkit.load_model(out / "model.pt")
    card = model.card
    assert card.epochs == 3 and card.test_accuracy == pytest.approx(result.test_accuracy, abs=1e-6)
    assert card.extra["recipe"]["name"] == "quick" and "date" in card.extra and str(color_folder) in card.extra["dataset"]
    state = load_checkpoint(out / "last.ckpt")
    assert state["epoch"] == 3 and len(state["history"]) == 3
    for key, value in model.state_dict().items():
        torch.testing.assert_close(state["model"][key], value)


def test_resume_after_sigkill(color_folder, tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "explainkit",
        "train",
        "--recipe",
        "quick",
        "--epochs",
        "4",
        "--batch-size",
        "8",
        "--data-dir",
        str(color_folder),
        "--out",
        str(out),
        "--workers",
        "0",
        "--device",
        "cpu",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (out / "last.ckpt").exists():
            assert proc.poll() is None and time.time() < deadline, "training ended before its first checkpoint"
            time.sleep(0.2)
        time.sleep(1.0)  # into the next epoch
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_at = load_checkpoint(out / "last.ckpt")["epoch"]
    assert 1 <= killed_at < 4
    resumed = subprocess.run(cmd + ["--resume"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    state = load_checkpoint(out / "last.ckpt")
    assert state["epoch"] == 4 and [row["epoch"] for row in state["history"]] == [1, 2, 3, 4]
    assert explainkit.load_model(out / "model.pt").card.epochs == 4


def test_ddp_two_gloo_processes(color_folder, tmp_path):
    out = tmp_path / "ddp"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533"]
    proc = subprocess.run(
        torchrun
        + [
            "-m",
            "explainkit",
            "train",
            "--recipe",
            "quick",
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--test-limit",
            "19",
            "--data-dir",
            str(color_folder),
            "--out",
            str(out),
            "--workers",
            "0",
            "--device",
            "cpu",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (proc.stdout + proc.stderr).count("Test set: Average loss") == 1  # only rank 0 reports
    card = explainkit.load_model(out / "model.pt").card
    assert card.extra["world_size"] == 2
    assert card.extra["test_images"] == 19  # every test image exactly once: no padded duplicates
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [
            "model.pt",
            "model.json",
            "last.ckpt",
            "history.csv",
            "curves.png",
            "confusion_matrix.png",
            "misclassified.png",
            "samples.png",
        ]
    )


@pytest.mark.parametrize("total_steps", [1, 3, 4, 5, 9, 200])
def test_one_cycle_survives_tiny_runs(total_steps):
    from explainkit.training.trainer import _scheduler

    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=0.1)
    scheduler = _scheduler(resolve_recipe("quick"), optimizer, 0.1, total_steps)
    lrs = []
    for _ in range(total_steps):
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    assert all(lr > 0 for lr in lrs) and max(lrs) <= 0.1 + 1e-9


def test_device_data_path_learns_and_records_itself(color_folder, tmp_path):
    """The device-resident path (CPU here): same loop, same outputs, recorded on the card."""
    result = train(_recipe(epochs=3), TrainConfig(tmp_path, data_dir=color_folder, data_path="device", progress=False))
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < losses[0] and result.train_seconds > 0
    card = explainkit.load_model(tmp_path / "model.pt").card
    assert card.extra["data_path"] == "device" and card.extra["test_images"] == 20
    for name in ("curves.png", "samples.png", "misclassified.png", "confusion_matrix.png"):
        assert (tmp_path / name).is_file(), name


def test_unknown_data_path_is_a_clear_error(color_folder, tmp_path):
    with pytest.raises(explainkit.ExplainkitError, match="data_path='gpu': must be one of auto, loader, device"):
        train(_recipe(epochs=1), TrainConfig(tmp_path, data_dir=color_folder, data_path="gpu"))


def test_resume_without_a_checkpoint_names_the_parameter(color_folder, tmp_path):
    with pytest.raises(explainkit.ExplainkitError, match=r"resume=True: no .*last\.ckpt to continue from; pass resume=False"):
        train(_recipe(epochs=1), TrainConfig(tmp_path / "run", data_dir=color_folder, resume=True))


def test_a_bad_data_dir_fails_before_creating_the_output(tmp_path):
    (tmp_path / "data" / "test" / "cat").mkdir(parents=True)
    with pytest.raises(explainkit.ExplainkitError, match="train/"):
        train(_recipe(epochs=1), TrainConfig(tmp_path / "out", data_dir=tmp_path / "data"))
    assert not (tmp_path / "out").exists()


def test_the_steps_one_at_a_time(color_folder, tmp_path):
    """Each step of train() is a function of small typed values."""
    recipe = _recipe(epochs=1, train_limit=32, test_limit=10)
    run = setup(recipe, TrainConfig(tmp_path, data_dir=color_folder, workers=0, progress=False))
    assert run.out == tmp_path and run.device.type == "cpu" and not run.ctx.enabled
    same, checkpoint = resume_state(recipe, run)
    assert same is recipe and checkpoint is None
    data = load_data(recipe, run)
    assert data.path == "loader" and data.steps == 2 and len(data.classes) == 10
    model = build_model(len(data.classes), run)
    chosen, written = choose_lr(recipe, model, data, run)
    assert chosen is recipe and written == []  # a fixed LR: no range test
    learner = make_learner(recipe, model, run, total_steps=data.steps)
    totals = train_one_epoch(learner, data, run, "epoch")
    assert totals.seen == 32 and 0 <= totals.correct <= 32 and totals.loss > 0
    row, confusion = run_epoch(learner, data, run, epoch=1, epochs=2)
    assert row["epoch"] == 2 and confusion.sum() == 10
    progress = Progress()
    assert final_confusion(learner, data, run, progress).sum() == 10 and 0 <= progress.test_accuracy <= 1


def test_a_diverging_run_stops_clearly_and_keeps_its_last_good_checkpoint(color_folder, tmp_path, monkeypatch):
    from explainkit.errors import ExplainkitError
    from explainkit.training import trainer

    real = trainer.train_one_epoch
    calls = []

    def nan_in_the_second_epoch(*args, **kwargs):
        totals = real(*args, **kwargs)
        calls.append(1)
        return totals._replace(loss=float("nan")) if len(calls) == 2 else totals

    monkeypatch.setattr(trainer, "train_one_epoch", nan_in_the_second_epoch)
    out = tmp_path / "run"
    with pytest.raises(ExplainkitError, match=r"training diverged: epoch 2's loss is nan; stopped \(.*last.ckpt keeps epoch 1\)"):
        train(_recipe(epochs=3), TrainConfig(out, data_dir=color_folder, workers=0, progress=False))
    assert load_checkpoint(out / "last.ckpt")["epoch"] == 1
    assert not (out / "model.pt").exists()


# --- the recipe tools -------------------------------------------------------------------------
def test_ema_is_the_exponential_average_of_the_weights_on_a_two_step_toy():
    from explainkit.training.ema import WeightsEMA

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    ema = WeightsEMA(model, decay=0.9)
    snapshots = [{k: v.clone() for k, v in model.state_dict().items()}]
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(8, 3)).pow(2).sum().backward()
        optimizer.step()
        ema.update(model)
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
    w0, w1, w2 = snapshots
    for key, value in ema.state_dict().items():
        if value.dtype.is_floating_point:  # parameters and BatchNorm's running statistics
            expected = 0.9 * (0.9 * w0[key] + 0.1 * w1[key]) + 0.1 * w2[key]
            torch.testing.assert_close(value, expected)
            assert not torch.allclose(value, w2[key])
        else:  # num_batches_tracked: copied
            assert int(value) == int(w2[key]) == 2
    assert not any(p.requires_grad for p in ema.model.parameters()) and not ema.model.training


def test_tta_flip_averages_the_logits_of_the_image_and_its_flip():
    from explainkit.runtime.distributed import DistContext
    from explainkit.training.trainer import evaluate, predict_logits

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    images = torch.randn(5, 3, 2, 2)
    with torch.no_grad():
        expected = (model(images) + model(images.flip(-1))) / 2
        torch.testing.assert_close(predict_logits(model, images, tta_flip=True), expected)
        torch.testing.assert_close(predict_logits(model, images), model(images))
        assert not torch.allclose(expected, model(images))
    labels = torch.tensor([0, 1, 2, 0, 1])
    loss, _ = evaluate(model, [(images, labels)], torch.device("cpu"), 3, DistContext(), amp=False, tta_flip=True)
    assert loss == pytest.approx(float(torch.nn.functional.cross_entropy(expected, labels, reduction="sum")), rel=1e-5)


def test_param_groups_no_decay_on_batchnorm_and_bias_and_a_bn_bias_lr_multiplier():
    from explainkit.models.store import resnet18_cifar
    from explainkit.training.trainer import _scheduler, make_optimizer

    model = resnet18_cifar(10)
    plain = make_optimizer(resolve_recipe("quick"), model, 0.1)
    assert len(plain.param_groups) == 1 and plain.param_groups[0]["weight_decay"] == 5e-4
    recipe = resolve_recipe("quick", no_decay_bn_bias=True, bn_bias_lr_mult=4.0)
    optimizer = make_optimizer(recipe, model, 0.1)
    weights, small, bn_bias = optimizer.param_groups
    bn = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert {id(p) for p in bn_bias["params"]} == {id(m.bias) for m in bn}
    assert {id(p) for p in small["params"]} == {id(m.weight) for m in bn} | {id(model.fc.bias)}
    assert all(p.dim() > 1 for p in weights["params"])  # conv and linear weights
    ids = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())  # every parameter exactly once
    assert (weights["weight_decay"], small["weight_decay"], bn_bias["weight_decay"]) == (5e-4, 0.0, 0.0)
    assert (weights["lr"], small["lr"], bn_bias["lr"]) == (0.1, 0.1, pytest.approx(0.4))
    scheduler = _scheduler(recipe, optimizer, 0.1, total_steps=20)
    peaks = [0.0, 0.0, 0.0]
    for _ in range(20):
        optimizer.step()
        scheduler.step()
        peaks = [max(p, g["lr"]) for p, g in zip(peaks, optimizer.param_groups)]
    assert peaks[2] == pytest.approx(4 * peaks[0]) and peaks[1] == pytest.approx(peaks[0])
    decayed = make_optimizer(resolve_recipe("quick", bn_bias_lr_mult=4.0), model, 0.1)  # the multiplier alone
    assert [g["weight_decay"] for g in decayed.param_groups] == [5e-4] * 3


def test_pytorch_init_is_the_course_models_default_conv_init():
    from explainkit.training.trainer import new_model

    torch.manual_seed(0)
    course, ours = new_model(10, "pytorch"), new_model(10, "torchvision")
    fan_in = 64 * 9
    assert course.layer1[0].conv1.weight.std().item() == pytest.approx((1 / (3 * fan_in)) ** 0.5, rel=0.05)
    assert ours.layer1[0].conv1.weight.std().item() == pytest.approx((2 / fan_in) ** 0.5, rel=0.05)  # fan_out = fan_in here


def test_reference_range_test_is_the_courses(color_folder, tmp_path, monkeypatch):
    """``lr="auto"`` with the reference recipe: the sweep starts at 1e-3 and runs 200 batches, with Adam (wd 1e-4)."""
    from explainkit.training import trainer

    calls = {}

    def fake_find_lr(model, optimizer, criterion, loader, device, out, num_iter, start_lr):
        calls.update(num_iter=num_iter, start_lr=start_lr, optimizer=type(optimizer).__name__)
        calls["wd"] = optimizer.param_groups[0]["weight_decay"]
        return 1.91e-3

    monkeypatch.setattr(trainer, "find_lr", fake_find_lr)
    recipe = resolve_recipe("reference", epochs=1, batch_size=16, train_limit=32, test_limit=10)
    run = setup(recipe, TrainConfig(tmp_path, data_dir=color_folder, workers=0, progress=False))
    data = load_data(recipe, run)
    chosen, _ = choose_lr(recipe, build_model(len(data.classes), run, recipe.init), data, run)
    assert chosen.lr == 1.91e-3
    assert calls == {"num_iter": 200, "start_lr": 1e-3, "optimizer": "Adam", "wd": 1e-4}


def test_ema_and_tta_run_evaluates_and_saves_the_averaged_weights(color_folder, tmp_path):
    recipe = _recipe(epochs=2, ema_decay=0.9, tta_flip=True, no_decay_bn_bias=True, bn_bias_lr_mult=2.0, label_smoothing=0.2)
    result = train(recipe, TrainConfig(tmp_path, data_dir=color_folder, workers=0, progress=False, reports=False))
    state = load_checkpoint(tmp_path / "last.ckpt")
    saved = explainkit.load_model(tmp_path / "model.pt")
    for key, value in saved.state_dict().items():
        torch.testing.assert_close(state["ema"][key], value, rtol=1e-3, atol=1e-3)  # the saved model is the EMA
    assert any(not torch.allclose(state["ema"][k].float(), state["model"][k].float()) for k in state["model"])
    card = saved.card.extra["recipe"]
    assert (card["ema_decay"], card["tta_flip"], card["label_smoothing"]) == (0.9, True, 0.2)
    assert 0 <= result.test_accuracy <= 1 and len(result.history) == 2
