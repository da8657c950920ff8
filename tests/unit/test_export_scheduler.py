"""The scheduler a bundle ships: the model's, or --scheduler's, checked before any export.

A hub SD1.5 folder ships PNDMScheduler, and fine-tunes ship whatever their authors used
(IPNDM, SA-Solver, DPM++ SDE...): a bundle the runtime cannot sample with must be refused before
minutes of export, naming the --scheduler choices that would work.
"""

from __future__ import annotations

import json

import diffusers
import pytest
from click.testing import CliRunner
from slimdiff.export import export_bundle
from slimdiff.export.bundle import bundle_scheduler
from slimdiff.runtime.schedulers import scheduler_names

from slimdiff.cli import main
from slimdiff.errors import UserError
from slimdiff.models import load_model
from slimdiff.recipe import SCHEDULERS, load_recipe


@pytest.fixture(scope="module")
def sd15():
    return load_model("tiny:sd15")


@pytest.fixture(scope="module")
def sd3():
    return load_model("tiny:sd3")  # the quickest family to export (~2 s)


def _with_scheduler(model, cls_name: str, **overrides):
    """The model with its scheduler replaced (a folder another tool saved), and the old one."""
    old = model.pipe.scheduler
    model.pipe.scheduler = getattr(diffusers, cls_name).from_config(old.config, **overrides)
    return old


def test_default_is_the_models_own(sd15):
    assert bundle_scheduler(sd15) is sd15.pipe.scheduler


@pytest.mark.parametrize(
    ("name", "cls_name", "karras"),
    [
        ("euler-a", "EulerAncestralDiscreteScheduler", None),
        ("dpm++2m-karras", "DPMSolverMultistepScheduler", True),
        ("PNDMScheduler", "PNDMScheduler", None),
        ("lcm", "LCMScheduler", None),
        ("deis-karras", "DEISMultistepScheduler", True),
    ],
)
def test_named_scheduler_from_the_models_config(sd15, name, cls_name, karras):
    before = dict(sd15.pipe.scheduler.config)
    chosen = bundle_scheduler(sd15, name)
    assert type(chosen).__name__ == cls_name
    # the betas carry over, as diffusers' from_config carries them
    for key in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps"):
        assert chosen.config[key] == before[key]
    if karras is not None:
        assert chosen.config["use_karras_sigmas"] is karras
    assert dict(sd15.pipe.scheduler.config) == before  # the model is left as it was


def test_unsupported_scheduler_is_refused_naming_the_ones_that_work(sd15):
    old = _with_scheduler(sd15, "IPNDMScheduler")  # improved PNDM: no numpy port
    try:
        with pytest.raises(UserError) as info:
            bundle_scheduler(sd15)
        assert bundle_scheduler(sd15, "euler").config["beta_schedule"] == "scaled_linear"
    finally:
        sd15.pipe.scheduler = old
    message = str(info.value)
    assert "cannot sample with its IPNDMScheduler" in message
    assert "--scheduler NAME" in message and "export.scheduler" in message
    names = message.rpartition("one of: ")[2].split(", ")
    assert {"euler", "euler-a", "dpm++2m-karras", "pndm", "unipc", "lcm"} <= set(names)
    assert "flow-euler" not in names and "FlowMatchEulerDiscreteScheduler" not in names
    assert "edm-euler" not in names and "EDMDPMSolverMultistepScheduler" not in names


def test_unported_option_of_a_ported_class_is_refused(sd15):
    old = _with_scheduler(sd15, "DPMSolverMultistepScheduler", thresholding=True)
    try:
        with pytest.raises(UserError, match="thresholding=True"):
            bundle_scheduler(sd15)
    finally:
        sd15.pipe.scheduler = old


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("k_euler", "unknown scheduler 'k_euler'; use one of: euler,"),
        ("flow-euler", "samples the flow matching process"),
    ],
)
def test_bad_names(sd15, name, message):
    with pytest.raises(UserError, match=message):
        bundle_scheduler(sd15, name)


