"""Drivers of the language-model preference experiments: Direct Preference Optimization
(:func:`train_dpo`, ``experiments/dpo.py``), KTO on unpaired completions (:func:`train_kto`,
``experiments/kto.py``), Bradley-Terry reward models
(:func:`train_reward_model`, ``experiments/reward_model.py``) and iterative (online) DPO
(:func:`train_iterative_dpo`, ``experiments/iterative_dpo.py``), supervised fine-tuning with
packing (:func:`train_sft`, ``experiments/sft.py``), and the stages they share.

A driver calls one named stage per line. :func:`load_run` resolves the model folder (a Hugging
Face checkpoint, or the built-in task's warmed-up base model), loads and validates preference
data (a file or the built-in task's generated pairs), tokenises it with the model's tokenizer
and builds the device mesh; :func:`dpo_run` or :func:`reward_run` compiles the update;
:func:`train_loop` runs it resumably: the train state and the data position are checkpointed
with orbax every ``checkpoint_every`` steps, and a run started again with the same ``--out``
folder continues from the last checkpoint with identical results (the data order is a function
of the seed and the position; nothing else is random); :func:`finish_run` exports the model;
the built-in task's oracle judges it (:func:`dpo_oracle`, :func:`oracle_agreement`); and
:func:`write_outputs` writes ``summary.json`` and the plot. Metrics go to ``out/metrics.jsonl``
and to the sinks named by ``--log`` (TensorBoard, Weights & Biases:
:class:`rljax.runs.MetricsLog`), a few sample completions of the final evaluation to
``out/samples.jsonl`` and the sinks' sample tables. The drivers hold their folder while they
run (:func:`in_run_folder`): a second run on it fails at once, and a resume with other settings
than the stored ``out/config.json`` is refused unless ``--allow-config-change``.

Multi-process runs (``python -m rljax.launch``, or one process per host on a cluster; the
drivers call :func:`rljax.sharding.initialize_from_env` first): every process resolves the same
model and loads and tokenises the same data (deterministic), draws the same global batches and
feeds only the rows its devices hold (:func:`rljax.sharding.shard_global_batch`), so a run over
N processes computes what one process over the same devices computes. Orbax checkpoints are
saved and restored by every process together (written once); ``metrics.jsonl``, summaries,
plots and the exported Hugging Face model are written by process 0 only. (Iterative DPO has
not been run on several processes.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import pathlib
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from rljax import checkpoint, checks, data, finite, runs, sharding, updates
from rljax.models import hf, lora
from rljax.models.generate import SamplingConfig, make_generate_fn
from rljax.models.transformer import with_head
from rljax.tasks import arithmetic, sorting
from rljax.updates import lm

__all__ = [
    "DPORunConfig",
    "IterativeDPORunConfig",
    "KTORunConfig",
    "PreferenceRunConfig",
    "PreferenceSetup",
    "RewardModelRunConfig",
    "RoundSetup",
    "SFTRunConfig",
    "adamw",
    "apply_layout",
    "build_mesh",
    "builtin",
    "dpo_oracle",
    "dpo_run",
    "final_eval",
    "finish_run",
    "in_run_folder",
    "kto_run",
    "load_kto_arrays",
    "load_preference_arrays",
    "load_reward_model",
    "load_run",
    "load_sft_data",
    "log_final_samples",
    "mean_metrics",
    "oracle_agreement",
    "oracle_win_rate",
    "pair_best_worst",
    "placer",
    "rank_correlation",
    "resolve_model",
    "resume",
    "reward_model_judge",
    "reward_run",
    "round_prompts",
    "run_round",
    "sample_completions",
    "sample_pairs",
    "saved_rounds",
    "sft_arrays",
    "sft_held_out",
    "sft_run",
    "sft_sequences",
    "train_and_export",
    "train_and_report",
    "train_dpo",
    "train_iterative_dpo",
    "train_kto",
    "train_loop",
    "train_reward_model",
    "train_round",
    "train_sft",
    "unpaired_rows",
    "validate_unpaired",
    "win_rate_vs_base",
    "write_outputs",
]


#: Completions of a final evaluation logged as samples (and, for DPO, kept in ``summary.json``).
EXAMPLES = 5


# ---------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class LoRARunSettings(runs.RunSettings):
    """The run settings of every language-model run (preference, SFT and RL), LoRA's among
    them (Hu et al., 2021, arXiv:2106.09685; :mod:`rljax.models.lora`).

    Attributes:
      lora_rank: rank of LoRA adapters on the model's projections, the base weights frozen
        (0 = full fine-tuning). The final model is saved merged (a plain Hugging Face folder)
        and, for causal LMs of the Llama family, as a peft adapter folder beside it.
      lora_alpha: LoRA's alpha (the update is scaled by alpha / rank); none = the rank.
      lora_dropout: dropout rate on the adapters' inputs in the training passes (not with
        TRPO's natural step).
      lora_targets: comma-separated projections to adapt (q,k,v,o,gate,up,down, or peft's
        q_proj, ...); none = every projection.
      lora_base_dtype: store the frozen base weights in this dtype (bfloat16: QLoRA-style
        memory, the adapters float32); none = as loaded.
    """

    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    lora_targets: str | None = None
    lora_base_dtype: str | None = None

    def __post_init__(self):
        super().__post_init__()
        checks.check(self, {"lora_rank": ">= 0", "lora_alpha": "> 0", "lora_dropout": "in [0, 1)"})
        unread = {"lora_alpha": None, "lora_dropout": 0.0, "lora_targets": None,
                  "lora_base_dtype": None}  # fmt: skip
        if self.lora_rank == 0:
            for field, default in unread.items():
                if getattr(self, field) != default:
                    raise ValueError(
                        f"{checks.flag(field)}: set to {getattr(self, field)!r}, but --lora-rank "
                        "is 0 (full fine-tuning), which does not read it; set --lora-rank or "
                        f"drop {checks.flag(field)}"
                    )
            return
        if self.lora_base_dtype is not None:
            checks.check_choice(self, "lora_base_dtype", ("bfloat16", "float16", "float32"))
        try:
            lora.parse_targets(self.lora_targets)
        except ValueError as e:
            raise ValueError(f"--lora-targets: {e}") from None

    def with_lora(self, model, label: str):
        """``model`` with LoRA adapters of these settings (:func:`rljax.models.lora.apply`;
        ``model`` itself for ``lora_rank`` 0), the trainable and total parameter counts
        printed."""
        if self.lora_rank:
            try:
                lora.apply(
                    model,
                    self.lora_rank,
                    alpha=self.lora_alpha,
                    dropout=self.lora_dropout,
                    targets=self.lora_targets,
                    rngs=nnx.Rngs(self.seed + 7),
                    base_dtype=self.lora_base_dtype,
                )
            except ValueError as e:  # e.g. a target this model lacks (gate on GPT-2)
                flag = "--lora-targets" if "targets" in str(e) else "--lora-rank"
                raise ValueError(f"{flag}: {e}") from None
        counts = parameter_counts(model)
        what = (
            f"LoRA rank {self.lora_rank} on {','.join(model.lora.targets)}"
            if model.lora
            else "full fine-tuning"
        )
        print(
            f"[{label}] {what}: {counts['trainable']:,} trainable of {counts['total']:,} "
            f"parameters ({100 * counts['trainable'] / counts['total']:.2f}%)",
            flush=True,
        )
        return model


def parameter_counts(model) -> dict[str, Any]:
    """``{"trainable", "total", "lora"}`` of ``model`` for a run's summary: the parameter counts
    (:func:`rljax.models.lora.trainable_count`, :func:`rljax.models.lora.total_count`) and the
    adapters' settings (rank, alpha, targets, rsLoRA, dropout; None without adapters)."""
    settings = getattr(model, "lora", None)
    return {
        "trainable": lora.trainable_count(model),
        "total": lora.total_count(model),
        "lora": None if settings is None else runs.to_json(dataclasses.asdict(settings)),
    }


def export_model(model, folder: pathlib.Path, tokenizer):
    """Save ``model`` as a Hugging Face folder ``folder``; a model with LoRA adapters is saved
    merged (:func:`rljax.models.lora.merge`), and, for a Llama-family model without a reward
    head, its adapters as a peft folder ``<folder>_adapter`` too (GPT-2's peft adapters are
    fused, a reward model's head is no causal-LM adapter: these are saved merged only). A value
    head is dropped (training machinery). Returns the saved (merged) model."""
    if getattr(model, "lora", None) is not None:
        if model.config.family != "gpt2" and model.config.head != "reward":
            lora.save_peft(model, folder.parent / f"{folder.name}_adapter")
        model = lora.merge(model)
    if model.config.head == "value":
        model = with_head(model, None, rngs=nnx.Rngs(0), lm_head=True)
    hf.save_model(model, folder, tokenizer=tokenizer)
    return model


@dataclasses.dataclass(frozen=True)
class TrainRunConfig(LoRARunSettings):
    """Settings shared by the offline training runs (preference pairs, demonstrations).

    Attributes:
      model: a Hugging Face checkpoint folder (gpt2, llama, mistral, qwen2, qwen3, gemma2,
        gemma3_text, ...: rljax.models.hf.SUPPORTED_MODEL_TYPES); none =
        the built-in task's tiny base model (warmed up once and cached under runs/builtin).
      data: the training examples (JSONL, JSON, parquet or a saved datasets folder) in one of
        TRL's formats; none = the built-in task's.
      eval_data: held-out examples; none = the built-in test split, or 10% of --data.
      out: output folder (checkpoints, metrics.jsonl, summary.json, plots, the final model).
      steps: optimizer steps.
      batch_size: examples per step.
      learning_rate: AdamW peak learning rate (linear warm-up over 10% of the steps).
      max_length: tokens per sequence (prompt + completion).
      overflow: truncate or drop examples longer than max_length (counted and reported).
      skip_invalid: skip and count invalid rows instead of failing on the first.
      log_every: steps between progress lines.
      eval_every: steps between held-out evaluations (0 = only at the end).
      checkpoint_every: steps between checkpoints (the last step is always saved).
    """

    model: str | None = None
    data: str | None = None
    eval_data: str | None = None
    out: str = "runs/dpo"
    steps: int = 300
    batch_size: int = 32
    learning_rate: float = 1e-3
    max_length: int = 32
    overflow: str = "truncate"
    skip_invalid: bool = False
    log_every: int = 25
    eval_every: int = 100
    checkpoint_every: int = 100


@dataclasses.dataclass(frozen=True)
class PreferenceRunConfig(TrainRunConfig):
    """Settings shared by the preference experiments.

    Attributes:
      data: preference pairs (JSONL, JSON, parquet or a saved datasets folder, TRL's standard or
        conversational format); none = the built-in task's generated pairs.
      eval_data: held-out pairs; none = the built-in test split, or 10% of --data.
      batch_size: pairs per step.
      max_prompt_length: prompt tokens kept (its end).
      overflow: truncate or drop pairs longer than max_length.
      train_pairs: generated training pairs (built-in task only).
      eval_pairs: generated held-out pairs (built-in task only).
      share_prompt: run each pair's prompt once (rljax.data.share_prompts; same losses,
        fewer FLOPs: both completions attend to one prompt key/value cache).
    """

    max_prompt_length: int = 16
    train_pairs: int = 4096
    eval_pairs: int = 512
    share_prompt: bool = False

    def __post_init__(self):
        _check_run_settings(
            self, {"max_prompt_length": ">= 1", "train_pairs": ">= 1", "eval_pairs": ">= 1"}
        )


