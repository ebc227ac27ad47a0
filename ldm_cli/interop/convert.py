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

from ldm_cli.bundle import BUNDLE_JSON, Bundle, load_bundle
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
    vae: str | Path | None = None,
) -> Path:
    """`ldm convert`: import into a bundle (to="ldm"), or export a bundle (to="diffusers" /
    "sd-single-file"). A foreign source exported directly is imported into a temporary bundle first.
    On the way, `merge_lora` (FILE[:SCALE] each) bakes LoRAs into the weights and `vae` replaces the
    model's autoencoder with one sharing its latent space (a decoder-only fine-tune, e.g. sd-vae-ft-mse)."""
    if to not in TARGETS:
        raise UsageError(f"--to must be one of {', '.join(TARGETS)}, got {to!r}")
    source, out = Path(source).expanduser(), Path(out).expanduser()
    if not source.exists():
        raise UsageError(f"--from {source} does not exist")
    _refuse_existing(out)
    is_bundle = (source / BUNDLE_JSON).is_file() or (source / "bundle" / BUNDLE_JSON).is_file()
    if merge_lora or vae:
        return _rewrite_and_convert(source, out, to, is_bundle, options, log, list(merge_lora or []), vae)
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


def _rewrite_and_convert(
    source: Path, out: Path, to: str, is_bundle: bool, options: ImportOptions | None, log: Log, loras: list[str],
    vae: str | Path | None,
) -> Path:
    from ldm_cli.adapters.bake import bake_loras
    from ldm_cli.adapters.files import LoraSpec
    from ldm_cli.diffusion.load import replace_autoencoder

    specs = [LoraSpec.parse(text) for text in loras]
    with tempfile.TemporaryDirectory(prefix="ldm-convert-") as scratch_dir:
        scratch = Path(scratch_dir)
        autoencoder = _autoencoder_bundle(Path(vae).expanduser(), scratch / "vae", options, log) if vae else None
        bundle_path = source if is_bundle else import_checkpoint(source, scratch / "imported", options, log).path
        final = out if to == "ldm" else scratch / "rewritten"
        if specs:
            bundle_path = bake_loras(bundle_path, specs, scratch / "merged" if autoencoder else final).path
            log(f"merged {len(specs)} LoRA(s): {', '.join(str(spec) for spec in specs)}")
        if autoencoder is not None:
            bundle_path = replace_autoencoder(bundle_path, autoencoder, final).path
            log(f"replaced the autoencoder with {vae}")
        if to == "ldm":
            log(f"wrote latent-diffusion bundle {bundle_path}")
            return bundle_path
        export = export_diffusers if to == "diffusers" else export_single_file
        with quiet_progress_bars():
            return export(bundle_path, out, log)


def _autoencoder_bundle(vae: Path, scratch: Path, options: ImportOptions | None, log: Log) -> Bundle:
    """--vae: an ldm autoencoder (or a model's), else a VAE file or folder imported into `scratch`."""
    if not vae.exists():
        raise UsageError(f"--vae {vae} does not exist")
    if (vae / BUNDLE_JSON).is_file() or (vae / "bundle" / BUNDLE_JSON).is_file():
        bundle = load_bundle(vae)
        return load_bundle(bundle.path / bundle.meta["autoencoder"]["path"]) if bundle.kind == "latent-diffusion" else bundle
    bundle = import_checkpoint(vae, scratch, options, log)
    if bundle.kind != "autoencoder":
        raise UsageError(f"--vae {vae} is a whole model, not a VAE; pass its VAE, or convert it and pass the bundle")
    return bundle


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
