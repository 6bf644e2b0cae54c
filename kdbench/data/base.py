"""In-memory data sets served as whole-batch tensor slices.

A data set supplies arrays (train, test, and optionally an unlabelled transfer set); this base
class carves out the validation split, appends the transfer set for distillation, and serves
batches ``(x, y, index)``. Unlabelled samples carry ``y = -1``: hard-label losses skip them,
distillation terms use them. ``index`` addresses the sample in the training set, for caches of
teacher outputs and for contrastive methods.

Arrays are stored as ``storage_dtype`` (float32 by default; image data sets keep uint8 pixels,
a quarter of the memory) and become model input in :meth:`ArrayDataModule.batch_transform`,
which Lightning runs on the device after the transfer (``on_after_batch_transfer``): this is
where image data sets scale, augment (training batches only) and normalise.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from kdbench.errors import ConfigError

UNLABELLED = -1  # a sample (or token) with no hard label: distilled, but no cross-entropy
# Padding of a token sequence (text data sets): neither cross-entropy nor distillation applies;
# token losses average over the positions with ``y != PAD_LABEL``.
PAD_LABEL = -2


class BatchTensorDataset(Dataset):
    """Tensors indexed a whole batch at a time (``__getitems__``), not one sample per call."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y
        self.index = torch.arange(len(x))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i], self.index[i]

    def __getitems__(self, indices):
        idx = torch.as_tensor(indices)  # a tensor slice (SliceBatchSampler) or a list
        # index_select: on the CPU several times faster than x[idx] for a gather of rows
        return self.x.index_select(0, idx), self.y.index_select(0, idx), idx


class EpochRandomSampler(RandomSampler):
    """A shuffle that is a function of (seed, epoch) alone, not of the global RNG's history: a
    run resumed from a checkpoint sees the same batches as one never interrupted. (Under DDP,
    Lightning replaces it by a DistributedSampler, which is seeded by epoch too.)"""

    def __init__(self, data_source, seed: int, epoch) -> None:
        super().__init__(data_source)
        self.seed, self.epoch = int(seed), epoch

    def permutation(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch())
        return torch.randperm(len(self.data_source), generator=g)

    def __iter__(self):
        yield from self.permutation().tolist()


class SliceBatchSampler(BatchSampler):
    """Batches of indices as tensor slices of the epoch's permutation (or of ``arange`` for an
    unshuffled loader): no per-sample Python, unlike ``BatchSampler``, which collects every
    index one by one. Any other sampler (e.g. the DistributedSampler Lightning puts in under
    DDP, through this class's ``BatchSampler`` signature) is batched as ``BatchSampler`` does."""

    def __iter__(self):
        if isinstance(self.sampler, EpochRandomSampler):
            order = self.sampler.permutation()
        elif isinstance(self.sampler, SequentialSampler):
            order = torch.arange(len(self.sampler))
        else:
            yield from super().__iter__()
            return
        stop = len(order) - len(order) % self.batch_size if self.drop_last else len(order)
        yield from order[:stop].split(self.batch_size)


def _identity(batch):
    return batch


