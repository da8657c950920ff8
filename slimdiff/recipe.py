"""Recipes: one YAML file names the model, the passes, the export and the bench settings.

Example (YAML):

    version: 1
    description: SDXL, no compression, fp16 ONNX
    model: tiny:sdxl
    passes: []                       # e.g. - pass: blocks.remove
    export: {targets: [onnx], precision: fp16}
    bench: {steps: 8, repeat: 3}

Every section rejects unknown keys; each pass entry is validated into its own pass's typed
Config inside the Recipe model (the passes register their schemas in slimdiff/passes.py),
so a `Recipe(...)` built in Python is checked like `slimdiff validate` checks a file.
Errors name the file, the pass index and the field.
"""

from __future__ import annotations

import hashlib
import json
from importlib.resources import files
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
import yaml

from slimdiff.errors import UserError
from slimdiff.limits import (
    MAX_CONTROLNETS,
    MAX_GUIDANCE,
    MAX_IMAGES,
    MAX_SEED,
    MAX_SIDE,
    MAX_STEPS,
    MIN_SIDE,
)
from slimdiff.passes import PassConfig, Stage, StrictRecord, get_schema
from slimdiff.yamlio import check_depth, parse_yaml_value, read_yaml_file

__all__ = [
    "BenchSpec",
    "CalibrationSpec",
    "ExportSpec",
    "PassEntry",
    "Recipe",
    "builtin_recipes",
    "load_recipe",
    "parse_size",
]


_Strict = StrictRecord  # the recipe's sections: strict as the passes' configs


# Bounds that say what is allowed (pydantic names them in its message). Seeds are what numpy
# and torch generators both take; sizes are pixels, multiples of 8 (the VAE's scale; a
# bundle may need a larger multiple, which the runtime checks).
Seed = Annotated[int, pydantic.Field(ge=0, le=MAX_SEED)]
Steps = Annotated[int, pydantic.Field(ge=1, le=MAX_STEPS)]
Guidance = Annotated[float, pydantic.Field(ge=0, le=MAX_GUIDANCE, allow_inf_nan=False)]
# diffusers' guidance_rescale (SD1.5/SDXL pipelines; Lin et al. 2023): 0 is off
GuidanceRescale = Annotated[float, pydantic.Field(ge=0, le=1, allow_inf_nan=False)]


def _check_side(value: int) -> int:
    if not MIN_SIDE <= value <= MAX_SIDE or value % 8:
        raise ValueError(f"{value} px: a side must be a multiple of 8 from 8 to {MAX_SIDE}")
    return value


Side = Annotated[int, pydantic.AfterValidator(_check_side)]
Size = tuple[Side, Side]


def parse_size(value: str | list[int] | tuple[int, int] | None) -> tuple[int, int] | None:
    """(height, width) from "WxH" text or a [height, width] list."""
    if value is None:
        return None
    if isinstance(value, str):
        w, sep, h = value.lower().partition("x")
        if not sep or not (w.strip().isdigit() and h.strip().isdigit()):
            raise UserError(f"size {value!r} is not WIDTHxHEIGHT; use e.g. 1024x1024")
        if len(w.strip()) > 6 or len(h.strip()) > 6:
            raise UserError(f"size {value!r}: sides go up to {MAX_SIDE} px")
        return int(h), int(w)
    h, w = value
    return int(h), int(w)


class CalibrationSpec(_Strict):
    """Prompts and sampling settings that passes needing calibration run the model with."""

    prompts: str | list[str] = "builtin"  # "builtin", a text file (one per line) or a list
    num_prompts: int = pydantic.Field(16, ge=1, le=100_000)
    steps: Steps = 20
    guidance: Guidance | None = None  # None: the family's default
    # Calibrate as the model will be sampled: 0.7 for zero-terminal-SNR models (Lin et al.)
    guidance_rescale: GuidanceRescale = 0.0
    # TCD's gamma (diffusers' eta, which its SD1.5/SDXL pipelines pass the step; 0 there
    # unless given): only with a TCD scheduler
    eta: float = pydantic.Field(0.0, ge=0, le=1, allow_inf_nan=False)
    seed: Seed = 0
    size: Size | None = None  # (height, width); None: the family's default
    # The dtype the pipeline runs in while the teacher's trajectories are recorded (and
    # passes calibrate): bfloat16 or float16 halve a GPU's memory and time; float32 on CPU.
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    # The diffusers scheduler class calibration samples with, built from the model's
    # scheduler config (from_config); None: the model's own. Passes that recompute steps
    # (EcoDiff) need one with a torch sampler (slimdiff/sampler.py: Euler, Euler a, Heun, DPM2,
    # DDIM, DPM-Solver++ and its SDE form, PNDM, LCM, TCD, UniPC, EDM Euler/DPM-Solver++,
    # flow-match Euler): for a model that ships DEIS, LMS or DDPM, say.
    scheduler: str | None = pydantic.Field(None, pattern=r"^[A-Za-z][A-Za-z0-9]{0,63}Scheduler$")

    @pydantic.field_validator("prompts")
    @classmethod
    def _some_prompts(cls, prompts: str | list[str]) -> str | list[str]:
        if not (prompts.strip() if isinstance(prompts, str) else any(p.strip() for p in prompts)):
            raise ValueError(
                "give at least one prompt: a list, a text file of one per line, or builtin"
            )
        return prompts


