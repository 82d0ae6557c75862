"""Preference and prompt data: load, validate, tokenize, pad and batch.

- :func:`load_rows`: rows from JSONL / JSON / parquet files or a saved HF ``datasets`` folder;
  :func:`load_numbered_rows` also gives the :class:`RowNumbers` that name each row as the file
  does (1-based line of a JSON-lines file, else 0-based row) in errors and reports;
- :func:`validate_preferences` / :func:`validate_completions`: TRL's standard and
  conversational formats, errors naming row and field, or skip-and-count;
- :func:`tokenize_preferences` / :func:`tokenize_completions` / :func:`tokenize_prompts`:
  padded numpy arrays (the batch contract of :mod:`rljax.dpo` and :mod:`rljax.updates.lm`);
- :func:`validate_conversations` / :func:`tokenize_conversations` / :func:`render_conversation`
  (:mod:`rljax.data.chat`): TRL's conversational ``messages`` SFT rows rendered with the chat
  template, every assistant turn trained on (assistant spans found from the template);
- :func:`share_prompts`: the shared-prompt layout (each pair's prompt stored and run once);
- :func:`pack` / :func:`pack_arrays`: several sequences per row with segment ids (no padding
  compute; supervised fine-tuning, :mod:`rljax.sft`), :class:`PackingReport`;
- :class:`Batches`: deterministic, resumable minibatches.

numpy only; ``pyarrow`` / ``datasets`` are imported when a parquet file / datasets folder is read.
"""

from rljax.data.batching import Batches
from rljax.data.chat import (
    render_conversation,
    tokenize_conversations,
    validate_conversations,
)
from rljax.data.load import RowNumbers, load_numbered_rows, load_rows
from rljax.data.packing import (
    PACKING_STRATEGIES,
    PackedArrays,
    PackingReport,
    pack,
    pack_arrays,
)
from rljax.data.preference import (
    SKIP_REASONS,
    ValidationReport,
    is_conversational,
    validate_completions,
    validate_preferences,
)
from rljax.data.prefix import SHARED_PROMPT_KEYS, share_prompts
from rljax.data.tokenize import (
    CompletionArrays,
    PreferenceArrays,
    TokenizationReport,
    tokenize_completions,
    tokenize_preferences,
    tokenize_prompts,
)

__all__ = [
    "PACKING_STRATEGIES",
    "SHARED_PROMPT_KEYS",
    "SKIP_REASONS",
    "Batches",
    "CompletionArrays",
    "PackedArrays",
    "PackingReport",
    "PreferenceArrays",
    "RowNumbers",
    "TokenizationReport",
    "ValidationReport",
    "is_conversational",
    "load_numbered_rows",
    "load_rows",
    "pack",
    "pack_arrays",
    "render_conversation",
    "share_prompts",
    "tokenize_completions",
    "tokenize_conversations",
    "tokenize_preferences",
    "tokenize_prompts",
    "validate_completions",
    "validate_conversations",
    "validate_preferences",
]
