"""Flax NNX models.

- :mod:`rljax.models.mlp`: actor-critic MLPs for classic control.
- :mod:`rljax.models.transformer`: decoder-only LMs (GPT-2 and Llama families), stacked layers,
  optional value or reward head.
- :mod:`rljax.models.hf`: load and save Hugging Face checkpoint folders (``config.json`` +
  safetensors) as :class:`~rljax.models.transformer.Transformer` models.
"""