def _check_run_settings(config, data_rules: Mapping[str, str]) -> None:
    """The checks a preference or SFT run's settings share (:func:`rljax.checks.check`, the
    first field out of range raises): the run's lengths and rates, ``data_rules`` (its data
    sizes) among them, and ``overflow``; the LoRA settings."""
    LoRARunSettings.__post_init__(config)
    checks.check(
        config,
        {
            "steps": ">= 1",
            "batch_size": ">= 1",
            "learning_rate": "> 0",
            "max_length": ">= 2",  # one prompt and one completion token
            **data_rules,
            "log_every": ">= 1",
            "eval_every": ">= 0",
            "checkpoint_every": ">= 1",
        },
    )
    checks.check_choice(config, "overflow", ("truncate", "drop"))


@dataclasses.dataclass(frozen=True)
class DPOLossSettings:
    """The DPO loss's settings as flags (those of :class:`rljax.updates.DPOConfig`, the loss
    types as text), shared by the offline and online DPO runs.

    Attributes:
      beta: DPO's beta (strength of the KL regularisation to the reference).
      loss_type: a TRL loss type, or several separated by commas (sigmoid,ipo,...).
      loss_weights: comma-separated weights, one per loss type (empty = 1 each).
      rpo_alpha: weight of the chosen NLL term (RPO, Pang et al., 2024); none = off. The default
        0.5 keeps the chosen completions likely: with plain DPO on the built-in sorting task
        both log-probs fall and the policy's samples stop being valid permutations (oracle
        win-rate 0.17 against 0.70 with 0.5, 300 steps; benchmarks/RESULTS.md).
    """

    beta: float = 0.1
    loss_type: str = "sigmoid"
    loss_weights: str = ""
    rpo_alpha: float | None = 0.5

    def dpo_config(self, **settings) -> updates.DPOConfig:
        """The :class:`rljax.updates.DPOConfig` of these flags and ``settings`` (its other
        fields: ``reference``, ``chunk_size``)."""
        types = tuple(t.strip() for t in self.loss_type.split(",") if t.strip())
        try:
            weights = tuple(float(w) for w in self.loss_weights.split(",") if w.strip()) or None
        except ValueError:
            raise ValueError(
                f"--loss-weights {self.loss_weights!r}: expected numbers separated by commas, "
                "one per loss type"
            ) from None
        return updates.DPOConfig(
            beta=self.beta,
            loss_type=types[0] if len(types) == 1 else types,
            loss_weights=weights,
            rpo_alpha=self.rpo_alpha,
            **settings,
        )


@dataclasses.dataclass(frozen=True)
class DPORunConfig(DPOLossSettings, PreferenceRunConfig):
    """Direct Preference Optimization (Rafailov et al., 2023).

    Attributes:
      reference: precomputed (reference log-probs computed once over the data), model (a frozen
        reference forward pass per batch) or none (reference-free).
      chunk_size: token rows per chunk of the log-prob computation.
      win_rate_prompts: held-out prompts sampled for the oracle win-rate (built-in task).
      out: output folder (checkpoints, metrics.jsonl, summary.json, training.png, policy/).
    """

    reference: str = "precomputed"
    chunk_size: int = 1024
    win_rate_prompts: int = 512

    def __post_init__(self):
        super().__post_init__()
        checks.check(self, {"win_rate_prompts": ">= 1"})
        self.dpo_config()  # DPOConfig checks beta, rpo_alpha, the loss types, ...

    def dpo_config(self) -> updates.DPOConfig:
        """The update's :class:`rljax.updates.DPOConfig`."""
        return super().dpo_config(reference=self.reference, chunk_size=self.chunk_size)


@dataclasses.dataclass(frozen=True)
class RewardModelRunConfig(PreferenceRunConfig):
    """Bradley-Terry reward model (Ouyang et al., 2022; TRL's RewardTrainer).

    Attributes:
      center_rewards_coefficient: weight of the mean-squared-reward penalty (Eisenstein et al.,
        2023); none = off.
      out: output folder (checkpoints, metrics.jsonl, summary.json, training.png,
        reward_model/).
    """

    center_rewards_coefficient: float | None = None
    out: str = "runs/reward_model"

    def __post_init__(self):
        super().__post_init__()
        self.reward_config()  # RewardConfig checks center_rewards_coefficient

    def reward_config(self) -> updates.RewardConfig:
        return updates.RewardConfig(center_rewards_coefficient=self.center_rewards_coefficient)


# ---------------------------------------------------------------------------- run folder, model, mesh


def in_run_folder(
    main: Callable | None = None,
    *,
    length_field: str | None = "steps",
    progress: Callable[[pathlib.Path], int | None] | None = None,
) -> Callable:
    """Decorate a driver ``main(config, ...)`` so that it runs holding its output folder
    ``config.out`` (:class:`rljax.runs.RunFolder`): one run per folder (a lock, taken by process
    0), and a resume refused when its settings differ from the stored ones unless
    ``config.allow_config_change``; ``length_field`` names the setting a resume may not shrink
    below the saved progress, and ``progress(folder)`` finds that progress (default: the newest
    step folder in ``folder/checkpoints``). It first joins a multi-process run
    (:func:`rljax.sharding.initialize_from_env`), which must precede any other JAX call.

    Use as ``@in_run_folder`` or ``@in_run_folder(length_field=..., progress=...)``."""

    def wrap(main: Callable) -> Callable:
        @functools.wraps(main)
        def run_in_folder(config, *args, **kwargs):
            sharding.initialize_from_env()  # a multi-process run (rljax.launch); no-op otherwise
            folder = runs.RunFolder(
                config.out,
                dataclasses.asdict(config),
                allow_change=getattr(config, "allow_config_change", False),
                length_field=length_field,
                progress=progress,
                primary=sharding.is_primary(),
            )
            with folder:
                return main(config, *args, **kwargs)

        return run_in_folder

    return wrap if main is None else wrap(main)


def builtin(config: PreferenceRunConfig) -> bool:
    """Whether the run uses the built-in task (its oracle can then score samples)."""
    return config.data is None


def resolve_model(config: PreferenceRunConfig, base_model: Callable[[], str] | None = None) -> str:
    """The model folder: ``config.model``, or the cached built-in base model,
    ``base_model()`` (default: the sorting task's, :func:`rljax.tasks.sorting.default_base_model`;
    in a multi-process run process 0 builds it first and the others wait, then find it
    cached)."""
    if config.model is None:
        base_model = sorting.default_base_model if base_model is None else base_model
        if jax.process_count() > 1:
            if sharding.is_primary():
                base_model()
            sharding.barrier("rljax.experiment.resolve_model")
        return base_model()
    checks.require_folder("--model", config.model, "Hugging Face checkpoint folder")
    return config.model


def build_mesh(spec: str):
    """The mesh of ``spec`` (``data=2,fsdp=2,tensor=2``), or one device for ``""``; in a
    multi-process run ``""`` means ``data=-1`` (data parallel over every process's devices)
    and any spec must cover all of ``jax.devices()``."""
    if not spec:
        if jax.process_count() > 1:
            return sharding.make_mesh({"data": -1})
        return sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    return sharding.make_mesh(spec)


# ---------------------------------------------------------------------------- data


_Split = tuple[list[dict], data.RowNumbers]  # rows, and where each lies in the user's file


def _file_rows(path: str, option: str) -> _Split:
    """The rows of ``path`` (given as ``option``) with their numbers; an empty file raises."""
    rows, numbering = data.load_numbered_rows(path)
    if not rows:
        raise ValueError(
            f"{option} {path}: the file holds 0 rows (it is empty, or only blank lines); "
            "give a file with at least one preference pair"
        )
    return rows, numbering


def _generated_rows(config: PreferenceRunConfig) -> tuple[_Split, _Split, str]:
    """The built-in task's generated pairs, written to ``out/data`` by process 0 (the others
    generate the same rows apart from its files)."""
    folder = pathlib.Path(config.out) / "data"

    def generated(root) -> tuple[_Split, _Split, str]:
        paths = sorting.write_dataset(root, config.train_pairs, config.eval_pairs, config.seed)
        train = _file_rows(paths["train"], "built-in pairs")
        test = _file_rows(paths["test"], "built-in pairs")
        return train, test, str(folder)

    if sharding.is_primary():
        return generated(folder)
    with tempfile.TemporaryDirectory() as own:
        return generated(own)


def _rows(config: PreferenceRunConfig) -> tuple[_Split, _Split, str]:
    """``(train, held_out, source)``: each split's rows with their :class:`rljax.data.RowNumbers`
    (numbered as the user's file numbers them, also when the held-out split is carved from
    ``--data``)."""
    if builtin(config):
        return _generated_rows(config)
    train, numbering = _file_rows(config.data, "--data")
    if config.eval_data is not None:
        return (train, numbering), _file_rows(config.eval_data, "--eval-data"), config.data
    if len(train) < 2:
        raise ValueError(
            f"--data {config.data}: the file holds {len(train)} row, too few to split: the "
            "held-out evaluation split is carved from it (10%, at least 1 row) and the rest is "
            "trained on, so it needs at least 2 rows; add rows or pass --eval-data"
        )
    order = np.random.default_rng(config.seed).permutation(len(train))
    n_eval = max(1, len(train) // 10)
    held_out, kept = sorted(order[:n_eval]), sorted(order[n_eval:])
    return (
        ([train[i] for i in kept], numbering.take(kept)),
        ([train[i] for i in held_out], numbering.take(held_out)),
        config.data,
    )


def _lengths(config: PreferenceRunConfig) -> dict[str, Any]:
    """The length settings of a preference run's tokenisation (``rljax.data.tokenize_*``):
    rows of ``max_length`` tokens, padded to it, with the last ``max_prompt_length`` prompt
    tokens; a longer row is cut or dropped as ``overflow`` says."""
    return {
        "max_length": config.max_length,
        "max_prompt_length": config.max_prompt_length,
        "overflow": config.overflow,
        "pad_to": config.max_length,
    }


def load_preference_arrays(
    config: PreferenceRunConfig, tokenizer
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, Any]]:
    """Train and held-out arrays (the :mod:`rljax.data` batch contract, padded to
    ``max_length``) and a report of what validation and tokenisation kept, truncated, dropped
    and skipped, and of the tokens outside the vocabulary; the report is printed (both splits,
    before a split with no pairs left raises). Errors and reports name rows as the user's file
    numbers them (the 1-based line of a JSON-lines file, else the 0-based row)."""
    train_split, eval_split, source = _rows(config)
    report: dict[str, Any] = {"source": source}
    arrays, empty = [], []
    for name, (rows, numbering) in (("train", train_split), ("eval", eval_split)):
        valid, validation = data.validate_preferences(
            rows, skip_invalid=config.skip_invalid, numbering=numbering
        )
        tokens, tokenization = data.tokenize_preferences(
            valid, tokenizer, **_lengths(config), numbering=numbering.take(validation.kept_rows)
        )
        print(f"{name} data ({numbering.source}): {validation}; {tokenization}", flush=True)
        report[name] = {
            "rows": len(rows),
            "valid": validation.kept,
            "skipped": dict(validation.skipped),
            "pairs": len(tokens["chosen_tokens"]),
            "truncated": tokenization.truncated,
            "dropped": tokenization.dropped,
            "unknown_tokens": tokenization.unknown_tokens,
            "unknown_token_rows": tokenization.unknown_rows,
        }
        if len(tokens["chosen_tokens"]) == 0:
            empty.append(
                f"{name} data ({numbering.source}): no pairs left of {len(rows)} rows "
                f"({validation.num_skipped} skipped as invalid, {tokenization.dropped} dropped as "
                "longer than --max-length; see the report above)"
            )
        arrays.append({k: np.asarray(v) for k, v in dict(tokens).items()})
    if empty:
        raise ValueError("; ".join(empty))
    return arrays[0], arrays[1], report


