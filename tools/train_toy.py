"""Train `toy:shapes` from scratch on the procedural dataset `slimdiff.toy` (CPU or GPU).

    python tools/train_toy.py --work /tmp/toy-train --out slimdiff/models/toy_shapes

Four resumable stages, each checkpointed under --work (safetensors; rerun the same
command after a kill and it goes on from the last checkpoint):

1. VAE: AutoencoderKL on 64x64 renders, L1 + MSE reconstruction + 1e-6 KL (SD's VAE
   recipe without the LPIPS and GAN terms, which flat shapes do not need).
2. Latent cache: renders `--images` training images once, encodes them (posterior mean),
   and sets the VAE's scaling factor to 1/std of the latents, as SD does.
3. Decoder fine-tune: the VAE decoder alone, on the cached latents (so the latent space
   the UNet learns does not move; SD's ft-MSE VAE did the same). Independent of stage 4:
   `--stage decoder` and `--stage unet` may run side by side.
4. UNet and both text encoders, jointly from scratch: epsilon prediction on SDXL's
   scaled-linear schedule, min-SNR-5 loss weights (Hang et al. 2023; faster convergence
   at this budget), captions dropped 10% of the time to all-zero embeddings (what SDXL's
   `force_zeros_for_empty_prompt` feeds the unconditional branch), EMA weights.

`--save-only` writes the pipeline folder from the latest checkpoint (EMA weights), e.g.
to evaluate while training goes on. A larger `--steps` on an existing work folder trains
on from its checkpoint (the cosine schedule is recomputed for the new total, a warm
restart); `--until N` stops at step N without changing the schedule, so a run made of
several segments can be replayed exactly. `--init DIR` goes on from a trained pipeline
folder instead (e.g. the shipped model, once the work folder that made it is gone): DIR's
VAE, latent scaling, text encoders and UNet are kept and only the cache and UNet stages
run, with a fresh optimizer and schedule over --steps (`--seed` picks other renders and
batches); TRAINING.json then counts DIR's UNet steps plus these. The shipped weights'
commands and timings: docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from slimdiff.threads import prepare_process  # noqa: E402

prepare_process()  # OpenMP threads sleep, not spin, while they wait: before torch loads

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from slimdiff.models.toy import TOY_SIDE, build_toy_pipeline, load_toy_folder  # noqa: E402
from slimdiff.toy import ShapesDataset  # noqa: E402
from slimdiff.toy.scenes import caption  # noqa: E402
from slimdiff.trainstate import load_train_state, save_train_state  # noqa: E402

TIME_IDS = [TOY_SIDE, TOY_SIDE, 0, 0, TOY_SIDE, TOY_SIDE]  # original size, crop, target


def main() -> None:
    args = _parse()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    init = _init_record(work, args)
    if init is None:
        pipe = build_toy_pipeline(seed=args.seed)
        stages = ("vae", "cache", "decoder", "unet") if args.stage == "all" else (args.stage,)
    else:
        pipe = load_toy_folder(Path(init["from"]))  # its VAE config holds the scaling
        stages = ("cache", "unet") if args.stage == "all" else (args.stage,)
        if {"vae", "decoder"} & set(stages):
            _fail("--init keeps the folder's trained VAE: use --stage cache, unet or all")
    if args.save_only:
        stages = ()
    if "vae" in stages:
        train_vae(pipe.vae, work, args, device)
    if init is None:
        load_train_state(work / "vae.safetensors", {"vae": pipe.vae})
    if stages:
        cache = build_cache(pipe, work, args, device, keep_scaling=init is not None)
    if "decoder" in stages:
        finetune_decoder(pipe.vae, cache, work, args, device)
    if "unet" in stages:
        train_denoiser(pipe, cache, work, args, device)
    if args.stage == "all" or args.save_only:
        save_pipeline(pipe, work, Path(args.out), init)


def _init_record(work: Path, args) -> dict | None:
    """What an `--init` work folder continues from (written on its first run, as DIR may
    be overwritten by --out later), or None for a from-scratch work folder."""
    path = work / "init.json"
    if path.exists():
        record = json.loads(path.read_text())
        if args.init is None or Path(args.init).resolve() != Path(record["from"]):
            _fail(f"{work} continues from {record['from']}: pass --init {record['from']}")
        return record
    if args.init is None:
        return None
    if (work / "vae.safetensors").exists():
        _fail(f"{work} holds a from-scratch run: give --init a new --work folder")
    folder = Path(args.init).resolve()
    trained = folder / "TRAINING.json"
    if not (folder / "model_index.json").exists() or not trained.exists():
        _fail(f"--init {folder}: not a pipeline folder written by this tool (TRAINING.json)")
    info = json.loads(trained.read_text())
    record = {
        "from": str(folder),
        "unet_steps": info["unet_steps"],
        "decoder_finetuned": info["decoder_finetuned"],
    }
    path.write_text(json.dumps(record, indent=2) + "\n")
    return record


def _fail(message: str) -> None:
    """Bad input: one line naming the problem and the fix, exit code 2 (as argparse)."""
    print(f"train_toy: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="toy-train", help="checkpoints and caches")
    p.add_argument("--out", default=str(ROOT / "slimdiff/models/toy_shapes"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vae-steps", type=int, default=1500)
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--decoder-steps", type=int, default=1500)
    p.add_argument("--images", type=int, default=40_000, help="training images (cached)")
    p.add_argument("--steps", type=int, default=8000, help="UNet training steps")
    p.add_argument(
        "--until",
        type=int,
        default=None,
        help="stop the UNet stage at this step; the cosine schedule still spans --steps",
    )
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--every", type=int, default=250, help="checkpoint interval (steps)")
    p.add_argument("--stage", default="all", choices=("all", "vae", "cache", "decoder", "unet"))
    p.add_argument("--save-only", action="store_true", help="write --out from checkpoints")
    p.add_argument("--init", default=None, help="go on from this trained pipeline folder")
    return p.parse_args()


def _images(dataset: ShapesDataset, indices) -> tuple[torch.Tensor, list[str]]:
    items = [dataset[int(i)] for i in indices]
    x = torch.from_numpy(np.stack([im for im, _ in items])).permute(0, 3, 1, 2)
    return x.float() / 127.5 - 1.0, [text for _, text in items]


def _schedule(step: int, total: int, warmup: int = 200, floor: float = 0.1) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _fit(
    work: Path,
    stage: str,
    total: int,
    modules: dict,
    opt,
    ckpt: Path,
    lr,
    loss_at,
    every: int,
    clip=None,
    after_step=None,
    until: int | None = None,
) -> int:
    """The loop every stage shares: resume from `ckpt`, then per step the scheduled
    learning rate (`lr(step)`), `loss_at(step)`, an optimizer step (gradients clipped to
    norm 1 over `clip` when given), `after_step(step)`, a log line every 50 steps and a
    checkpoint of `modules` and `opt` every `every` steps and at the end. `until` stops
    early (at that step) without changing the schedule, which `total` sets."""
    step = load_train_state(ckpt, modules, opt)[0] if ckpt.exists() else 0
    end = total if until is None else min(total, until)
    t0, losses = time.time(), []
    while step < end:
        for group in opt.param_groups:
            group["lr"] = lr(step)
        loss = loss_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(clip, 1.0)
        opt.step()
        step += 1
        if after_step is not None:
            after_step(step)
        losses.append(loss.item())
        if step % 50 == 0:
            _log(work, stage, step, total, float(np.mean(losses)), t0)
            losses = []
        if step % every == 0 or step == end:
            save_train_state(ckpt, modules, opt, step)
    return step


# ---------------------------------------------------------------- 1. VAE


def train_vae(vae, work: Path, args, device) -> None:
    done = work / "vae.safetensors"
    if done.exists():
        return
    vae.to(device).train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=5e-4, weight_decay=0.0)
    data = ShapesDataset(seed=args.seed + 1, include_heldout=True)  # no captions used

    def loss_at(step: int) -> torch.Tensor:
        x, _ = _images(data, range(step * args.vae_batch, (step + 1) * args.vae_batch))
        x = x.to(device)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        return F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()

    step = _fit(
        work,
        "vae",
        args.vae_steps,
        {"vae": vae},
        opt,
        work / "vae-ckpt.safetensors",
        lambda step: 5e-4 * _schedule(step, args.vae_steps, warmup=100),
        loss_at,
        every=args.every,
    )
    vae.eval().requires_grad_(False).cpu()
    save_train_state(done, {"vae": vae}, None, step)


# ---------------------------------------------------------------- 2. latent cache


def build_cache(pipe, work: Path, args, device, keep_scaling=False) -> dict[str, torch.Tensor]:
    path = work / "cache.safetensors"
    if not path.exists():
        from safetensors.torch import save_file

        data = ShapesDataset(seed=args.seed)
        vae = pipe.vae.to(device)
        latents, ids = [], {"ids_1": [], "ids_2": [], "ids_1s": [], "ids_2s": []}
        t0 = time.time()
        for start in range(0, args.images, 256):
            idx = range(start, min(args.images, start + 256))
            x, _ = _images(data, idx)
            with torch.no_grad():
                latents.append(vae.encode(x.to(device)).latent_dist.mean.cpu())
            scenes = [data.scene(i)[0] for i in idx]
            # Each image keeps both captions (with and without the size word); training
            # draws one per step, so both forms are learned.
            for suffix, with_size in (("", False), ("s", True)):
                texts = [caption(s, with_size=with_size) for s in scenes]
                ids[f"ids_1{suffix}"].append(_tokens(pipe.tokenizer, texts))
                ids[f"ids_2{suffix}"].append(_tokens(pipe.tokenizer_2, texts))
            print(f"cache {start + len(idx)}/{args.images} {time.time() - t0:.0f}s", flush=True)
        lat = torch.cat(latents)
        tensors = {"latents": lat.contiguous(), **{k: torch.cat(v) for k, v in ids.items()}}
        scaling = 1.0 / lat.std().item()
        save_file(tensors, str(path.with_suffix(".tmp")), metadata={"scaling": str(scaling)})
        path.with_suffix(".tmp").rename(path)
        vae.cpu()
    from safetensors.torch import load_file

    if not keep_scaling:  # --init: the UNet was trained on the folder's scaling; keep it
        pipe.vae.register_to_config(scaling_factor=_cache_scaling(path))
    print(f"latent scaling factor {pipe.vae.config.scaling_factor:.4f}", flush=True)
    return load_file(str(path))


def _cache_scaling(path: Path) -> float:
    """The VAE scaling factor (1/std of the latents) the cache was built with."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return float(f.metadata()["scaling"])


