"""Cost of one Fisher-vector product relative to one gradient of the TRPO surrogate.

For an MLP policy (diagonal Gaussian, MuJoCo-sized) and a small causal transformer LM
(categorical over the vocabulary), after compilation, the median wall time of

* ``grad``: ``jax.value_and_grad`` of the surrogate;
* ``gauss_newton``: one :func:`rljax.trpo.fisher_vector_product` call (linearise + product);
* ``gauss_newton (in CG)``: per-product cost when the linearisation is shared across the 10
  products of a conjugate-gradient solve (:func:`rljax.trpo.make_fisher_vector_product`);
* ``hessian`` and ``hessian (in CG)``: forward-over-reverse, single and per product in a loop.

Run: ``python benchmarks/fvp.py [--repeats N]``; prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp

from rljax import distributions, trpo

CG_PRODUCTS = 10


def mlp_policy(key, obs_dim=17, hidden=256, action_dim=6, batch=4096):
    keys = jax.random.split(key, 6)

    def dense(k, i, o):
        return {"w": jax.random.normal(k, (i, o)) / math.sqrt(i), "b": jnp.zeros(o)}

    params = {
        "l1": dense(keys[0], obs_dim, hidden),
        "l2": dense(keys[1], hidden, hidden),
        "out": dense(keys[2], hidden, action_dim),
        "log_std": jnp.zeros(action_dim),
    }

    def policy_fn(p, x):
        h = jnp.tanh(x @ p["l1"]["w"] + p["l1"]["b"])
        h = jnp.tanh(h @ p["l2"]["w"] + p["l2"]["b"])
        return h @ p["out"]["w"] + p["out"]["b"], p["log_std"]

    inputs = jax.random.normal(keys[3], (batch, obs_dim))
    actions = jax.random.normal(keys[4], (batch, action_dim))
    advantages = jax.random.normal(keys[5], (batch,))
    name = f"MLP {obs_dim}-{hidden}-{hidden}-{action_dim} Gaussian, batch {batch}"
    return name, params, policy_fn, inputs, actions, advantages


def transformer_policy(key, vocab=512, dim=128, heads=4, layers=2, batch=8, length=128):
    keys = iter(jax.random.split(key, 8 + 6 * layers))

    def w(shape, scale=None):
        return jax.random.normal(next(keys), shape) * (scale or 1 / math.sqrt(shape[0]))

    params = {
        "embed": w((vocab, dim), 0.02),
        "pos": w((length, dim), 0.02),
        "blocks": [
            {
                "qkv": w((dim, 3 * dim)),
                "proj": w((dim, dim)),
                "up": w((dim, 4 * dim)),
                "down": w((4 * dim, dim)),
                "ln1": jnp.ones(dim),
                "ln2": jnp.ones(dim),
            }
            for _ in range(layers)
        ],
        "ln_f": jnp.ones(dim),
    }

    def norm(x, g):
        return g * x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)

    def policy_fn(p, tokens):
        b, t = tokens.shape
        x = p["embed"][tokens] + p["pos"][:t]
        for blk in p["blocks"]:
            q, k, v = jnp.split(norm(x, blk["ln1"]) @ blk["qkv"], 3, axis=-1)
            q, k, v = (y.reshape(b, t, heads, dim // heads) for y in (q, k, v))
            att = jax.nn.dot_product_attention(q, k, v, is_causal=True)
            x = x + att.reshape(b, t, dim) @ blk["proj"]
            x = x + jax.nn.gelu(norm(x, blk["ln2"]) @ blk["up"]) @ blk["down"]
        return norm(x, p["ln_f"]) @ p["embed"].T

    tokens = jax.random.randint(next(keys), (batch, length), 0, vocab)
    actions = jax.random.randint(next(keys), (batch, length), 0, vocab)
    advantages = jax.random.normal(next(keys), (batch, length))
    name = f"transformer {layers}x{dim} vocab {vocab}, batch {batch}x{length}"
    return name, params, policy_fn, tokens, actions, advantages


def timed(fn, *args, repeats):
    compile_start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - compile_start
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times), compile_s


def computations(case) -> dict[str, tuple]:
    """The timed computations of ``case`` (a tuple from :func:`mlp_policy` or
    :func:`transformer_policy`): ``name -> (fn, args, products)``, where ``fn(*args)`` makes
    ``products`` Fisher-vector products (0 for the gradient)."""
    _, params, policy_fn, inputs, actions, advantages = case
    old_logps = distributions.log_prob(policy_fn(params, inputs), actions)
    vector = jax.tree.map(lambda x: jnp.ones_like(x) * 1e-3, params)

    def grad(p):
        def surrogate(q):
            logps = distributions.log_prob(policy_fn(q, inputs), actions)
            return trpo.surrogate_objective(logps, old_logps, advantages)[0]

        return jax.value_and_grad(surrogate)(p)

    def single(method):
        return lambda p, v: trpo.fisher_vector_product(policy_fn, p, inputs, v, method=method)

    def in_cg(method):
        def run(p, v):
            fvp = trpo.make_fisher_vector_product(policy_fn, p, inputs, method=method)
            return jax.lax.fori_loop(0, CG_PRODUCTS, lambda _, u: fvp(u), v)

        return run

    out = {"grad": (grad, (params,), 0)}
    for method in trpo.FVP_METHODS:
        out[method] = (single(method), (params, vector), 1)
        out[f"{method} (in CG)"] = (in_cg(method), (params, vector), CG_PRODUCTS)
    return out


def bench(case, repeats):
    rows = {}
    for key, (fn, args, products) in computations(case).items():
        s, _ = timed(fn, *args, repeats=repeats)
        s /= max(products, 1)
        rows[key] = (s, s / rows["grad"][0] if rows else 1.0)
    return case[0], rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", default="benchmarks/fvp_results.json")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 3 repeats (smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = 3
    device = jax.devices()[0]
    header = (
        f"FVP cost on {device.device_kind} ({jax.device_count()} device(s), "
        f"{platform.processor() or platform.machine()}), jax {jax.__version__}"
    )
    print(header)
    results = {"device": device.device_kind, "jax": jax.__version__, "cases": {}}
    key = jax.random.key(0)
    if args.quick:
        cases = (
            mlp_policy(key, hidden=16, batch=64),
            transformer_policy(key, vocab=32, dim=16, layers=1, batch=2, length=8),
        )
    else:
        cases = (mlp_policy(key), transformer_policy(key))
    for case in cases:
        name, rows = bench(case, args.repeats)
        results["cases"][name] = {k: {"ms": s * 1e3, "x_grad": r} for k, (s, r) in rows.items()}
        print(f"\n{name}\n\n| computation | ms | x gradient |\n|---|---:|---:|")
        for k, (s, r) in rows.items():
            print(f"| {k} | {s * 1e3:.2f} | {r:.2f} |")
    pathlib.Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.out}")
    return results


if __name__ == "__main__":
    main()
