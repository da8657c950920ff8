"""EcoDiff pruning (`prune.ecodiff`): learned head and neuron masks over whole trajectories,
then a smaller dense model (arXiv 2412.02852).

Torch loads only where the pass runs; `units` (what is masked) is shared by the mask
learning (masks, train) and the hard pruning (slicing).
"""
