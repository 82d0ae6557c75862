"""Helpers shared by the peer benchmarks (``benchmarks/peers/trl_*.py``).

Not part of rljax and never imported by it. A peer script run as ``python
benchmarks/peers/X.py`` has this folder on ``sys.path``, so it imports the module as
``_peer_common`` whether or not rljax is installed in its environment. At module level the
module imports only the standard library (torch, transformers and trl are imported inside the
functions that need them), so ``benchmarks/grpo_vs_trl.py`` can use :func:`nearest_rank_summary`
from the rljax environment too, and nothing here imports jax.
"""

from __future__ import annotations

import json
import pathlib
import statistics


def build_tokenizer(vocab_size: int):
    """A word-level ``PreTrainedTokenizerFast`` whose vocabulary is the strings ``"0"`` ..
    ``str(vocab_size - 2)`` plus ``"</s>"`` (id ``vocab_size - 1``, EOS and pad): every id maps
    to exactly one token, so random ids written as text tokenise back to themselves."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {str(i): i for i in range(vocab_size - 1)}
    eos = "</s>"
    vocab[eos] = vocab_size - 1
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=eos))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=eos)
    fast.add_special_tokens({"eos_token": eos, "pad_token": eos})
    return fast


def llama_config(vocab_size: int, intermediate_size: int, **extra):
    """The ``transformers.LlamaConfig`` of the rljax side's benchmark model (hidden 256, 4
    layers, 4 heads, 4 KV heads, 256 positions, untied LM head as in ``LlamaConfig``'s
    default), the last id as EOS and pad, no BOS; ``extra`` adds fields (``num_labels``)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=intermediate_size,
        vocab_size=vocab_size,
        max_position_embeddings=256,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        bos_token_id=None,
        **extra,
    )


def cpu_training_args(**overrides) -> dict:
    """Keyword arguments for a TRL trainer config (``DPOConfig``, ``PPOConfig``,
    ``GRPOConfig``) that every peer shares: float32 on the CPU (``bf16``/``fp16`` off,
    ``use_cpu``), no gradient checkpointing, no dataloader workers, no reporting, logging,
    evaluation or saving, no progress bar, seed 0. ``overrides`` (the trainer's own settings)
    are added and win over these."""
    defaults = dict(
        bf16=False,
        fp16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        report_to=[],
        logging_strategy="no",
        eval_strategy="no",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    return {**defaults, **overrides}


def library_versions() -> dict[str, str]:
    """``{"trl", "torch", "transformers"}``: the versions of the peer's libraries."""
    import torch
    import transformers
    import trl

    return {
        "trl": trl.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def nearest_rank_summary(times: list[float]) -> dict | None:
    """Median, mean, 10th and 90th percentile (nearest rank: no interpolation) and count of
    ``times`` (``{"median_s", "mean_s", "p10_s", "p90_s", "n"}``); None when empty. Both sides
    of ``benchmarks/grpo_vs_trl.py`` summarise their iterations with it."""
    if not times:
        return None
    ordered = sorted(times)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]
    return {
        "median_s": statistics.median(times),
        "mean_s": statistics.fmean(times),
        "p10_s": pick(0.1),
        "p90_s": pick(0.9),
        "n": len(times),
    }


def emit_result(result: dict, json_path: str | None) -> dict:
    """Print ``result`` as one JSON line and, when ``json_path`` is given, write that line to
    it (creating its folder); returns ``result``."""
    line = json.dumps(result)
    print(line)
    if json_path:
        out = pathlib.Path(json_path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(line + "\n")
    return result
