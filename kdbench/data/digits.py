"""scikit-learn's bundled handwritten digits (8x8 images, 1797 samples, 10 classes).

Served as sequences of 64 pixels (1 x 64) scaled to [0, 1], so the 1-D models apply. A fixed
stratified 80/20 split gives 1437 train / 360 test samples. No generator: no transfer set.
"""

from __future__ import annotations

import numpy as np

from kdbench.data.base import ArrayDataModule


class Digits(ArrayDataModule):
    num_classes = 10

    def __init__(self, test_fraction: float = 0.2, **kwargs) -> None:
        super().__init__(test_fraction=float(test_fraction), **kwargs)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (1, 64)

    def generate(self) -> dict[str, np.ndarray]:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        d = load_digits()
        x = (d.data / 16.0).astype(np.float32)
        y = d.target.astype(np.int64)
        x, x_test, y, y_test = train_test_split(
            x, y, test_size=self.generation["test_fraction"], stratify=y, random_state=0
        )
        return {"x": x, "y": y, "x_test": x_test, "y_test": y_test}
