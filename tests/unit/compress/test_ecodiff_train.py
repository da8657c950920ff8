"""EcoDiff's mask learning: time-step gradient checkpointing gives plain backprop's
gradient (every family, and a multistep DPM-Solver++ sampler), only because the recomputed
step sees its forward's masks; its activation memory does not grow with the steps;
training lowers the loss; a killed run resumes bit-identical; other settings are refused.

Tiny models at 64x64 (8x8 latents), 3-4 step trajectories, float32, one thread.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from slimdiff.compress.prune.masks import Masks
from slimdiff.compress.prune.train import MaskSettings, mask_gradients, train_masks

from slimdiff.calib import Calibration
from slimdiff.errors import UserError
from slimdiff.models import load_model
from slimdiff.recipe import CalibrationSpec
from slimdiff.trainstate import read_train_state

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["a red circle on the left", "a blue square at the top"]
SPEC = CalibrationSpec(prompts=PROMPTS, num_prompts=2, steps=3, size=(64, 64))


def _calibrated(family: str, steps: int = 3, scheduler: str | None = None):
    model = load_model(f"tiny:{family}")
    if scheduler is not None:  # another sampler for the same model, before recording
        import diffusers

        config = model.pipe.scheduler.config
        plms = {"skip_prk_steps": True} if scheduler == "PNDMScheduler" else {}  # SD1.5's
        model.pipe.scheduler = getattr(diffusers, scheduler).from_config(config, **plms)
    spec = SPEC.model_copy(update={"steps": steps})
    calib = Calibration(model.pipe, model.arch, spec)
    calib.record()
    model.denoiser.eval().requires_grad_(False)
    return model, calib


@pytest.fixture(scope="module")
def calibrated():
    cache = {}

    def get(family, steps=3, scheduler=None):
        key = (family, steps, scheduler)
        if key not in cache:
            cache[key] = _calibrated(family, steps, scheduler)
        return cache[key]

    return get


def _gradients(model, calib, masks, checkpointing, prompt=0, iteration=0, beta=0.0):
    den = model.denoiser
    data = calib.record()
    return mask_gradients(
        calib.loop(den),
        masks,
        calib.conditioning(prompt, den),
        data.noise(prompt),
        data.final(prompt),
        iteration,
        beta,
        checkpointing,
        step_noise=calib.step_noise(prompt),
    )


def _rel(a: dict, b: dict) -> float:
    va, vb = torch.cat([a[k] for k in a]), torch.cat([b[k] for k in a])
    return float((va - vb).norm() / vb.norm())


def _assert_checkpointing_matches_backprop(model, calib):
    # λ = 1: gates mostly inside (0, 1), so most units carry gradient (at λ = 3 most clamp
    # to 1 and pass none). beta = 0: the penalty's gradient is the same code on both paths.
    masks = Masks.for_denoiser(model.arch, model.denoiser, init_logit=1.0)
    loss_full, full = _gradients(model, calib, masks, checkpointing=False)
    loss_ckpt, ckpt = _gradients(model, calib, masks, checkpointing=True)
    assert full.keys() == ckpt.keys() == set(masks.keys)
    assert sum(bool(g.abs().sum() > 0) for g in full.values()) > len(full) // 2
    assert loss_ckpt == pytest.approx(loss_full, rel=1e-6)
    assert _rel(ckpt, full) < 1e-5, _rel(ckpt, full)
    return masks, full


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "flux"])
def test_checkpointed_mask_gradients_equal_full_backprop(calibrated, family):
    _assert_checkpointing_matches_backprop(*calibrated(family))


def test_checkpointing_carries_a_multistep_samplers_history(calibrated):
    # DPM-Solver++ 2M over 4 steps: steps 1 and 2 are second order and read the previous
    # step's data prediction from the sampler state (the last step is first order).
    model, calib = calibrated("sdxl", steps=4, scheduler="DPMSolverMultistepScheduler")
    assert calib.sampler().config["solver_order"] == 2
    _assert_checkpointing_matches_backprop(model, calib)


def test_checkpointing_carries_unipcs_history_and_corrected_start(calibrated):
    # UniPC (bh2, order 2): each step corrects its input from the previous step's start
    # sample and outputs (state.start, state.x0), then predicts from the corrected one.
    model, calib = calibrated("sd15", steps=4, scheduler="UniPCMultistepScheduler")
    assert calib.sampler().config["solver_order"] == 2
    _assert_checkpointing_matches_backprop(model, calib)


@pytest.mark.parametrize("scheduler", ["HeunDiscreteScheduler", "KDPM2DiscreteScheduler"])
def test_checkpointing_carries_the_first_half_of_two_call_steps(calibrated, scheduler):
    # Heun, DPM2: 2n - 1 calls; each second half reads the first half's sample (and slope)
    model, calib = calibrated("sd15", steps=3, scheduler=scheduler)
    assert calib.sampler().num_steps == 5
    _assert_checkpointing_matches_backprop(model, calib)


def test_checkpointing_carries_plms_noise_history_and_start(calibrated):
    # PLMS (the hub SD1.5 default): every step reads up to 3 earlier noise predictions
    # (state.eps) and call 1 restarts from call 0's sample (state.start). Walking back
    # with x0 alone missed those: the gradient was 22% off plain backprop's.
    model, calib = calibrated("sd15", steps=4, scheduler="PNDMScheduler")
    sampler = calib.loop(model.denoiser).sampler
    assert sampler.config["skip_prk_steps"] and sampler.num_steps == 5
    _assert_checkpointing_matches_backprop(model, calib)


@pytest.mark.parametrize(
    "scheduler",
    ["EulerAncestralDiscreteScheduler", "LCMScheduler", "EDMDPMSolverMultistepScheduler"],
)
def test_step_noise_and_edm_samplers_train_against_their_own_teacher(calibrated, scheduler):
    """SDXL-Turbo's Euler a and LCM add fresh noise at each step, Playground's EDM solver
    preconditions the UNet: unmasked, the loop must land on the teacher's final latent
    (loss ~0; without the teacher's step noise it is the size of the latent), and the
    walk back must reuse each step's noise (checkpointed gradient = plain backprop's)."""
    model, calib = calibrated("sd15", steps=4, scheduler=scheduler)
    assert calib.sampler().stochastic == (scheduler != "EDMDPMSolverMultistepScheduler")
    open_masks = Masks.for_denoiser(model.arch, model.denoiser, init_logit=20.0)
    loss, _ = _gradients(model, calib, open_masks, checkpointing=True)
    assert loss < 1e-10 * float(calib.record().final(0).square().mean()), loss
    _assert_checkpointing_matches_backprop(model, calib)


def test_the_recomputed_step_must_see_its_forward_passs_masks(calibrated, monkeypatch):
    """The official walk resamples the hard-concrete noise when it recomputes a step:
    planted here, the loss stays the same but the gradient is no longer the loss's."""
    model, calib = calibrated("sdxl")
    masks, full = _assert_checkpointing_matches_backprop(model, calib)
    seeded = masks.sample
    calls: dict[tuple[int, int], int] = {}

    def resampling(iteration, step):  # first call per step: the forward's; then fresh
        n = calls[iteration, step] = calls.get((iteration, step), -1) + 1
        return seeded(iteration + 1000 * n, step)

    monkeypatch.setattr(masks, "sample", resampling)
    loss, planted = _gradients(model, calib, masks, checkpointing=True)
    monkeypatch.undo()
    assert loss == pytest.approx(_gradients(model, calib, masks, checkpointing=False)[0])
    assert _rel(planted, full) > 0.05, _rel(planted, full)


