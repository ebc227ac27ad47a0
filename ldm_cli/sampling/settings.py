"""The sampling settings: one dataclass holds every default and every check. The CLI options, the PNG
metadata (written and replayed), quickstart and the bench scripts all read it. (No torch import at
module level: the CLI reads the defaults before it loads anything heavy.)"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Optional

from ldm_cli.errors import ConfigError, DataError, UsageError

DEFAULT_SAMPLER = "dpmpp_2m"
SPACINGS = ("leading", "trailing", "linspace", "exponential")
TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


@dataclass(frozen=True)
class SamplingLimits:
    """Bounds on sizes and counts, so an untrusted input (a replayed PNG, a typo) fails in one line instead
    of allocating for hours; raise them with `ldm sample max_steps=... max_side=... max_batch_size=...`."""

    max_steps: int = 1000
    max_side: int = 4096  # pixels
    max_batch_size: int = 256


@dataclass
class SamplingSettings:
    """How to sample; the same for every image of a run (sizes of img2img images come from their init)."""

    steps: int = 30
    guidance_scale: float = 7.5
    sampler: str = DEFAULT_SAMPLER
    eta: Optional[float] = None  # None: the sampler's own default; only samplers with an `eta` take it
    negative_prompt: str = ""
    height: int = 512
    width: int = 512
    strength: float = 1.0  # img2img: the fraction of the σ schedule re-noised; 1 starts from pure noise
    timestep_spacing: str = "trailing"  # leading | trailing | linspace | exponential (log σ evenly spaced)
    karras_sigmas: bool = False
    prompt_weighting: bool = True  # A1111's (word:1.2) syntax and BREAK; False reads prompts literally
    clip_skip: int = 1  # use the N-th CLIP hidden state from the end (1: the last)

    @property
    def spacing(self) -> str:
        return "karras" if self.karras_sigmas else self.timestep_spacing

    def sampler_options(self) -> dict[str, float]:
        return {} if self.eta is None else {"eta": self.eta}

    def effective_eta(self) -> Optional[float]:
        """The eta the sampler runs with (its default when none was given); None if it takes none."""
        from ldm_cli.sampling.samplers import get_sampler

        default = get_sampler(self.sampler).options.get("eta")
        if default is None:
            return None
        return float(self.eta if self.eta is not None else default)

    def start_index(self) -> int:
        """SDEdit's first step k = S − int(S · strength): strength 1 → 0 (all steps), 0 → S (none)."""
        return self.steps - int(self.steps * self.strength)

    def validate(self, num_train_timesteps: Optional[int] = None, limits: SamplingLimits = SamplingLimits()) -> None:
        """Raise UsageError / ConfigError on a value no run could use (before anything is written);
        the steps are checked against `num_train_timesteps` once the model is known."""
        from ldm_cli.sampling.samplers import SAMPLERS, get_sampler

        get_sampler(self.sampler)
        for name in ("guidance_scale", "strength", "eta"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise UsageError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
        if self.eta is not None:
            if self.effective_eta() is None:
                takers = [name for name, sampler in SAMPLERS.items() if "eta" in sampler.options]
                raise ConfigError(f"sampler {self.sampler!r} takes no --eta; samplers with eta: {', '.join(takers)}")
            if self.eta < 0:
                raise UsageError(f"--eta must be >= 0, got {self.eta}")
        if self.steps < 1:
            raise UsageError(f"--steps must be a positive integer, got {self.steps}")
        if num_train_timesteps is not None and not self.karras_sigmas and self.steps > num_train_timesteps:
            raise UsageError(f"--steps {self.steps} exceeds the model's {num_train_timesteps} training timesteps")
        if self.steps > limits.max_steps:
            raise UsageError(f"--steps {self.steps} exceeds the limit of {limits.max_steps} (raise it with max_steps=N)")
        for name in ("height", "width"):
            side = getattr(self, name)
            if not 1 <= side <= limits.max_side:
                raise UsageError(f"--{name} must be between 1 and {limits.max_side} pixels (raise it with max_side=N), got {side}")
        if not 0.0 <= self.strength <= 1.0:
            raise UsageError(f"--strength must be between 0 and 1, got {self.strength}")
        if self.timestep_spacing not in SPACINGS:
            raise ConfigError(f"timestep_spacing must be one of {', '.join(SPACINGS)}, got {self.timestep_spacing!r}")
        if self.clip_skip < 1:
            raise UsageError(f"--clip-skip must be a positive integer, got {self.clip_skip}")

    def to_metadata(self) -> dict[str, Any]:
        """The settings as the PNG's "ldm" metadata stores them (eta as the sampler ran it)."""
        return {
            "negative_prompt": self.negative_prompt, "steps": self.steps, "sampler": self.sampler,
            "eta": self.effective_eta(), "guidance_scale": self.guidance_scale, "timestep_spacing": self.timestep_spacing,
            "karras_sigmas": self.karras_sigmas, "height": self.height, "width": self.width, "strength": self.strength,
            "prompt_weighting": self.prompt_weighting, "clip_skip": self.clip_skip,
        }

    @classmethod
    def from_metadata(cls, meta: dict[str, Any], source: str = "the image") -> "SamplingSettings":
        """Settings from a PNG's metadata, each value checked for its type (DataError naming the key);
        `validate` then checks the values."""
        types = {"steps": int, "height": int, "width": int, "guidance_scale": float, "strength": float,
                 "eta": float, "sampler": str, "negative_prompt": str, "timestep_spacing": str, "karras_sigmas": bool,
                 "prompt_weighting": bool, "clip_skip": int}
        values: dict[str, Any] = {}
        for item in fields(cls):
            if item.name not in meta or (item.name == "eta" and meta[item.name] is None):
                continue
            value, kind = meta[item.name], types[item.name]
            if kind is float:
                fits = isinstance(value, (int, float)) and not isinstance(value, bool)
            else:
                fits = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
            if not fits:
                raise DataError(f"the metadata of {source} has {item.name}={value!r}, not {TYPE_WORDS[kind]}; it cannot be replayed")
            values[item.name] = kind(value)
        if meta.get("mode") not in ("img2img", "inpaint"):
            values["strength"] = 1.0
        values.setdefault("prompt_weighting", False)  # images made before prompt weighting existed read prompts literally
        return cls(**values)
