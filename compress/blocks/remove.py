"""`blocks.remove`: remove UNet blocks, layers and transformer blocks (BK-SDM, SSD-1B, KOALA).

Papers: BK-SDM arXiv 2305.15798; SSD-1B / Segmind-Vega arXiv 2401.02677; KOALA arXiv
2312.04005. The student is built from diffusers' own config and initialised with the
teacher's kept weights, then (with `distill.steps` > 0) recovered by layer-level
distillation on the teacher's calibration trajectories (slimdiff.compress.distill).

Recipe entries (YAML):

    - pass: blocks.remove
      preset: ssd-1b             # bk-sdm-{base,small,tiny} (SD1.x), ssd-1b, vega,
                                 # koala-1b, koala-700m (SDXL)

    - pass: blocks.remove        # the generic form: any of these keys
      drop: ["down_blocks.3", "up_blocks.0"]      # module globs ("*" within one name)
      layers_per_block: 1                          # per down block; up blocks get one more
      down_depths: [1, [2, 2], [4, 4]]             # transformer depth per block / per layer
      up_depths: [[4, 4, 10], [2, 1, 1], 1]       # like reverse_transformer_layers_per_block
      mid: resnet_only                             # keep | resnet_only | none
      keep: first                                  # which transformer blocks a depth cut keeps
      distill:                                     # keys left out: the preset's paper defaults
        steps: 300                                 # 0 (default): the student as initialised
        lr: 5.0e-5
        batch: 4                                   # (prompt, step) pairs per iteration
        hooks: sub_block                           # block | sub_block | self_attn
        checkpoint_every: 50

Where the paper departs: nothing is removed "progressively" as SSD-1B did over training;
the published end architectures are built in one step, then distilled.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar, Literal

import pydantic
from slimdiff.compress.base import (
    Pass,
    PassConfig,
    PassReport,
    Stage,
    checkpoint_root,
    register_pass,
)
from slimdiff.compress.blocks.plan import Settings, make_plan, read_structure
from slimdiff.compress.blocks.presets import PRESETS, get_preset, presets_for
from slimdiff.compress.distill.config import SEGMIND, DistillConfig, check_settings

from slimdiff.edits import Edit
from slimdiff.errors import UserError

__all__ = ["BlocksRemoved", "RemoveBlocksConfig", "RemoveBlocksPass"]

log = logging.getLogger(__name__)

DepthEntry = int | tuple[int, ...]
_STRUCTURE_KEYS = ("drop", "layers_per_block", "down_depths", "up_depths", "mid")


class RemoveBlocksConfig(PassConfig):
    """A preset by name, or the student's structure in the generic keys (not both)."""

    preset: str | None = None
    drop: tuple[str, ...] = ()
    layers_per_block: int | tuple[int, ...] | None = None
    down_depths: tuple[DepthEntry, ...] | None = None
    up_depths: tuple[DepthEntry, ...] | None = None
    mid: Literal["keep", "resnet_only", "none"] | None = None  # None: the teacher's
    # Which transformer blocks survive a depth cut. "first" is the default because it is
    # the one choice that keeps each kept block's input as it was in the teacher; the
    # papers publish the depths but not which blocks they copied (see plan.pick_layers).
    keep: Literal["first", "even"] = "first"
    distill: DistillConfig = DistillConfig()

    @pydantic.field_validator("preset")
    @classmethod
    def _known_preset(cls, name: str | None) -> str | None:
        if name is not None and name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
        return name

    @pydantic.model_validator(mode="after")
    def _preset_or_structure(self):
        given = [k for k in _STRUCTURE_KEYS if getattr(self, k) not in (None, ())]
        if self.preset is not None:
            if given:
                raise ValueError(
                    f"preset {self.preset} sets the structure; remove {', '.join(given)} "
                    "or the preset"
                )
        elif not given:
            raise ValueError(
                "give a preset (e.g. preset: ssd-1b) or the structure (drop, layers_per_block, "
                "down_depths, up_depths, mid)"
            )
        return self


