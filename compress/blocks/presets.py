"""The published block-removal architectures, as presets relative to the teacher.

Depth cuts are fractions of the teacher's depth at the same place, rounded half up and at
least 1, so a preset gives exactly the published depths on the real SDXL (depth 10 in the
deepest stage) and scales to the same topology at other depths: tiny:sdxl and toy:shapes
(depths 1, 2, 4) get 4 -> 2 where SDXL gets 10 -> 4 or 5 or 6.

Sources (details: reference/compression-anchors.md, section c):
- BK-SDM, arXiv 2305.15798, Nota-NetsPresso/BK-SDM src/unet_config/bk_{base,small,tiny}.
- SSD-1B and Segmind-Vega, arXiv 2401.02677; the SSD-1B UNet config (diffusers PR #5400);
  Vega's depths from ComfyUI's model detection (comfy/model_detection.py, `Segmind_Vega`),
  which matches the released checkpoint by its state dict.
- KOALA, arXiv 2312.04005; depths and mid-blocks from ComfyUI's `KOALA_1B` / `KOALA_700M`
  detection entries (no training code was released).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction as F

from slimdiff.compress.blocks.plan import MidMode, Settings
from slimdiff.compress.distill.config import BK_SDM, KOALA, SEGMIND, DistillSettings

from slimdiff.errors import UserError

__all__ = ["PRESETS", "Preset", "get_preset", "presets_for"]

# A depth scale: one entry per block (a Fraction for every layer, or one per layer);
# blocks without transformers take 1 (ignored), as diffusers' own configs write them.
Scale = tuple[F | int | tuple[F | int, ...], ...]


@dataclass(frozen=True)
class Preset:
    name: str
    family: str  # the ArchSpec family whose UNet topology this preset is written for
    unet_params: float  # the published student UNet size, for the docs and tests
    source: str
    layers_per_block: int | None = None  # None: the teacher's
    drop_stages: int = 0  # innermost stages removed, down and up together
    mid: MidMode = "keep"
    down_scale: Scale | None = None  # None: depths unchanged
    up_scale: Scale | None = None
    # The teacher this preset expects: its block types and layers per block.
    teacher_down_types: tuple[str, ...] = ()
    teacher_layers: int = 2
    # The paper's distillation defaults (loss weights, feature hooks, lr); the generic form
    # (no preset) takes Segmind's, the closest to a free depth cut.
    distill: DistillSettings = SEGMIND

    def settings(self, keep: str) -> Settings:
        """The preset as Settings; depths stay fractions, resolved by the plan against the
        teacher layer each student layer is initialised from."""
        return Settings(
            drop_stages=self.drop_stages,
            layers_per_block=self.layers_per_block,
            down_depths=_fractions(self.down_scale),
            up_depths=_fractions(self.up_scale),
            mid=self.mid,
            keep=keep,
        )


def _fractions(scale: Scale | None):
    if scale is None:
        return None
    return tuple(tuple(F(x) for x in e) if isinstance(e, tuple) else F(e) for e in scale)


_SD15 = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
_SDXL = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
_BK = "BK-SDM (arXiv 2305.15798), Nota-NetsPresso/BK-SDM src/unet_config"

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        # One (ResNet, transformer) pair per down stage goes (layers_per_block 1) and the
        # middle of the three pairs in each up stage (student up layer 1 <- teacher 2).
        Preset(
            "bk-sdm-base",
            "sd15",
            0.58e9,
            _BK,
            layers_per_block=1,
            teacher_down_types=_SD15,
            distill=BK_SDM,
        ),
        # Base without the mid-block.
        Preset(
            "bk-sdm-small",
            "sd15",
            0.49e9,
            _BK,
            layers_per_block=1,
            mid="none",
            teacher_down_types=_SD15,
            distill=BK_SDM,
        ),
        # Small without the innermost stage (down_blocks.3, up_blocks.0): block_out_channels
        # [320, 640, 1280]; down_blocks.2 loses its downsampler.
        Preset(
            "bk-sdm-tiny",
            "sd15",
            0.33e9,
            _BK,
            layers_per_block=1,
            mid="none",
            drop_stages=1,
            teacher_down_types=_SD15,
            distill=BK_SDM,
        ),
        # SSD-1B: transformer_layers_per_block [[1], [2, 2], [4, 4]], reverse
        # [[4, 4, 10], [2, 1, 1], 1], mid-block = one ResNet (UNetMidBlock2D); ResNets kept.
        Preset(
            "ssd-1b",
            "sdxl",
            1.3e9,
            "SSD-1B (arXiv 2401.02677), its diffusers UNet config",
            mid="resnet_only",
            down_scale=(1, 1, F(4, 10)),
            up_scale=((F(4, 10), F(4, 10), 1), (1, F(1, 2), F(1, 2)), 1),
            teacher_down_types=_SDXL,
            distill=SEGMIND,
        ),
        # Segmind-Vega: down depths [[1], [1, 1], [2, 2]] (published), mid one ResNet. The
        # up depths are not published; [[2, 2, 2], [1, 1, 1]] are what ComfyUI detects the
        # released checkpoint by, and they give the published 0.745B (blog: down 247M,
        # mid 31M, up 460M).
        Preset(
            "vega",
            "sdxl",
            0.745e9,
            "Segmind-Vega (arXiv 2401.02677, Segmind blog); up depths: ComfyUI model detection",
            mid="resnet_only",
            down_scale=(1, F(1, 2), F(2, 10)),
            up_scale=(F(2, 10), F(1, 2), 1),
            teacher_down_types=_SDXL,
            distill=SEGMIND,
        ),
        # KOALA-1B: one (ResNet, transformer) pair per down stage, BK-style (up stages keep
        # their first and last pairs), depth 10 -> 6 in the 1280-channel stage; the mid
        # keeps its transformer, and diffusers gives it the same depth 6 (ComfyUI:
        # transformer_depth [0, 2, 6], transformer_depth_middle 6).
        Preset(
            "koala-1b",
            "sdxl",
            1.16e9,
            "KOALA (arXiv 2312.04005); depths: ComfyUI model detection",
            layers_per_block=1,
            down_scale=(1, 1, F(6, 10)),
            up_scale=(F(6, 10), 1, 1),
            teacher_down_types=_SDXL,
            distill=KOALA,
        ),
        # KOALA-700M: as KOALA-1B with depth 5 and no mid-block (ComfyUI:
        # transformer_depth_middle -2, i.e. none). With the mid-block kept it would be
        # 1.02B, far from the published 0.78B; without it, 0.783B: the paper's "no mid-block".
        Preset(
            "koala-700m",
            "sdxl",
            0.78e9,
            "KOALA (arXiv 2312.04005); depths: ComfyUI model detection",
            layers_per_block=1,
            mid="none",
            down_scale=(1, 1, F(5, 10)),
            up_scale=(F(5, 10), 1, 1),
            teacher_down_types=_SDXL,
            distill=KOALA,
        ),
    )
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise UserError(
            f"blocks.remove: unknown preset {name!r}; presets: {', '.join(PRESETS)}"
        ) from None


def presets_for(family: str) -> tuple[str, ...]:
    """The presets written for `family`'s UNet topology."""
    return _BY_FAMILY.get(family, ())


_BY_FAMILY: dict[str, tuple[str, ...]] = {}
for _p in PRESETS.values():
    _BY_FAMILY[_p.family] = (*_BY_FAMILY.get(_p.family, ()), _p.name)