class _SavedBytes:
    """Peak bytes of the tensors autograd keeps for backward, by storage (the frozen
    weights excluded): the activation memory time-step checkpointing is about."""

    def __init__(self, exclude: set[int]) -> None:
        self.exclude, self.live, self.now, self.peak = exclude, {}, 0, 0

    def pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self.exclude or storage.nbytes() == 0:
            return t
        count = self.live.get(ptr, 0)
        if count == 0:
            self.now += storage.nbytes()
            self.peak = max(self.peak, self.now)
        self.live[ptr] = count + 1
        holder = _Holder(t)
        weakref.finalize(holder, self._release, ptr, storage.nbytes())
        return holder

    def _release(self, ptr: int, nbytes: int) -> None:
        self.live[ptr] -= 1
        if self.live[ptr] == 0:
            self.now -= nbytes

    @staticmethod
    def unpack(holder):
        return holder.tensor if isinstance(holder, _Holder) else holder


class _Holder:
    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


def _peak_saved(model, calib, checkpointing: bool) -> int:
    masks = Masks.for_denoiser(model.arch, model.denoiser, init_logit=1.0)
    meter = _SavedBytes({p.untyped_storage().data_ptr() for p in model.denoiser.parameters()})
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
        _gradients(model, calib, masks, checkpointing)
    assert meter.now == 0  # everything saved was released
    return meter.peak


