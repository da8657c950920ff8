"""What gets exported: one `Component` per bundle entry, derived from the model's ArchSpec.

A Component is data: the wrapped module, its ONNX input/output names and dynamic axes, and
how to make example inputs. The exporter, optimizer and parity check only read these
records, so nothing downstream branches on the family.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from slimdiff.export.dummy_inputs import (
    DYNAMIC_AXES,
    Sizes,
    text_encoder_inputs,
    vae_decoder_inputs,
    vae_encoder_inputs,
)
from slimdiff.export.wrappers import (
    DenoiserWrapper,
    TextEncoderWrapper,
    VaeDecoderWrapper,
    VaeEncoderWrapper,
)
from slimdiff.runtime.manifest import VAE_ENCODER, VAE_ENCODER_INPUT, VAE_ENCODER_OUTPUTS
from torch import nn

from slimdiff.memory import release_memory_past
from slimdiff.models.arch import VAE_ONNX, ArchSpec, OnnxPlan, TensorSpec
from slimdiff.models.inputs import denoiser_inputs, denoiser_specs
from slimdiff.models.lazy import param_bytes
from slimdiff.models.loading import LoadedModel

__all__ = [
    "Component",
    "denoiser_component",
    "eval_mode",
    "export_mode",
    "free_weights",
    "model_device",
    "plan_components",
    "reference_precision",
    "vae_decoder_component",
    "vae_encoder_component",
]

# Text encoder outputs that carry the token axis; the others are pooled (B, P).
_TOKEN_OUTPUTS = frozenset({"last_hidden_state", "penultimate_hidden_state"})


@dataclass
class Component:
    """One graph of the bundle; `plan` is how ORT's optimizer treats it (from the ArchSpec)."""

    name: str  # bundle folder and manifest key: "text_encoder_2", "unet", "vae_decoder"
    plan: OnnxPlan
    module: nn.Module  # takes the inputs positionally, in input_names order
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]]
    make_inputs: Callable[[Sizes], dict[str, torch.Tensor]]
    model: nn.Module  # the diffusers/transformers model inside `module`


def _axes(specs: tuple[TensorSpec, ...]) -> dict[str, dict[int, str]]:
    # Only run-time sizes become symbolic; config widths stay fixed ints in the graph.
    return {
        s.name: {i: d for i, d in enumerate(s.shape) if d in DYNAMIC_AXES}
        for s in specs
        if any(d in DYNAMIC_AXES for d in s.shape)
    }


def plan_components(
    model: LoadedModel, vae_encoder: bool = False, controlnets: Sequence[nn.Module] = ()
) -> list[Component]:
    """The components of `model`'s bundle, in model.components order; with `vae_encoder`
    the VAE encoder too (for image-to-image), last. With `controlnets` (each checked with
    slimdiff.models.controlnet.check_controlnet) the denoiser is the UNet and the
    ControlNets in one graph (ControlledDenoiser).

    Example:
        >>> [c.name for c in plan_components(load_model("tiny:sdxl"))]  # doctest: +SKIP
        ['text_encoder', 'text_encoder_2', 'unet', 'vae_decoder']
    """
    pipe, arch = model.pipe, model.arch
    plans = []
    for spec in model.text_encoders:
        encoder = getattr(pipe, spec.name)
        plans.append(
            Component(
                name=spec.name,
                plan=spec.onnx,
                module=TextEncoderWrapper(encoder, spec.outputs),
                input_names=("input_ids",),
                output_names=spec.outputs,
                dynamic_axes={
                    "input_ids": {0: "B", 1: "S"},
                    **{
                        o: ({0: "B", 1: "S"} if o in _TOKEN_OUTPUTS else {0: "B"})
                        for o in spec.outputs
                    },
                },
                make_inputs=partial(
                    text_encoder_inputs, getattr(pipe, spec.tokenizer), spec.max_length
                ),
                model=encoder,
            )
        )
    denoiser = model.denoiser
    if controlnets:
        from slimdiff.models.controlnet import ControlledDenoiser

        denoiser = ControlledDenoiser(denoiser, controlnets)
    plans.append(denoiser_component(arch, denoiser))
    plans.append(vae_decoder_component(arch, pipe.vae))
    if vae_encoder:
        plans.append(vae_encoder_component(pipe.vae))
    return plans


def vae_encoder_component(vae: nn.Module) -> Component:
    """The VAE encoder of an image-to-image bundle: image -> the latent posterior's mean and
    std (VaeEncoderWrapper), before scaling. Shares its model with the decoder."""
    latent_axes = {0: "B", 2: "h", 3: "w"}
    return Component(
        name=VAE_ENCODER,
        plan=VAE_ONNX,
        module=VaeEncoderWrapper(vae),
        input_names=(VAE_ENCODER_INPUT,),
        output_names=VAE_ENCODER_OUTPUTS,
        dynamic_axes={
            VAE_ENCODER_INPUT: {0: "B", 2: "8h", 3: "8w"},
            **dict.fromkeys(VAE_ENCODER_OUTPUTS, latent_axes),
        },
        make_inputs=partial(vae_encoder_inputs, vae),
        model=vae,
    )


