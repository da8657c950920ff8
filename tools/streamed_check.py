"""Check a bundle's streamed weights against the model they came from, by sampling.

    python tools/streamed_check.py /tmp/flux16 random:flux --samples 8

For each component exported with streamed weights (manifest `extra.weights: streamed`,
export/streamed.py), `--samples` initializers drawn at random (seeded) and the last two
written are read from the graph (its external data) and compared bit for bit with the model's
own tensor, fetched from its weight source (`load_model(MODEL, weights="lazy")`) and
converted as the exporter converts it (transposed where the graph stores it transposed; fp16
as onnxruntime's converter). It checks the offsets, the transposes and the conversion where
a parity run does not fit in memory (a FLUX-size transformer). Exit code 1 on a mismatch.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("bundle")
    p.add_argument("model", help="what the bundle was exported from (folder or built-in)")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rows = check(Path(args.bundle), args.model, args.samples, args.seed)
    print(json.dumps(rows, indent=2))
    bad = [r for r in rows if not r["identical"]]
    print(f"{len(rows) - len(bad)} of {len(rows)} sampled weights identical", file=sys.stderr)
    sys.exit(1 if bad or not rows else 0)


def check(bundle: Path, model_ref: str, samples: int, seed: int) -> list[dict]:
    import numpy as np
    import onnx
    from onnx.external_data_helper import load_external_data_for_tensor
    from onnx.numpy_helper import to_array
    from slimdiff.export.components import plan_components
    from slimdiff.export.streamed import TRANSPOSED, fp16_as_ort
    from slimdiff.runtime.manifest import read_manifest

    from slimdiff.models import load_model
    from slimdiff.models.lazy import aliases, fetch_tensor, weight_source

    manifest = read_manifest(bundle)
    model = load_model(model_ref, weights="lazy")
    components = {c.name: c for c in plan_components(model)}
    rows = []
    for name, entry in manifest.components.items():
        if entry.format != "onnx" or entry.extra.get("weights") != "streamed":
            continue
        component = components[name]
        source = weight_source(component.model)
        names = aliases(component.model)
        keys = {n: names[id(p)] for n, p in component.module.named_parameters()}
        path = bundle / entry.path
        graph = onnx.load(str(path), load_external_data=False).graph
        stored = [t for t in graph.initializer if t.name.removesuffix(TRANSPOSED) in keys]
        picked = random.Random(seed).sample(stored, min(samples, len(stored))) + stored[-2:]
        for tensor in picked:
            external = tensor.data_location == onnx.TensorProto.EXTERNAL
            if external:  # small graphs keep their weights inline
                load_external_data_for_tensor(tensor, str(path.parent))
            got = to_array(tensor)
            base = tensor.name.removesuffix(TRANSPOSED)
            want = fetch_tensor(source, keys[base])
            if base != tensor.name:  # linear weights, stored transposed (2-D)
                want = want.t()
            want = (
                fp16_as_ort(want).numpy()
                if tensor.data_type == onnx.TensorProto.FLOAT16
                else want.float().numpy()
            )
            same = got.shape == want.shape and np.array_equal(
                got.view(np.uint8), np.ascontiguousarray(want).view(np.uint8)
            )
            rows.append(
                {
                    "component": name,
                    "initializer": tensor.name,
                    "shape": list(got.shape),
                    "identical": bool(same),
                }
            )
            if external:
                tensor.ClearField("raw_data")
    return rows


if __name__ == "__main__":
    main()