def test_export_refuses_before_any_work_and_ships_the_choice(sd3, tmp_path):
    """SD3 with flow-matching LCM (no numpy port): refused, nothing written; with flow-euler
    the bundle carries FlowMatchEuler with the model's shift."""
    old = _with_scheduler(sd3, "FlowMatchLCMScheduler")
    try:
        only_flow = (
            r"one of: flow-euler, flow-heun, flow-dpm\+\+2m, flow-unipc, "
            r"FlowMatchEulerDiscreteScheduler, "
            r"FlowMatchHeunDiscreteScheduler$"
        )
        with pytest.raises(UserError, match=only_flow):
            export_bundle(sd3, tmp_path / "refused")
        assert list(tmp_path.iterdir()) == []
        with pytest.raises(UserError, match="the model was trained for the flow matching one"):
            export_bundle(sd3, tmp_path / "refused", scheduler="euler-a")
        export_bundle(sd3, tmp_path / "bundle", scheduler="flow-euler")
    finally:
        sd3.pipe.scheduler = old
    shipped = json.loads((tmp_path / "bundle/scheduler/scheduler_config.json").read_text())
    assert shipped["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    assert shipped["shift"] == old.config["shift"] == 3.0


def test_cli_and_recipe_names(tmp_path):
    result = CliRunner().invoke(
        main, ["export", "tiny:sd15", "--out", str(tmp_path / "b"), "--scheduler", "k_euler"]
    )
    assert result.exit_code == 2
    assert "'k_euler' is not a scheduler; use one of: euler," in result.output
    assert not (tmp_path / "b").exists()
    recipe = tmp_path / "r.yaml"
    recipe.write_text("version: 1\nmodel: tiny:sd15\nexport: {scheduler: euler-a}\n")
    assert load_recipe(recipe).export.scheduler == "euler-a"
    recipe.write_text("version: 1\nmodel: tiny:sd15\nexport: {scheduler: k_euler}\n")
    with pytest.raises(UserError, match=r"export\.scheduler.*unknown scheduler 'k_euler'"):
        load_recipe(recipe)


def test_recipe_knows_the_runtimes_names():
    assert list(SCHEDULERS) == scheduler_names()


def test_dpm_bundle_with_diffusers_infinity_runs(sd15, tmp_path):
    """diffusers' save_config writes DPM-Solver's lambda_min_clipped = -inf as -Infinity (not
    JSON): the runtime reads the scheduler config with infinities allowed (a bundle with a
    DPM scheduler was refused at run time)."""
    from slimdiff.runtime import Text2ImagePipeline

    export_bundle(sd15, tmp_path / "b", scheduler="dpm++2m-karras", optimize=False)
    text = (tmp_path / "b/scheduler/scheduler_config.json").read_text()
    assert '"lambda_min_clipped": -Infinity' in text
    pipe = Text2ImagePipeline.from_bundle(tmp_path / "b")
    assert pipe.scheduler_config["lambda_min_clipped"] == float("-inf")
    image = pipe("a cat", steps=3, size=(64, 64)).image
    assert image.shape == (64, 64, 3)


# runwayml/stable-diffusion-v1-5's scheduler/scheduler_config.json, verbatim: written by
# diffusers 0.6, before timestep_spacing and prediction_type existed
SD15_HUB_PNDM = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}


@pytest.mark.parametrize(
    ("name", "cls_name"),
    [
        ("euler", "EulerDiscreteScheduler"),
        ("dpm++2m", "DPMSolverMultistepScheduler"),
        ("ddim", "DDIMScheduler"),
        ("unipc", "UniPCMultistepScheduler"),
    ],
)
def test_switching_a_hub_sd15_scheduler_gives_diffusers_from_config(sd15, tmp_path, name, cls_name):
    """diffusers' from_config gives the keys the file left out (`_use_default_values`) the new
    class's defaults: SD1.5's PNDM "leading" spacing becomes Euler's "linspace". The bundle
    keeps that list (save_config drops it), so `run --scheduler` switches as diffusers does."""
    from slimdiff.export.bundle import write_support_files
    from slimdiff.runtime.schedulers import scheduler_from_config, switch_scheduler

    pndm = diffusers.PNDMScheduler.from_config(SD15_HUB_PNDM)
    assert "timestep_spacing" in pndm.config["_use_default_values"]
    expected = getattr(diffusers, cls_name).from_config(pndm.config)
    expected.set_timesteps(30)
    old, sd15.pipe.scheduler = sd15.pipe.scheduler, pndm
    try:
        write_support_files(sd15, tmp_path)
        shipped = bundle_scheduler(sd15, name)  # export --scheduler NAME
    finally:
        sd15.pipe.scheduler = old
    assert shipped.config.timestep_spacing == expected.config.timestep_spacing
    written = json.loads((tmp_path / "scheduler/scheduler_config.json").read_text())
    assert written["timestep_spacing"] == "leading"  # PNDM's own, as save_config writes it
    assert "timestep_spacing" in written["_use_default_values"]
    ours = scheduler_from_config(switch_scheduler(written, name))  # run --scheduler NAME
    ours.set_timesteps(30)
    assert ours.timesteps.tolist() == pytest.approx(expected.timesteps.numpy().tolist())
    assert float(ours.init_noise_sigma) == pytest.approx(float(expected.init_noise_sigma))


