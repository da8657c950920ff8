"""IO binding for onnxruntime sessions on a GPU: constant inputs copied to the device once,
outputs left where the graph wrote them until read, and optionally CUDA graphs.

The runtime speaks numpy, so a denoising loop would otherwise copy every input to the GPU
at every step, text embeddings included. The contract here: a feed whose numpy array is
read-only (`arr.flags.writeable == False`) is a constant. Its device copy is made on the
first call and reused for as long as the same array object is fed (the pipeline marks its
per-image conditioning read-only; see runtime/pipeline.py). Writable feeds, the latents,
are copied at each call, as onnxruntime's own `run` would.

CUDA graphs (`cuda_graph=True`; onnxruntime's `enable_cuda_graph` CUDA EP option) replay
the whole captured graph with one launch, which needs every input and output at a fixed
device address: each distinct set of input shapes gets its own persistent buffers and its
own `gpu_graph_id` (onnxruntime's multi-graph capture), and each call writes the feeds into
those buffers in place. UNVERIFIED on CUDA: no GPU was lent to this work. The same code
runs with device "cpu" in tests (tests/unit/test_ort_binding.py), which checks every
bookkeeping path; only the device string and the CUDA EP option differ on a GPU.

Threads: in graph mode a call fills shared buffers, replays, and reads them back, so each
runner (one per session) does that under its own lock: two calls at one shape would
otherwise overwrite each other's inputs, and CUDA forbids launching one graph from two
threads at once. The plain IO-binding path binds fresh buffers per call and takes no lock.
At most MAX_GRAPHS shape sets keep their buffers (least recently used first out).

`run_config` holds onnxruntime run config entries for every run (the backend's arena
shrinkage for graphs run once per image, runtime/backends/ort.py).

onnxruntime's documentation: https://onnxruntime.ai/docs/api/python/api_summary.html#iobinding
and https://onnxruntime.ai/docs/execution-providers/CUDA-ExecutionProvider.html#using-cuda-graphs-preview
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["MAX_GRAPHS", "BoundRunner"]

# Shape sets whose graph buffers a session keeps (CUDA-graph mode). A service sees a few
# sizes in rotation: the UNet runs at one shape per (size, batch), the VAE decoder at one per
# size, so 8 covers those; a caller cycling through many sizes would otherwise keep every
# one's persistent device buffers (169 sizes: 169 sets per session). An evicted set's
# buffers are freed; its shapes, seen again, get new buffers and a new graph id (a reused id
# would replay the old capture onto freed addresses). onnxruntime itself keeps the captured
# graph of every id until the session is released: its Python API cannot drop one.
MAX_GRAPHS = 8


@dataclass
class _Graph:
    """One input-shape set's graph: its onnxruntime graph id and persistent buffers."""

    graph_id: int
    inputs: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    # input name -> the read-only array whose values its buffer holds (copied no more)
    held: dict[str, np.ndarray] = field(default_factory=dict)