class PreferenceSetup(NamedTuple):
    """What a preference run starts from (:func:`load_run`)."""

    model_path: str  # the model folder (--model, or the built-in base model)
    tokenizer: Any
    graphdef: Any  # the model, split: nnx.split(model)
    params: Any
    train: dict[str, np.ndarray]  # tokenised pairs (the rljax.data batch contract)
    held_out: dict[str, np.ndarray]
    data_report: dict[str, Any]  # what validation and tokenisation kept (load_preference_arrays)
    mesh: Any


def load_run(
    config: PreferenceRunConfig,
    load_model: Callable = hf.load_model,
    load_arrays: Callable | None = None,
    base_model: Callable[[], str] | None = None,
    *,
    label: str = "run",
) -> PreferenceSetup:
    """Resolve the model folder (:func:`resolve_model`, ``base_model`` the built-in one), load
    its tokenizer and ``load_model(folder)``, load and tokenise the data with
    ``load_arrays(config, tokenizer)`` (default :func:`load_preference_arrays`) and build the
    mesh of ``config.mesh``. With ``--lora-rank`` the model gets LoRA adapters
    (:meth:`LoRARunSettings.with_lora`) and ``params`` are :func:`rljax.models.lora.split`'s."""
    model_path = resolve_model(config, base_model)
    tokenizer = hf.load_tokenizer(model_path)
    graphdef, params = lora.split(config.with_lora(load_model(model_path), label))
    load_arrays = load_preference_arrays if load_arrays is None else load_arrays
    train, held_out, data_report = load_arrays(config, tokenizer)
    mesh = build_mesh(config.mesh)
    return PreferenceSetup(
        model_path, tokenizer, graphdef, params, train, held_out, data_report, mesh
    )


# ---------------------------------------------------------------------------- compiled updates


