"""The iteration loop every RL driver shares: resume, the per-iteration stage, logging,
evaluation, checkpoints and the non-finite stop; and the first and last stages of a run
(:func:`start_run`: compilation cache, model folder, tokenizer; :func:`finish`: the exported
policy, ``summary.json``, the plot and the closing line).

An algorithm's driver (:mod:`rljax.rl.grpo`, :mod:`rljax.rl.rlhf`) builds its stages and
hands one function per iteration to :func:`train_loop`::

    state, metrics, host_metrics, carry = iterate(it, state, carry)   # rollout -> update

``carry`` holds the host values that must survive a restart with the state (the prompt
cursor, the KL coefficient): it is checkpointed beside the state and restored with it. The
rollout key of iteration ``it`` is derived from ``it`` by the driver, so a resumed run repeats
the iterations it would have run.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from rljax import checkpoint, experiment, finite, runs
from rljax.models import hf

__all__ = ["LoopResult", "RunStart", "export_policy", "finish", "start_run", "train_loop"]


class RunStart(NamedTuple):
    """What a driver's run starts from (:func:`start_run`)."""

    label: str  # the run's name in its progress lines
    model_path: str  # the policy's Hugging Face folder (--model, or the built-in base model)
    tokenizer: Any
    time: float  # time.perf_counter() at the start


def start_run(config, label: str, base_model: Callable[[], str] | None = None) -> RunStart:
    """The first stage of a run of ``config``: JAX's persistent compilation cache turned on
    (``config.compilation_cache``), the time noted, the model folder resolved
    (:func:`rljax.experiment.resolve_model`, ``base_model`` the built-in one) and its tokenizer
    loaded."""
    runs.use_compilation_cache(config.compilation_cache)
    started = time.perf_counter()
    model_path = experiment.resolve_model(config, base_model)
    return RunStart(label, model_path, hf.load_tokenizer(model_path), started)


@dataclasses.dataclass(frozen=True)
class LoopResult:
    """What :func:`train_loop` returns: the final ``state`` and ``carry``, the metrics rows
    logged (``history``, resumed rows included) and the iteration it started from (0 for a
    fresh run)."""

    state: Any
    carry: dict[str, Any]
    history: list[dict[str, Any]]
    resumed_from: int


def _restore_carry(initial: Mapping[str, Any], saved: Mapping[str, Any]) -> dict[str, Any]:
    """``saved`` (JSON numbers) in the types of ``initial`` (Python ints stay ints; arrays come
    back as arrays of their dtype)."""
    carry = {}
    for name, value in initial.items():
        if name not in saved:
            raise ValueError(f"checkpoint metadata lacks {name!r} (has {sorted(saved)})")
        if isinstance(value, int):
            carry[name] = int(saved[name])
        else:
            carry[name] = jnp.asarray(saved[name], jnp.asarray(value).dtype)
    return carry


