"""`quant.quest`: the pass contract (config round trip, bit-identical reload through the
edit log) on tiny SDXL, SD3 and FLUX; the quantizers' arithmetic; the layer plan; a killed
finetuning run resumes to the same weights; bad configs are refused."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest
import torch
from slimdiff.compress import get_pass
from slimdiff.compress.quant.edits import LayerQuant, Quantized
from slimdiff.compress.quant.layers import ActQuantizer, QuantLayer, group_of, quant_layers

from slimdiff.errors import UserError
from slimdiff.lowbit import (
    current_qdq_form,
    merged_scales,
    pack_int4,
    parameter_count,
    qdq_form,
    scales_merged,
    unpack_int4,
)
from slimdiff.models import load_model
from slimdiff.models.arch import matches
from slimdiff.recipe import Recipe
from tests.unit.compress.pass_contract import PassContract

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUEST = {"sensitive": 2, "epochs": 1, "epochs_time": 1, "batch": 2, "checkpoint_every": 1}


class _QuantContract(PassContract):
    pass_name = "quant.quest"

    def test_frozen_modules_are_untouched(self):
        """Quantization touches the time and first/last layers (QuEST quantizes them); what
        stays float is ArchSpec.never_quantize and keep_fp: plain modules, same weights."""
        model = load_model(f"tiny:{self.family}")
        reference = dict(load_model(f"tiny:{self.family}").denoiser.named_modules())
        report = self._apply(model)
        layers = quant_layers(model.denoiser)
        assert len(layers) == report.summary["layers"] > 0
        keep = (*model.arch.never_quantize, *self.config.get("keep_fp", ()))
        checked = 0
        for name, module in model.denoiser.named_modules():
            if (
                name
                and matches(name, keep)
                and isinstance(module, torch.nn.Linear | torch.nn.Conv2d)
            ):
                assert name not in layers
                assert torch.equal(module.weight, reference[name].weight), name
                checked += 1
        assert checked > 0 or not keep
        assert all(layer.finalised for layer in layers.values())
        # inspect's parameter count: integer weights count as the weights they replace,
        # the low-rank branch adds its own, step sizes are not weights
        before = sum(p.numel() for p in load_model(f"tiny:{self.family}").denoiser.parameters())
        branch = sum(
            lay.lr_down.numel() + lay.lr_up.numel() for lay in layers.values() if lay.spec.rank
        )
        assert parameter_count(model.denoiser) == before + branch
        assert (branch > 0) == bool(self.config.get("lowrank"))


class TestMinmaxW8A8SDXL(_QuantContract):
    config: ClassVar[dict] = {"weights": "int8", "activations": "int8", "method": "minmax"}
    family = "sdxl"


class TestQuestW4A4LowrankSD3(_QuantContract):
    config: ClassVar[dict] = {
        "weights": "int4",
        "activations": "int4",
        "timestep_groups": 2,
        "lowrank": 4,
        "keep_fp": ["transformer_blocks.0.attn.to_k"],
        "finetune": QUEST,
    }
    family = "sd3"


class TestMinmaxW4A8FLUX(_QuantContract):
    config: ClassVar[dict] = {"weights": "int4", "activations": "int8", "method": "minmax"}
    family = "flux"


def test_int4_packing_round_trips_and_halves_the_bytes():
    values = np.random.default_rng(0).integers(-8, 8, size=(7, 5, 3)).astype(np.int8)
    packed = pack_int4(values)
    assert packed.dtype == np.uint8 and packed.size == (values.size + 1) // 2
    assert np.array_equal(unpack_int4(packed, values.shape), values)
    with pytest.raises(ValueError, match=r"outside -8\.\.7"):
        pack_int4(np.array([9], np.int8))


def test_activation_quantizer_groups_merge_and_learn():
    q = ActQuantizer(8, groups=2)
    q.set_range(torch.tensor([-1.0, -0.1]), torch.tensor([1.0, 4.0]))
    x = torch.linspace(-1.0, 4.0, 1001)
    q.group = 1
    err_own = (q(x.clamp(-0.1, 4.0)) - x.clamp(-0.1, 4.0)).abs().max()
    assert err_own <= q.scale[1] / 2 + 1e-6  # half a step inside its range
    scale, zero = q.merged()  # covers both groups' ranges: [-1, 4]
    assert scale == pytest.approx(5.0 / 255, rel=1e-3) and zero == round(1.0 / scale)
    with merged_scales():
        assert (q(x) - x).abs().max() <= scale / 2 + 1e-6
    # LSQ: the step size gets a gradient through the straight-through rounding.
    q.scale.grad = None
    q(x * 1.5).sum().backward()
    assert q.scale.grad is not None and q.scale.grad[1] != 0 and q.scale.grad[0] == 0


def test_tensorrt_form_is_symmetric_int8_of_the_merged_range():
    q = ActQuantizer(8, groups=2)
    q.set_range(torch.tensor([-1.0, -0.1]), torch.tensor([1.0, 4.0]))
    x = torch.linspace(-5.0, 5.0, 2001)
    with qdq_form("tensorrt"):
        y = q(x)
        assert q.onnx_params() == (pytest.approx(4.0 / 127, rel=1e-2), 128, 255)
    s = q.symmetric()
    assert s == pytest.approx(4.0 / 127, rel=1e-2)  # amax of [-1, 4] over int8's 127
    expected = torch.clamp(torch.round(x / s), -128, 127) * s  # TensorRT's int8 Q/DQ
    assert torch.allclose(y, expected, atol=1e-6)
    assert scales_merged() is False and current_qdq_form() == "ort"  # restored
    with pytest.raises(ValueError, match="unknown Q/DQ form"), qdq_form("fp8"):
        pass


def test_groups_follow_the_timestep():
    edges = [750.0, 250.0]  # three groups, descending as the sampler visits them
    # (a timestep on an edge, never a sampled one: edges are midpoints, goes to the earlier)
    assert [group_of(t, edges) for t in (999, 751, 750, 500, 250, 10)] == [0, 0, 0, 1, 1, 2]


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_calibration_fills_every_timestep_group(family, monkeypatch):
    """The group edges are in the units the denoiser's `timestep` takes (FluxPipeline
    passes t / 1000): the calibration's calls land in both groups, whose ranges differ.
    With edges from the scheduler's t, every FLUX call went to the last group."""
    from slimdiff.compress.quant import layers as quant
    from slimdiff.compress.quant.layers import act_quantizers

    from slimdiff.calib import Calibration
    from slimdiff.recipe import CalibrationSpec

    model = load_model(f"tiny:{family}")
    extra = {"guidance": 0.0} if family == "flux" else {}
    spec = CalibrationSpec(num_prompts=1, steps=4, size=(64, 64), **extra)
    calib = Calibration(model.pipe, model.arch, spec)
    seen = []
    group_of_t = quant.group_of
    monkeypatch.setattr(quant, "group_of", lambda t, e: seen.append(group_of_t(t, e)) or seen[-1])
    cls = get_pass("quant.quest")
    p = cls(cls.Config(weights="int8", activations="int8", method="minmax", timestep_groups=2))
    (edge,) = p.apply(model.pipe, calib).edits[0].group_edges
    divisor = model.arch.kind.timestep_divisor
    steps = [t / divisor for t in calib.record().timesteps]
    assert steps[1] > edge > steps[2]  # the midpoint of the 2nd and 3rd of 4 calls
    assert set(seen) == {0, 1}
    quantizers = act_quantizers(model.denoiser)
    differ = [not torch.equal(q.scale[0], q.scale[1]) for q in quantizers]
    assert sum(differ) > len(quantizers) // 2