def test_checkpointing_keeps_one_steps_activations_whatever_the_step_count(calibrated):
    peaks = {
        (steps, ckpt): _peak_saved(*calibrated("sd15", steps=steps), ckpt)
        for steps in (2, 4)
        for ckpt in (False, True)
    }
    assert peaks[4, True] <= 1.02 * peaks[2, True], peaks
    assert peaks[4, False] >= 1.8 * peaks[2, False], peaks  # plain backprop: grows with steps
    assert peaks[4, True] <= 0.3 * peaks[4, False], peaks


SETTINGS = MaskSettings(
    iterations=4,
    lr=0.1,
    beta=0.5,
    checkpoint_every=2,
    prompts_per_iteration=2,
    warmup=2,
)


def test_training_lowers_the_loss(calibrated):
    model, calib = calibrated("sdxl")
    den = model.denoiser
    masks = Masks.for_denoiser(model.arch, den, init_logit=0.0)
    settings = MaskSettings(iterations=8, lr=0.2, beta=0.01, prompts_per_iteration=2, warmup=0)

    def held_out_loss() -> float:  # mask draws no iteration of the run used
        return sum(_gradients(model, calib, masks, True, p, 10**6, 0.01)[0] for p in (0, 1))

    before = held_out_loss()
    report = train_masks(den, masks, calib, settings)
    after = held_out_loss()
    assert report.iterations == 8 and report.resumed_from == 0
    assert report.losses["total"] < report.first_losses["total"], report
    assert after < 0.7 * before, (before, after)
    # From λ = 0 (gates half open) the reconstruction opens the gates: most units were needed.
    opened = [float(lam.mean().detach()) for _, lam in masks.named_logits()]
    assert sum(m > 0 for m in opened) > 0.6 * len(opened), opened


class _Killed(Exception):
    pass


def _kill_after(n: int):
    def hook(done: int) -> None:
        if done == n:
            raise _Killed

    return hook


def test_a_killed_run_resumes_bit_identical(calibrated, tmp_path):
    model, calib = calibrated("sdxl")
    den = model.denoiser
    den.requires_grad_(True).train()  # the caller's flags, to be restored

    def fresh() -> Masks:
        return Masks.for_denoiser(model.arch, den, init_logit=1.0)

    reference = fresh()
    ref_report = train_masks(den, reference, calib, SETTINGS, tmp_path / "ref.safetensors")

    ckpt = tmp_path / "run" / "masks.safetensors"
    with pytest.raises(_Killed):  # killed after iteration 3: the last checkpoint is at 2
        train_masks(den, fresh(), calib, SETTINGS, ckpt, on_iteration=_kill_after(3))
    assert read_train_state(ckpt)[0] == 2
    assert den.training and all(p.requires_grad for p in den.parameters())

    resumed = fresh()  # as a new process would build them
    report = train_masks(den, resumed, calib, SETTINGS, ckpt)
    assert (report.resumed_from, report.iterations) == (2, 4)
    assert report.losses == ref_report.losses and report.first_losses == ref_report.first_losses
    for key, lam in reference.named_logits():
        assert torch.equal(resumed.logit(key), lam), key
    assert not torch.equal(reference.logit(reference.keys[0]), fresh().logit(reference.keys[0]))
    den.requires_grad_(False).eval()


