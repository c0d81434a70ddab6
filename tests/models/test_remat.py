"""Remat policies for the scanned blocks: same gradients as no remat; host offload compiles for TPU."""
import jax
import jax.numpy as jnp
import pytest

from fluxir_jax import config, tpu_topology
from fluxir_jax.errors import UserError
from fluxir_jax.models.flux import REMAT_POLICIES, FluxConfig
from tests.models import tiny_flux

TOL = 1e-6  # worst leaf ||policy - none|| / ||none||, float32, highest precision (recompute is the same math)
OFFLOAD = [p for p in REMAT_POLICIES if p.startswith("offload_")]


@pytest.fixture(scope="module")
def reference():
    x = tiny_flux.inputs(batch=2, h=3, w=4, t=5)
    state = tiny_flux.random_state(tiny_flux.config())
    with jax.default_matmul_precision("highest"):
        ref = tiny_flux.forward_and_grads(tiny_flux.graphdef(tiny_flux.config()), state, x)
    return x, state, ref


@pytest.mark.slow  # one fwd+bwd compile per policy: ~10 s each on an idle 2-core CPU, ~45 s on a busy one
@pytest.mark.parametrize("policy", [p for p in REMAT_POLICIES if p != "none"])
def test_policy_gives_the_gradients_of_no_remat(reference, policy):
    x, state, ref = reference
    gdef = tiny_flux.graphdef(tiny_flux.config(remat_policy=policy))
    with jax.default_matmul_precision("highest"):
        out = tiny_flux.forward_and_grads(gdef, state, x)
        jaxpr = str(jax.make_jaxpr(lambda s: jax.grad(lambda s: tiny_flux.loss(gdef, s, x))(s))(state))
    assert "checkpoint" in jaxpr or "remat" in jaxpr  # the policy is really applied
    errs = [tiny_flux.worst_leaf_err(o, r) for o, r in zip(out, ref)]
    print(policy, "forward / param grads / img grad:", [f"{e:.1e}" for e in errs])
    assert max(errs) <= TOL


@pytest.mark.slow  # splash in interpret mode: ~20 s per policy on an idle 2-core CPU
@pytest.mark.parametrize("policy", ["save_attention", "full"])
def test_policy_with_splash_gives_the_gradients_of_no_remat(policy):
    """Splash runs its own VJP (`layers.normed_attention`) whose residuals the policies name: the
    forward pass, the parameter gradients and the input gradient under `policy` equal those without
    remat. 128 tokens (8 text + 120 image), so splash needs no padding."""
    x = tiny_flux.inputs(batch=2, h=8, w=15, t=8)
    state = tiny_flux.random_state(tiny_flux.config())
    with jax.default_matmul_precision("highest"):
        ref, out = (tiny_flux.forward_and_grads(tiny_flux.graphdef(tiny_flux.config(attention="splash", remat_policy=p)),
                                                state, x) for p in ("none", policy))
    errs = [tiny_flux.worst_leaf_err(o, r) for o, r in zip(out, ref)]
    print(policy, "forward / param grads / img grad:", [f"{e:.1e}" for e in errs])
    assert max(errs) <= TOL


@pytest.mark.slow  # one fwd+bwd compile per case: ~10 s each on an idle 2-core CPU
@pytest.mark.parametrize("policy, keep", [("save_attention", "all"), ("full", "double"), ("save_dots_no_batch", "single"),
                                          ("offload_dots_no_batch", "all")])
def test_keep_gelu_grad_gives_the_gradients_of_no_remat(reference, policy, keep):
    """Keeping GELU's derivative (`FluxConfig.keep_gelu_grad`) on top of a policy changes what the
    backward pass reads, not what it computes: float32 forward and gradients equal those without remat."""
    x, state, ref = reference
    gdef = tiny_flux.graphdef(tiny_flux.config(remat_policy=policy, keep_gelu_grad=keep))
    with jax.default_matmul_precision("highest"):
        out = tiny_flux.forward_and_grads(gdef, state, x)
    errs = [tiny_flux.worst_leaf_err(o, r) for o, r in zip(out, ref)]
    print(policy, keep, "forward / param grads / img grad:", [f"{e:.1e}" for e in errs])
    assert max(errs) <= TOL