# Export targets this version builds. "tensorrt" and "aoti" are planned: naming them is a
# validation error, not a failure after the compression work.
TARGETS = ("onnx", "tensorrt", "aoti")  # export.TARGETS (the recipe imports no torch)
_PLANNED_TARGETS: tuple[str, ...] = ()
# What `bench.backend` takes: runtime.backends.backend_names(), kept equal by
# tests/unit/test_runtime_backends.py (the core may not import the runtime).
BACKENDS = ("ort-cpu", "ort-cuda", "trt", "trt-rtx", "aoti")
# What `export.scheduler` takes: runtime.schedulers.scheduler_names(), which the core may
# not import (layers import downwards); tests/unit/test_export_scheduler.py keeps them equal.
SCHEDULERS = (
    *("euler", "euler-karras", "euler-a", "heun", "dpm2", "dpm2-karras", "dpm2-a"),
    *("dpm2-a-karras", "lms", "lms-karras", "ddim", "ddpm", "dpm++2m", "dpm++2m-karras"),
    *("dpm++2m-sde", "dpm++2m-sde-karras", "dpm++2s", "dpm++2s-karras", "dpm++sde"),
    *("dpm++sde-karras", "deis", "deis-karras"),
    *("pndm", "lcm", "tcd", "unipc", "edm-euler", "edm-dpm++2m", "edm-dpm++2m-sde"),
    *("flow-euler", "flow-heun", "flow-dpm++2m", "flow-unipc"),
    *("DDIMScheduler", "DDPMScheduler", "DEISMultistepScheduler"),
    *("DPMSolverMultistepScheduler", "DPMSolverSDEScheduler", "DPMSolverSinglestepScheduler"),
    *("EDMDPMSolverMultistepScheduler", "EDMEulerScheduler", "EulerAncestralDiscreteScheduler"),
    *("EulerDiscreteScheduler", "FlowMatchEulerDiscreteScheduler"),
    *("FlowMatchHeunDiscreteScheduler", "HeunDiscreteScheduler"),
    *("KDPM2AncestralDiscreteScheduler", "KDPM2DiscreteScheduler", "LCMScheduler"),
    *("LMSDiscreteScheduler", "PNDMScheduler", "TCDScheduler", "UniPCMultistepScheduler"),
)


