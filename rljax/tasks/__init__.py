"""Built-in generated tasks (no downloads): prompts, data sets in TRL's formats, programmatic
oracles, tokenizers and warmed-up tiny base models.

- :mod:`rljax.tasks.sorting`: "sort the letters" (``"sort: dbca ->"`` -> ``" abcd"``), the
  default task of the preference and RLHF experiments.
- :mod:`rljax.tasks.arithmetic`: short arithmetic word problems in GSM8K's format
  (``"... How many apples now?"`` -> ``" 3+4=7\\n#### 7"``) with verifiable accuracy and format
  rewards, for RL with verifiable rewards (GRPO and kin).
"""

from rljax.tasks import arithmetic, sorting

__all__ = ["arithmetic", "sorting"]