def _eqns(jaxpr):
    """Every equation of `jaxpr` and of every jaxpr inside it."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else [value]:
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    yield from _eqns(sub)


@pytest.mark.parametrize("keep, stacked_per_loop", [("none", {}), ("double", {2: 2}), ("single", {3: 1}),
                                                    ("all", {2: 2, 3: 1})])
def test_keep_gelu_grad_stacks_the_derivative_and_skips_its_recompute(keep, stacked_per_loop):
    """Under save_attention, the loops `keep_gelu_grad` names stack GELU's derivative per layer ([B, L,
    4C] bf16: two per double layer, img and txt, one per single layer) and their backward pass
    computes no tanh; the others keep no [B, L, 4C] tensor and compute GELU's tanh again (forward:
    one tanh per stream, 3 in all; each backward pass that recomputes adds its loop's)."""
    from jax._src.ad_checkpoint import saved_residuals

    cfg = tiny_flux.config(dtype="bfloat16", param_dtype="bfloat16", depth=2, depth_single_blocks=3,
                           remat_policy="save_attention", keep_gelu_grad=keep)
    gdef, state = tiny_flux.graphdef(cfg), tiny_flux.random_state(cfg)
    mlp = int(cfg.hidden_size * cfg.mlp_ratio)
    x = tiny_flux.inputs(batch=3, h=4, w=5, t=6)
    loss = lambda img: tiny_flux.output_loss(tiny_flux.forward(gdef, state, {**x, "img": img}).astype(jnp.float32))  # noqa: E731
    stacked = [a for a, why in saved_residuals(loss, x["img"]) if "output of scan" in why and a.shape[-1] == mlp]
    per_loop = {}
    for a in stacked:
        assert a.dtype == jnp.bfloat16 and a.shape[1] == 3, a
        per_loop[a.shape[0]] = per_loop.get(a.shape[0], 0) + 1
    assert per_loop == stacked_per_loop, [(str(a.dtype), a.shape) for a in stacked]
    recomputed = 3 - sum(stacked_per_loop.values())
    tanh = [e for e in _eqns(jax.make_jaxpr(jax.grad(loss))(x["img"]).jaxpr) if e.primitive.name == "tanh"]
    assert len(tanh) == 3 + recomputed


def test_unknown_keep_gelu_grad_is_user_error():
    with pytest.raises(UserError, match="keep_gelu_grad 'img' is not one of"):
        config.load(FluxConfig, None, overrides=["keep_gelu_grad=img"], base=FluxConfig())


def test_no_remat_traces_without_checkpoint(reference):
    """jax.checkpoint marks each residual it keeps with a reduce_precision, which splits TPU fusions:
    "none" must not be a checkpoint that saves everything (flux._remat)."""
    x, state, _ = reference
    gdef = tiny_flux.graphdef(tiny_flux.config())
    jaxpr = str(jax.make_jaxpr(lambda s: jax.grad(lambda s: tiny_flux.loss(gdef, s, x))(s))(state))
    assert "checkpoint" not in jaxpr and "remat" not in jaxpr