class BoundRunner:
    """Runs one onnxruntime session through IO binding on `device` ("cuda" or "cpu")."""

    def __init__(
        self,
        ort: Any,
        session: Any,
        output_names: list[str],
        device: str,
        device_id: int = 0,
        cuda_graph: bool = False,
        run_config: dict[str, str] | None = None,
    ) -> None:
        self._ort = ort
        self._session = session
        self._outputs = list(output_names)
        self._device = device
        self._device_id = device_id
        self._cuda_graph = cuda_graph
        self._run_config = dict(run_config or {})
        self._options = self._run_options() if self._run_config else None
        # name -> (the read-only array it was copied from, its device copy). The array is
        # held so its id cannot be reused by another object while the copy is cached.
        self._constants: dict[str, tuple[np.ndarray, Any]] = {}
        # CUDA graphs: input shapes -> their graph, least recently used first; ids from 1
        # (-1 = no capture), never reused
        self._graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self._last_id = 0
        self._lock = threading.Lock()  # graph mode: one call at a time fills, runs, reads
        self.copies = 0  # host-to-device input copies made (what tests and benches read)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Outputs in `output_names` order, as host numpy arrays."""
        if self._cuda_graph:
            return self._run_graph(feeds)
        binding = self._session.io_binding()
        for name, value in feeds.items():
            if value.flags.writeable:
                binding.bind_ortvalue_input(name, self._to_device(value))
            else:
                binding.bind_ortvalue_input(name, self._constant(name, value))
        for name in self._outputs:
            # Allocated by the session on the device; copied to the host once, below.
            binding.bind_output(name, self._device, self._device_id)
        self._session.run_with_iobinding(binding, self._options)
        return binding.copy_outputs_to_cpu()

    def _run_options(self) -> Any:
        options = self._ort.RunOptions()
        for key, value in self._run_config.items():
            options.add_run_config_entry(key, value)
        return options

    def _to_device(self, value: np.ndarray) -> Any:
        self.copies += 1
        return self._ort.OrtValue.ortvalue_from_numpy(value, self._device, self._device_id)

    def _constant(self, name: str, value: np.ndarray) -> Any:
        cached = self._constants.get(name)
        if cached is not None and cached[0] is value:
            return cached[1]
        device_copy = self._to_device(value)
        self._constants[name] = (value, device_copy)
        return device_copy

    def _run_graph(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        key = tuple(sorted((name, value.shape, value.dtype.str) for name, value in feeds.items()))
        with self._lock:
            graph = self._graph(key)
            self._fill(graph, feeds)
            binding = self._session.io_binding()
            for name, buffer in graph.inputs.items():
                binding.bind_ortvalue_input(name, buffer)
            for name in self._outputs:
                if name in graph.outputs:
                    binding.bind_ortvalue_output(name, graph.outputs[name])
                else:
                    # First call with these shapes: the session allocates the outputs; they
                    # are kept and bound from then on, before onnxruntime captures (it runs a
                    # few times uncaptured first, so the captured addresses are these).
                    binding.bind_output(name, self._device, self._device_id)
            options = self._run_options()
            # One captured graph per input-shape set (onnxruntime >= 1.17).
            options.add_run_config_entry("gpu_graph_id", str(graph.graph_id))
            self._session.run_with_iobinding(binding, options)
            if not graph.outputs:
                graph.outputs.update(zip(self._outputs, binding.get_outputs(), strict=True))
            # Read before the lock goes: numpy() copies a device buffer to the host; a CPU
            # buffer it would only view, and the next run would overwrite the result.
            host = [graph.outputs[name].numpy() for name in self._outputs]
            return [a.copy() for a in host] if self._device == "cpu" else host

    def _graph(self, key: tuple) -> _Graph:
        """The graph of input shapes `key`, now the most recently used; a new one (and the
        least recently used dropped, its buffers freed) if these shapes have none."""
        graph = self._graphs.get(key)
        if graph is not None:
            self._graphs.move_to_end(key)
            return graph
        while len(self._graphs) >= MAX_GRAPHS:
            self._graphs.popitem(last=False)
        self._last_id += 1
        graph = self._graphs[key] = _Graph(self._last_id)
        return graph

    def _fill(self, graph: _Graph, feeds: dict[str, np.ndarray]) -> None:
        """Write `feeds` into `graph`'s input buffers; a read-only feed the buffer already
        holds (the same array object as last time) is not copied again."""
        for name, value in feeds.items():
            if name not in graph.inputs:
                # Allocated, then filled: a buffer made from the array itself would, on the
                # CPU, alias the caller's memory, and the next in-place update write into it.
                graph.inputs[name] = self._ort.OrtValue.ortvalue_from_shape_and_type(
                    list(value.shape), value.dtype, self._device, self._device_id
                )
            elif not value.flags.writeable and graph.held.get(name) is value:
                continue
            graph.inputs[name].update_inplace(np.ascontiguousarray(value))
            self.copies += 1
            if value.flags.writeable:
                graph.held.pop(name, None)
            else:
                graph.held[name] = value
