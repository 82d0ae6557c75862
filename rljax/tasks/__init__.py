"""Built-in generated tasks (no downloads): prompts, data sets in TRL's formats, programmatic
oracles, tokenizers and warmed-up tiny base models.

- :mod:`rljax.tasks.sorting`: "sort the letters" (``"sort: dbca ->"`` -> ``" abcd"``), the
  default task of the preference and RLHF experiments.
"""

from rljax.tasks import sorting

__all__ = ["sorting"]