class BlocksRemoved(Edit):
    """What blocks.remove took out. diffusers' saved config already builds the student, so
    nothing is replayed on load (`in_config`); this is the record of what went."""

    op: Literal["blocks.remove"] = "blocks.remove"
    removed: list[str]
    config: dict[str, list[Any]]  # config key -> [teacher value, student value]
    in_config: ClassVar[bool] = True


@register_pass
class RemoveBlocksPass(Pass):
    """Replace the pipeline's UNet with a smaller one initialised from its weights.

    Example:
        >>> p = RemoveBlocksPass(RemoveBlocksPass.Config(preset="ssd-1b"))
        >>> report = p.apply(load_model("tiny:sdxl").pipe, None)  # doctest: +SKIP
        >>> report.summary["params_after"] < report.summary["params_before"]  # doctest: +SKIP
        True
    """

    name = "blocks.remove"
    stage = Stage.STRUCTURAL
    Config = RemoveBlocksConfig
    edits = (BlocksRemoved,)
    # The structure plan reads UNet2DConditionModel configs (down/up block types, depths).
    denoisers = ("UNet2DConditionModel",)

    @property
    def needs_calibration(self) -> bool:
        """Only distillation needs calibration (the teacher's trajectories)."""
        return self.config.distill.steps > 0

    def preflight(self, pipe, calib) -> None:
        """What apply would refuse, before the runner records the teacher's trajectories:
        another kind of denoiser, a preset of another family or teacher, a structure this
        UNet cannot take, distillation settings that cannot run."""
        from slimdiff.compress.prior import refuse_reshaped

        arch = self._arch(pipe)
        denoiser = getattr(pipe, arch.denoiser)
        refuse_reshaped(
            denoiser,
            self.name,
            "remove blocks from the unpruned, unquantized model, then prune or quantize (one "
            "recipe: blocks.remove first)",
        )
        self.plan(denoiser, arch.family)
        if self.config.distill.steps > 0:
            check_settings(self.config.distill.resolve(self._defaults()))

    def _arch(self, pipe):
        from slimdiff.models.families import arch_of_pipeline

        arch = arch_of_pipeline(pipe)
        if arch.denoiser_class not in self.denoisers:
            raise UserError(
                f"blocks.remove cuts {', '.join(self.denoisers)} denoisers (SD1.x, SDXL and "
                f"their fine-tunes); {arch.family}'s is a {arch.denoiser_class}"
            )
        return arch

    def _defaults(self):
        """The distillation settings keys left out take: the preset paper's, else Segmind's."""
        preset = self.config.preset
        return get_preset(preset).distill if preset is not None else SEGMIND

    def apply(self, pipe, calib) -> PassReport:
        from slimdiff.compress.blocks.student import removed_modules

        cfg = self.config
        arch = self._arch(pipe)
        teacher = getattr(pipe, arch.denoiser)
        student, mapping = self.build_student(teacher, arch.family)
        defaults = self._defaults()
        before, after = _params(teacher), _params(student)
        removed = removed_modules(teacher, mapping)
        changed = _config_changes(teacher.config, student.config)
        recovery = self._distill(arch, teacher, student, mapping, calib, defaults)
        setattr(pipe, arch.denoiser, student)
        log.info(
            "blocks.remove: %s params %.3fB -> %.3fB, %d modules removed",
            arch.denoiser,
            before / 1e9,
            after / 1e9,
            len(removed),
        )
        summary = {
            "preset": cfg.preset,
            "params_before": before,
            "params_after": after,
            "removed": len(removed),
            "config": changed,
            "distill": recovery,
        }
        edit = BlocksRemoved(component=arch.denoiser, removed=removed, config=changed)
        return PassReport(self.name, summary=summary, edits=[edit])

    def build_student(self, teacher, family: str):
        """The student UNet this config cuts from `teacher` (a `family` UNet), initialised
        with the teacher's weights, and its module mapping (student name -> teacher name).
        No distillation: `apply` runs that. tools/unet_speed.py uses this directly."""
        from slimdiff.compress.blocks.student import build_student

        return build_student(teacher, self.plan(teacher, family))

    def plan(self, teacher, family: str):
        """The student's structure this config cuts from `teacher` (a `family` UNet), from
        its config alone; UserError when the preset or the keys do not fit it."""
        cfg = self.config
        if cfg.preset is not None:
            preset = get_preset(cfg.preset)
            _check_teacher(preset, family, teacher)
            settings = preset.settings(cfg.keep)
        else:
            settings = Settings(
                drop=cfg.drop,
                layers_per_block=cfg.layers_per_block,
                down_depths=cfg.down_depths,
                up_depths=cfg.up_depths,
                mid=cfg.mid,
                keep=cfg.keep,
            )
        return make_plan(read_structure(teacher), settings)

    def _distill(self, arch, teacher, student, mapping, calib, defaults) -> dict | str:
        """Recover the student by distillation from the teacher; what it did, for the report.

        Runs while the pipeline still holds the teacher: recording the trajectories (when
        they are not cached) runs the whole pipeline.
        """
        settings = self.config.distill.resolve(defaults)
        if settings.steps == 0:
            return "off (distill.steps: 0)"
        if calib is None:
            log.info("blocks.remove: no calibration given; distillation skipped")
            return (
                f"skipped: {settings.steps} steps asked, but no calibration was given "
                "(`slimdiff inspect --recipe` builds the student only)"
            )
        from slimdiff.compress.distill.features import feature_pairs
        from slimdiff.compress.distill.train import distill

        data = calib.record()
        pairs = feature_pairs(mapping, settings.hooks, student, teacher)
        report = distill(
            student,
            teacher,
            data,
            pairs,
            settings,
            checkpoint=self._checkpoint(calib),
            frozen=arch.frozen,
        )
        return {**asdict(settings), **asdict(report), "prompts": len(data.prompts)}

    def _checkpoint(self, calib) -> Path | None:
        """Where distillation checkpoints, keyed by the teacher, the calibration and this
        pass's config; None (no checkpoints) without a work folder."""
        cfg = self.config.distill
        root = checkpoint_root(cfg.work_dir, calib)
        if root is None:
            return None
        config = self.config.model_dump(mode="json", exclude={"distill": {"work_dir"}})
        blob = json.dumps({"calibration": calib.key, "pass": config}, sort_keys=True)
        key = hashlib.sha256(blob.encode()).hexdigest()[:16]
        return root / f"{self.name}-{key}" / "distill.safetensors"