def adamw(config: PreferenceRunConfig) -> optax.GradientTransformation:
    """AdamW with global-norm clipping at 1, linear warm-up over 10% of the steps and cosine
    decay to 10% of the peak learning rate."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0,
        config.learning_rate,
        max(1, config.steps // 10),
        config.steps,
        0.1 * config.learning_rate,
    )
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.0))


def placer(mesh, batch_shardings) -> Callable:
    """The batch placement of a step compiled by :func:`rljax.updates.lm.compile_update`: a global
    batch (the same in every process) to global arrays. One process: ``jax.device_put(batch,
    batch_shardings)``; several: each process feeds its own rows
    (:func:`rljax.sharding.shard_global_batch`, the same shardings)."""
    if jax.process_count() == 1:
        return lambda batch: jax.device_put(batch, batch_shardings)
    return lambda batch: sharding.shard_global_batch(batch, mesh)


def apply_layout(config: PreferenceRunConfig, *splits: dict[str, np.ndarray]) -> None:
    """With ``config.share_prompt``, rewrite each split in place into the shared-prompt layout
    (:func:`rljax.data.share_prompts`, padded to the split's longest prompt and completion);
    otherwise leave them as they are."""
    if not config.share_prompt:
        return
    for arrays in splits:
        shared = data.share_prompts(arrays)
        arrays.clear()
        arrays.update(shared)


class _Family(NamedTuple):
    """An update family of :mod:`rljax.updates`: ``make_update(graphdef, optimizer,
    settings)``, ``init_state(params, optimizer, *reference)``, ``make_eval(graphdef,
    settings)``."""

    make_update: Callable
    init_state: Callable
    make_eval: Callable


_DPO = _Family(updates.make_dpo_update, updates.init_dpo_state, updates.make_dpo_eval)
_KTO = _Family(updates.make_kto_update, updates.init_kto_state, updates.make_kto_eval)
_REWARD = _Family(updates.make_reward_update, updates.init_reward_state, updates.make_reward_eval)
_SFT = _Family(updates.make_sft_update, updates.init_sft_state, updates.make_sft_eval)


def _compiled(
    family: _Family, settings, graphdef, params, train, held_out, config, mesh, *reference,
    held_out_mean: Callable | None = None,
):  # fmt: skip
    """``(state, step_fn, place, evaluate)`` of ``family``'s update with ``settings`` under
    :func:`adamw`: the placed initial state (``params``, then ``reference``), the compiled
    donated step (:func:`rljax.updates.lm.compile_update`, shaped by ``train``'s first batch),
    the batch placement and ``held_out_mean`` (default :func:`mean_metrics`) of the family's
    evaluation over ``held_out``."""
    optimizer = adamw(config)
    example = {k: v[: config.batch_size] for k, v in train.items()}
    state, step_fn, batch_shardings = lm.compile_update(
        family.make_update(graphdef, optimizer, settings),
        family.init_state(params, optimizer, *reference),
        example,
        mesh,
    )
    place = placer(mesh, batch_shardings)
    eval_fn = jax.jit(family.make_eval(graphdef, settings))
    held_out_mean = mean_metrics if held_out_mean is None else held_out_mean
    evaluate = lambda s: held_out_mean(eval_fn, s, held_out, place, config.batch_size)
    return state, step_fn, place, evaluate


def dpo_run(graphdef, params, train, held_out, config: DPORunConfig, mesh, reference_params=None):
    """Everything a DPO training loop needs: reference log-probs added to ``train`` and
    ``held_out`` (``reference="precomputed"``), the placed initial state, the compiled donated
    step, the batch placement and the held-out evaluation. The reference policy is
    ``reference_params`` (default: ``params``, the initial policy). With
    ``config.share_prompt`` the arrays are first rewritten in place into the shared-prompt
    layout (:func:`rljax.data.share_prompts`, padded to the longest prompt and completion of
    each split).

    Returns ``(state, step_fn, place, evaluate)``.
    """
    dpo_config = config.dpo_config()
    reference_params = params if reference_params is None else reference_params
    apply_layout(config, train, held_out)
    return _with_reference(
        _DPO, dpo_config, lm.reference_logps, reference_params, graphdef, params, train,
        held_out, config, mesh,
    )  # fmt: skip


def _with_reference(
    family, settings, reference_logps, reference_params, graphdef, params, train, held_out,
    config, mesh,
):  # fmt: skip
    """:func:`_compiled` of a DPO-family update whose reference policy is
    ``reference_params``: with ``reference="precomputed"`` its log-probs,
    ``reference_logps(graphdef, reference_params, arrays, chunk_size=...)``, are added to both
    splits; with ``"model"`` a copy of it (kept apart from the donated train state) goes into
    the state; with ``"none"`` there is none."""
    if config.reference == "precomputed":
        for arrays in (train, held_out):
            arrays.update(
                reference_logps(graphdef, reference_params, arrays, chunk_size=config.chunk_size)
            )
    ref_params = jax.tree.map(jnp.copy, reference_params) if config.reference == "model" else None
    if ref_params is not None and lora.has_lora(params) and reference_params is params:
        ref_params = None  # the base with the adapters off (init_dpo_state): no second copy
    return _compiled(family, settings, graphdef, params, train, held_out, config, mesh, ref_params)


def reward_run(graphdef, params, train, held_out, config: RewardModelRunConfig, mesh):
    """What :func:`dpo_run` gives, for a Bradley-Terry reward model (``params`` with a reward
    head): ``(state, step_fn, place, evaluate)``, the arrays first rewritten into the
    shared-prompt layout with ``config.share_prompt``."""
    reward_config = config.reward_config()
    apply_layout(config, train, held_out)
    return _compiled(_REWARD, reward_config, graphdef, params, train, held_out, config, mesh)


# ---------------------------------------------------------------------------- training loop


def mean_metrics(evaluate: Callable, state, arrays: Mapping[str, np.ndarray], place, batch_size):
    """Mean of ``evaluate(state, batch)`` over the whole of ``arrays`` in batches of
    ``batch_size`` (the last one filled with repeated rows, which are not counted); ``place``
    puts a batch on the mesh (:func:`placer`)."""
    n = len(next(iter(arrays.values())))
    totals: dict[str, float] = {}
    for start in range(0, n, batch_size):
        index = np.minimum(np.arange(start, start + batch_size), n - 1)
        keep = min(batch_size, n - start)
        metrics = sharding.to_host(evaluate(state, place({k: v[index] for k, v in arrays.items()})))
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + float(v) * keep
    return {k: v / n for k, v in totals.items()}


def resume(ckpt: checkpoint.Checkpointer, state, length: int, unit: str = "step"):
    """``(position, state, extra)`` of the newest checkpoint in ``ckpt`` that restores into the
    shapes and shardings of ``state`` (damaged newer ones are skipped with a warning,
    :meth:`rljax.checkpoint.Checkpointer.restore_latest`), or ``(0, state, None)`` without one.

    Raises ``ValueError`` (closing ``ckpt``) when the checkpoint lies past the run's ``length``
    (``--steps`` or ``--iterations``, after ``unit``): finishing would export a longer-trained
    model labelled with the shorter length."""
    restored = ckpt.restore_latest(checkpoint.abstract_like(state))
    if restored is None:
        return 0, state, None
    if restored[0] > length:
        ckpt.close()
        raise ValueError(
            f"{ckpt.directory} holds {unit} {restored[0]}, past --{unit}s {length}: use "
            f"--{unit}s {restored[0]} or more to continue that run, or a new --out"
        )
    return restored


def train_loop(
    *,
    label: str,
    config: PreferenceRunConfig,
    state,
    step_fn: Callable,
    train_arrays: Mapping[str, np.ndarray],
    place: Callable,
    evaluate: Callable[[Any], Mapping[str, float]] | None,
    progress_keys: tuple[str, ...],
    checkpoint_dir: str | os.PathLike | None = None,
    extra: Mapping[str, Any] | None = None,
    shuffle: bool = True,
) -> tuple[Any, runs.MetricsLog, dict[str, Any]]:
    """Run ``config.steps`` steps of ``step_fn(state, batch) -> (state, metrics)``, resuming
    from the last checkpoint in ``checkpoint_dir`` (default ``out/checkpoints``) if there is
    one (the newest that restores: :func:`resume`). Logs every ``log_every`` steps to
    ``out/metrics.jsonl`` and the sinks of ``config.log``, evaluates (``evaluate(state) ->
    metrics``, logged with an ``eval/`` prefix) every ``eval_every`` steps and at the end, and
    checkpoints every ``checkpoint_every`` steps and at the end. Returns ``(state, log, info)``.
    ``shuffle=False`` draws the batches in the rows' order (:class:`rljax.data.Batches`).

    The log is returned open, for the final evaluation's samples (:func:`log_final_samples`):
    the caller closes it (``with log:`` marks a W&B run failed when its block raises). When
    the loop itself raises (an interruption, a non-finite stop) it is closed as failed.

    A step whose update was non-finite (its ``nonfinite`` metric, :mod:`rljax.finite`) left
    the state unchanged; ``config.max_nonfinite_updates`` of them in a row stop the run with a
    ``FloatingPointError`` naming the step and the last good checkpoint, and a state with a
    non-finite value is never checkpointed.

    Multi-process: every process runs the loop (and the collective orbax saves and restores)
    with the same global batches; only process 0 writes the metrics."""
    out = pathlib.Path(config.out)
    ckpt = checkpoint.Checkpointer(checkpoint_dir or out / "checkpoints", max_to_keep=2)
    batches = data.Batches(train_arrays, config.batch_size, seed=config.seed, shuffle=shuffle)
    start, state, saved = resume(ckpt, state, config.steps, "step")
    if saved is not None:
        batches.restore(saved["data"])
        print(f"[{label}] resumed from checkpoint step {start} in {ckpt.directory}", flush=True)
    stop = finite.NonfiniteStop(config.max_nonfinite_updates, label, ckpt.directory)
    if start:
        stop.saved(start)
    log = None
    try:
        log = runs.MetricsLog(
            out / "metrics.jsonl",
            label,
            config.steps,
            resume_step=start,
            keys=progress_keys,
            write=sharding.is_primary(),
            sinks=config.log,
            config=dataclasses.asdict(config),
        )
        for step in range(start + 1, config.steps + 1):
            state, metrics = step_fn(state, place(next(batches)))
            stop.observe(step, metrics)  # the previous step's `nonfinite`; this one stays queued
            last = step == config.steps
            row = {}
            if step % config.log_every == 0 or last or step == 1:
                row.update(sharding.to_host(metrics))
            if evaluate is not None and (
                last or (config.eval_every and step % config.eval_every == 0)
            ):
                row.update({f"eval/{k}": v for k, v in evaluate(state).items()})
            if row:
                log.log(step, row)
            if step % config.checkpoint_every == 0 or last:
                stop.before_save(step, state)  # raises rather than save a non-finite state
                ckpt.save(step, state, {"data": batches.state(), **(extra or {})}, force=True)
                stop.saved(step)
        stop.flush()
    except BaseException:
        if log is not None:
            log.close(failed=True)  # marks a W&B run failed
        raise
    finally:
        ckpt.close()  # finishes a save in flight, also when the run is interrupted
    return state, log, {"resumed_from": start or None}


def log_final_samples(log: runs.MetricsLog, step: int, rows: Sequence[Mapping[str, Any]]):
    """Record a few sample completions of the evaluation after the last step ``step``
    (:meth:`rljax.runs.MetricsLog.log_samples`), unless ``samples.jsonl`` holds that step
    already: a run resumed from its last checkpoint keeps what the interrupted run recorded."""
    if log.write and log.samples_path.exists():
        if any(row.get("step") == step for _, row in runs.read_jsonl(log.samples_path)):
            return
    log.log_samples(step, rows)


# ---------------------------------------------------------------------------- the end of a run


def final_eval(rows) -> dict[str, Any]:
    """The held-out metrics (``eval/...``) of the last logged row, without the prefix (a
    non-finite value, logged as null, comes back as NaN so that it still formats)."""
    if not rows:
        return {}
    return {
        k[len("eval/") :]: float("nan") if v is None else v
        for k, v in rows[-1].items()
        if k.startswith("eval/")
    }


def finish_run(
    config: PreferenceRunConfig,
    setup: PreferenceSetup,
    params,
    log: runs.MetricsLog,
    info: Mapping[str, Any],
    *,
    started: float,
    folder: str,
):
    """Save the trained model (``params`` of ``setup.graphdef``) as a Hugging Face folder
    ``out/folder`` (:func:`export_model`: with LoRA merged, the peft adapters in
    ``out/<folder>_adapter``) and build the common part of ``summary.json`` (the run took since
    ``started``, a ``time.perf_counter()``). Returns ``(model, summary)``.

    Multi-process: every process calls it (the parameters are gathered to every host, a
    collective); process 0 alone writes the folder."""
    out = pathlib.Path(config.out)
    finite.require_finite(params, f"not exporting the model to {out / folder}")
    model = lm.merge(setup.graphdef, sharding.to_host(params))
    if sharding.is_primary():
        export_model(model, out / folder, setup.tokenizer)
    summary = {
        "model": setup.model_path,
        "parameters": parameter_counts(model),
        "steps": config.steps,
        "eval": final_eval(log.rows()),
        "data": dict(setup.data_report),
        "resumed_from": info["resumed_from"],
        "wall_seconds": round(time.perf_counter() - started, 2),
        "devices": int(setup.mesh.size),
        "processes": jax.process_count(),
        "config": dataclasses.asdict(config),
        **runs.config_record(out),  # the original settings, after --allow-config-change
    }
    return model, summary


def train_and_export(
    config: PreferenceRunConfig,
    setup: PreferenceSetup,
    run: tuple,
    *,
    label: str,
    progress_keys: tuple[str, ...],
    folder: str,
    started: float,
    shuffle: bool = True,
):
    """Train from ``run`` (``(state, step_fn, place, evaluate)`` of :func:`dpo_run` or
    :func:`reward_run`) on ``setup.train`` (:func:`train_loop`) and export the trained model to
    ``out/folder`` (:func:`finish_run`). Returns ``(model, summary, log)``; the log is open for
    the final evaluation's samples (close it: ``with log:``), and closed as failed when the
    export raises."""
    state, step_fn, place, evaluate = run
    state, log, info = train_loop(
        label=label,
        config=config,
        state=state,
        step_fn=step_fn,
        train_arrays=setup.train,
        place=place,
        evaluate=evaluate,
        progress_keys=progress_keys,
        shuffle=shuffle,
    )
    try:
        model, summary = finish_run(
            config, setup, state.params, log, info, started=started, folder=folder
        )
    except BaseException:
        log.close(failed=True)
        raise
    return model, summary, log


def train_and_report(
    config: PreferenceRunConfig,
    setup: PreferenceSetup,
    make_run: Callable,
    *,
    started: float,
    label: str,
    keys: tuple[str, ...],
    folder: str,
    oracle: Callable[[Any], tuple[dict, Sequence[Mapping[str, Any]]]],
    title: str,
    headline: Mapping[str, str],
    shuffle: bool = True,
) -> dict[str, Any]:
    """The rest of a preference run from its :func:`load_run` ``setup``: train
    ``make_run(graphdef, params, train, held_out, config, mesh)`` (:func:`dpo_run`,
    :func:`reward_run`, ...) and export the model to ``out/folder`` (:func:`train_and_export`,
    progress ``keys``); then, on process 0, the built-in task's verdict on the model,
    ``oracle(model) -> (verdict, samples)`` (the summary's ``oracle``; the samples are logged,
    :func:`log_final_samples`), and :func:`write_outputs`. Returns the summary."""
    run = make_run(setup.graphdef, setup.params, setup.train, setup.held_out, config, setup.mesh)
    model, summary, log = train_and_export(
        config, setup, run, label=label, progress_keys=keys, folder=folder, started=started,
        shuffle=shuffle,
    )  # fmt: skip
    with log:
        if not sharding.is_primary():
            return summary  # process 0 judges the model, writes the summary and plots
        if builtin(config):
            summary["oracle"], samples = oracle(model)
            log_final_samples(log, config.steps, samples)
        write_outputs(
            config,
            summary,
            log.rows(),
            label=label,
            title=title,
            plot_keys=keys,
            headline=headline,
            folder=folder,
        )
    return summary


def write_outputs(
    config: PreferenceRunConfig,
    summary: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
    *,
    label: str,
    title: str,
    plot_keys: Sequence[str],
    headline: Mapping[str, str],
    folder: str,
) -> None:
    """Process 0's last outputs of a preference run: ``out/summary.json``, ``out/training.png``
    (the ``plot_keys`` metrics of the logged ``rows`` by step) and a closing line with the
    held-out metrics of ``headline`` (``{"name in the line": "metric"}``)."""
    out = pathlib.Path(config.out)
    runs.write_summary(out, summary)
    runs.plot_metrics(rows, plot_keys, out / "training.png", title=title)
    final = summary["eval"]
    shown = ", ".join(f"{name} {final.get(k, float('nan')):.3f}" for name, k in headline.items())
    print(
        f"[{label}] held-out {shown}; wrote {out}/metrics.jsonl, summary.json, training.png, "
        f"{folder}/ ({summary['wall_seconds']:.0f}s)"
    )


# ---------------------------------------------------------------------------- DPO


DPO_KEYS = ("loss", "rewards/accuracies", "rewards/margins", "eval/rewards/accuracies")


def oracle_win_rate(policy_model, reference_model, tokenizer, prompts, seed: int) -> dict:
    """The built-in task's oracle win-rate (ties count half) of one sampled policy completion
    over one sampled reference completion per prompt (temperature 1, the same key)."""
    key = jax.random.key(seed)
    policy = sorting.evaluate_policy(policy_model, tokenizer, prompts, key=key)
    reference = sorting.evaluate_policy(reference_model, tokenizer, prompts, key=key)
    p, r = np.asarray(policy["scores"]), np.asarray(reference["scores"])
    return {
        "win_rate": float(np.mean((p > r) + 0.5 * (p == r))),
        "prompts": len(prompts),
        "policy": policy["metrics"],
        "reference": reference["metrics"],
        "examples": [
            {"prompt": q, "policy": a, "reference": b}
            for q, a, b in zip(
                prompts[:EXAMPLES], policy["completions"], reference["completions"], strict=False
            )
        ],
    }


def dpo_oracle(
    config: PreferenceRunConfig, policy, reference, tokenizer, label: str = "DPO"
) -> dict[str, Any]:
    """The built-in task's verdict on a DPO run (:func:`oracle_win_rate`): the win-rate of the
    ``policy`` model's samples over the ``reference`` model's on up to ``win_rate_prompts``
    held-out prompts (``out/data/test.jsonl``), printed and returned."""
    held_out_rows = data.load_rows(str(pathlib.Path(config.out) / "data" / "test.jsonl"))
    prompts = sorted({row["prompt"] for row in held_out_rows})[: config.win_rate_prompts]
    oracle = oracle_win_rate(policy, reference, tokenizer, prompts, config.seed + 1)
    print(
        f"[{label}] oracle win-rate of the policy over the reference: {oracle['win_rate']:.3f} "
        f"({oracle['prompts']} held-out prompts; mean score "
        f"{oracle['policy']['mean_score']:.3f} vs {oracle['reference']['mean_score']:.3f})"
    )
    return oracle


@in_run_folder  # one run per --out; a resume must keep the stored settings
def train_dpo(config: DPORunConfig) -> dict[str, Any]:
    """Direct Preference Optimization of ``config.model`` (or the built-in base model) on
    preference pairs, the initial model as the reference. Writes ``out/metrics.jsonl``,
    ``out/summary.json``, ``out/training.png`` and ``out/policy`` (a Hugging Face folder); on
    the built-in task the summary adds the oracle's win-rate (:func:`dpo_oracle`), whose first
    completions are logged as samples. Returns the summary."""
    headline = {"reward accuracy": "rewards/accuracies", "margin": "rewards/margins"}
    return _train_policy(config, dpo_run, label="DPO", keys=DPO_KEYS, headline=headline)


def _train_policy(config, make_run, *, label, keys, headline, load_arrays=None, shuffle=True):
    """A DPO-family run (``make_run``: :func:`dpo_run` or :func:`kto_run`, the initial model
    as the reference) from :func:`load_run` (``load_arrays``) to :func:`train_and_report`, the
    oracle's verdict being its win-rate of the policy over the reference (:func:`dpo_oracle`).
    Returns the summary."""
    started = time.perf_counter()
    setup = load_run(config, load_arrays=load_arrays, label=label)
    reference = jax.device_get(setup.params)  # kept apart from the donated train state

    def oracle(policy):
        base = lm.merge(setup.graphdef, reference)
        verdict = dpo_oracle(config, policy, base, setup.tokenizer, label=label)
        return verdict, verdict["examples"]

    return train_and_report(
        config, setup, make_run, started=started, label=label, keys=keys, folder="policy",
        oracle=oracle, title=f"{label} ({config.loss_type}, beta {config.beta})",
        headline=headline, shuffle=shuffle,
    )  # fmt: skip


# ---------------------------------------------------------------------------- KTO


@dataclasses.dataclass(frozen=True)
class KTORunConfig(PreferenceRunConfig):
    """KTO, Kahneman-Tversky Optimization (Ethayarajh et al., 2024; TRL's KTOTrainer), on
    unpaired completions (TRL's unpaired format: prompt, completion, label).

    Attributes:
      data: unpaired completions (JSONL, JSON, parquet or a saved datasets folder: prompt,
        completion and a bool label, True = desirable); none = the built-in task's oracle
        pairs, each split into a desirable (chosen) and an undesirable (rejected) row.
      batch_size: rows per step (each batch's KL reference point uses its own completions,
        rotated by one: at least 2 rows for loss type kto).
      beta: KTO's beta.
      desirable_weight: weight of the desirable rows' losses (lambda_D).
      undesirable_weight: weight of the undesirable rows' losses (lambda_U).
      loss_type: kto or apo_zero_unpaired.
      reference: precomputed (reference log-probs computed once over the data) or model (a
        frozen reference forward pass per batch).
      chunk_size: token rows per chunk of the log-prob computation.
      nll_alpha: weight of an NLL term on the desirable completions (as --rpo-alpha for DPO;
        not in TRL's KTO); none = off. The default 0.5 keeps the desirable completions likely:
        without it the built-in task's oracle win-rate is 0.43 instead of 0.69
        (benchmarks/RESULTS.md).
      win_rate_prompts: held-out prompts sampled for the oracle win-rate (built-in task).
      out: output folder (checkpoints, metrics.jsonl, summary.json, training.png, policy/).
    """

    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    loss_type: str = "kto"
    reference: str = "precomputed"
    chunk_size: int = 1024
    nll_alpha: float | None = 0.5
    win_rate_prompts: int = 512
    out: str = "runs/kto"

    def __post_init__(self):
        super().__post_init__()
        checks.check(self, {"win_rate_prompts": ">= 1"})
        if self.kto_config().uses_kl and self.batch_size < 2:
            raise ValueError(
                f"--batch-size {self.batch_size}: loss type kto estimates its KL reference point "
                "from the batch's other completions, so it needs at least 2 rows per batch"
            )

    def kto_config(self) -> updates.KTOConfig:
        """The update's :class:`rljax.updates.KTOConfig`: each of its fields is the flag of
        the same name."""
        fields = dataclasses.fields(updates.KTOConfig)
        return updates.KTOConfig(**{f.name: getattr(self, f.name) for f in fields})


KTO_KEYS = ("loss", "kl", "rewards/margins", "eval/rewards/margins")


def unpaired_rows(pairs: Sequence[Mapping[str, Any]]) -> list[dict]:
    """TRL's unpaired format from preference pairs: each pair gives its chosen completion with
    ``label`` True and its rejected one with ``label`` False (in that order)."""
    return [
        {"prompt": pair["prompt"], "completion": pair[side], "label": side == "chosen"}
        for pair in pairs
        for side in ("chosen", "rejected")
    ]


def validate_unpaired(
    rows: Sequence[Any], numbering: data.RowNumbers, skip_invalid: bool
) -> tuple[list[dict], data.RowNumbers, dict[str, Any]]:
    """Rows in TRL's unpaired format: ``prompt`` and ``completion`` as
    :func:`rljax.data.validate_completions` checks them, and a bool ``label``. An invalid row
    raises naming its row in the user's file, or with ``skip_invalid`` is skipped and counted.
    Returns ``(rows, their numbering, report)``."""
    valid, validation = data.validate_completions(
        rows, skip_invalid=skip_invalid, numbering=numbering
    )
    numbering = numbering.take(validation.kept_rows)
    kept, bad = [], []
    for i, row in enumerate(valid):
        if isinstance(row.get("label"), bool | np.bool_):
            kept.append(i)
            continue
        problem = (
            "field 'label' is missing"
            if "label" not in row
            else f"field 'label' is {row['label']!r}, expected true or false"
        )
        message = (
            f"{numbering.label(i)}: {problem} (TRL's unpaired format: prompt, completion, label)"
        )
        if not skip_invalid:
            raise ValueError(f"{message}; pass --skip-invalid to skip and count such rows")
        bad.append(numbering.numbers[i])
    report = {
        "validation": str(validation),
        "valid": len(kept),
        "skipped": {**validation.skipped, **({"invalid_label": len(bad)} if bad else {})},
    }
    return [valid[i] for i in kept], numbering.take(kept), report


def load_kto_arrays(
    config: KTORunConfig, tokenizer
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, Any]]:
    """Train and held-out arrays of unpaired completions: ``tokens``, ``mask``, ``loss_mask``
    (padded to ``max_length``), ``desirable`` and, for loss type kto, the KL batch of each
    group of ``batch_size`` rows (:func:`rljax.updates.mismatched_pairs`). The training rows
    are shuffled once (``seed``) and then drawn in order, so each batch's KL completions are
    its own, rotated by one (TRL's sequential sampling). Also returns a report of validation
    and tokenisation (printed)."""
    train_split, eval_split, source = _rows(config)
    if builtin(config):  # the oracle's pairs -> desirable and undesirable rows
        train_split, eval_split = (
            (rows, data.RowNumbers.of(len(rows)))
            for rows in (unpaired_rows(train_split[0]), unpaired_rows(eval_split[0]))
        )
    report: dict[str, Any] = {"source": source}
    arrays = []
    for name, (rows, numbering) in (("train", train_split), ("eval", eval_split)):
        valid, numbering, validation = validate_unpaired(rows, numbering, config.skip_invalid)
        tokens, tokenization = data.tokenize_completions(
            valid, tokenizer, **_lengths(config), numbering=numbering
        )
        print(f"{name} data ({numbering.source}): {validation['validation']}; {tokenization}")
        split = {k: np.asarray(v) for k, v in dict(tokens).items()}
        split["desirable"] = np.array([valid[i]["label"] for i in tokenization.kept_rows], bool)
        n = len(split["desirable"])
        report[name] = {
            "rows": len(rows),
            **{k: v for k, v in validation.items() if k != "validation"},
            "examples": n,
            "desirable": int(split["desirable"].sum()),
            "truncated": tokenization.truncated,
            "dropped": tokenization.dropped,
            "unknown_tokens": tokenization.unknown_tokens,
        }
        if n == 0:
            raise ValueError(
                f"{name} data ({numbering.source}): no examples left of {len(rows)} rows"
            )
        if name == "train":
            order = np.random.default_rng(config.seed).permutation(n)
            split = {k: v[order] for k, v in split.items()}
        if config.kto_config().uses_kl:
            split.update(updates.mismatched_pairs(split, config.batch_size))
        arrays.append(split)
    return arrays[0], arrays[1], report


def kto_run(graphdef, params, train, held_out, config: KTORunConfig, mesh):
    """What :func:`dpo_run` gives, for KTO: reference log-probs added to ``train`` and
    ``held_out`` (``reference="precomputed"``; the initial policy is the reference), then
    ``(state, step_fn, place, evaluate)``."""
    return _with_reference(
        _KTO, config.kto_config(), updates.kto_reference_logps, params, graphdef, params, train,
        held_out, config, mesh,
    )  # fmt: skip


@in_run_folder  # one run per --out; a resume must keep the stored settings
def train_kto(config: KTORunConfig) -> dict[str, Any]:
    """KTO of ``config.model`` (or the built-in base model) on unpaired completions, the
    initial model as the reference; the outputs of :func:`train_dpo` (on the built-in task
    with the oracle's win-rate of the policy over the reference, :func:`dpo_oracle`). Returns
    the summary."""
    headline = {"reward margin": "rewards/margins", "kl": "kl"}
    return _train_policy(
        config, kto_run, label="KTO", keys=KTO_KEYS, headline=headline,
        load_arrays=load_kto_arrays,
        shuffle=False,  # each batch's KL rows are its own completions rotated (TRL's order)
    )  # fmt: skip


# ---------------------------------------------------------------------------- ORPO, CPO, SimPO

#: Per method: the CPO loss type it fixes (None for ORPO, which has its own loss) and the
#: defaults of its unset settings (SimPO's beta 2.0 and gamma 1.0 lie in the ranges Meng et al.,
#: 2024 tune over; cpo_alpha 0 makes it SimPO proper).
REFERENCE_FREE_METHODS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {
        "orpo": {"beta": 0.1},
        "cpo": {"beta": 0.1, "loss_type": "sigmoid", "cpo_alpha": 1.0},
        "simpo": {"beta": 2.0, "loss_type": "simpo", "simpo_gamma": 1.0, "cpo_alpha": 0.0},
    }
)


@dataclasses.dataclass(frozen=True)
class ReferenceFreeRunConfig(PreferenceRunConfig):
    """ORPO (Hong et al., 2024), CPO (Xu et al., 2024) or SimPO (Meng et al., 2024): preference
    optimization without a reference model (TRL's ORPOTrainer / CPOTrainer), on preference
    pairs in TRL's formats.

    Attributes:
      method: orpo (NLL plus the log odds ratio), cpo (a pairwise loss on summed log-probs plus
        NLL) or simpo (length-normalised margin with a target gamma, no NLL by default).
      beta: ORPO's lambda, CPO's and SimPO's beta; none = 0.1 (orpo, cpo) or 2.0 (simpo).
      loss_type: CPO's pairwise loss: sigmoid, hinge or ipo (cpo only; none = sigmoid).
      label_smoothing: conservative label smoothing (cpo with sigmoid, simpo); none = 0.
      simpo_gamma: SimPO's target reward margin (simpo only); none = 1.0.
      cpo_alpha: weight of the NLL term on the chosen completions (cpo, simpo); none = 1.0
        (cpo) or 0 (simpo).
      chunk_size: token rows per chunk of the log-prob computation.
      win_rate_prompts: held-out prompts sampled for the oracle win-rate (built-in task).
      out: output folder (checkpoints, metrics.jsonl, summary.json, training.png, policy/).
    """

    method: str = "orpo"
    beta: float | None = None
    loss_type: str | None = None
    label_smoothing: float | None = None
    simpo_gamma: float | None = None
    cpo_alpha: float | None = None
    chunk_size: int = 1024
    win_rate_prompts: int = 512
    out: str = "runs/orpo"

    def __post_init__(self):
        super().__post_init__()
        checks.check(self, {"win_rate_prompts": ">= 1"})
        checks.check_choice(self, "method", tuple(REFERENCE_FREE_METHODS))
        self.update_config()  # ORPOConfig / CPOConfig check the values

    def update_config(self) -> updates.ORPOConfig | updates.CPOConfig:
        """The step's settings: the method's defaults for what is unset; a setting the method
        does not read raises ``ValueError`` naming its flag."""
        readers = {
            "loss_type": ("cpo",),
            "label_smoothing": ("cpo", "simpo"),
            "simpo_gamma": ("simpo",),
            "cpo_alpha": ("cpo", "simpo"),
        }
        for field, methods in readers.items():
            if getattr(self, field) is not None and self.method not in methods:
                flag = "--" + field.replace("_", "-")
                raise ValueError(
                    f"{flag} is not read by --method {self.method} (read by {', '.join(methods)})"
                )
        if self.method == "cpo" and self.loss_type == "simpo":
            raise ValueError("--loss-type simpo: use --method simpo (SimPO's own defaults)")
        given = {k: getattr(self, k) for k in ("beta", *readers) if getattr(self, k) is not None}
        settings = {**REFERENCE_FREE_METHODS[self.method], **given, "chunk_size": self.chunk_size}
        if self.method == "orpo":
            return updates.ORPOConfig(**settings)
        return updates.CPOConfig(**settings)


REFERENCE_FREE_KEYS = ("loss", "nll_loss", "rewards/margins", "eval/rewards/accuracies")
_REFERENCE_FREE = _Family(
    updates.make_reference_free_update,
    updates.init_reference_free_state,
    updates.make_reference_free_eval,
)


def reference_free_run(graphdef, params, train, held_out, config: ReferenceFreeRunConfig, mesh):
    """What :func:`dpo_run` gives, for ORPO / CPO / SimPO (no reference model):
    ``(state, step_fn, place, evaluate)``, the arrays first rewritten into the shared-prompt
    layout with ``config.share_prompt``."""
    apply_layout(config, train, held_out)
    settings = config.update_config()
    return _compiled(_REFERENCE_FREE, settings, graphdef, params, train, held_out, config, mesh)


@in_run_folder  # one run per --out; a resume must keep the stored settings
def train_reference_free(config: ReferenceFreeRunConfig) -> dict[str, Any]:
    """ORPO, CPO or SimPO (``config.method``) of ``config.model`` (or the built-in base model)
    on preference pairs; the outputs of :func:`train_dpo` (on the built-in task with the
    oracle's win-rate of the policy over the initial model, :func:`dpo_oracle`). Returns the
    summary."""
    headline = {"reward accuracy": "rewards/accuracies", "nll": "nll_loss"}
    return _train_policy(
        config, reference_free_run, label=config.method.upper(), keys=REFERENCE_FREE_KEYS,
        headline=headline,
    )  # fmt: skip


# ---------------------------------------------------------------------------- reward model


REWARD_KEYS = ("loss", "accuracy", "margin", "eval/accuracy")


def load_reward_model(path: str, seed: int):
    """A one-label *ForSequenceClassification folder as is; a causal LM with a fresh scalar
    head read at the last token (:func:`rljax.models.transformer.with_head`)."""
    model_type = json.loads((pathlib.Path(path) / "config.json").read_text()).get(
        "architectures", [""]
    )[0]
    if model_type.endswith("ForSequenceClassification"):
        return hf.load_model(path, head="reward")
    return with_head(hf.load_model(path), "reward", rngs=nnx.Rngs(seed))


def rank_correlation(a, b) -> float:
    """Spearman's rank correlation (ties broken by order), in numpy."""
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def oracle_agreement(model, tokenizer, rows, max_length) -> tuple[dict, list[dict]]:
    """Scores of the reward model and the built-in task's oracle on every held-out completion
    (chosen and rejected) of ``rows``: ``({"spearman": their rank correlation, "completions":
    how many}, the first few completions with both scores)``."""
    texts = [
        {"prompt": r["prompt"], "completion": r[k]} for r in rows for k in ("chosen", "rejected")
    ]
    arrays, _ = data.tokenize_completions(
        texts, tokenizer, max_length=max_length, pad_to=max_length
    )
    rewards = np.asarray(
        jax.jit(lambda t, m: model.rewards(t, m))(arrays["tokens"], arrays["mask"])
    )
    oracle = [sorting.score(t["prompt"], t["completion"]) for t in texts]
    samples = [
        {**text, "reward": float(reward), "oracle": score}
        for text, reward, score in zip(texts[:EXAMPLES], rewards, oracle, strict=False)
    ]
    agreement = {
        "spearman": rank_correlation(rewards, np.asarray(oracle)),
        "completions": len(texts),
    }
    return agreement, samples


@in_run_folder  # one run per --out; a resume must keep the stored settings
def train_reward_model(config: RewardModelRunConfig) -> dict[str, Any]:
    """Train a Bradley-Terry reward model: ``config.model``'s backbone (or the built-in base
    model's) with a fresh scalar head, or a one-label *ForSequenceClassification folder
    fine-tuned (:func:`load_reward_model`). Writes ``out/metrics.jsonl``, ``out/summary.json``,
    ``out/training.png`` and ``out/reward_model`` (a Hugging Face *ForSequenceClassification
    folder); on the built-in task the summary adds the rank correlation of its scores with the
    oracle's on the held-out completions (:func:`oracle_agreement`), the first of which are
    logged as samples. Returns the summary."""
    started = time.perf_counter()
    setup = load_run(
        config, functools.partial(load_reward_model, seed=config.seed), label="reward model"
    )

    def oracle(model):
        rows = data.load_rows(str(pathlib.Path(config.out) / "data" / "test.jsonl"))
        agreement, samples = oracle_agreement(model, setup.tokenizer, rows, config.max_length)
        print(f"[reward model] rank correlation with the oracle: {agreement['spearman']:.3f}")
        return agreement, samples

    return train_and_report(
        config, setup, reward_run, started=started, label="reward model", keys=REWARD_KEYS,
        folder="reward_model", oracle=oracle, title="Reward model",
        headline={"accuracy": "accuracy", "margin": "margin"},
    )  # fmt: skip


# ---------------------------------------------------------------------------- iterative DPO


@dataclasses.dataclass(frozen=True)
class IterativeDPORunConfig(DPORunConfig):
    """Iterative DPO (Xu et al., 2023, "Some things are more CRINGE than others"; Guo et al.,
    2024, online AI feedback).

    Attributes:
      rounds: sample-label-train rounds.
      prompts_per_round: training prompts sampled per round.
      samples_per_prompt: completions sampled per prompt (the best and worst form a pair).
      judge: a reward-model folder (a one-label *ForSequenceClassification checkpoint) that
        scores completions; none = the built-in task's oracle.
      reference_policy: previous (the policy at the start of each round) or initial.
      steps: DPO steps per round.
      out: output folder.
    """

    rounds: int = 3
    prompts_per_round: int = 1024
    samples_per_prompt: int = 4
    judge: str | None = None
    reference_policy: str = "previous"
    steps: int = 100
    out: str = "runs/iterative_dpo"

    def __post_init__(self):
        super().__post_init__()
        checks.check(
            self, {"rounds": ">= 1", "prompts_per_round": ">= 1", "samples_per_prompt": ">= 2"}
        )
        if self.data is not None and self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"--max-prompt-length {self.max_prompt_length} must be below --max-length "
                f"{self.max_length}: completions of a prompt file are sampled up to "
                "max_length - max_prompt_length tokens"
            )


def sample_completions(model, tokenizer, prompts, config, key, batch_size: int = 256) -> list[str]:
    """One temperature-1 completion per prompt (decoded without special tokens): the built-in
    task's sampler, or for a prompt file (``--data``) prompts left-padded to
    ``max_prompt_length`` and ``max_length - max_prompt_length`` new tokens."""
    if builtin(config):
        return sorting.evaluate_policy(model, tokenizer, prompts, key=key)["completions"]
    sampling = SamplingConfig(
        max_new_tokens=config.max_length - config.max_prompt_length,
        temperature=1.0,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    graphdef, params = nnx.split(model)
    generate_fn = make_generate_fn(graphdef, sampling)
    tokens, mask = data.tokenize_prompts(
        prompts, tokenizer, config.max_prompt_length, pad_to=config.max_prompt_length
    )
    out = []
    batch_size = min(batch_size, len(prompts))
    for start in range(0, len(prompts), batch_size):
        index = np.minimum(np.arange(start, start + batch_size), len(prompts) - 1)
        result = generate_fn(params, tokens[index], mask[index], jax.random.fold_in(key, start))
        ids, keep = jax.device_get((result.completions, result.completion_mask))
        for row in range(min(batch_size, len(prompts) - start)):
            out.append(tokenizer.decode(ids[row][keep[row]].tolist(), skip_special_tokens=True))
    return out


def pair_best_worst(prompts, completions, scores) -> tuple[list[dict], dict[str, Any]]:
    """Pair the best-scored completion of each prompt (``completions`` and ``scores`` are
    ``[samples, prompts]``) with the worst: ``(rows, stats)``. Empty completions (EOS at once)
    cannot form a pair and are left out; prompts whose remaining samples all score the same
    give no pair. Both are counted."""
    completions = np.array(completions, dtype=object)
    scores = np.asarray(scores, np.float64)
    empty = np.vectorize(lambda c: not c.strip())(completions)
    ranked = np.where(empty, np.nan, scores)
    rows = []
    for p, prompt in enumerate(prompts):
        if np.sum(~empty[:, p]) < 2:
            continue
        best, worst = int(np.nanargmax(ranked[:, p])), int(np.nanargmin(ranked[:, p]))
        if ranked[best, p] > ranked[worst, p] and completions[best, p] != completions[worst, p]:
            rows.append(
                {
                    "prompt": prompt,
                    "chosen": completions[best, p],
                    "rejected": completions[worst, p],
                }
            )
    return rows, {
        "pairs": len(rows),
        "prompts_without_pair": len(prompts) - len(rows),
        "empty_samples": int(empty.sum()),
        "mean_score": float(np.nanmean(scores)) if np.isfinite(scores).any() else None,
    }


def sample_pairs(model, tokenizer, prompts, config, round_index, judge):
    """Sample ``samples_per_prompt`` completions per prompt, score them (``judge(prompts,
    completions)``, or the built-in oracle for ``judge=None``) and pair the best with the worst
    (:func:`pair_best_worst`). Returns ``(rows, stats)``."""
    completions, scores = [], []
    for k in range(config.samples_per_prompt):
        key = jax.random.fold_in(jax.random.key(config.seed), 1000 * round_index + k)
        texts = sample_completions(model, tokenizer, prompts, config, key)
        completions.append(texts)
        scores.append(
            sorting.score_batch(prompts, texts) if judge is None else judge(prompts, texts)
        )
    return pair_best_worst(prompts, completions, scores)


def _prompt_column(path: str) -> list[str]:
    rows = data.load_rows(path)
    missing = [i for i, row in enumerate(rows) if not row.get("prompt")]
    if missing:
        raise ValueError(f"{path}: rows {missing[:5]} have no (or an empty) 'prompt' field")
    return [row["prompt"] for row in rows]


def round_prompts(config: IterativeDPORunConfig) -> tuple[list, list]:
    """Training prompts (``rounds * prompts_per_round``) and held-out prompts: the built-in
    task's generated ones, or those of ``--data`` (rows with a ``prompt`` field; held out:
    ``--eval-data`` or the last 10%), cycled through in a seeded order when the rounds need more
    prompts than the file has."""
    n = config.rounds * config.prompts_per_round
    if builtin(config):
        train = sorting.prompts(n, config.seed)
        held_out = sorted(
            set(sorting.prompts(config.win_rate_prompts, config.seed + 7)) - set(train)
        )
        return train, held_out
    prompts = _prompt_column(config.data)
    if config.eval_data is not None:
        held_out = _prompt_column(config.eval_data)
    else:
        n_eval = max(1, len(prompts) // 10)
        prompts, held_out = prompts[:-n_eval], prompts[-n_eval:]
    if not prompts:
        raise ValueError(f"--data {config.data!r}: no training prompts left")
    rng = np.random.default_rng(config.seed)
    cycled = []
    while len(cycled) < n:
        cycled += [prompts[i] for i in rng.permutation(len(prompts))]
    return cycled[:n], held_out[: config.win_rate_prompts]


def win_rate_vs_base(policy, base, tokenizer, prompts, config, judge) -> tuple[dict, list[dict]]:
    """Win-rate (ties half) of one sampled policy completion over one sampled base-model
    completion per held-out prompt (the same key), and both mean scores: by the oracle on the
    built-in task, by the judge on a prompt file. Returns ``(verdict, the first few prompts
    with both completions)``."""
    if builtin(config):  # the oracle measures true improvement
        oracle = oracle_win_rate(policy, base, tokenizer, prompts, config.seed + 1)
        samples = [
            {"prompt": e["prompt"], "policy": e["policy"], "base": e["reference"]}
            for e in oracle["examples"]
        ]
        return {
            "win_rate_vs_base": oracle["win_rate"],
            "policy_score": oracle["policy"]["mean_score"],
            "policy_validity": oracle["policy"]["validity"],
            "base_score": oracle["reference"]["mean_score"],
        }, samples
    key = jax.random.key(config.seed + 1)
    mine = sample_completions(policy, tokenizer, prompts, config, key)
    theirs = sample_completions(base, tokenizer, prompts, config, key)
    score = judge if judge is not None else sorting.score_batch
    p, b = np.asarray(score(prompts, mine), float), np.asarray(score(prompts, theirs), float)
    p, b = np.nan_to_num(p, nan=-np.inf), np.nan_to_num(b, nan=-np.inf)  # empty loses
    samples = [
        {"prompt": q, "policy": x, "base": y, "policy_score": s, "base_score": t}
        for q, x, y, s, t in zip(prompts[:EXAMPLES], mine, theirs, p, b, strict=False)
    ]
    return {
        "win_rate_vs_base": float(np.mean((p > b) + 0.5 * (p == b))),
        "policy_score": float(np.mean(p[np.isfinite(p)])) if np.isfinite(p).any() else None,
        "base_score": float(np.mean(b[np.isfinite(b)])) if np.isfinite(b).any() else None,
    }, samples


def reward_model_judge(folder, max_length):
    """Scores of a reward model (a one-label *ForSequenceClassification folder) for
    ``(prompt, completion)`` lists; empty completions get NaN (they are never paired)."""
    model = hf.load_model(folder, head="reward")
    tokenizer = hf.load_tokenizer(folder)
    score = jax.jit(lambda t, m: model.rewards(t, m))

    def judge(prompts, completions):
        keep = [i for i, c in enumerate(completions) if c.strip()]
        out = np.full(len(completions), np.nan)
        if keep:
            rows = [{"prompt": prompts[i], "completion": completions[i]} for i in keep]
            arrays, _ = data.tokenize_completions(
                rows, tokenizer, max_length=max_length, pad_to=max_length
            )
            out[keep] = np.asarray(score(arrays["tokens"], arrays["mask"]))
        return out

    return judge


class RoundSetup(NamedTuple):
    """What every round of iterative DPO uses (:func:`run_round`)."""

    graphdef: Any
    initial: Any  # the base model's parameters, on the host
    tokenizer: Any
    mesh: Any
    judge: Callable | None  # judge(prompts, completions) -> scores; None = the built-in oracle
    train_prompts: list[str]  # rounds * prompts_per_round (round_prompts)
    held_out: list[str]  # the win-rate's prompts


def train_round(r, round_dir, config, setup: RoundSetup, params):
    """DPO on the round's pairs (``round_dir/pairs.jsonl``, 10% held out) from ``params``, the
    reference being ``params`` (``reference_policy="previous"``) or the base model; resumes
    from ``round_dir/checkpoints``. Returns the new parameters (on the host) and the round's
    metrics log, open (:func:`train_loop`)."""
    round_config = dataclasses.replace(
        config, data=str(round_dir / "pairs.jsonl"), out=str(round_dir)
    )
    train, held_pairs, _ = load_preference_arrays(round_config, setup.tokenizer)
    reference = params if config.reference_policy == "previous" else setup.initial
    state, step_fn, place, evaluate = dpo_run(
        setup.graphdef,
        jax.tree.map(np.copy, params),
        train,
        held_pairs,
        round_config,
        setup.mesh,
        reference,
    )
    state, log, _ = train_loop(
        label=f"iterative DPO round {r}",
        config=round_config,
        state=state,
        step_fn=step_fn,
        train_arrays=train,
        place=place,
        evaluate=evaluate,
        progress_keys=("loss", "rewards/accuracies", "eval/rewards/accuracies"),
    )
    return jax.device_get(state.params), log


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def run_round(config: IterativeDPORunConfig, setup: RoundSetup, r: int, params):
    """Round ``r`` in ``out/round_R``: sample pairs from the policy ``params`` and save them
    (``pairs.jsonl``), train DPO on them (:func:`train_round`; too few pairs leave the policy
    unchanged), save the policy (``policy/``), rate it against the base model
    (:func:`win_rate_vs_base`, a few of whose completions are logged as samples) and record the
    round (``done.json``). Returns ``(params, record)``."""
    round_dir = pathlib.Path(config.out) / f"round_{r}"
    n = config.prompts_per_round
    rows, sampling = sample_pairs(
        lm.merge(setup.graphdef, params),
        setup.tokenizer,
        setup.train_prompts[(r - 1) * n : r * n],
        config,
        r,
        setup.judge,
    )
    round_dir.mkdir(parents=True, exist_ok=True)
    (round_dir / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(
        f"[iterative DPO] round {r}: {sampling['pairs']} pairs, "
        f"{sampling['prompts_without_pair']} prompts without a pair "
        f"({sampling['empty_samples']} empty samples), mean sampled score "
        f"{_fmt(sampling['mean_score'])}"
    )
    log, round_eval = None, {}
    if sampling["pairs"] < max(2, config.batch_size):
        print(f"[iterative DPO] round {r}: too few pairs to train on; the policy is unchanged")
    else:
        params, log = train_round(r, round_dir, config, setup, params)
        round_eval = final_eval(log.rows())
    with log if log is not None else contextlib.nullcontext():
        policy = lm.merge(setup.graphdef, params)
        hf.save_model(policy, round_dir / "policy", tokenizer=setup.tokenizer)
        base = lm.merge(setup.graphdef, setup.initial)
        verdict, samples = win_rate_vs_base(
            policy, base, setup.tokenizer, setup.held_out, config, setup.judge
        )
        if log is not None:
            log_final_samples(log, config.steps, samples)
    record = {"round": r, **sampling, **verdict, "eval": round_eval}
    (round_dir / "done.json").write_text(json.dumps(runs.to_json(record)))
    print(
        f"[iterative DPO] round {r}: win-rate over the base model "
        f"{record['win_rate_vs_base']:.3f}, mean score {_fmt(record['policy_score'])} "
        f"(base {_fmt(record['base_score'])})"
    )
    return params, record


def saved_rounds(out: pathlib.Path) -> int | None:
    """The last round with saved progress (finished, or an unfinished one's checkpoint)."""
    rounds = [
        int(folder.name.removeprefix("round_"))
        for folder in out.glob("round_*")
        if (folder / "done.json").exists()
        or runs.latest_saved_step(folder / "checkpoints") is not None
    ]
    return max(rounds, default=None)


def _check_iterative(config: IterativeDPORunConfig) -> None:
    if config.lora_rank:
        raise ValueError(
            "--lora-rank: iterative DPO trains full models (each round's policy is a Hugging "
            "Face folder that the next round loads); LoRA is not supported here, use 0"
        )
    if config.reference_policy not in ("previous", "initial"):
        raise ValueError(
            f"--reference-policy must be previous or initial, got {config.reference_policy!r}"
        )
    if not builtin(config) and config.judge is None:
        raise ValueError(
            "--data (a prompt set of your own) needs --judge DIR (a reward-model folder): the "
            "oracle only knows the built-in task"
        )
    checks.require_folder("--judge", config.judge, "reward-model folder")


def _write_iterative_outputs(config, setup: RoundSetup, params, history, summary) -> None:
    out = pathlib.Path(config.out)
    (out / "rounds.jsonl").write_text("".join(json.dumps(runs.to_json(h)) + "\n" for h in history))
    hf.save_model(lm.merge(setup.graphdef, params), out / "policy", tokenizer=setup.tokenizer)
    runs.plot_metrics(
        history,
        ["win_rate_vs_base", "policy_score"],
        out / "win_rate.png",
        title="Iterative DPO",
        x="round",
    )
    runs.write_summary(out, summary)
    rates = [round(h["win_rate_vs_base"], 3) for h in history]
    print(f"[iterative DPO] win-rate by round: {rates}; wrote {out}")


# One run per --out; a resume (of finished or checkpointed rounds) must keep the settings.
@in_run_folder(length_field=None, progress=saved_rounds)
def train_iterative_dpo(config: IterativeDPORunConfig) -> dict[str, Any]:
    """Iterative (online) DPO: ``config.rounds`` rounds of :func:`run_round` from the base
    model, each round's policy the next one's start. A resume loads the finished rounds
    (``round_R/done.json`` and ``policy/``) and continues an unfinished one from its last
    checkpoint. Writes ``out/rounds.jsonl``, ``out/summary.json``, ``out/win_rate.png`` and
    ``out/policy`` (the last round's, a Hugging Face folder). Returns the summary."""
    _check_iterative(config)
    started = time.perf_counter()
    model_path = resolve_model(config)
    tokenizer = hf.load_tokenizer(model_path)
    graphdef, initial = nnx.split(hf.load_model(model_path))
    initial = jax.device_get(initial)
    judge = None if config.judge is None else reward_model_judge(config.judge, config.max_length)
    mesh = build_mesh(config.mesh)
    setup = RoundSetup(graphdef, initial, tokenizer, mesh, judge, *round_prompts(config))
    params, history = initial, []
    for r in range(1, config.rounds + 1):
        round_dir = pathlib.Path(config.out) / f"round_{r}"
        if (round_dir / "done.json").exists():  # finished before an interruption: load it
            history.append(json.loads((round_dir / "done.json").read_text()))
            params = jax.device_get(nnx.split(hf.load_model(str(round_dir / "policy")))[1])
            print(f"[iterative DPO] round {r}: loaded from {round_dir}")
            continue
        params, record = run_round(config, setup, r, params)
        history.append(record)
    summary = {
        "model": model_path,
        "rounds": history,
        "final_win_rate": history[-1]["win_rate_vs_base"],
        "wall_seconds": round(time.perf_counter() - started, 2),
        "config": dataclasses.asdict(config),
        **runs.config_record(pathlib.Path(config.out)),  # the original settings, if changed
    }
    _write_iterative_outputs(config, setup, params, history, summary)
    return summary


# ---------------------------------------------------------------------------- supervised fine-tuning


@dataclasses.dataclass(frozen=True)
class SFTRunConfig(TrainRunConfig):
    """Supervised fine-tuning (TRL's SFTTrainer) on demonstrations, packed or padded.

    Attributes:
      model: a Hugging Face checkpoint folder; none = the built-in arithmetic task's base model
        (rljax.tasks.arithmetic, warmed up on demonstrations with format noise).
      data: demonstrations (JSONL, JSON, parquet or a saved datasets folder) in one of TRL's SFT
        formats: text, prompt/completion (plain or conversational), or messages (a whole
        conversation, rendered with the chat template, ending with an assistant reply: every
        assistant turn is trained on, the other turns are context); none = the built-in
        task's clean demonstrations.
      out: output folder (checkpoints, metrics.jsonl, summary.json, training.png, model/).
      batch_size: rows per step (with --packing a row holds several demonstrations).
      max_length: tokens per packed row, and per demonstration (longer ones are cut or
        dropped); without packing rows are padded to the longest demonstration.
      packing: pack several demonstrations per row (rljax.data.pack, segment ids: no compute
        on padding; the loss is the unpacked one).
      packing_strategy: bfd (best-fit decreasing) or greedy (in order).
      completion_only_loss: train on the completion tokens only (prompt/completion data), or
        the assistant turns only (messages data); off = on the whole sequence. Text rows
        always train on every token.
      train_examples: built-in demonstrations to train on.
      eval_examples: built-in held-out demonstrations (and problems for the greedy accuracy).
      sft: the update's settings (loss normalisation, metrics, chunking).
    """

    out: str = "runs/sft"
    steps: int = 150
    batch_size: int = 16
    max_length: int = 256
    eval_every: int = 50
    checkpoint_every: int = 50
    packing: bool = True
    packing_strategy: str = "bfd"
    completion_only_loss: bool = True
    train_examples: int = 4096
    eval_examples: int = 256
    sft: updates.SFTConfig = dataclasses.field(default_factory=updates.SFTConfig)

    def __post_init__(self):
        _check_run_settings(self, {"train_examples": ">= 1", "eval_examples": ">= 1"})
        checks.check_choice(self, "packing_strategy", data.PACKING_STRATEGIES)


def _sft_format(row: Any, where: str) -> str:
    """``"text"``, ``"messages"`` or ``"prompt_completion"``: TRL's SFT format of ``row``."""
    if isinstance(row, dict):
        if "text" in row:
            return "text"
        if "messages" in row:
            return "messages"
        if "prompt" in row and "completion" in row:
            return "prompt_completion"
    fields = sorted(row) if isinstance(row, dict) else type(row).__name__
    raise ValueError(
        f"{where}: not an SFT row (fields {fields}); use TRL's formats: 'text', "
        "'prompt' + 'completion', or 'messages'"
    )


def _text_sequences(rows, numbering, tokenizer, config: SFTRunConfig, report: dict):
    """Token ids (EOS appended) of plain ``text`` rows, all tokens counted; cut or dropped at
    ``max_length`` (counted in ``report``)."""
    eos = tokenizer.eos_token_id
    sequences = []
    for i, row in enumerate(rows):
        text = row.get("text") if isinstance(row, dict) else None
        if not isinstance(text, str) or not text:
            if config.skip_invalid:
                report["skipped"] = report.get("skipped", 0) + 1
                continue
            raise ValueError(f"{numbering.label(i)}: field 'text' must be a non-empty string")
        ids = list(tokenizer(text)["input_ids"])
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(int(eos))
        if len(ids) > config.max_length:
            key = "dropped" if config.overflow == "drop" else "truncated"
            report[key] = report.get(key, 0) + 1
            if config.overflow == "drop":
                continue
            ids = ids[: config.max_length]
        sequences.append(np.asarray(ids, np.int32))
    return sequences, [np.ones(len(s), bool) for s in sequences]


def _messages_sequences(rows, numbering, tokenizer, config: SFTRunConfig, report: dict):
    """Conversational ``messages`` rows (:func:`rljax.data.tokenize_conversations`): each
    conversation rendered once with the chat template, every assistant turn counted (the
    other turns and the template's headers not), or every token without
    ``completion_only_loss``; cut or dropped at ``max_length``, counted in ``report``."""
    valid, validation = data.validate_conversations(
        rows, skip_invalid=config.skip_invalid, numbering=numbering
    )
    sequences, masks, tokenization = data.tokenize_conversations(
        valid,
        tokenizer,
        max_length=config.max_length,
        overflow=config.overflow,
        numbering=numbering.take(validation.kept_rows),
    )
    if not config.completion_only_loss:
        masks = [np.ones(len(s), bool) for s in sequences]
    _count_examples(report, sequences, validation, tokenization)
    return sequences, masks, report


def _count_examples(report: dict, sequences: list, validation, tokenization) -> None:
    """Add what validation skipped and tokenization cut, dropped or did not know to an SFT
    data ``report``."""
    report.update(
        examples=len(sequences),
        skipped=dict(validation.skipped),
        truncated=tokenization.truncated,
        dropped=tokenization.dropped,
        unknown_tokens=tokenization.unknown_tokens,
    )


def sft_sequences(rows, numbering, tokenizer, config: SFTRunConfig) -> tuple[list, list, dict]:
    """``(token ids, loss masks, report)`` of SFT rows in any of TRL's formats (the format of
    the first row; a row of another format fails validation)."""
    kind = _sft_format(rows[0], f"row {numbering.label(0)}")
    report: dict[str, Any] = {"rows": len(rows), "format": kind}
    if kind == "text":
        sequences, losses = _text_sequences(rows, numbering, tokenizer, config, report)
        report["examples"] = len(sequences)
        return sequences, losses, report
    if kind == "messages":
        return _messages_sequences(rows, numbering, tokenizer, config, report)
    valid, validation = data.validate_completions(
        rows, skip_invalid=config.skip_invalid, numbering=numbering
    )
    arrays, tokenization = data.tokenize_completions(
        valid,
        tokenizer,
        max_length=config.max_length,
        overflow=config.overflow,
        numbering=numbering.take(validation.kept_rows),
    )
    keep = np.asarray(arrays["mask"], bool)
    counted = arrays["loss_mask"] if config.completion_only_loss else arrays["mask"]
    sequences = [row[k] for row, k in zip(arrays["tokens"], keep, strict=True)]
    losses = [np.asarray(row, bool)[k] for row, k in zip(counted, keep, strict=True)]
    _count_examples(report, sequences, validation, tokenization)
    return sequences, losses, report


def sft_arrays(sequences, losses, config: SFTRunConfig) -> tuple[dict[str, np.ndarray], dict]:
    """The batch arrays of :func:`rljax.updates.make_sft_update`: packed rows of
    ``max_length`` (:func:`rljax.data.pack`), or one demonstration per row right-padded to the
    longest; and what it did (rows, the fraction of slots holding a real token)."""
    if config.packing:
        arrays, packing = data.pack(
            sequences, config.max_length, loss_masks=losses, strategy=config.packing_strategy
        )
        return dict(arrays), {"rows": packing.rows, "slot_use": round(packing.efficiency, 4)}
    n, length = len(sequences), max(map(len, sequences))
    arrays = {
        "tokens": np.zeros((n, length), np.int32),
        "mask": np.zeros((n, length), bool),
        "loss_mask": np.zeros((n, length), bool),
    }
    for i, (ids, loss) in enumerate(zip(sequences, losses, strict=True)):
        arrays["tokens"][i, : len(ids)] = ids
        arrays["mask"][i, : len(ids)] = True
        arrays["loss_mask"][i, : len(ids)] = loss
    used = sum(map(len, sequences)) / max(n * length, 1)
    return arrays, {"rows": n, "slot_use": round(used, 4)}


def load_sft_data(config: SFTRunConfig, tokenizer) -> tuple[dict, dict, dict[str, Any]]:
    """Train and held-out batch arrays (:func:`sft_arrays`) and a report of each split (printed)."""
    if config.data is None:
        train_rows = arithmetic.sft_corpus(config.train_examples, config.seed)
        eval_rows = arithmetic.sft_corpus(config.eval_examples, config.seed, "heldout")
        splits = [
            ("train", train_rows, data.RowNumbers.of(len(train_rows))),
            ("eval", eval_rows, data.RowNumbers.of(len(eval_rows))),
        ]
        source = "built-in arithmetic demonstrations"
    else:
        (train_rows, train_numbers), (eval_rows, eval_numbers), source = _rows(config)
        splits = [("train", train_rows, train_numbers), ("eval", eval_rows, eval_numbers)]
    report: dict[str, Any] = {"source": source}
    out = []
    for name, rows, numbering in splits:
        sequences, losses, split_report = sft_sequences(rows, numbering, tokenizer, config)
        if not sequences:
            raise ValueError(f"{name} data ({source}): no demonstrations left: {split_report}")
        arrays, layout = sft_arrays(sequences, losses, config)
        report[name] = {**split_report, **layout}
        print(f"{name} data ({source}): {report[name]}", flush=True)
        out.append(arrays)
    return out[0], out[1], report


def sft_held_out(evaluate: Callable, state, arrays: Mapping[str, np.ndarray], place, batch_size):
    """Held-out metrics of ``evaluate`` (:func:`rljax.updates.make_sft_eval`) over all of
    ``arrays``, exact token means: the last batch is filled with empty rows (no token
    counted), and sums and counts add over batches."""
    n = len(arrays["tokens"])
    totals = {"nll_sum": 0.0, "num_tokens": 0.0, "hits": 0.0, "entropy": 0.0}
    for start in range(0, n, batch_size):
        batch = {}
        for k, v in arrays.items():
            part = v[start : start + batch_size]
            fill = np.zeros((batch_size - len(part), *v.shape[1:]), v.dtype)
            batch[k] = np.concatenate([part, fill])
        m = sharding.to_host(evaluate(state, place(batch)))
        totals["nll_sum"] += float(m["nll_sum"])
        totals["num_tokens"] += float(m["num_tokens"])
        totals["hits"] += float(m.get("mean_token_accuracy", 0.0)) * float(m["num_tokens"])
        totals["entropy"] += float(m.get("entropy", 0.0)) * float(m["num_tokens"])
    tokens = max(totals["num_tokens"], 1.0)
    metrics = {"loss": totals["nll_sum"] / tokens, "num_tokens": totals["num_tokens"]}
    if "mean_token_accuracy" in m:
        metrics["mean_token_accuracy"] = totals["hits"] / tokens
    if "entropy" in m:
        metrics["entropy"] = totals["entropy"] / tokens
    return metrics


def sft_run(graphdef, params, train, held_out, config: SFTRunConfig, mesh):
    """``(state, step_fn, place, evaluate)`` of supervised fine-tuning: the placed initial
    state, the compiled donated step (:func:`rljax.updates.lm.compile_update`), the batch
    placement and the exact held-out evaluation (:func:`sft_held_out`)."""
    return _compiled(
        _SFT, config.sft, graphdef, params, train, held_out, config, mesh,
        held_out_mean=sft_held_out,
    )  # fmt: skip


def _greedy_accuracy(model, tokenizer, config: SFTRunConfig) -> dict[str, float]:
    """The built-in task's greedy strict accuracy and format rate on held-out problems."""
    rows = arithmetic.problems(config.eval_examples, config.seed, "heldout")
    result = arithmetic.evaluate_policy(model, tokenizer, rows, key=jax.random.key(config.seed))
    return {k: round(v, 4) for k, v in result["metrics"].items()}


SFT_KEYS = ("loss", "mean_token_accuracy", "eval/loss", "eval/mean_token_accuracy")


@in_run_folder
def train_sft(config: SFTRunConfig) -> dict[str, Any]:
    """Supervised fine-tuning: load the model and the demonstrations (:func:`load_sft_data`,
    packed with ``config.packing``), train (:func:`train_loop`, resumable from ``out``),
    export ``out/model``, write ``summary.json`` and ``training.png``. For the built-in task
    the summary adds the greedy accuracy on held-out problems before and after.

    Returns the summary."""
    started = time.perf_counter()
    setup = load_run(
        config, load_arrays=load_sft_data, base_model=arithmetic.default_base_model, label="sft"
    )
    graphdef, tokenizer = setup.graphdef, setup.tokenizer
    before = None
    if config.data is None:
        before = _greedy_accuracy(lm.merge(graphdef, setup.params), tokenizer, config)
    run = sft_run(graphdef, setup.params, setup.train, setup.held_out, config, setup.mesh)
    eval_before = run[3](run[0])  # the base model's held-out metrics
    model, summary, log = train_and_export(
        config, setup, run, label="sft", progress_keys=SFT_KEYS, folder="model", started=started
    )
    summary["eval_before"] = eval_before
    with log:
        if before is not None:
            summary["greedy"] = {
                "before": before,
                "after": _greedy_accuracy(model, tokenizer, config),
            }
        rows = log.rows()
    if sharding.is_primary():
        write_outputs(
            config,
            summary,
            rows,
            label="sft",
            title="supervised fine-tuning",
            plot_keys=("loss", "eval/loss", "mean_token_accuracy"),
            headline={"loss": "loss", "token accuracy": "mean_token_accuracy"},
            folder="model",
        )
        print(f"[sft] held-out loss {eval_before['loss']:.4f} -> {summary['eval']['loss']:.4f}")
        if before is not None:
            print(
                f"[sft] held-out greedy accuracy {before['accuracy']:.3f} -> "
                f"{summary['greedy']['after']['accuracy']:.3f}",
                flush=True,
            )
    return summary
