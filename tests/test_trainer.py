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