def _check_teacher(preset, family: str, teacher) -> None:
    fitting = presets_for(family)
    if preset.name not in fitting:
        others = fitting
        raise UserError(
            f"blocks.remove: preset {preset.name} is for {preset.family} UNets, this model is "
            f"{family}; use one of {', '.join(others) or 'none yet'}, or the generic keys "
            "(drop, layers_per_block, down_depths, up_depths, mid)"
        )
    cfg = teacher.config
    layers = cfg.layers_per_block
    layers = (
        tuple(layers)
        if isinstance(layers, (list, tuple))
        else (layers,) * len(cfg.down_block_types)
    )
    if (
        tuple(cfg.down_block_types) != preset.teacher_down_types
        or set(layers) != {preset.teacher_layers}
        or cfg.mid_block_type != "UNetMidBlock2DCrossAttn"
        or cfg.get("reverse_transformer_layers_per_block")
    ):
        raise UserError(
            f"blocks.remove: preset {preset.name} starts from an uncompressed {family} UNet "
            f"({', '.join(preset.teacher_down_types)}, {preset.teacher_layers} layers per "
            f"block, a cross-attention mid-block); this one differs ({_why_different(cfg)}); "
            "use the generic keys instead"
        )


def _why_different(cfg) -> str:
    from slimdiff.models.families import is_refiner_unet

    if is_refiner_unet(cfg):
        return "it is the SDXL refiner's UNet, another architecture than the base's"
    return "already compressed?"


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _config_changes(old, new) -> dict[str, list]:
    """{key: [teacher value, student value]} for the config keys that differ."""

    def norm(v):
        return [norm(x) for x in v] if isinstance(v, (list, tuple)) else v

    keys = [k for k in new if not k.startswith("_")]
    return {k: [norm(old.get(k)), norm(new[k])] for k in keys if norm(old.get(k)) != norm(new[k])}
