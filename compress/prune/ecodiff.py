"""`prune.ecodiff`: learned (or magnitude-ranked) head and FFN-neuron pruning, ending in a
smaller dense denoiser (EcoDiff, arXiv 2412.02852; official code YaNgZhAnG-V5/EcoDiff).

    - pass: prune.ecodiff
      sparsity: 0.2            # fraction of the maskable parameters (heads, neurons) removed
      scope: global            # global | local
      method: ecodiff          # ecodiff (learned masks) | magnitude (weight norms, no data)
      iterations: 100
      lr: 0.1                  # head masks; ffn_lr for the neurons' (default: lr)
      beta: 0.5
      penalty: l1              # l1 | l1_bounded (EcoDiff's FLUX configs)
      mask: hard_concrete      # hard_concrete | sigmoid
      checkpointing: true      # time-step gradient checkpointing
      checkpoint_every: 10     # resumable checkpoints, in iterations
      recover:                 # optional: layer-level distillation after slicing
        steps: 200

What it does, in order:
1. the units: every attention head and FFN neuron the ArchSpec declares (`units.py`);
2. their scores: the learned mask logits λ (`train.py`: the masked model's final latent
   after the whole trajectory against the teacher's, on the calibration's prompts, noise
   and sampler) or the weight norms (`magnitude.py`);
3. which stay: the lowest-scored go until `sparsity` of the maskable parameters is gone
   (`select.py`), over the model (heads among heads, neurons among neurons, as the
   official binarisation) or per module;
4. slicing for real (`slicing.py`): Q/K/V rows, output-projection columns, FFN rows and
   columns; head counts updated; a module left without units becomes a skip. The typed
   edits go into slimdiff.json and `restore` replays them on load;
5. with `recover:`, the pruned denoiser learns the unpruned one's output and block outputs
   (`ArchSpec.blocks`) on the calibration trajectories, as EcoDiff's optional retraining.

The mask learning does not depend on `sparsity`, `scope` or `recover`, so its checkpoint
key leaves them out: recipes that differ only there resume from the same learned masks
while the work folder is shared (`--work-dir`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from slimdiff.compress.base import Pass, PassReport, Stage, checkpoint_root, register_pass
from slimdiff.compress.prune.config import EcoDiffConfig
from slimdiff.compress.prune.edits import EDITS

from slimdiff.errors import UserError

__all__ = ["EcoDiffPass"]

log = logging.getLogger(__name__)

# The mask-learning keys: what its checkpoint must have been written with.
_LEARNING_KEYS = (
    "iterations",
    "prompts_per_iteration",
    "lr",
    "ffn_lr",
    "beta",
    "penalty",
    "mask",
    "init_logit",
    "checkpointing",
    "seed",
)


@register_pass
class EcoDiffPass(Pass):
    """Remove `sparsity` of the denoiser's maskable parameters, heads and neurons ranked
    by learned masks (or weight norms), sliced into a smaller dense model.

    Example:
        >>> p = EcoDiffPass(EcoDiffPass.Config(sparsity=0.2, method="magnitude"))
        >>> report = p.apply(load_model("tiny:sdxl").pipe, None)  # doctest: +SKIP
        >>> report.summary["achieved_sparsity"]                     # doctest: +SKIP
        0.2
    """

    name = "prune.ecodiff"
    stage = Stage.PRUNING
    Config = EcoDiffConfig
    edits = EDITS

    @property
    def needs_calibration(self) -> bool:
        """Learned masks and recovery train on the teacher's trajectories; magnitude alone
        needs no data."""
        return self.config.method == "ecodiff" or self.config.recover is not None

    def preflight(self, pipe, calib) -> None:
        from slimdiff.compress.prior import refuse_quantized

        from slimdiff.models.families import arch_of_pipeline

        denoiser = getattr(pipe, arch_of_pipeline(pipe).denoiser)
        refuse_quantized(
            denoiser,
            self.name,
            "prune the unquantized model, then quantize (one recipe: prune.ecodiff before "
            "quant.quest)",
        )
        if self.config.method != "ecodiff" or calib is None:
            return
        sampler = calib.sampler()  # learned masks run the stateless sampler: it must exist
        if sampler.stochastic and calib.spec.dtype != "float32":
            # The teacher records under autocast, where diffusers draws the step noise in the
            # output's dtype; the float32 training loop would draw other numbers. Recording
            # the draws themselves would lift this (see the note of this change).
            from slimdiff.errors import UserError

            name = sampler.config.get("_class_name", "this scheduler")
            raise UserError(
                f"prune.ecodiff: {name} adds noise at each step, which calibration.dtype "
                f"{calib.spec.dtype} draws in that precision and the float32 mask training "
                "cannot replay; set calibration.dtype: float32, or calibration.scheduler to a "
                "deterministic one of the model's process (e.g. EulerDiscreteScheduler)"
            )

    @classmethod
    def restore(cls, module: Any, edit: Any) -> Any:
        from slimdiff.compress.prune.slicing import restore

        return restore(module, edit)

    def apply(self, pipe, calib) -> PassReport:
        from slimdiff.compress.prune.select import achieved_sparsity, select
        from slimdiff.compress.prune.slicing import prune
        from slimdiff.compress.prune.units import maskable_params, unit_groups

        from slimdiff.models.families import arch_of_pipeline
        from slimdiff.models.fingerprint import module_digest

        cfg = self.config
        arch = arch_of_pipeline(pipe)
        denoiser = getattr(pipe, arch.denoiser)
        groups = unit_groups(arch, denoiser)
        if not groups:
            raise UserError(
                f"prune.ecodiff: the {arch.family} {arch.denoiser} has no attention heads or "
                "FFN neurons left to prune"
            )
        # On the meta device (see _scores) every module is cut by the same fraction.
        scope = "local" if next(denoiser.parameters()).is_meta else cfg.scope
        # what the masks are learned on: a resume must find the same denoiser (an earlier
        # pass of the recipe, distilled longer, changes it without changing this config)
        digest = module_digest(denoiser)
        scores, learning = self._scores(arch, denoiser, groups, calib, digest)
        keep = select(groups, scores, sparsity=cfg.sparsity, scope=scope)
        _check_prompt_kept(denoiser, groups, keep, cfg.sparsity, scope)
        teacher = copy.deepcopy(denoiser) if cfg.recover is not None else None
        before = _params(denoiser)
        edits = prune(arch, denoiser, groups, keep, component=arch.denoiser)
        after = _params(denoiser)
        maskable = maskable_params(groups)
        recovery = "off"
        if teacher is not None:
            recovery = self._recover(arch, teacher, denoiser, calib, digest)
        summary = {
            "method": cfg.method,
            "scope": scope,
            "sparsity": cfg.sparsity,
            "achieved_sparsity": achieved_sparsity(groups, keep),
            "maskable_params": maskable,
            "params_before": before,
            "params_after": after,
            "heads": _before_after(groups, keep, "heads"),
            "neurons": _before_after(groups, keep, "neurons"),
            "modules_removed": sum(1 for g in groups if not keep[g.key]),
            "masks": learning,
            "recover": recovery,
        }
        log.info(
            "prune.ecodiff: %s params %.4gM -> %.4gM (%.1f%% of the maskable %.4gM removed)",
            arch.denoiser,
            before / 1e6,
            after / 1e6,
            100 * summary["achieved_sparsity"],
            maskable / 1e6,
        )
        return PassReport(self.name, summary=summary, edits=edits)

    def _scores(self, arch, denoiser, groups, calib, digest: str) -> tuple[dict, dict | str]:
        """Per group (units,) scores, higher = keep; and what the learning did."""
        cfg = self.config
        import torch

        if next(denoiser.parameters()).is_meta:
            # `slimdiff inspect random:... --recipe` builds models on the meta device (no
            # weights: a full-size FLUX is 48 GB in fp32), so nothing can be ranked. Equal
            # scores with a local scope prune every module by the same fraction: what
            # mean-normalised magnitude ranking gives on random weights, whose units have
            # equal norms in expectation. Shapes, parameters and FLOPs are the pass's to
            # within which units go; the weights are not (there are none).
            return (
                {g.key: torch.zeros(g.count) for g in groups},
                "preview (meta device, no weights): the same fraction of every module",
            )
        if cfg.method == "magnitude" or calib is None:
            from slimdiff.compress.prune.magnitude import magnitude_scores

            if cfg.method == "magnitude":
                return magnitude_scores(groups, denoiser), "off (method: magnitude)"
            # The runner gives a calibration whenever needs_calibration; `slimdiff inspect
            # --recipe` runs passes without one, to show the shapes.
            log.warning("prune.ecodiff: no calibration, so no learned masks: ranked by magnitude")
            return magnitude_scores(groups, denoiser), (
                "preview without calibration: ranked by weight magnitude, no masks learned"
            )
        from slimdiff.compress.prune.masks import Masks
        from slimdiff.compress.prune.train import MaskSettings, train_masks

        settings = MaskSettings(
            iterations=cfg.iterations,
            lr=cfg.lr,
            beta=cfg.beta,
            checkpointing=cfg.checkpointing,
            checkpoint_every=cfg.checkpoint_every,
            prompts_per_iteration=cfg.prompts_per_iteration,
            seed=cfg.seed,
            mask_type=cfg.mask,
            ffn_lr=cfg.ffn_lr,
            bounded_penalty=cfg.penalty == "l1_bounded",
        )
        masks = Masks.for_denoiser(
            arch, denoiser, cfg.init_logit, mask_type=cfg.mask, seed=cfg.seed
        )
        checkpoint = self._checkpoint(calib, digest)
        report = train_masks(denoiser, masks, calib, settings, checkpoint)
        scores = {key: lam.detach().cpu().clone() for key, lam in masks.named_logits()}
        gates = masks.eval_masks()
        closed = sum(int((g == 0).sum()) for g in gates.values())
        return scores, {
            **asdict(report),
            "init_logit": masks.init_logit,
            "prompts": len(calib.record().prompts),
            "steps": calib.spec.steps,
            "units": sum(g.count for g in groups),
            "closed_gates": closed,  # units whose median gate learned to be exactly 0
        }

    def _recover(self, arch, teacher, student, calib, digest: str) -> dict | str:
        """EcoDiff's optional retraining, as layer-level distillation from the unpruned
        denoiser: its output and every block output (`arch.blocks`: the same names in both,
        since slicing keeps the module tree)."""
        rec = self.config.recover
        if calib is None:  # needs_calibration says it is needed; inspect passes none
            return f"skipped: {rec.steps} steps asked, but no calibration was given"
        from slimdiff.compress.distill.config import DistillSettings
        from slimdiff.compress.distill.train import distill

        from slimdiff.models.structure import find_modules

        blocks = [name for glob in arch.blocks for name, _ in find_modules(student, glob)]
        settings = DistillSettings(
            steps=rec.steps,
            lr=rec.lr,
            batch=rec.batch,
            accumulate=rec.accumulate,
            out_weight=rec.out_weight,
            feat_weight=rec.feat_weight,
            checkpoint_every=rec.checkpoint_every,
            max_grad_norm=rec.max_grad_norm,
            seed=rec.seed,
            source="prune.ecodiff recover: output and block outputs of the unpruned denoiser",
        )
        data = calib.record()
        checkpoint = self._checkpoint(calib, digest, "recover")
        report = distill(
            student,
            teacher.requires_grad_(False),
            data,
            [(b, b) for b in blocks],
            settings,
            checkpoint=checkpoint,
            frozen=arch.frozen,
        )
        return {**asdict(settings), **asdict(report), "blocks": len(blocks)}

    def _checkpoint(self, calib, digest: str, what: str = "masks") -> Path | None:
        """Where mask learning (or recovery) checkpoints. Masks are keyed by the denoiser
        they are learned on (`digest`, fingerprint.module_digest: an earlier pass of the
        recipe that changed changes it), the calibration and the learning keys only (see
        the module docstring); recovery by the whole config too. None without a work
        folder."""
        cfg = self.config
        root = checkpoint_root(cfg.work_dir, calib)
        if root is None:
            return None
        dumped = cfg.model_dump(mode="json", exclude={"work_dir"})
        if what == "masks":
            dumped = {k: dumped[k] for k in _LEARNING_KEYS}
        blob = json.dumps(
            {"calibration": calib.key, "denoiser": digest, "pass": dumped}, sort_keys=True
        )
        key = hashlib.sha256(blob.encode()).hexdigest()[:16]
        return root / f"{self.name}-{what}-{key}" / f"{what}.safetensors"


def _check_prompt_kept(denoiser, groups, keep, sparsity: float, scope: str) -> None:
    """Refuse a selection that removes every attention head reading the prompt: the model
    would draw the same image whatever the text (and its graph would drop the text input).
    The paper's code does not guard this; on full-size models it takes an extreme sparsity,
    on tiny ones half. The learned masks stay checkpointed: a lower sparsity reuses them."""
    reading = [g for g in groups if g.kind == "heads" and _reads_prompt(denoiser, g.site)]
    if reading and not any(keep[g.key] for g in reading):
        raise UserError(
            f"prune.ecodiff: sparsity {sparsity:g} ({scope}) removes every attention head "
            f"that reads the prompt ({sum(g.count for g in reading)} heads in "
            f"{len(reading)} modules): the model would ignore the text; lower "
            "prune.sparsity (the learned masks are reused)"
            + (", or use scope: local" if scope == "global" else "")
        )


def _reads_prompt(denoiser, site) -> bool:
    """Whether an attention site sees the text: cross-attention (UNets' attn2), joint
    attention with context projections (SD3, FLUX double blocks), or single-stream
    attention over text and image tokens together (FLUX single blocks, `pre_only`)."""
    attention = denoiser.get_submodule(site.attention)
    return bool(
        site.context_qkv
        or getattr(attention, "is_cross_attention", False)
        or getattr(attention, "pre_only", False)
    )


def _before_after(groups, keep, unit: str) -> list[int]:
    """[units before, units kept] over the groups of one unit type (heads | neurons)."""
    of_type = [g for g in groups if g.kind == unit]
    return [sum(g.count for g in of_type), sum(len(keep[g.key]) for g in of_type)]


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())