def _tokens(tokenizer, texts: list[str]) -> torch.Tensor:
    return tokenizer(
        texts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(torch.int32)


# ---------------------------------------------------------------- 3. decoder fine-tune


def finetune_decoder(vae, cache: dict[str, torch.Tensor], work: Path, args, device) -> None:
    done = work / "decoder.safetensors"
    if done.exists():
        return
    vae.to(device).requires_grad_(False)
    parts = {"decoder": vae.decoder, "post_quant_conv": vae.post_quant_conv}
    for m in parts.values():
        m.train().requires_grad_(True)
    params = [p for m in parts.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.0)
    data = ShapesDataset(seed=args.seed)  # the cached images, re-rendered by index
    n = cache["latents"].shape[0]

    def loss_at(step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        idx = torch.randint(0, n, (args.vae_batch,), generator=g)
        x, _ = _images(data, idx.tolist())
        x = x.to(device)
        recon = vae.decode(cache["latents"][idx].to(device)).sample
        return F.l1_loss(recon, x) + F.mse_loss(recon, x)

    step = _fit(
        work,
        "decoder",
        args.decoder_steps,
        parts,
        opt,
        work / "decoder-ckpt.safetensors",
        lambda step: 5e-4 * _schedule(step, args.decoder_steps, warmup=50),
        loss_at,
        every=args.every,
    )
    vae.eval().requires_grad_(False).cpu()
    save_train_state(done, parts, None, step)


# ---------------------------------------------------------------- 4. UNet + text encoders


def encode_text(pipe, ids_1: torch.Tensor, ids_2: torch.Tensor):
    """SDXL's conditioning: penultimate hidden states of both encoders, concatenated, and
    the second encoder's projected pooled output."""
    out_1 = pipe.text_encoder(ids_1.long(), output_hidden_states=True)
    out_2 = pipe.text_encoder_2(ids_2.long(), output_hidden_states=True)
    context = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)
    return context, out_2.text_embeds


def train_denoiser(pipe, cache: dict[str, torch.Tensor], work: Path, args, device) -> None:
    modules = {
        "unet": pipe.unet,
        "text_encoder": pipe.text_encoder,
        "text_encoder_2": pipe.text_encoder_2,
    }
    for m in modules.values():
        m.to(device).train().requires_grad_(True)
    ema = {f"ema_{k}": copy.deepcopy(m).eval().requires_grad_(False) for k, m in modules.items()}
    params = [p for m in modules.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    alphas = pipe.scheduler.alphas_cumprod.to(device)
    snr = alphas / (1 - alphas)
    weight = torch.clamp(snr, max=5.0) / snr  # min-SNR-5 for epsilon prediction
    scaling = pipe.vae.config.scaling_factor
    n = cache["latents"].shape[0]
    time_ids = torch.tensor([TIME_IDS], dtype=torch.float32, device=device)

    def loss_at(step: int) -> torch.Tensor:
        # Batches are a pure function of (seed, step), so a resumed run sees the same data.
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        idx = torch.randint(0, n, (args.batch,), generator=g)
        sized = torch.rand(args.batch, generator=g) < 0.5
        drop = (torch.rand(args.batch, generator=g) < 0.1).to(device)
        ids_1 = torch.where(sized[:, None], cache["ids_1s"][idx], cache["ids_1"][idx]).to(device)
        ids_2 = torch.where(sized[:, None], cache["ids_2s"][idx], cache["ids_2"][idx]).to(device)
        x0 = cache["latents"][idx].to(device) * scaling
        noise = torch.randn(x0.shape, generator=g).to(device)
        t = torch.randint(0, len(alphas), (args.batch,), generator=g).to(device)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        context, pooled = encode_text(pipe, ids_1, ids_2)
        keep = (~drop).float()
        context = context * keep.view(-1, 1, 1)
        pooled = pooled * keep.view(-1, 1)
        pred = pipe.unet(
            noisy,
            t,
            context,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.expand(len(t), -1)},
        ).sample
        loss = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
        return (loss * weight[t]).mean()

    def update_ema(step: int) -> None:
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, m in modules.items():
                for pe, p in zip(ema[f"ema_{k}"].parameters(), m.parameters(), strict=True):
                    pe.lerp_(p, 1 - decay)

    _fit(
        work,
        "unet",
        args.steps,
        {**modules, **ema},
        opt,
        work / "unet-ckpt.safetensors",
        lambda step: args.lr * _schedule(step, args.steps),
        loss_at,
        every=args.every,
        clip=params,
        after_step=update_ema,
        until=args.until,
    )


# ---------------------------------------------------------------- output


def save_pipeline(pipe, work: Path, out: Path, init: dict | None = None) -> None:
    """The EMA weights as a diffusers pipeline folder (fp32 safetensors), written atomically."""
    ckpt = work / "unet-ckpt.safetensors"
    targets = {
        "ema_unet": pipe.unet,
        "ema_text_encoder": pipe.text_encoder,
        "ema_text_encoder_2": pipe.text_encoder_2,
    }
    step, _ = load_train_state(ckpt, targets)
    decoder = work / "decoder.safetensors"
    if decoder.exists():
        load_train_state(
            decoder, {"decoder": pipe.vae.decoder, "post_quant_conv": pipe.vae.post_quant_conv}
        )
    if init is None:
        pipe.vae.register_to_config(scaling_factor=_cache_scaling(work / "cache.safetensors"))
    for m in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2, pipe.vae):
        m.to("cpu").eval().requires_grad_(False)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    info = {"unet_steps": step, "decoder_finetuned": decoder.exists()}
    if init is not None:
        info["unet_steps"] += init["unet_steps"]
        info["decoder_finetuned"] = init["decoder_finetuned"]
        info["continued_from"] = {"folder_unet_steps": init["unet_steps"], "steps_here": step}
    (tmp / "TRAINING.json").write_text(json.dumps(info, indent=2) + "\n")
    _drop_load_metadata(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"wrote {out} (UNet step {step})", flush=True)


LOAD_METADATA = {"_name_or_path", "is_local", "local_files_only"}


def _drop_load_metadata(folder: Path) -> None:
    """Remove what from_pretrained adds to the configs of a loaded (--init) pipeline when it
    is saved again: the loading machine's path and the tokenizers' load flags. A shipped
    folder must not carry them (the path is meaningless elsewhere)."""
    for path in folder.rglob("*.json"):
        config = json.loads(path.read_text())
        if isinstance(config, dict) and LOAD_METADATA & config.keys():
            kept = {k: v for k, v in config.items() if k not in LOAD_METADATA}
            path.write_text(json.dumps(kept, indent=2, sort_keys=True) + "\n")


def _log(work: Path, stage: str, step: int, total: int, loss: float, t0: float) -> None:
    elapsed = time.time() - t0
    line = {"stage": stage, "step": step, "loss": round(loss, 5), "elapsed_s": round(elapsed, 1)}
    with open(work / "log.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")
    print(f"{stage} {step}/{total} loss {loss:.4f} {elapsed:.0f}s", flush=True)


if __name__ == "__main__":
    main()