class ExportSpec(_Strict):
    targets: list[str] = pydantic.Field(default_factory=lambda: ["onnx"])
    precision: Literal["fp32", "fp16"] = "fp32"
    vae_precision: Literal["fp32", "fp16"] | None = None  # None: fp32 where the VAE needs it
    optimize: bool = True  # onnxruntime transformer-optimizer fusions
    # Quantized layers' Q/DQ dialect (slimdiff/lowbit.py): ort (asymmetric uint8, integer
    # kernels of onnxruntime) or tensorrt (ModelOpt's symmetric int8, inputs only)
    qdq: Literal["ort", "tensorrt"] | None = None  # None: tensorrt for that target
    # The image sizes and images per call the bundle is built for (TensorRT's optimization
    # profiles; export/profiles.py). None: half to 1.5x the model's default size.
    min_size: Size | None = None
    max_size: Size | None = None
    max_images: int = pydantic.Field(1, ge=1, le=MAX_IMAGES)
    # The scheduler the bundle ships, built from the model's scheduler config as diffusers'
    # from_config does: a short name ("euler-a", "dpm++2m-karras") or a class name.
    # None: the model's own (which the runtime must support).
    scheduler: str | None = None
    # The sigma schedule it samples on instead of its own (the class's use_<name>_sigmas
    # key): karras | exponential | beta. None: the scheduler's own.
    sigmas: Literal["karras", "exponential", "beta"] | None = None
    # diffusers' timestep_spacing it ships with: "trailing" for SDXL-Lightning, Hyper-SD,
    # SDXL-Turbo and other few-step distillations. None: the scheduler's own.
    timestep_spacing: Literal["leading", "trailing", "linspace"] | None = None
    # Also export the VAE encoder, which image-to-image needs (`slimdiff run --image`).
    vae_encoder: bool = False
    # A ControlNet to steer the UNet with (a diffusers ControlNet folder, a single
    # .safetensors file or a hub id), or a list of them: the denoiser graph holds the UNet
    # and them (`slimdiff run --control-image`).
    controlnet: str | list[str] | None = None

    @pydantic.field_validator("controlnet", mode="before")
    @classmethod
    def _controlnet_paths(cls, value: Any) -> Any:
        paths = value if isinstance(value, list) else [value] if value is not None else []
        if not all(isinstance(p, str) and p.strip() for p in paths):
            raise ValueError(
                "give a ControlNet path (a diffusers ControlNet folder or a .safetensors "
                "file) or a list of them"
            )
        if len(paths) > MAX_CONTROLNETS:
            raise ValueError(f"at most {MAX_CONTROLNETS} ControlNets (each adds ~40% per step)")
        return value

    @pydantic.field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, name: str | None) -> str | None:
        if name is not None and name not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {name!r}; use one of: {', '.join(SCHEDULERS)}")
        return name

    @pydantic.field_validator("targets")
    @classmethod
    def _available(cls, targets: list[str]) -> list[str]:
        for t in targets:
            if t in _PLANNED_TARGETS:
                raise ValueError(f"target {t!r} is not available in this version; use onnx")
            if t not in TARGETS:
                raise ValueError(f"unknown target {t!r}; use one of: {', '.join(TARGETS)}")
        if not targets or len(set(targets)) != len(targets):
            raise ValueError("give each export target once, e.g. [onnx]")
        return targets


class BenchSpec(_Strict):
    prompts: list[str] | None = None  # None: the built-in bench prompts
    steps: Steps = 8
    size: Size | None = None
    guidance: Guidance | None = None
    guidance_rescale: GuidanceRescale = 0.0  # as `slimdiff run --guidance-rescale`
    seed: Seed = 0
    repeat: int = pydantic.Field(3, ge=1, le=1000)
    warmup: int = pydantic.Field(1, ge=0, le=100)
    backend: str = "ort-cpu"  # one of BACKENDS
    # Prompt following, judged automatically on a held-out prompt set (toy:shapes only, so
    # far): `accuracy_images` seeds per prompt, through the runtime and the uncompressed
    # torch model.
    accuracy: Literal["toy-shapes"] | None = None
    accuracy_images: int = pydantic.Field(4, ge=1, le=64)
    # Prompts per call of the uncompressed torch reference: a batch amortizes eager torch's
    # per-operator overhead (toy:shapes, 16 prompts of 20 steps on 2 CPU cores: 12.4 s one
    # a call, 3.0 s eight a call) at the memory of that many images. The reference is the
    # same within float error at any batch, so its cache key leaves the batch out.
    reference_batch: int = pydantic.Field(1, ge=1, le=64)

    @pydantic.field_validator("backend")
    @classmethod
    def _known_backend(cls, name: str) -> str:
        if name not in BACKENDS:
            raise ValueError(f"unknown backend {name!r}; use one of: {', '.join(BACKENDS)}")
        return name

    @pydantic.field_validator("prompts")
    @classmethod
    def _some_prompts(cls, prompts: list[str] | None) -> list[str] | None:
        if prompts is not None and not any(p.strip() for p in prompts):
            raise ValueError("give at least one prompt, or leave bench.prompts out (built-in)")
        return prompts


class PassEntry(pydantic.BaseModel):
    """One `passes:` item: `- pass: NAME` plus that pass's keys, validated into its typed
    config (registered by the pass, slimdiff/passes.py). Dumps back to the flat form."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")
    name: str
    config: pydantic.SerializeAsAny[PassConfig]

    @classmethod
    def resolve(cls, item: Any, where: str) -> PassEntry:
        """A PassEntry from a recipe's raw item; UserError naming `where` and the field."""
        if isinstance(item, PassEntry):
            return item
        if not isinstance(item, dict) or not isinstance(item.get("pass"), str):
            raise UserError(f"{where}: a pass entry is a mapping with `pass: NAME` and its keys")
        name = item["pass"]
        try:
            schema = get_schema(name)
        except UserError as err:
            raise UserError(f"{where}: {err}") from None
        options = {k: v for k, v in item.items() if k != "pass"}
        try:
            config = schema.config.model_validate(options)
        except pydantic.ValidationError as err:
            raise _invalid(err, f"{where} ({name})") from None
        return cls(name=name, config=config)

    @property
    def stage(self) -> Stage:
        return get_schema(self.name).stage

    def options(self) -> dict[str, Any]:
        return self.config.model_dump(mode="json", by_alias=True)

    @pydantic.model_serializer(mode="plain")
    def _flat(self, info: pydantic.SerializationInfo) -> dict[str, Any]:
        return {"pass": self.name, **self.config.model_dump(mode=info.mode, by_alias=True)}