def test_strict_json_infinities_only_where_asked():
    from slimdiff.runtime.strict_json import StrictJSONError, loads

    data = b'{"a": -Infinity, "b": Infinity}'
    assert loads(data, 4, infinities=True) == {"a": float("-inf"), "b": float("inf")}
    with pytest.raises(StrictJSONError, match="-Infinity is not a JSON number"):
        loads(data, 4)
    with pytest.raises(StrictJSONError, match="NaN is not a JSON number"):
        loads(b'{"a": NaN}', 4, infinities=True)


@pytest.mark.parametrize(
    ("name", "sigmas", "cls_name"),
    [
        (None, "karras", "EulerDiscreteScheduler"),  # tiny:sd15's own
        ("euler", "beta", "EulerDiscreteScheduler"),
        ("dpm++2m-karras", "exponential", "DPMSolverMultistepScheduler"),
    ],
)
def test_sigmas_replace_the_shipped_schedule(sd15, name, sigmas, cls_name, caplog):
    """--sigmas after --scheduler: that class's use_<sigmas>_sigmas set, the others off (a
    "-karras" name's too, with a warning)."""
    with caplog.at_level("WARNING"):
        chosen = bundle_scheduler(sd15, name, sigmas)
    replaced = [r.getMessage() for r in caplog.records if "replaces" in r.getMessage()]
    karras = name is not None and name.endswith("-karras")
    assert replaced == (
        [f"--scheduler {name} samples on karras sigmas, which --sigmas {sigmas} replaces"]
        if karras
        else []
    )
    assert type(chosen).__name__ == cls_name
    flags = {s: chosen.config[f"use_{s}_sigmas"] for s in ("karras", "exponential", "beta")}
    assert flags == {s: s == sigmas for s in flags}


def test_sigmas_on_a_scheduler_without_them_are_refused(sd15):
    old = _with_scheduler(sd15, "DDIMScheduler")
    try:
        with pytest.raises(
            UserError, match=r"--sigmas: DDIMScheduler has no karras sigmas; .*Euler"
        ):
            bundle_scheduler(sd15, None, "karras")
    finally:
        sd15.pipe.scheduler = old


def test_sigmas_in_the_cli_and_recipe(tmp_path):
    result = CliRunner().invoke(
        main, ["export", "tiny:sd15", "--out", str(tmp_path / "b"), "--sigmas", "polyexponential"]
    )
    assert result.exit_code == 2 and "--sigmas" in result.output
    recipe = tmp_path / "r.yaml"
    recipe.write_text("version: 1\nmodel: tiny:sd15\nexport: {scheduler: euler, sigmas: beta}\n")
    assert load_recipe(recipe).export.sigmas == "beta"
    recipe.write_text("version: 1\nmodel: tiny:sd15\nexport: {sigmas: cosine}\n")
    with pytest.raises(UserError, match=r"export\.sigmas"):
        load_recipe(recipe)


def test_run_warns_the_same_when_sigmas_replace_a_presets(sd15, caplog, tmp_path):
    from slimdiff.export.bundle import pipeline_constants
    from slimdiff.runtime.scheduler_choice import chosen

    own = {**sd15.pipe.scheduler.config, "_class_name": type(sd15.pipe.scheduler).__name__}
    with caplog.at_level("WARNING"):
        config = chosen(tmp_path, pipeline_constants(sd15), own, "euler-karras", "beta")
    assert config["use_beta_sigmas"] and not config.get("use_karras_sigmas")
    assert "--scheduler euler-karras samples on karras sigmas, which --sigmas beta replaces" in [
        r.getMessage() for r in caplog.records
    ]


def test_a_scheduler_of_another_process_than_the_familys_is_warned_of(sd15, caplog):
    old = _with_scheduler(sd15, "FlowMatchEulerDiscreteScheduler")
    try:
        with caplog.at_level("WARNING"):
            bundle_scheduler(sd15)
    finally:
        sd15.pipe.scheduler = old
    lines = [r.getMessage() for r in caplog.records if "trained as" in r.getMessage()]
    assert len(lines) == 1
    assert (
        "FlowMatchEulerDiscreteScheduler samples flow matching, and sd15 models are " in (lines[0])
    )
    caplog.clear()
    with caplog.at_level("WARNING"):
        bundle_scheduler(sd15)  # its own Euler: nothing said
    assert not [r for r in caplog.records if "trained as" in r.getMessage()]