def test_plan_keeps_io_layers_at_8_bit_and_skips_never_quantize():  # and weight_only
    from slimdiff.compress.quant.quest import plan_layers

    model = load_model("tiny:sdxl")
    cls = get_pass("quant.quest")
    arch = model.arch
    plan = plan_layers(cls.Config(weights="int4", activations="int4"), arch, model.denoiser)
    # io layers: 8-bit weights, float inputs (no integer kernel runs them) unless asked
    assert plan["conv_in"].weight_bits == 8 and plan["conv_in"].act_bits is None
    assert plan["conv_out"].out_bits is None and plan["conv_out"].act_bits is None
    io8 = cls.Config(weights="int4", activations="int4", io_activations="int8")
    plan8 = plan_layers(io8, arch, model.denoiser)
    assert plan8["conv_in"].act_bits == 8 and plan8["conv_out"].act_bits == 8
    assert plan8["conv_out"].out_bits is None  # the model's output stays float
    assert not any(matches(n, arch.never_quantize) for n in plan)
    # conv_shortcut: 8-bit weights, float input (weight_only)
    shortcuts = [s for n, s in plan.items() if matches(n, arch.weight_only)]
    assert shortcuts and all(s.weight_bits == 8 and s.act_bits is None for s in shortcuts)
    assert all(s.out_bits is None for s in shortcuts)
    convs = [
        s
        for n, s in plan.items()
        if s.kind == "conv" and not matches(n, (*arch.io_layers, *arch.weight_only))
    ]
    assert convs and all(s.weight_bits == 4 and s.act_bits == 4 for s in convs)
    assert all(s.out_bits == 8 for s in convs)