def train_loop(
    config,
    *,
    label: str,
    state,
    carry: Mapping[str, Any],
    iterate: Callable[[int, Any, dict], tuple[Any, dict, dict, dict]],
    evaluate: Callable[[Any], dict[str, float]],
    log_keys: tuple[str, ...],
    describe: str,
) -> LoopResult:
    """Run ``config.iterations`` iterations of ``iterate`` from the newest checkpoint in
    ``config.out/checkpoints`` (or from the start).

    ``iterate(it, state, carry) -> (state, update_metrics, host_metrics, carry)``:
    ``update_metrics`` are the compiled update's (read lazily: the non-finite check looks at
    them one iteration late, so the host never waits for the device in between).
    ``evaluate(state)`` runs before the first iteration of a fresh run, every
    ``config.eval_every`` iterations and after the last (logged as ``eval/<name>``; a
    ``"samples"`` entry, a list of dicts such as prompt/completion/reward, goes to
    ``out/samples.jsonl`` and the sinks' sample tables instead). Metrics
    are logged every ``config.log_every`` iterations (and at the first and last) to
    ``out/metrics.jsonl`` and the sinks of ``config.log`` (TensorBoard, W&B); the state and carry are checkpointed every
    ``config.checkpoint_every`` iterations and after the last, never when non-finite. After
    ``config.max_nonfinite_updates`` consecutive non-finite updates the run stops, naming the
    last good checkpoint.
    """
    out = pathlib.Path(config.out)
    carry = dict(carry)
    ckpt = checkpoint.Checkpointer(out / "checkpoints", max_to_keep=2)
    first, state, saved = experiment.resume(ckpt, state, config.iterations, "iteration")
    if saved is not None:  # the newest checkpoint that restores (damaged ones are skipped)
        carry = _restore_carry(carry, saved)
        print(f"[{label}] resumed from iteration {first} in {ckpt.directory}", flush=True)
    log = runs.MetricsLog(
        out / "metrics.jsonl",
        label,
        config.iterations,
        resume_step=first or None,
        keys=log_keys,
        sinks=config.log,
        config=dataclasses.asdict(config),
    )
    print(f"[{label}] {describe}", flush=True)

    def evaluated(it: int, state) -> dict[str, Any]:
        metrics = dict(evaluate(state))
        samples = metrics.pop("samples", None)
        if samples:
            log.log_samples(it, samples)
        return {f"eval/{name}": v for name, v in metrics.items()}

    stop = finite.NonfiniteStop(
        config.max_nonfinite_updates, label, ckpt.directory, unit="iteration"
    )
    if first:
        stop.saved(first)
    try:
        if first == 0:
            log.log(0, evaluated(0, state))
        for it in range(first + 1, config.iterations + 1):
            state, update_metrics, host_metrics, carry = iterate(it, state, carry)
            stop.observe(it, update_metrics)  # the previous iteration's `nonfinite`
            last = it == config.iterations
            row = {}
            if it % config.log_every == 0 or last or it == 1:
                row.update({**host_metrics, **jax.device_get(update_metrics)})
            if last or (config.eval_every and it % config.eval_every == 0):
                row.update(evaluated(it, state))
            if row:
                log.log(it, row)
            if it % config.checkpoint_every == 0 or last:
                stop.before_save(it, (state, carry))  # never checkpoint a non-finite state
                metadata = {
                    name: value if isinstance(value, int) else float(value)
                    for name, value in carry.items()
                }
                ckpt.save(it, state, metadata, force=True)
                stop.saved(it)
        stop.flush()
    except BaseException:
        log.close(failed=True)  # marks a W&B run failed
        raise
    finally:
        ckpt.close()
    log.close()
    return LoopResult(state, carry, log.rows(), first)


def export_policy(label: str, out: pathlib.Path, model, tokenizer) -> None:
    """Save the trained policy ``model`` as a Hugging Face folder ``out/policy`` (refused,
    naming the run, when any parameter is NaN or inf); with LoRA adapters merged, and the
    adapters as a peft folder ``out/policy_adapter`` (:func:`rljax.experiment.export_model`)."""
    finite.require_finite(
        nnx.state(model), f"[{label}] not exporting the policy to {out / 'policy'}"
    )
    experiment.export_model(model, out / "policy", tokenizer)


def finish(
    config,
    run: RunStart,
    result: LoopResult,
    policy,
    *,
    devices: int,
    summary: Mapping[str, Any],
    plot_keys: list[str],
    title: str,
    message: str,
) -> dict[str, Any]:
    """The last stage of a run: save the trained ``policy`` model (:func:`export_policy`),
    write ``out/summary.json`` (``summary`` plus the run record: settings, wall time,
    ``devices``, resume point) and ``out/training.png`` (``plot_keys`` over the iterations),
    print ``message`` with what was written, and return the summary."""
    out = pathlib.Path(config.out)
    export_policy(run.label, out, policy, run.tokenizer)
    summary = {
        **summary,
        "parameters": experiment.parameter_counts(policy),
        **runs.run_record(
            config, out, resumed_from=result.resumed_from, start_time=run.time, devices=devices
        ),
    }
    runs.write_summary(out, summary)
    runs.plot_metrics(result.history, plot_keys, out / "training.png", title=title)
    print(
        f"[{run.label}] {message}; wrote {out}/metrics.jsonl, summary.json, training.png, "
        f"policy/ ({summary['wall_seconds']:.0f}s)",
        flush=True,
    )
    return summary