class Recipe(_Strict):
    """A validated recipe: every pass entry resolved to its typed config, pass order checked.

    Example:
        >>> r = Recipe(model="tiny:sdxl", passes=[{"pass": "blocks.remove", "preset": "ssd-1b"}])
        >>> r.passes[0].config.preset
        'ssd-1b'
    """

    version: Literal[1] = 1
    name: str = ""  # defaults to the file stem
    description: str = ""
    model: str = pydantic.Field(min_length=1)
    # Where passes and calibration run: "auto" (cuda when available, else cpu), "cpu",
    # "cuda" or "cuda:N". `--device` overrides it.
    device: str = "auto"
    calibration: CalibrationSpec = CalibrationSpec()
    passes: list[PassEntry] = pydantic.Field(default_factory=list)
    export: ExportSpec = ExportSpec()
    bench: BenchSpec = BenchSpec()

    def __init__(self, **data: Any) -> None:
        # A recipe built in Python gets validate's one UserError with every problem listed,
        # not pydantic's ValidationError; model_validate (validate_recipe) comes through
        # here too, pydantic calling a model's own __init__
        try:
            super().__init__(**data)
        except pydantic.ValidationError as err:
            raise _invalid(err) from None  # validate_recipe names the file

    @pydantic.field_validator("device")
    @classmethod
    def _device(cls, device: str) -> str:
        base, _, index = device.partition(":")
        indexed = not index or (base == "cuda" and index.isdigit())
        if base not in ("auto", "cpu", "cuda") or not indexed:
            raise ValueError(f"{device!r} is not a device; use auto, cpu, cuda or cuda:N")
        return device

    @pydantic.field_validator("passes", mode="before")
    @classmethod
    def _resolve(cls, items: Any) -> list[PassEntry]:
        if not isinstance(items, list):
            raise ValueError("passes is a list of `- pass: NAME` entries")
        entries, errors = [], []
        for i, item in enumerate(items):
            try:
                entries.append(PassEntry.resolve(item, f"passes[{i}]"))
            except UserError as err:
                errors.extend(err.details or [str(err)])
        if errors:  # every pass's problems at once, as pydantic does for the other fields
            # a ValueError, so pydantic goes on to validate the other fields (a UserError
            # here would stop it: validate listed the passes' problems and nothing else)
            raise _PassErrors(errors)
        return entries

    @pydantic.model_validator(mode="after")
    def _ordered(self) -> Recipe:
        last = None
        for i, entry in enumerate(self.passes):
            if last is not None and entry.stage < last.stage:
                raise UserError(
                    f"passes[{i}] ({entry.name}): a {entry.stage.name.lower()} pass cannot "
                    f"follow {last.name} ({last.stage.name.lower()}); order passes "
                    "components -> structural -> pruning -> quantization"
                )
            last = entry
        stages = [e.stage for e in self.passes]
        if stages.count(Stage.QUANTIZATION) > 1:
            i = [j for j, s in enumerate(stages) if s == Stage.QUANTIZATION][1]
            raise UserError(
                f"passes[{i}] ({self.passes[i].name}): a model is quantized once; keep one "
                "quantization pass (its settings choose the bits per layer)"
            )
        quantized = [e.name for e in self.passes if e.name.startswith("quant.")]
        if quantized and self.export.precision != "fp32":
            raise UserError(
                f"export.precision {self.export.precision}: {quantized[0]} bundles are fp32 "
                "ONNX around their Q/DQ integer layers (onnxruntime has no fp16 form of "
                "them); set export.precision: fp32"
            )
        return self

    @pydantic.field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        # bench writes each recipe's work under OUT/recipes/NAME: a folder name, no path
        # ("": unnamed, a recipe built in code; bench refuses it)
        if name == "":
            return name
        if name in (".", "..") or name.startswith(".") or set(name) & set("/\\:"):
            raise ValueError(
                f"{name!r} is not a recipe name: bench names a folder after it; use letters, "
                "digits, '-', '_' and '.' (not first), no '/'"
            )
        if any(ord(c) < 32 for c in name) or len(name) > 100:
            raise ValueError("a recipe name is one line of at most 100 characters")
        return name

    def content_hash(self) -> str:
        """SHA-256 of the normalised recipe (names the compress cache)."""
        blob = json.dumps(self.model_dump(mode="json", by_alias=True), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def to_yaml(self) -> str:
        """The resolved recipe (every default filled in) as YAML: what `--dry-run` prints."""
        return yaml.safe_dump(self.model_dump(mode="json", by_alias=True), sort_keys=False)


def builtin_recipes() -> dict[str, Path]:
    """Built-in recipe name -> file, from the recipes shipped in the package."""
    root = files("slimdiff.recipes")
    return {
        Path(str(p)).stem: Path(str(p))
        for p in sorted(root.iterdir(), key=lambda p: p.name)
        if p.name.endswith(".yaml")
    }


def load_recipe(
    ref: str | Path,
    overrides: tuple[str, ...] | list[str] = (),
    values: dict[str, Any] | None = None,
) -> Recipe:
    """Load a recipe file or built-in name, apply overrides, validate.

    `overrides` are `--set key=value` items, whose values are YAML; `values` are typed
    values (what CLI options give: `--model "dir #2"` stays that string), applied after.
    """
    path = Path(ref)
    if not path.exists():
        builtin = builtin_recipes()
        if str(ref) in builtin:
            path = builtin[str(ref)]
        else:
            raise UserError(
                f"recipe {str(ref)!r} not found: pass a YAML file or a built-in name "
                "(`slimdiff recipes` lists them)"
            )
    data = read_yaml_file(path, what="recipe")
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe is a YAML mapping with at least `version` and `model`")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r}: use --set key=value, e.g. --set bench.steps=4")
        _apply(data, key, parse_yaml_value(raw, where=f"--set {item}"), f"--set {item!r}", path)
    for key, value in (values or {}).items():
        _apply(data, key, value, f"--{key.replace('_', '-')}", path)
    check_depth(data, where=f"{path} (after --set)")
    data.setdefault("name", path.stem)
    return validate_recipe(data, str(path))


