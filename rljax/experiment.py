"""Orchestration shared by the language-model preference experiments (``experiments/dpo.py``,
``experiments/reward_model.py``, ``experiments/iterative_dpo.py``).

What every such run does, in one place: resolve the model folder (a Hugging Face checkpoint, or
the built-in task's warmed-up base model), load and validate preference data (a file or the
built-in task's generated pairs), tokenise it with the model's tokenizer, build the device mesh,
and run a resumable training loop: the train state and the data position are checkpointed with
orbax every ``checkpoint_every`` steps, and a run started again with the same ``--out`` folder
continues from the last checkpoint with identical results (the data order is a function of the
seed and the position; nothing else is random). The drivers hold their folder while they run
(:func:`in_run_folder`): a second run on it fails at once, and a resume with other settings than
the stored ``out/config.json`` is refused unless ``--allow-config-change``.

Multi-process runs (``python -m rljax.launch``, or one process per host on a cluster; the
scripts call :func:`rljax.sharding.initialize_from_env` first): every process resolves the same
model and loads and tokenises the same data (deterministic), draws the same global batches and
feeds only the rows its devices hold (:func:`rljax.sharding.shard_global_batch`), so a run over
N processes computes what one process over the same devices computes. Orbax checkpoints are
saved and restored by every process together (written once); ``metrics.jsonl``, summaries,
plots and the exported Hugging Face model are written by process 0 only.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rljax import checkpoint, checks, data, finite, runs, sharding, updates
from rljax.models import hf
from rljax.tasks import sorting
from rljax.updates import lm

__all__ = [
    "DPORunConfig",
    "PreferenceRunConfig",
    "adamw",
    "apply_layout",
    "build_mesh",
    "dpo_run",
    "final_eval",
    "finish_run",
    "in_run_folder",
    "load_preference_arrays",
    "mean_metrics",
    "oracle_win_rate",
    "placer",
    "resolve_model",
    "resume",
    "train_loop",
]


@dataclasses.dataclass(frozen=True)
class PreferenceRunConfig:
    """Settings shared by the preference experiments.

    Attributes:
      model: a Hugging Face checkpoint folder (gpt2, llama, mistral, qwen2); none = the built-in
        task's tiny base model (warmed up once and cached under runs/builtin).
      data: preference pairs (JSONL, JSON, parquet or a saved datasets folder, TRL's standard or
        conversational format); none = the built-in task's generated pairs.
      eval_data: held-out pairs; none = the built-in test split, or 10% of --data.
      mesh: device mesh such as data=2,fsdp=2,tensor=2; empty = one device.
      out: output folder (checkpoints, metrics.jsonl, summary.json, plots, the final model).
      seed: data order and sampling seed.
      steps: optimizer steps.
      batch_size: pairs per step.
      learning_rate: AdamW peak learning rate (linear warm-up over 10% of the steps).
      max_length: tokens per sequence (prompt + completion).
      max_prompt_length: prompt tokens kept (its end).
      overflow: truncate or drop pairs longer than max_length.
      skip_invalid: skip and count invalid rows instead of failing on the first.
      train_pairs: generated training pairs (built-in task only).
      eval_pairs: generated held-out pairs (built-in task only).
      log_every: steps between progress lines.
      eval_every: steps between held-out evaluations (0 = only at the end).
      checkpoint_every: steps between checkpoints (the last step is always saved).
      share_prompt: run each pair's prompt once (rljax.data.share_prompts; same losses,
        fewer FLOPs: both completions attend to one prompt key/value cache).
      max_nonfinite_updates: stop after this many consecutive updates with a NaN or inf in
        the loss, gradients or new parameters (each is skipped, parameters unchanged).
      allow_config_change: resume even though the settings differ from those stored in
        out/config.json (summary.json then records both); without it such a resume is refused.
    """

    model: str | None = None
    data: str | None = None
    eval_data: str | None = None
    mesh: str = ""
    out: str = "runs/dpo"
    seed: int = 0
    steps: int = 300
    batch_size: int = 32
    learning_rate: float = 1e-3
    max_length: int = 32
    max_prompt_length: int = 16
    overflow: str = "truncate"
    skip_invalid: bool = False
    train_pairs: int = 4096
    eval_pairs: int = 512
    log_every: int = 25
    eval_every: int = 100
    checkpoint_every: int = 100
    share_prompt: bool = False
    max_nonfinite_updates: int = 3
    allow_config_change: bool = False

    def __post_init__(self):
        checks.check(
            self,
            {
                "seed": ">= 0",
                "steps": ">= 1",
                "batch_size": ">= 1",
                "learning_rate": "> 0",
                "max_length": ">= 2",  # one prompt and one completion token
                "max_prompt_length": ">= 1",
                "train_pairs": ">= 1",
                "eval_pairs": ">= 1",
                "log_every": ">= 1",
                "eval_every": ">= 0",
                "checkpoint_every": ">= 1",
                "max_nonfinite_updates": ">= 1",
            },
        )
        checks.check_choice(self, "overflow", ("truncate", "drop"))


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


def resolve_model(config: PreferenceRunConfig) -> str:
    """The model folder: ``config.model``, or the cached built-in base model (in a
    multi-process run process 0 builds it first and the others wait, then find it cached)."""
    if config.model is None:
        if jax.process_count() > 1:
            if sharding.is_primary():
                sorting.default_base_model()
            sharding.barrier("rljax.experiment.resolve_model")
        return sorting.default_base_model()
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


def _rows(config: PreferenceRunConfig) -> tuple[_Split, _Split, str]:
    """``(train, held_out, source)``: each split's rows with their :class:`rljax.data.RowNumbers`
    (numbered as the user's file numbers them, also when the held-out split is carved from
    ``--data``)."""
    if builtin(config):
        folder = pathlib.Path(config.out) / "data"

        def generated(root) -> tuple[_Split, _Split, str]:
            paths = sorting.write_dataset(root, config.train_pairs, config.eval_pairs, config.seed)
            train = _file_rows(paths["train"], "built-in pairs")
            test = _file_rows(paths["test"], "built-in pairs")
            return train, test, str(folder)

        if sharding.is_primary():
            return generated(folder)
        with tempfile.TemporaryDirectory() as own:  # the same rows, apart from process 0's files
            return generated(own)
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
            valid,
            tokenizer,
            max_length=config.max_length,
            max_prompt_length=config.max_prompt_length,
            overflow=config.overflow,
            pad_to=config.max_length,
            numbering=numbering.take(validation.kept_rows),
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
) -> tuple[Any, runs.MetricsLog, dict[str, Any]]:
    """Run ``config.steps`` steps of ``step_fn(state, batch) -> (state, metrics)``, resuming
    from the last checkpoint in ``checkpoint_dir`` (default ``out/checkpoints``) if there is
    one (the newest that restores: :func:`resume`). Logs every ``log_every`` steps, evaluates
    (``evaluate(state) -> metrics``, logged with an ``eval/`` prefix) every ``eval_every``
    steps and at the end, and checkpoints every ``checkpoint_every`` steps and at the end.
    Returns ``(state, log, info)``.

    A step whose update was non-finite (its ``nonfinite`` metric, :mod:`rljax.finite`) left
    the state unchanged; ``config.max_nonfinite_updates`` of them in a row stop the run with a
    ``FloatingPointError`` naming the step and the last good checkpoint, and a state with a
    non-finite value is never checkpointed.

    Multi-process: every process runs the loop (and the collective orbax saves and restores)
    with the same global batches; only process 0 writes ``metrics.jsonl``."""
    out = pathlib.Path(config.out)
    ckpt = checkpoint.Checkpointer(checkpoint_dir or out / "checkpoints", max_to_keep=2)
    batches = data.Batches(train_arrays, config.batch_size, seed=config.seed)
    start, state, saved = resume(ckpt, state, config.steps, "step")
    if saved is not None:
        batches.restore(saved["data"])
        print(f"[{label}] resumed from checkpoint step {start} in {ckpt.directory}", flush=True)
    log = runs.MetricsLog(
        out / "metrics.jsonl",
        label,
        config.steps,
        resume_step=start,
        keys=progress_keys,
        write=sharding.is_primary(),
    )
    stop = finite.NonfiniteStop(config.max_nonfinite_updates, label, ckpt.directory)
    if start:
        stop.saved(start)
    try:
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
    finally:
        ckpt.close()  # finishes a save in flight, also when the run is interrupted
    return state, log, {"resumed_from": start or None}


@dataclasses.dataclass(frozen=True)
class DPORunConfig(PreferenceRunConfig):
    """Direct Preference Optimization (Rafailov et al., 2023).

    Attributes:
      beta: DPO's beta (strength of the KL regularisation to the reference).
      loss_type: a TRL loss type, or several separated by commas (sigmoid,ipo,...).
      loss_weights: comma-separated weights, one per loss type (empty = 1 each).
      rpo_alpha: weight of the chosen NLL term (RPO, Pang et al., 2024); none = off. The default
        0.5 keeps the chosen completions likely: with plain DPO on the built-in task both
        log-probs fall and the policy's samples stop being valid permutations (oracle win-rate
        0.17 against 0.70 with 0.5, 300 steps; benchmarks/RESULTS.md).
      reference: precomputed (reference log-probs computed once over the data), model (a frozen
        reference forward pass per batch) or none (reference-free).
      chunk_size: token rows per chunk of the log-prob computation.
      win_rate_prompts: held-out prompts sampled for the oracle win-rate (built-in task).
    """

    beta: float = 0.1
    loss_type: str = "sigmoid"
    loss_weights: str = ""
    rpo_alpha: float | None = 0.5
    reference: str = "precomputed"
    chunk_size: int = 1024
    win_rate_prompts: int = 512

    def __post_init__(self):
        super().__post_init__()
        checks.check(self, {"win_rate_prompts": ">= 1"})
        self.dpo_config()  # DPOConfig checks beta, rpo_alpha, the loss types, ...

    def dpo_config(self) -> updates.DPOConfig:
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
            reference=self.reference,
            chunk_size=self.chunk_size,
        )


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
    if config.reference == "precomputed":
        for arrays in (train, held_out):
            arrays.update(
                lm.reference_logps(graphdef, reference_params, arrays, chunk_size=config.chunk_size)
            )
    optimizer = adamw(config)
    ref_params = jax.tree.map(jnp.copy, reference_params) if config.reference == "model" else None
    example = {k: v[: config.batch_size] for k, v in train.items()}
    state, step_fn, batch_shardings = lm.compile_update(
        updates.make_dpo_update(graphdef, optimizer, dpo_config),
        updates.init_dpo_state(params, optimizer, ref_params),
        example,
        mesh,
    )
    place = placer(mesh, batch_shardings)
    eval_fn = jax.jit(updates.make_dpo_eval(graphdef, dpo_config))
    evaluate = lambda s: mean_metrics(eval_fn, s, held_out, place, config.batch_size)
    return state, step_fn, place, evaluate


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
                prompts[:5], policy["completions"], reference["completions"], strict=False
            )
        ],
    }


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
    *,
    graphdef,
    params,
    tokenizer,
    log: runs.MetricsLog,
    info: Mapping[str, Any],
    mesh,
    model_path: str,
    data_report: Mapping[str, Any],
    wall_seconds: float,
    folder: str,
):
    """Save the trained model as a Hugging Face folder ``out/folder`` and build the common part
    of ``summary.json``. Returns ``(model, summary)``.

    Multi-process: every process calls it (the parameters are gathered to every host, a
    collective); process 0 alone writes the folder."""
    out = pathlib.Path(config.out)
    finite.require_finite(params, f"not exporting the model to {out / folder}")
    model = lm.merge(graphdef, sharding.to_host(params))
    if sharding.is_primary():
        hf.save_model(model, out / folder, tokenizer=tokenizer)
    summary = {
        "model": model_path,
        "steps": config.steps,
        "eval": final_eval(log.rows()),
        "data": dict(data_report),
        "resumed_from": info["resumed_from"],
        "wall_seconds": round(wall_seconds, 2),
        "devices": int(mesh.size),
        "processes": jax.process_count(),
        "config": dataclasses.asdict(config),
        **runs.config_record(out),  # the original settings, after --allow-config-change
    }
    return model, summary
