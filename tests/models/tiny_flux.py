"""A tiny Flux with every parameter randomized, its inputs and a scalar loss (no PyTorch needed).

Used to compare model variants that share parameters but differ in static options
(attention kernel, remat policy): `graphdef(cfg)` gives each variant's graph, `random_state`
one parameter state that all of them accept.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fluxir_jax.models import presets
from fluxir_jax.models.flux import Flux


def config(**overrides):
    return presets.get("tiny", **overrides)


def graphdef(cfg):
    return nnx.graphdef(nnx.eval_shape(lambda: Flux(cfg, rngs=nnx.Rngs(0))))


def random_state(cfg, seed: int = 0):
    """Every parameter random: matrices ~ N(0, 1/fan_in), vectors ~ N(0, 0.1^2), norm scales ~ 1 + N(0, 0.1^2)."""
    state = nnx.state(nnx.eval_shape(lambda: Flux(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    rng = np.random.default_rng(seed)

    def draw(path, x):
        name = str(path[-1])
        if x.ndim >= 2 and "kernel" in name:
            return jnp.asarray(rng.standard_normal(x.shape) / np.sqrt(x.shape[-2]), x.dtype)
        if "scale" in name:
            return jnp.asarray(1 + 0.1 * rng.standard_normal(x.shape), x.dtype)
        return jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype)

    return jax.tree_util.tree_map_with_path(draw, state)


def inputs(batch=2, h=3, w=5, t=7, seed=0, ctx=32, vec=32):
    """Model inputs as a dict of arrays (ids already broadcast over the batch)."""
    rng = np.random.default_rng(seed)
    img_ids = np.zeros((h, w, 3), np.float32)
    img_ids[..., 1] = np.arange(h)[:, None]
    img_ids[..., 2] = np.arange(w)[None, :]
    img_ids = np.broadcast_to(img_ids.reshape(1, h * w, 3), (batch, h * w, 3))
    return dict(
        img=jnp.asarray(rng.standard_normal((batch, h * w, 64)), jnp.float32),
        img_ids=jnp.asarray(img_ids),
        txt=jnp.asarray(rng.standard_normal((batch, t, ctx)), jnp.float32),
        txt_ids=jnp.zeros((batch, t, 3), jnp.float32),
        timesteps=jnp.asarray(rng.uniform(0.05, 1.0, batch), jnp.float32),
        y=jnp.asarray(rng.standard_normal((batch, vec)), jnp.float32),
        guidance=jnp.asarray(rng.uniform(1.0, 5.0, batch), jnp.float32),
    )


def forward(gdef, state, x):
    model = nnx.merge(gdef, state)
    return model(x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["timesteps"], x["y"], x["guidance"])


def loss(gdef, state, x):
    """A scalar that depends on every output element (the target is fixed noise)."""
    return output_loss(forward(gdef, state, x))


def output_loss(out):
    target = jnp.sin(jnp.arange(out.size, dtype=out.dtype)).reshape(out.shape)
    return jnp.mean(jnp.square(out - target))


def forward_and_grads(gdef, state, x):
    """(output, d loss / d params, d loss / d img), jitted (the output from the differentiated forward pass)."""

    @jax.jit
    def run(state, x):
        def loss_and_out(s, img):
            out = forward(gdef, s, {**x, "img": img})
            return output_loss(out), out

        (_, out), (g_params, g_img) = jax.value_and_grad(loss_and_out, argnums=(0, 1), has_aux=True)(state, x["img"])
        return out, g_params, g_img

    return run(state, x)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def worst_leaf_err(a, b) -> float:
    """The largest relative error over the leaves of two matching pytrees."""
    errs = jax.tree.leaves(jax.tree.map(rel_err, a, b))
    return max(errs)


def all_gather_shapes(hlo: str) -> set[tuple[int, ...]]:
    """Result shapes of the all-gathers in a compiled program's text (for an async `all-gather-start`,
    the first shape of its result tuple)."""
    return {tuple(int(d) for d in m.split(",") if d)
            for m in re.findall(r"= \(?\w+\[([\d,]*)\][^ ]* all-gather(?:-start)?\(", hlo)}