def test_no_remat_keeps_activations_only():
    """What a scanned layer loop without remat stacks for the backward pass, per layer, with frozen
    weights (gradients for the activations, as in adapter training), bf16: every residual is an
    activation (it has the batch dimension; no view of a kernel, `layers.project(view=...)`: those
    were a per-layer copy of the weights, 11 GiB per v5p chip for flux-dev with whole weights), none
    is float32 with the hidden or head width (the norms' float32 copies: recomputed), and the MLP
    keeps one [B, L, 4C] tensor per stream (GELU's derivative, `layers.gelu_tanh`)."""
    from jax._src.ad_checkpoint import saved_residuals  # the list behind jax.ad_checkpoint.print_saved_residuals

    cfg = tiny_flux.config(dtype="bfloat16", param_dtype="bfloat16", depth=2, depth_single_blocks=3)
    gdef, state = tiny_flux.graphdef(cfg), tiny_flux.random_state(cfg)
    b, head_dim, mlp = 3, cfg.hidden_size // cfg.num_heads, int(cfg.hidden_size * cfg.mlp_ratio)
    x = tiny_flux.inputs(batch=b, h=4, w=5, t=6)  # 26 tokens: no length equals a width
    loss = lambda img: tiny_flux.output_loss(tiny_flux.forward(gdef, state, {**x, "img": img}).astype(jnp.float32))  # noqa: E731
    stacked = [aval for aval, why in saved_residuals(loss, x["img"]) if "output of scan" in why and aval.size]
    shapes = [(str(a.dtype), a.shape) for a in stacked]
    assert len({a.shape[0] for a in stacked}) == 2, shapes  # the double and single loops' residuals
    assert all(b in a.shape[1:3] for a in stacked), shapes
    assert not [s for s in shapes if s[0] == "float32" and s[1][-1] in (cfg.hidden_size, head_dim)], shapes
    per_loop = {}
    for a in stacked:
        if a.shape[-1] == mlp:
            per_loop[a.shape[0]] = per_loop.get(a.shape[0], 0) + 1
    assert per_loop == {cfg.depth: 2, cfg.depth_single_blocks: 1}, shapes  # double: img and txt MLP


def test_no_remat_with_splash_keeps_q_and_k_before_norm_and_rope_only():
    """With splash attention the normed and the roped q and k are not stacked for the backward pass
    (`layers.normed_attention` computes them again from the qkv projection, which the norms' backward
    keeps anyway): per layer the [B, H, T+L, D] residuals are v and splash's output (double block;
    its q and k are kept per stream, [B, H, T, D] and [B, H, L, D]), and q, k, v and the output
    (single block). With splash's own VJP there were 6 and 8: it keeps q and k after rope, and
    rope's VJP its input (those two XLA drops as dead: docs/tpu.md). 128 tokens: splash pads to
    multiples of 128, and flux-dev's 1536 need no padding."""
    from jax._src.ad_checkpoint import saved_residuals

    cfg = tiny_flux.config(dtype="bfloat16", param_dtype="bfloat16", depth=2, depth_single_blocks=3, attention="splash")
    gdef, state = tiny_flux.graphdef(cfg), tiny_flux.random_state(cfg)
    b, t, heads, head_dim = 3, 8, cfg.num_heads, cfg.hidden_size // cfg.num_heads
    x = tiny_flux.inputs(batch=b, h=8, w=15, t=t)
    loss = lambda img: tiny_flux.output_loss(tiny_flux.forward(gdef, state, {**x, "img": img}).astype(jnp.float32))  # noqa: E731
    stacked = [aval for aval, why in saved_residuals(loss, x["img"]) if "output of scan" in why and aval.size]
    full = {}
    for a in stacked:
        if a.shape[1:] == (b, heads, t + 120, head_dim):
            full[a.shape[0]] = full.get(a.shape[0], 0) + 1
    assert full == {cfg.depth: 2, cfg.depth_single_blocks: 4}, [(str(a.dtype), a.shape) for a in stacked]


def _pallas_kernels(jaxpr) -> dict:
    """Pallas kernel name -> how often it is called, in `jaxpr` and every jaxpr inside it."""
    found = {}
    for eqn in _eqns(jaxpr):
        if eqn.primitive.name == "pallas_call":
            name = str(eqn.params.get("name_and_src_info", eqn.params.get("name"))).split(" ")[0]
            found[name] = found.get(name, 0) + 1
    return found


