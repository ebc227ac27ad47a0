"""`ldm convert`: Stable Diffusion checkpoints → ldm bundles that `sample`, `img2img`, `encode` and
`train-diffusion --init-from` use as they are; and ldm bundles out to diffusers / SD single files.

Import sources: an original (CompVis) single file, .safetensors or a legacy .ckpt read weights-only;
a diffusers pipeline folder; a standalone VAE (either layout, file or folder → an autoencoder bundle).

    read safely, by kind (sources) → names to diffusers' (sd_keys) → architecture from configs or
    off the weights (configs, detect) → every key and shape checked against the model (checks) →
    print what was found (describe) → write (write)

Nothing is written until every part has been read and checked.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ldm_cli.bundle import BUNDLE_JSON, Bundle
from ldm_cli.errors import RunDirError, UsageError
from ldm_cli.interop.describe import describe, describe_autoencoder
from ldm_cli.interop.export import export_diffusers, export_single_file
from ldm_cli.interop.imported import (  # noqa: F401  (part of this module's public API)
    METADATA_KEY,
    SD1_TEXT_ENCODER,
    SD_LATENT_SCALE,
    ImportedAutoencoder,
    ImportOptions,
    Log,
)
from ldm_cli.interop.sources import already_a_bundle, read_source
from ldm_cli.interop.write import write_autoencoder, write_latent_diffusion


TARGETS = ("ldm", "diffusers", "sd-single-file")


@contextlib.contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """transformers draws a bar per tiny load/save; conversion prints its own summary instead."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def convert_model(
    source: str | Path, out: str | Path, to: str = "ldm", options: ImportOptions | None = None, log: Log = print,
    merge_lora: list[str] | None = None,
) -> Path:
    """`ldm convert`: import into a bundle (to="ldm"), or export a bundle (to="diffusers" /
    "sd-single-file"). A foreign source exported directly is imported into a temporary bundle first.
    `merge_lora` (FILE[:SCALE] each) bakes LoRAs into the weights on the way."""
    if to not in TARGETS:
        raise UsageError(f"--to must be one of {', '.join(TARGETS)}, got {to!r}")
    source, out = Path(source).expanduser(), Path(out).expanduser()
    if not source.exists():
        raise UsageError(f"--from {source} does not exist")
    _refuse_existing(out)
    is_bundle = (source / BUNDLE_JSON).is_file() or (source / "bundle" / BUNDLE_JSON).is_file()
    if merge_lora:
        return _merge_and_convert(source, out, to, is_bundle, options, log, merge_lora)
    if to == "ldm":
        if is_bundle:
            raise already_a_bundle(source)
        bundle = import_checkpoint(source, out, options, log)
        log(f"wrote {bundle.kind} bundle {bundle.path}")
        return bundle.path
    export = export_diffusers if to == "diffusers" else export_single_file
    if is_bundle:
        given = options or ImportOptions()
        if given.prediction_type or given.text_encoder or given.resolution:
            raise UsageError("--prediction-type, --text-encoder and --resolution apply when importing, not to an ldm bundle")
        with quiet_progress_bars():
            return export(source, out, log)
    with tempfile.TemporaryDirectory(prefix="ldm-convert-") as scratch:
        bundle = import_checkpoint(source, Path(scratch) / "bundle", options, log)
        with quiet_progress_bars():
            return export(bundle.path, out, log)


def _merge_and_convert(
    source: Path, out: Path, to: str, is_bundle: bool, options: ImportOptions | None, log: Log, loras: list[str]
) -> Path:
    from ldm_cli.adapters.bake import bake_loras
    from ldm_cli.adapters.files import LoraSpec

    specs = [LoraSpec.parse(text) for text in loras]
    with tempfile.TemporaryDirectory(prefix="ldm-convert-") as scratch:
        bundle_path = source if is_bundle else import_checkpoint(source, Path(scratch) / "imported", options, log).path
        merged = bake_loras(bundle_path, specs, out if to == "ldm" else Path(scratch) / "merged")
        log(f"merged {len(specs)} LoRA(s): {', '.join(str(spec) for spec in specs)}")
        if to == "ldm":
            log(f"wrote {merged.kind} bundle {merged.path}")
            return merged.path
        export = export_diffusers if to == "diffusers" else export_single_file
        with quiet_progress_bars():
            return export(merged.path, out, log)


def import_checkpoint(
    source: str | Path, out: str | Path, options: ImportOptions | None = None, log: Log = print
) -> Bundle:
    """Read an SD checkpoint, diffusers folder or VAE and write an ldm bundle to `out`."""
    source, out, options = Path(source).expanduser(), Path(out).expanduser(), options or ImportOptions()
    _refuse_existing(out)
    if options.resolution is not None and options.resolution <= 0:
        raise UsageError(f"--resolution must be positive, got {options.resolution}")
    with tempfile.TemporaryDirectory(prefix="ldm-convert-") as scratch_dir, quiet_progress_bars():
        scratch = Path(scratch_dir)
        imported = read_source(source, options, scratch, log)
        if isinstance(imported, ImportedAutoencoder):
            describe_autoencoder(imported, log)
            bundle = write_autoencoder(imported, out, {"path": str(source.resolve())})
        else:
            describe(imported, log)
            bundle = write_latent_diffusion(imported, out, scratch)
    return bundle


def _refuse_existing(out: Path) -> None:
    if out.exists():
        raise RunDirError(f"{out} already exists; choose a new --out (nothing was overwritten)")
