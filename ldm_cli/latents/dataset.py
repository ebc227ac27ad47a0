"""Reading a latent dataset written by `ldm encode`: memory-mapped shards of posterior moments.

Layout of a latent dataset directory:
    index.json                 format, autoencoder (content hash, path), latent scale/shift,
                               resolution, latent shape, count, shards, text cache info, bad images
    text_uncond.npy            [1, L, D] float16: the empty prompt's embedding (with --cache-text)
    shard_00000/
        mean.npy, logvar.npy   [n, C, h, w] float32: the posterior N(mean, exp(logvar)) per image
        mean_flip.npy, ...     the same for the horizontally flipped image (with --flip)
        text.npy               [n, L, D] float16: the caption's text-encoder output (with --cache-text)
        captions.json          list[str]
        paths.json             list[str], relative to the source folder
        shard.json             count, latent shape and the unreadable files skipped in this shard

With aspect-ratio buckets (`ldm encode --buckets`) every shard holds one bucket's shape; the
index lists each shard's `latent_shape`, and `latent_shape` is the most common bucket's. A set
made without buckets is one bucket.

Storing the posterior rather than one sample lets training draw a fresh latent every epoch.
Shards are opened lazily with `np.load(mmap_mode="r")`, per process and at most a bounded
number at a time, so the dataset pickles into DataLoader workers and never sits whole in RAM.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ldm_cli.errors import DataError, IncompatibleError

FORMAT = "ldm-latents/1"
INDEX_FILE = "index.json"
UNCOND_FILE = "text_uncond.npy"
SHARD_META = "shard.json"


def shard_name(number: int) -> str:
    return f"shard_{number:05d}"


def shard_files(flip: bool, text: bool) -> list[str]:
    """Every file a complete shard holds for these settings."""
    files = ["mean.npy", "logvar.npy", "captions.json", "paths.json", SHARD_META]
    if flip:
        files += ["mean_flip.npy", "logvar_flip.npy"]
    if text:
        files.append("text.npy")
    return files


def read_index(root: str | Path) -> dict[str, Any]:
    """The index of a complete latent dataset; DataError (one line) when there is none."""
    root = Path(root)
    path = root / INDEX_FILE
    if not path.is_file():
        what = "does not exist" if not root.exists() else "is not a latent dataset (no index.json)"
        raise DataError(f"{root} {what}; make one with `ldm encode --vae RUN --data DIR --out {root}`")
    try:
        index = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise DataError(f"{path} is unreadable ({error}); re-run `ldm encode` into {root}") from error
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise DataError(f"{path} is not an {FORMAT} index; re-encode with `ldm encode`")
    if not index.get("complete"):
        done, total = len(index.get("shards", [])), index.get("num_shards", "?")
        raise DataError(
            f"latent dataset {root} is incomplete ({done} of {total} shards); "
            "re-run the same `ldm encode` command to finish it"
        )
    return index


def check_autoencoder(root: str | Path, recorded_hash: str, model_hash: str) -> None:
    if recorded_hash != model_hash:
        raise IncompatibleError(
            f"latents in {root} were encoded with autoencoder {recorded_hash[:12]} but the model uses "
            f"{model_hash[:12]}; re-encode with `ldm encode --vae ...`"
        )


class LatentDataset(torch.utils.data.Dataset):
    """Items `dict(mean, logvar [C,h,w] float32, caption, index[, text [L,D] float32])`.

    With flipped copies in use, `len` doubles and item `i >= count` is the flip of `i - count`.
    `flip=None` uses them when the dataset has them.
    """

    def __init__(
        self,
        root: str | Path,
        flip: Optional[bool] = None,
        expect_autoencoder_hash: Optional[str] = None,
        max_open_shards: int = 64,  # each open array holds a file descriptor
    ) -> None:
        self.root = Path(root)
        self.index = read_index(self.root)
        if expect_autoencoder_hash is not None:
            check_autoencoder(self.root, self.autoencoder_hash, expect_autoencoder_hash)
        self.has_flip = bool(self.index["flip"])
        if flip and not self.has_flip:
            raise DataError(f"latent dataset {self.root} has no flipped copies; re-encode it with `ldm encode --flip`")
        self.use_flip = self.has_flip if flip is None else flip
        self.count = int(self.index["count"])
        self.shard_names = [shard["name"] for shard in self.index["shards"]]
        # item j lives in shard s at row j - starts[s]
        self.starts = np.cumsum([0] + [int(shard["count"]) for shard in self.index["shards"]])
        if self.starts[-1] != self.count:
            raise DataError(f"{self.root / INDEX_FILE} is inconsistent (shards hold {self.starts[-1]} items, count says {self.count})")
        self.shard_shapes = [tuple(int(n) for n in shard.get("latent_shape", self.index["latent_shape"])) for shard in self.index["shards"]]
        self.max_open_shards = max_open_shards
        self._open: OrderedDict[int, dict[str, Any]] = OrderedDict()

    # --- what the index records -------------------------------------------------------------------

    @property
    def autoencoder_hash(self) -> str:
        return self.index["autoencoder"]["content_hash"]

    @property
    def autoencoder_path(self) -> Path:
        return Path(self.index["autoencoder"]["path"])

    @property
    def latent_scale(self) -> float:
        return float(self.index["latent_scale"])

    @property
    def latent_shift(self) -> float:
        return float(self.index["latent_shift"])

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        channels, height, width = self.index["latent_shape"]
        return int(channels), int(height), int(width)

    def buckets(self) -> dict[tuple[int, int, int], list[int]]:
        """Item indices by latent shape (flipped copies with their originals), most items first (ties: squarest)."""
        groups: dict[tuple[int, int, int], list[int]] = {}
        for number, shape in enumerate(self.shard_shapes):
            groups.setdefault(shape, []).extend(range(int(self.starts[number]), int(self.starts[number + 1])))
        if self.use_flip:
            for items in groups.values():
                items.extend([item + self.count for item in items])
        return dict(sorted(groups.items(), key=lambda entry: (-len(entry[1]), abs(math.log(entry[0][2] / entry[0][1])), entry[0])))

    def caption(self, index: int) -> str:
        """Item `index`'s caption, without reading its latents."""
        item = index - self.count if index >= self.count else index
        number = int(np.searchsorted(self.starts, item, side="right")) - 1
        return self._shard(number)["captions"][item - int(self.starts[number])]

    @property
    def resolution(self) -> int:
        return int(self.index["resolution"])

    @property
    def text_info(self) -> Optional[dict[str, Any]]:
        """`{"config": TextEncoderConfig as a dict, "width", "max_length"}`, or None without a cache."""
        return self.index.get("text")

    def uncond_text(self) -> Optional[torch.Tensor]:
        """The cached empty-prompt embedding [L, D] (for caption dropout), or None without a cache."""
        if self.text_info is None:
            return None
        path = self.root / UNCOND_FILE
        if not path.is_file():
            raise DataError(f"{path} is missing; re-run `ldm encode --cache-text` into {self.root}")
        try:
            return torch.from_numpy(np.load(path).astype(np.float32))[0]
        except (OSError, ValueError, EOFError, IndexError) as error:
            raise DataError(f"{path} is damaged ({error}); delete it and re-run `ldm encode --cache-text` into {self.root}") from None

    # --- items ------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.count * (2 if self.use_flip else 1)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} latent items")
        flipped = index >= self.count
        item = index - self.count if flipped else index
        number = int(np.searchsorted(self.starts, item, side="right")) - 1
        shard, row = self._shard(number), item - int(self.starts[number])
        suffix = "_flip" if flipped else ""
        out = {
            # np.array copies the row out of the read-only memmap
            "mean": torch.from_numpy(np.array(shard["mean" + suffix][row])),
            "logvar": torch.from_numpy(np.array(shard["logvar" + suffix][row])),
            "caption": shard["captions"][row],
            "index": index,
        }
        if "text" in shard:
            out["text"] = torch.from_numpy(shard["text"][row].astype(np.float32))
        return out

    def _shard(self, number: int) -> dict[str, Any]:
        if number in self._open:
            self._open.move_to_end(number)
            return self._open[number]
        directory = self.root / self.shard_names[number]
        expected = int(self.starts[number + 1] - self.starts[number])
        arrays = ["mean", "logvar"] + (["mean_flip", "logvar_flip"] if self.use_flip else [])
        arrays += ["text"] if self.text_info is not None else []
        try:
            shard: dict[str, Any] = {name: np.load(directory / f"{name}.npy", mmap_mode="r") for name in arrays}
            shard["captions"] = json.loads((directory / "captions.json").read_text())
        except (OSError, ValueError) as error:
            raise DataError(f"shard {directory} is damaged ({error}); delete it and re-run `ldm encode`") from error
        if any(len(values) != expected for values in shard.values()):
            raise DataError(f"shard {directory} does not hold the {expected} items its index says; delete it and re-run `ldm encode`")
        self._open[number] = shard
        while len(self._open) > self.max_open_shards:
            self._open.popitem(last=False)
        return shard

    def __getstate__(self) -> dict[str, Any]:
        # memmaps stay in the process that opened them; a DataLoader worker opens its own
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        return state


def sample_latents(mean: torch.Tensor, logvar: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """z ~ N(mean, exp(logvar)): a fresh raw (unscaled) latent from a stored posterior."""
    noise_device = generator.device if generator is not None else mean.device
    noise = torch.randn(mean.shape, generator=generator, device=noise_device, dtype=mean.dtype).to(mean.device)
    return mean + torch.exp(0.5 * logvar) * noise


def collate_latents(items: list[dict[str, Any]]) -> dict[str, Any]:
    batch = {
        "mean": torch.stack([item["mean"] for item in items]),
        "logvar": torch.stack([item["logvar"] for item in items]),
        "caption": [item["caption"] for item in items],
        "index": torch.tensor([item["index"] for item in items]),
    }
    if "text" in items[0]:
        batch["text"] = torch.stack([item["text"] for item in items])
    return batch
