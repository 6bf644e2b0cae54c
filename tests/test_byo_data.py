"""Bring your own data, as the README says: a folder of images in the ImageNet layout
(`dataset=imagefolder dataset.root=DIR`) is distilled on end to end through the CLI."""

from __future__ import annotations

from pathlib import Path

from conftest import mlflow_runs, run_cli

COLOURS = {"red": (220, 40, 40), "blue": (40, 40, 220)}


def _folder(root: Path, per_class: dict[str, int]) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in per_class.items():
        for name, colour in COLOURS.items():
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(rng.normal(colour, 30, size=(40, 48, 3)), 0, 255)
                Image.fromarray(pixels.astype("uint8")).save(root / split / name / f"{i}.png")


def test_a_folder_of_the_users_images_is_distilled_on(tmp_path):
    root = tmp_path / "my_images"
    _folder(root, {"train": 12, "val": 6})
    proc = run_cli(
        "dataset=imagefolder",
        f"dataset.root={root}",
        "dataset.image_size=32",
        "dataset.batch_size=8",
        "teacher=resnet56",
        "teacher.arch=resnet8",  # (small, for the test's sake)
        "teacher.epochs=2",
        "teacher.batch_size=8",
        "student=resnet8",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        "efficiency.latency_runs=2",
        "efficiency.throughput_batch=4",
        "mlflow.experiment=my-images",
        cwd=tmp_path,
        tiny=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, (run,) = mlflow_runs("my-images")
    assert run.info.status == "FINISHED"
    assert run.data.tags["dataset"] == "imagefolder"
    assert run.data.params["dataset.root"] == str(root)
    # the folders are the classes
    assert run.data.metrics["student/params"] == 83_892 - 98 * 65  # resnet8, 2 classes not 100
    assert 0.0 <= run.data.metrics["test/acc"] <= 1.0
    assert "training teacher resnet8" in proc.stdout