def validate_recipe(data: dict[str, Any], origin: str = "<recipe>") -> Recipe:
    """Validate a recipe dict: schema, each pass's config, and the pass order.

    The error's message names the first problem and how many follow; its `details` list
    every one (`slimdiff validate` prints them all)."""
    try:
        return Recipe.model_validate(data)
    except pydantic.ValidationError as err:  # not a mapping: pydantic refuses it before __init__
        raise _invalid(err, origin) from None
    except UserError as err:  # Recipe.__init__'s, and the order checks' (_ordered)
        error = UserError(f"{origin}: {err}")
        error.details = tuple(f"{origin}: {line}" for line in err.details)
        raise error from None


class _PassErrors(ValueError):
    """The pass entries' problems, one line each, carried through pydantic's validation."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__(lines[0])
        self.lines = lines


def _invalid(err: pydantic.ValidationError, where: str | None = None) -> UserError:
    """One UserError for all of `err`'s problems: the first in its message, all in details;
    each line starts with `where` when given."""
    lines = []
    for e in err.errors():
        passes = (e.get("ctx") or {}).get("error")
        lines += passes.lines if isinstance(passes, _PassErrors) else [_error_line(e)]
    return _many([f"{where}: {line}" if where else line for line in lines])


def _many(lines: list[str]) -> UserError:
    """A UserError whose message is the first of `lines` and a count of the rest."""
    more = f" ({len(lines) - 1} more; `slimdiff validate` lists them)" if len(lines) > 1 else ""
    error = UserError(lines[0] + more)
    error.details = tuple(lines)
    return error


def _error_line(e: Any) -> str:
    loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
    msg = e["msg"].removeprefix("Value error, ")  # our validators' own words
    if e["type"] == "extra_forbidden":
        msg = "unknown key; remove it or check the spelling"
    return f"field '{loc}': {msg}"


def _apply(data: dict[str, Any], key: str, value: Any, what: str, path: Path) -> None:
    """Set dotted `key` ("bench.steps", "passes.0.distill.steps") in `data` to `value`."""
    node: Any = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = _list_item(node, part, what) if isinstance(node, list) else node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise UserError(f"{what}: {part!r} in {path} is not a section")
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(node, last, what)] = value
    else:
        node[last] = value


def _list_index(node: list, part: str, what: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise UserError(f"{what}: {part!r} is not an index of a {len(node)}-item list")
    return int(part)


def _list_item(node: list, part: str, what: str) -> Any:
    return node[_list_index(node, part, what)]
