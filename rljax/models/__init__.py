"""Flax NNX models: actor-critic MLPs for classic control (:mod:`rljax.models.mlp`)."""