class ArrayDataModule(L.LightningDataModule):
    """Base for data sets that fit in memory. Subclasses implement :meth:`generate`."""

    name = "arrays"
    num_classes: int
    has_generator = False  # can make an unlabelled transfer set of any size
    # generation options that shape the transfer set alone (not in a teacher's key); a data set
    # whose labelled splits depend on the transfer set's size must not be generated that way
    transfer_only: tuple[str, ...] = ()
    storage_dtype: torch.dtype = torch.float32  # dtype of the stored x tensors
    input_dtype: torch.dtype = torch.float32  # dtype of model input (after batch_transform)

    def __init__(
        self,
        name: str,
        data_dir: str,
        batch_size: int = 128,
        val_size: int = 400,
        split_seed: int = 0,
        transfer_size: int = 0,
        eval_batch_size: int = 1024,
        **generation: object,
    ) -> None:
        super().__init__()
        self.name = name
        self.data_dir = Path(os.path.expanduser(str(data_dir)))
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size)
        self.val_size = int(val_size)
        self.split_seed = int(split_seed)
        self.transfer_size = int(transfer_size)
        self.generation = generation
        self.use_transfer = False  # set by the scheme when distillation terms need it
        self.steps_per_call = 1  # training batches served per loader item (see resolve_steps)
        self.shuffle_seed = 0  # the run's seed: epoch e's order is a function of (seed, e)
        self.augment = False  # no random augmentation: teacher outputs are fixed per sample
        self._check()
        self._arrays: dict[str, np.ndarray] | None = None

    # -- subclass interface -------------------------------------------------------------
    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one model input (after :meth:`batch_transform`), without the batch axis."""
        raise NotImplementedError

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """Shape of one stored sample (``train_x[i]``); the input shape unless the transform
        changes it (e.g. crops)."""
        return self.input_shape

    def generate(self) -> dict[str, np.ndarray]:
        """Return ``x``, ``y``, ``x_test``, ``y_test`` and, if any, ``x_transfer``.

        Optional: ``x_val``/``y_val``, a validation split the data set makes itself (e.g. split
        by play: the validation samples must not share a source with training ones); then
        ``val_size`` carves nothing out of ``x``. ``y_transfer``: labels of the transfer samples
        (e.g. per-token codes ``UNLABELLED``/``PAD_LABEL``); without it every transfer label is
        ``UNLABELLED``.
        """
        raise NotImplementedError

    def batch_transform(self, x: torch.Tensor, train: bool) -> torch.Tensor:
        """Turn a batch of stored samples (``storage_dtype``, any device) into model input.

        ``train`` says whether it is a training batch (random augmentation applies only then,
        and only if ``self.augment``). With ``train=False`` it is deterministic, so it may be
        applied to stored tensors directly (e.g. for a cache of teacher outputs). Default: the
        identity (arrays already stored as model input).
        """
        return x

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Lightning hook, run on the device after the transfer: ``batch_transform`` on x."""
        if type(self).batch_transform is ArrayDataModule.batch_transform:
            return batch  # the identity: leave the batch as it came
        x, *rest = batch
        train = self.trainer is not None and self.trainer.training
        return (self.batch_transform(x, train), *rest)

    # -- validation -----------------------------------------------------------------------
    def _check(self) -> None:
        if self.batch_size < 1:
            raise ConfigError("dataset.batch_size", self.batch_size, "must be a positive integer")
        if self.val_size < 0:
            raise ConfigError(
                "dataset.val_size",
                self.val_size,
                "must be >= 0 (0 means no validation split: validate on the test set)",
            )
        if self.transfer_size < 0:
            raise ConfigError(
                "dataset.transfer_size",
                self.transfer_size,
                "must be >= 0 (0 means no transfer set)",
            )
        if self.transfer_size > 0 and not self.has_generator:
            raise ConfigError(
                "dataset.transfer_size",
                self.transfer_size,
                f"dataset {self.name} cannot generate unlabelled samples: set it to 0",
            )

    def cache_key(self) -> dict:
        """Everything that determines the arrays and the splits (not where they live)."""
        return {
            "name": self.name,
            "val_size": self.val_size,
            "split_seed": self.split_seed,
            "transfer_size": self.transfer_size,
            **{k: v for k, v in sorted(self.generation.items())},
        }

    def labelled_key(self) -> dict:
        """What determines the labelled splits alone, on which a teacher trains: the cache key
        less the transfer set's size and the options that shape only the transfer set
        (``transfer_only``). A sweep over ``dataset.transfer_size`` reuses one cached teacher."""
        key = self.cache_key()
        for k in ("transfer_size", *self.transfer_only):
            key.pop(k, None)
        return key

    # -- arrays, cached on disk ---------------------------------------------------------
    def _cache_path(self, what: dict) -> Path:
        digest = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()
        return self.data_dir / f"{self.name}-{digest[:16]}.npz"

    def load_cached(self, what: dict, make) -> dict[str, np.ndarray]:
        """Arrays from ``data_dir`` if there, else ``make()`` written atomically (never half)."""
        from kdbench.cachefile import atomic_write, read_or_none

        def read(p: Path) -> dict[str, np.ndarray]:
            with np.load(p, allow_pickle=False) as f:
                return {k: f[k] for k in f.files}  # reads (and checks) every member now

        path = self._cache_path(what)
        arrays = read_or_none(path, read, "data cache entry")
        if arrays is not None:
            return arrays
        arrays = make()  # an unwritable data_dir costs the cache, not the run (a notice)
        atomic_write(path, lambda f: np.savez(f, **arrays), "data cache entry")
        return arrays

    def arrays(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            self._arrays = self.generate()
            n_train = len(self._arrays["y"])
            if "x_val" not in self._arrays and self.val_size >= n_train:
                raise ConfigError(
                    "dataset.val_size",
                    self.val_size,
                    f"must be smaller than the {n_train} training samples",
                )
        return self._arrays

    def prepare_data(self) -> None:
        self.arrays()

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_x"):
            return
        a = self.arrays()
        x = self._tensor(a["x"])
        y = torch.as_tensor(a["y"], dtype=torch.long)
        self.test_x = self._tensor(a["x_test"])
        self.test_y = torch.as_tensor(a["y_test"], dtype=torch.long)
        if "x_val" in a:  # the data set's own validation split: val_size carves nothing
            self.train_x, self.train_y = x, y
            self.val_x = self._tensor(a["x_val"])
            self.val_y = torch.as_tensor(a["y_val"], dtype=torch.long)
        elif self.val_size == 0:  # no validation split: the test set serves as validation set
            self.train_x, self.train_y = x, y
            self.val_x, self.val_y = self.test_x, self.test_y
        else:
            perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.split_seed))
            val, train = perm[: self.val_size], perm[self.val_size :]
            self.train_x, self.train_y = x[train], y[train]
            self.val_x, self.val_y = x[val], y[val]
        if "x_transfer" in a and self.transfer_size > 0:
            self.transfer_x = self._tensor(a["x_transfer"])[: self.transfer_size]
        else:
            self.transfer_x = x[:0]
        self.transfer_y = None  # labels of the transfer samples: all UNLABELLED unless given
        if "y_transfer" in a and len(self.transfer_x):
            self.transfer_y = torch.as_tensor(a["y_transfer"], dtype=torch.long)
            self.transfer_y = self.transfer_y[: len(self.transfer_x)]

    def _tensor(self, a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(a, dtype=self.storage_dtype).reshape(-1, *self.stored_shape)

    # -- loaders ------------------------------------------------------------------------
    def distill_set(self) -> BatchTensorDataset:
        """Labelled training samples, then (if used) the unlabelled transfer samples."""
        x, y = self.train_x, self.train_y
        if self.use_transfer and len(self.transfer_x):
            unl = getattr(self, "transfer_y", None)
            if unl is None:  # labels shaped like y's (per token for sequences)
                shape = (len(self.transfer_x), *self.train_y.shape[1:])
                unl = torch.full(shape, UNLABELLED, dtype=torch.long)
            x, y = torch.cat([x, self.transfer_x]), torch.cat([y, unl])
        return BatchTensorDataset(x, y)

    def _loader(self, ds: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        if shuffle:
            sampler = EpochRandomSampler(ds, self.shuffle_seed, self._epoch)
        else:
            sampler = SequentialSampler(ds)
        batches = SliceBatchSampler(sampler, batch_size, drop_last=False)
        return DataLoader(ds, batch_sampler=batches, collate_fn=_identity)

    def _epoch(self) -> int:
        return int(self.trainer.current_epoch) if self.trainer is not None else 0

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches; ``steps_per_call`` consecutive ones served as one item
        (the scheme splits it back into steps of ``batch_size``)."""
        return self._loader(self.distill_set(), self.batch_size * self.steps_per_call, True)

    def resolve_steps(self, value, limited: bool = False) -> int:
        """``steps_per_call``: an integer >= 1, or ``auto``: as many as fit in 32 MB of stored
        samples, at most 32 (tiny steps amortise the training loop's per-batch cost, about 1 ms
        per served batch on the CPU; large ones gain nothing and would hold more memory), and 1
        where ``trainer.limit_train_batches`` is ``limited`` (Lightning counts served batches:
        one step each, as there)."""
        if value == "auto" and limited:
            return 1
        if value == "auto":
            per_sample = torch.empty((), dtype=self.storage_dtype).element_size()
            per_sample *= math.prod(self.stored_shape)
            return max(1, min(32, (32 * 2**20) // max(1, per_sample * self.batch_size)))
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError("steps_per_call", value, "must be an integer >= 1 or auto")
        return value

    def val_dataloader(self) -> DataLoader:
        return self._loader(BatchTensorDataset(self.val_x, self.val_y), self.eval_batch_size, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(
            BatchTensorDataset(self.test_x, self.test_y), self.eval_batch_size, False
        )


def dummy_input(dm: ArrayDataModule, n: int) -> torch.Tensor:
    """``n`` zero model inputs of ``dm`` (shape ``(n, *dm.input_shape)``, ``dm.input_dtype``):
    for tracing, shape probes and exports (token ids 0 for text, zeros for images)."""
    return torch.zeros((n, *dm.input_shape), dtype=dm.input_dtype)


class ImageDataModule(ArrayDataModule):
    """Base for image data sets: pixels stored as uint8 ``(N, C, H, W)``; a batch becomes model
    input on its device: scaled to [0, 1], augmented (:meth:`train_augment`) when ``train`` and
    ``self.augment``, else :meth:`eval_view`, then normalised with ``mean``/``std``."""

    storage_dtype = torch.uint8
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def train_augment(self, x: torch.Tensor) -> torch.Tensor:
        """Random augmentation of a float batch in [0, 1] (training only)."""
        return x

    def eval_view(self, x: torch.Tensor) -> torch.Tensor:
        """The deterministic view of a float batch in [0, 1] (evaluation, or no augmentation)."""
        return x

    def batch_transform(self, x: torch.Tensor, train: bool) -> torch.Tensor:
        """uint8 pixels (or floats already in [0, 1]) -> normalised float32 model input."""
        from kdbench.data.augment import normalize

        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        x = self.train_augment(x) if train and self.augment else self.eval_view(x)
        return normalize(x, self.mean, self.std)