def test_quant_layer_finalises_to_the_same_outputs_and_integer_storage():
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 8)
    spec = LayerQuant(kind="linear", weight_bits=4, act_bits=8)
    layer = QuantLayer(spec, lin, groups=1)
    layer.init_weight_scale(search=True)
    layer.act.set_range(torch.tensor([-3.0]), torch.tensor([3.0]))
    x = torch.randn(4, 16)
    before = layer(x)
    layer.finalise()
    assert layer.weight_q.dtype == torch.uint8 and layer.weight_q.numel() == 16 * 8 // 2
    assert "weight" not in dict(layer.named_parameters())
    assert torch.equal(layer(x), before)
    assert layer.integer_weight().abs().max() <= 7


def test_a_killed_finetuning_run_resumes_to_the_same_weights(tmp_path):
    """Kill a finetuning stage after 3 of its 6 steps, rerun: the result equals an
    uninterrupted run's, bit for bit (student, optimizer and batch order restored)."""
    import copy

    from slimdiff.compress.quant.calibrate import batches_by_step
    from slimdiff.compress.quant.finetune import Stage, finetune, trainable
    from slimdiff.compress.quant.layers import replace_layers
    from slimdiff.compress.quant.quest import plan_layers

    from slimdiff.calib import Calibration
    from slimdiff.recipe import CalibrationSpec

    cls = get_pass("quant.quest")
    settings = cls.Config.model_validate({"finetune": {**QUEST, "epochs": 2}}).finetune

    def run(ckpt, stop_at=None):
        model = load_model("tiny:sd15")
        calib = Calibration(
            model.pipe, model.arch, CalibrationSpec(num_prompts=2, steps=3, size=(64, 64))
        )
        data = calib.record()
        teacher = copy.deepcopy(model.denoiser)
        plan = plan_layers(cls.Config(), model.arch, model.denoiser)
        edit = Quantized(component="unet", layers=plan)
        layers = replace_layers(model.denoiser.requires_grad_(False), edit)
        for layer in layers.values():
            layer.init_weight_scale(search=False)
        names = sorted(layers)[:3]
        weights = [p for n in names for p in trainable(layers[n], weights=True)[0]]
        scales = [p for lay in layers.values() for p in trainable(lay, weights=False)[1]]
        stage = Stage("stage", [(weights, 1e-3), (scales, 1e-3)], names, settings.epochs)
        batches = batches_by_step(data, [data.pair(i) for i in range(len(data))], 2)

        def on_step(step):
            if step == stop_at:
                raise KeyboardInterrupt

        result = finetune(model.denoiser, teacher, data, batches, stage, settings, ckpt, on_step)
        return model.denoiser.state_dict(), result

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "a.safetensors", stop_at=3)
    resumed, result = run(tmp_path / "a.safetensors")
    assert result["steps"] == 6 and result["resumed_at"] == 3
    straight, _ = run(tmp_path / "b.safetensors")
    for name, value in straight.items():
        assert torch.equal(resumed[name], value), name


@pytest.mark.parametrize(
    "bad",
    [
        {"weights": "int2"},
        {"activations": "fp8"},
        {"method": "gptq"},
        {"timestep_groups": 0},
        {"lowrank": -1},
        {"finetune": {"epochs": -1}},
        {"init": "entropy"},
    ],
)
def test_bad_configs_are_refused_by_the_recipe(bad):
    key = next(iter(bad))
    with pytest.raises(UserError, match=rf"passes\[0\] \(quant.quest\).*{key}"):
        Recipe(model="tiny:sdxl", passes=[{"pass": "quant.quest", **bad}])


def test_more_groups_than_calibration_steps_is_one_clear_error():
    model = load_model("tiny:sdxl")
    cls = get_pass("quant.quest")
    p = cls(cls.Config(method="minmax", timestep_groups=3))
    with pytest.raises(UserError, match=r"timestep_groups 3 exceeds the 2 denoiser calls of"):
        p.apply(model.pipe, PassContract().calibration(model))


def test_the_edit_checks_its_groups():
    with pytest.raises(ValueError, match=r"2 groups need 1 group_edges"):
        Quantized(component="unet", layers={}, groups=2)
