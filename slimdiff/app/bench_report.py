"""The human-facing outputs of `slimdiff bench`: results.md, the plot and the image grids."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from slimdiff.fsutil import atomic_write_text

__all__ = ["markdown_table", "write_grid", "write_markdown", "write_plot"]

_HEADER = (
    "| denoiser params (M) | bundle (MB) | denoiser (MB) | GFLOP/step | "
    "ms/step (median / p90) | torch eager ms/step | speedup | of matmul rate | end-to-end ms | "
    "peak RSS (MiB) | PSNR (dB) | latent rel err |"
)


_ACCURACY_HEADER = (
    " held-out latent rel err | held-out PSNR (dB) |"
    " prompt acc. all / single / two (uncompressed torch) |"
)


# The run settings results.md states: once in its heading when every measured recipe ran
# with the same value, else as a column per row: (column, a row's value, heading words).
_SETTINGS = (
    ("size", lambda r: f"{r['size'][1]}x{r['size'][0]}", "size {}"),  # rows hold (h, w)
    ("steps", lambda r: f"{r['steps']}", "{} steps"),
    ("guidance", lambda r: f"{r['guidance']:g}{_rescale(r)}", "guidance {}"),
    ("backend", lambda r: f"{r['backend']}", "backend {}"),
)


def _setting_values(results: dict[str, Any]) -> dict[str, list[str]]:
    """Each setting's value per measured recipe (failed ones ran nothing)."""
    measured = [r for r in results["recipes"] if "error" not in r]
    return {name: [show(r) for r in measured] for name, show, _ in _SETTINGS}


def _varying(results: dict[str, Any]) -> list[str]:
    return [name for name, values in _setting_values(results).items() if len(set(values)) > 1]


def markdown_table(results: dict[str, Any]) -> str:
    """One row per recipe; a column per run setting that differs between recipes, and a
    prompt-accuracy column when any recipe measured it."""
    with_acc = any("prompt_accuracy" in r for r in results["recipes"])
    varying = _varying(results)
    shows = {name: show for name, show, _ in _SETTINGS}
    header = (
        "| recipe | "
        + "".join(f"{name} | " for name in varying)
        + _HEADER.removeprefix("| ")
        + (_ACCURACY_HEADER if with_acc else "")
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in results["recipes"]:
        if "error" in r:  # a recipe that failed: its message across the row
            cells = header.count("|") - 3  # after the name and the message
            lines.append(f"| {r['name']} | failed: {_cell(r['error'])} |" + " |" * cells)
            continue
        lat = r["latency_ms"]
        den = r.get("denoiser_bytes")
        floor = r.get("flop_floor_fraction")
        # results.json before the key said MiB: the same number under its old name
        rss = r["peak_rss_mib"] if "peak_rss_mib" in r else r["peak_rss_mb"]
        if r.get("simulated"):  # the precision has no kernel here: no speed to quote
            step, speedup, e2e, rate = "simulated", "simulated", "simulated", "simulated"
        else:
            step = f"{lat['denoiser_step']:.2f} / {lat['denoiser_step_p90']:.2f}"
            speedup, e2e = f"{r['speedup_vs_eager']:.2f}x", f"{lat['end_to_end']:.0f}"
            rate = "-" if floor is None else f"{floor:.1%}"
        line = (
            f"| {r['name']} | "
            + "".join(f"{shows[name](r)} | " for name in varying)
            + f"{r['params'] / 1e6:.2f} | {r['bytes_on_disk'] / 1e6:.1f} | "
            f"{'-' if den is None else f'{den / 1e6:.2f}'} | "
            f"{r['flops_per_step'] / 1e9:.2f} | {step} | {r['torch_eager_ms_per_step']:.2f} | "
            f"{speedup} | {rate} | {e2e} | {rss:.0f} | "
            f"{r['fidelity']['psnr_db']:.1f} | {r['fidelity']['latent_rel_err']:.2e} |"
        )
        if with_acc:
            line += f" {_accuracy_cells(r)} |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    """`text` fit for one markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def _accuracy_cells(row: dict[str, Any]) -> str:
    """The held-out latent error, PSNR and prompt accuracy cells (three, joined by " | ")."""
    if "prompt_accuracy" not in row:
        return "- | - | -"

    def fmt(acc: dict[str, Any]) -> str:
        parts = [acc.get(k) for k in ("all", "single", "two")]
        return " / ".join("-" if v is None else f"{100 * v:.1f}%" for v in parts)

    err = row["fidelity"].get("heldout_latent_rel_err")
    db = row["fidelity"].get("heldout_psnr_db")
    acc = f"{fmt(row['prompt_accuracy'])} ({fmt(row['reference_prompt_accuracy'])})"
    return f"{'-' if err is None else f'{err:.2e}'} | {'-' if db is None else f'{db:.1f}'} | {acc}"


def _rescale(row: dict[str, Any]) -> str:
    value = row.get("guidance_rescale") or 0
    return f" (rescaled {value:g})" if value > 0 else ""


def write_markdown(results: dict[str, Any], path: Path) -> None:
    m = results["machine"]
    # The settings every measured recipe shares; those that differ are table columns, and
    # with no recipe measured there is none to state.
    values = _setting_values(results)
    settings = ", ".join(
        words.format(values[name][0])
        for name, _, words in _SETTINGS
        if values[name] and len(set(values[name])) == 1
    )
    head = (
        f"Measured {results['date']} on {m['cpu']} ({m['cpu_count']} cores), "
        f"onnxruntime {m['onnxruntime']}, torch {m['torch']}"
        f"{f'; {settings}' if settings else ''}.\n"
        f"Command: `{results['command']}`\n\n"
    )
    atomic_write_text(path, head + markdown_table(results))


def write_plot(results: dict[str, Any], path: Path) -> None:
    """Latency (ms/step) against fidelity (PSNR) per recipe."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for r in results["recipes"]:
        if r.get("simulated") or "error" in r:  # no speed of its own to plot
            continue
        x, y = r["latency_ms"]["denoiser_step"], r["fidelity"]["psnr_db"]
        ax.scatter([x], [y], s=40)
        ax.annotate(r["name"], (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("denoiser ms/step (median, runtime)")
    ax.set_ylabel("PSNR vs uncompressed (dB)")
    ax.set_title("latency vs fidelity")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def write_grid(row: dict[str, Any], path: Path) -> None:
    """Reference images (top row) over the recipe's images (bottom row)."""
    from PIL import Image

    def load(paths):
        return [np.asarray(Image.open(p).convert("RGB")) for p in paths]

    top, bottom = load(row["reference_images"]), load(row["images"])
    grid = np.concatenate([np.concatenate(top, axis=1), np.concatenate(bottom, axis=1)], axis=0)
    tmp = path.with_name(f".{path.name}.tmp.png")
    Image.fromarray(grid).save(tmp)
    tmp.replace(path)