def vae_decoder_component(arch: ArchSpec, vae: nn.Module) -> Component:
    """The bundle's VAE decoder component of `vae` (post_quant_conv + decoder, as
    VaeDecoderWrapper traces it), alone: for work on the decoder only, e.g.
    tools/vae_speed.py."""
    return Component(
        name="vae_decoder",
        plan=VAE_ONNX,
        module=VaeDecoderWrapper(vae),
        input_names=tuple(s.name for s in arch.vae_decoder_inputs),
        output_names=("sample",),
        dynamic_axes={**_axes(arch.vae_decoder_inputs), "sample": {0: "B", 2: "8h", 3: "8w"}},
        make_inputs=partial(vae_decoder_inputs, vae),
        model=vae,
    )


def denoiser_component(arch: ArchSpec, denoiser: nn.Module) -> Component:
    """The denoiser's Component (named arch.denoiser) for `denoiser`, which need not be the
    pipeline's: tools export a UNet alone with it (tools/unet_speed.py)."""
    specs = denoiser_specs(arch, denoiser)
    names = tuple(s.name for s in specs)
    axes = _axes(specs)
    return Component(
        name=arch.denoiser,
        plan=arch.denoiser_onnx,
        module=DenoiserWrapper(denoiser, specs),
        input_names=names,
        output_names=("out_sample",),
        # The prediction has the layout of the noisy latent it denoises.
        dynamic_axes={**axes, "out_sample": axes[names[0]]},
        make_inputs=partial(denoiser_inputs, arch, denoiser),
        model=denoiser,
    )


def _rms_norm_forward(self: nn.RMSNorm, x: torch.Tensor) -> torch.Tensor:
    # torch.nn.RMSNorm calls aten::rms_norm, which the TorchScript exporter only lowers from
    # opset 23 (RMSNormalization); FLUX's q/k norms use it. The same math written out, as
    # diffusers' own RMSNorm does it, exports at opset 17 (Pow/ReduceMean/Add/Sqrt/Div/Mul).
    dims = tuple(range(-len(self.normalized_shape), 0))
    eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
    y = x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps)
    return y * self.weight if self.weight is not None else y


@contextlib.contextmanager
def eval_mode(component: Component) -> Iterator[None]:
    """The component in eval mode (no dropout), its model's own mode restored on exit.

    The wrapper too: a fresh nn.Module is in training mode, and torch.onnx.export restores
    the wrapper's mode, recursively, after tracing (T5's dropout would then be live).
    """
    was_training = component.model.training
    try:
        component.module.eval()
        yield
    finally:
        component.module.train(False)
        component.model.train(was_training)


@contextlib.contextmanager
def export_mode(
    component: Component, processor: Callable[[nn.Module], object] | None
) -> Iterator[None]:
    """eval_mode, plus an exportable RMSNorm and, if given, `processor(model)` for attention
    (one processor for every attention module, or a dict as `set_attn_processor` takes).

    Everything is restored on exit, so exporting leaves the caller's model as it was (no
    deep copy: a FLUX transformer is 24 GB).
    """
    model = component.model
    saved = getattr(model, "attn_processors", None) if processor is not None else None
    # Instance-level forwards someone else set (accelerate hooks) are put back as found.
    rms_norms = {m: vars(m).get("forward") for m in model.modules() if isinstance(m, nn.RMSNorm)}
    with eval_mode(component):
        try:
            for m in rms_norms:
                m.forward = types.MethodType(_rms_norm_forward, m)
            if saved:
                model.set_attn_processor(processor(model))
            yield
        finally:
            if saved:
                model.set_attn_processor(saved)
            for m, own in rms_norms.items():
                if own is None:
                    del m.forward  # back to the class's forward
                else:
                    m.forward = own


def free_weights(model: nn.Module) -> None:
    """Drop `model`'s parameters and buffers (to the meta device: shapes kept, no storage)
    and give the freed memory back to the OS. The model cannot compute afterwards."""
    nbytes = param_bytes(model)
    model.to_empty(device="meta")
    release_memory_past(nbytes)


def model_device(model: nn.Module) -> torch.device:
    """Where `model`'s weights are (a compressed model may come from a GPU)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@contextlib.contextmanager
def reference_precision() -> Iterator[None]:
    """True fp32 on a GPU: cuDNN convolutions default to TF32 (10-bit mantissa), which
    would put torch 1e-3 away from the fp32 graph it is the reference for."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