def test_a_checkpoint_of_other_settings_is_refused(calibrated, tmp_path):
    model, calib = calibrated("sd3")
    den = model.denoiser
    ckpt = tmp_path / "masks.safetensors"
    short = MaskSettings(iterations=1, prompts_per_iteration=1, checkpointing=False)
    train_masks(den, Masks.for_denoiser(model.arch, den), calib, short, ckpt)
    again = MaskSettings(iterations=1, prompts_per_iteration=1, checkpointing=False, lr=0.05)
    with pytest.raises(UserError, match="other mask-learning settings"):
        train_masks(den, Masks.for_denoiser(model.arch, den), calib, again, ckpt)
    other_init = Masks.for_denoiser(model.arch, den, init_logit=1.0)
    with pytest.raises(UserError, match="other mask-learning settings"):
        train_masks(den, other_init, calib, short, ckpt)
    # the checkpoint interval is not a setting the result depends on
    same = MaskSettings(
        iterations=1, prompts_per_iteration=1, checkpointing=False, checkpoint_every=5
    )
    report = train_masks(den, Masks.for_denoiser(model.arch, den), calib, same, ckpt)
    assert report.resumed_from == 1


def test_settings_and_masks_are_checked():
    with pytest.raises(UserError, match="prompts_per_iteration"):
        MaskSettings(prompts_per_iteration=0)
    with pytest.raises(UserError, match="recon_norm"):
        MaskSettings(recon_norm="l3")
    with pytest.raises(UserError, match="mask_type"):
        MaskSettings(mask_type="binary")


def test_heads_and_neurons_learn_at_their_own_rates(calibrated):
    from slimdiff.compress.prune.train import _param_groups

    model, _ = calibrated("flux")
    masks = Masks.for_denoiser(model.arch, model.denoiser)
    groups = _param_groups(masks, MaskSettings(lr=0.5, ffn_lr=0.1))
    assert [g["lr"] for g in groups] == [0.5, 0.1]
    heads = sum(g.count for g in masks.groups if g.kind == "heads")
    assert sum(p.numel() for p in groups[0]["params"]) == heads
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(g.count for g in masks.groups)
    assert [g["lr"] for g in _param_groups(masks, MaskSettings(lr=0.2))] == [0.2, 0.2]


def test_a_model_without_a_torch_sampler_is_refused_before_any_trajectory(tmp_path, monkeypatch):
    """DEIS has no stateless sampler: the runner's preflight says so before it records the
    teacher's trajectories (minutes to hours at full size), naming the recipe key to use."""
    import diffusers
    from slimdiff.compress.runner import compress_model

    from slimdiff.recipe import validate_recipe

    model = load_model("tiny:sd15")
    model.pipe.scheduler = diffusers.DEISMultistepScheduler.from_config(model.pipe.scheduler.config)
    recipe = validate_recipe(
        {
            "model": "tiny:sd15",
            "calibration": SPEC.model_dump(),
            "passes": [{"pass": "prune.ecodiff", "sparsity": 0.2, "iterations": 1}],
        }
    )

    def no_recording(self):
        raise AssertionError("the trajectories were recorded before the refusal")

    monkeypatch.setattr(Calibration, "record", no_recording)
    with pytest.raises(UserError, match=r"DEISMultistepScheduler.*calibration\.scheduler"):
        compress_model(model, recipe, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    # a stochastic sampler recorded in bfloat16: its step noise cannot be replayed in float32
    model.pipe.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(
        model.pipe.scheduler.config
    )
    bf16 = recipe.model_copy(
        update={"calibration": recipe.calibration.model_copy(update={"dtype": "bfloat16"})}
    )
    with pytest.raises(UserError, match=r"adds noise at each step.*calibration\.dtype: float32"):
        compress_model(model, bf16, tmp_path / "a")
    assert not (tmp_path / "a").exists()
