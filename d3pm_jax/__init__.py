"""d3pm_jax: discrete diffusion language models in JAX.

The package is layered; a module imports only from its own layer and the layers above it in this list
(``tests/test_layering.py`` enforces it):

1. the math, at the top of the package: ``schedules``, ``processes/``, ``blocks``, ``losses``, ``sampling``,
   ``draws`` (pure functions, no I/O) and ``_checks`` (argument checks every layer uses);
2. ``models/``: the networks;
3. ``runtime/``: meshes, hosts and crash-safe files;
4. ``config``: the one config boundary (ConfigDict in, frozen dataclasses out);
5. ``data/``: corpora, tokenizers, the prepared format, the input pipeline;
6. ``training/``: the train loop and its state, checkpoints, metrics and fault handling;
7. ``evaluation/``: likelihood, generation quality, workdir evaluation, comparisons, plots;
8. ``cli/``: the ``d3pm-*`` commands.

``pallas_kernels`` (beside this package) sits below all of them and imports nothing of ``d3pm_jax``.

Shape legend used in names throughout: B batch, L length, V states (mask included), D model width,
H heads, T discrete steps, K data states of a synthetic source.
"""
from d3pm_jax.processes import make_process
from d3pm_jax.schedules import get_schedule

__version__ = "0.1.0"
__all__ = ["make_process", "get_schedule"]