@pytest.mark.parametrize("policy, forward_kernels", [("save_attention", 2), ("full", 4)])
def test_save_attention_keeps_what_splash_backward_needs(policy, forward_kernels):
    """With splash attention, `save_attention` stacks per layer splash's output and its log-sum-exp
    (named `attn_output` and `attn_lse` inside `layers.normed_attention`), so the backward pass runs
    splash's backward kernels without its forward kernel: one forward kernel per layer loop (the
    forward pass), where `full` runs it again in each loop's backward. Before the names were inside,
    the single block's output was saved by nothing and its backward recomputed the forward kernel."""
    from jax._src.ad_checkpoint import saved_residuals

    cfg = tiny_flux.config(dtype="bfloat16", param_dtype="bfloat16", depth=2, depth_single_blocks=3, attention="splash",
                           remat_policy=policy)
    gdef, state = tiny_flux.graphdef(cfg), tiny_flux.random_state(cfg)
    b, t, heads, head_dim = 3, 8, cfg.num_heads, cfg.hidden_size // cfg.num_heads
    x = tiny_flux.inputs(batch=b, h=8, w=15, t=t)  # 128 tokens: no splash padding
    loss = lambda img: tiny_flux.output_loss(tiny_flux.forward(gdef, state, {**x, "img": img}).astype(jnp.float32))  # noqa: E731
    stacked = [(str(a.dtype), a.shape) for a, why in saved_residuals(loss, x["img"]) if "output of scan" in why]
    attention = [s for s in stacked if s[1][1:] in ((b, heads, t + 120, head_dim), (b, heads, t + 120))]
    kernels = _pallas_kernels(jax.make_jaxpr(jax.grad(loss))(x["img"]).jaxpr)
    forward = sum(n for name, n in kernels.items() if "fwd" in name)
    assert forward == forward_kernels, kernels
    if policy == "save_attention":  # output and lse, once per layer loop
        assert sorted(attention) == sorted([("bfloat16", (n, b, heads, t + 120, head_dim)) for n in (2, 3)]
                                           + [("float32", (n, b, heads, t + 120)) for n in (2, 3)]), stacked
    else:
        assert attention == [], stacked


@pytest.mark.slow
@pytest.mark.parametrize("policy", OFFLOAD)
def test_offload_policies_compile_for_tpu_with_host_memory(policy):
    """On v5p-8 the offloaded residuals live in pinned host memory (HLO memory space S(5))."""
    from tests.test_tpu_topology import _step

    fn, args, shardings = _step(tiny_flux.config(remat_policy=policy, depth=2, depth_single_blocks=2), batch=8)
    record, compiled = tpu_topology.compile_for_topology(fn, args, "v5p-8", (4, 1, 1), in_shardings=shardings)
    print(policy, record.per_chip_bytes)
    assert record.per_chip_bytes.get("host_temporaries", 0) > 0
    assert "S(5)" in compiled.as_text()


def test_unknown_policy_is_user_error():
    with pytest.raises(UserError, match="remat_policy 'some' is not one of"):
        config.load(FluxConfig, None, overrides=["remat_policy=some"], base=FluxConfig())


def test_every_policy_is_documented():
    doc = FluxConfig.__doc__
    assert all(f'"{p}"' in doc for p in REMAT_POLICIES)


def test_unrolled_blocks_keep_their_remat_when_compiled_for_tpu():
    """With the blocks unrolled (the XLA FLOP variants of `--topology`), remat must survive XLA's CSE:
    full remat recomputes every block's forward, so the compiled fwd+bwd does more FLOPs than without
    remat (with prevent_cse=False the TPU compiler merged the recomputation away: equal FLOPs)."""
    x = tiny_flux.inputs(batch=4, h=4, w=4, t=8)
    flops = {}
    for policy in ("none", "full"):
        cfg = tiny_flux.config(remat_policy=policy, scan_layers=False, depth=2, depth_single_blocks=2)
        gdef, state = tiny_flux.graphdef(cfg), tiny_flux.random_state(cfg)

        def grad_img(state, img, gdef=gdef):
            return jax.grad(lambda s, i: tiny_flux.output_loss(tiny_flux.forward(gdef, s, {**x, "img": i})), argnums=1)(state, img)

        flops[policy] = tpu_topology.compile_for_topology(grad_img, (state, x["img"]), "v5p-8", (1, -1, 1))[0].flops
    assert flops["full"] > 1.1 * flops["none"], flops
