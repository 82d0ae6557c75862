"""Flax NNX models.

- :mod:`rljax.models.mlp`: actor-critic MLPs for classic control.
- :mod:`rljax.models.transformer`: decoder-only LMs (GPT-2, Llama and Gemma families, sliding
  windows), stacked layers, optional value or reward head.
- :mod:`rljax.models.moe`: mixture-of-experts MLPs (Qwen3-MoE, Mixtral) and the router's
  load-balancing loss.
- :mod:`rljax.models.hf`: load and save Hugging Face checkpoint folders (``config.json`` +
  safetensors) as :class:`~rljax.models.transformer.Transformer` models.
- :mod:`rljax.models.generate`: batched sampling with a KV cache, compiled once.
- :mod:`rljax.models.engine`: continuous batching (decode slots refilled as rows finish).
- :mod:`rljax.models.lora`: LoRA adapters (the frozen base, the trainable/frozen split the
  updates use, merge, Hugging Face peft's adapter format); also ``rljax.lora``.
"""
