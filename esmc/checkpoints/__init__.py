"""Finding, renaming and loading ESMC checkpoints, one module per job:

- :mod:`esmc.checkpoints.locate`: a registry name, Hugging Face repo id or local path becomes
  local weight files (the shipped weights, the hub cache, downloads);
- :mod:`esmc.checkpoints.layouts`: the published checkpoint layouts and the one function that
  renames their keys into ours (:func:`~esmc.checkpoints.layouts.legacy_name`);
- :mod:`esmc.checkpoints.load`: build the network on the meta device, check keys and shapes,
  read memory-mapped tensors and ``load_state_dict(strict=True, assign=True)``.

The layouts are described in ``docs/checkpoints.md``. Users load through
:meth:`esmc.ESMC.from_pretrained` (or :func:`esmc.weights.load_pretrained`).
"""


class WeightsError(ValueError):
    """Weights that cannot be found or do not fit the model; the message says what to do."""
