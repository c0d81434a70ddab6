"""`fluxir train CONFIG [key=value ...] [--compile-only]`: the training run.

    run_dir/config.yaml        the resolved config
    run_dir/metrics.jsonl      one record per logged step (step, loss, loss_flow, loss_pix, lr, ...)
    run_dir/events/            TensorBoard events (tensorboardX)
    run_dir/checkpoints/<step> Orbax: adapter params, optimizer state, step, RNG (the data position is the step)
    run_dir/samples/           validation grids (rows LQ | restored | HQ)
    run_dir/adapter/           the final adapter (`adapter_io.save_adapter` format)
    run_dir/compile.json       --compile-only report

Rerunning the same command on the same run_dir resumes from the latest checkpoint. SIGTERM
(preemption) saves a checkpoint and exits 0.

Multi-host (`fluxir_jax.distributed`, docs/multihost.md): every process runs this same loop;
each loads only its rows of every global batch; Orbax checkpoints are written and restored by
all processes together; only process 0 logs and writes config.yaml, metrics, TensorBoard
events, samples and the final adapter. A checkpoint resumes with any number of processes.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import signal
import time

import numpy as np

from fluxir_jax import config as config_io
from fluxir_jax import distributed, parallel, train_config
from fluxir_jax.errors import UserError
from fluxir_jax.train_config import TrainConfig

_STEP_KEYS = ("step", "rng", "skipped", "bad_run")


class _Stop:
    """SIGTERM flag: the loop saves and exits after the current step."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        def handler(signum, frame):
            del signum, frame
            self.requested = True

        self._old = signal.signal(signal.SIGTERM, handler)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self._old)


def check_devices(cfg: TrainConfig, mesh) -> None:
    import jax

    div = parallel.batch_divisor(mesh)
    micro = cfg.batch_size // cfg.optim.accum_steps
    if cfg.batch_size % div or micro % div:
        raise UserError(f"batch_size={cfg.batch_size} (/ optim.accum_steps={cfg.optim.accum_steps}) is not divisible "
                        f"over the data axes (data x fsdp = {div})")
    if cfg.batch_size % jax.process_count():
        raise UserError(f"batch_size={cfg.batch_size} is not divisible by the {jax.process_count()} processes")


def _check_run_dir(cfg: TrainConfig, run_dir: pathlib.Path) -> None:
    """A run_dir made with another base or adapter cannot be resumed with this config."""
    old_file = run_dir / "config.yaml"
    if not old_file.is_file():
        return
    old = config_io.read_yaml(old_file)
    new = config_io.to_dict(cfg)
    for key in ("base", "adapter", "batch_size", "crop_size", "scale"):
        if old.get(key) != new.get(key):
            raise UserError(f"run_dir {run_dir} was made with a different {key} ({old.get(key)!r}); "
                            "use a new run_dir")


class Trainer:
    """Models, shardings and the jitted step for one config (shared by training and --compile-only)."""

    def __init__(self, cfg: TrainConfig, mesh, *, abstract: bool = False, log=print, base_config=None):
        import jax

        from fluxir_jax import train, train_setup

        train_config.check_static(cfg)  # library callers too: one-line errors, not a reshape failure deep in the step
        self.cfg, self.mesh = cfg, mesh
        self.models = m = train_setup.build(cfg, mesh, abstract=abstract, log=log, base_config=base_config)
        self.tx = train.make_optimizer(cfg.optim, cfg.steps)
        self.spec = train.StepSpec(m.base_graphdef, m.adapter_graphdef, m.vae_graphdef, m.base_abstract,
                                   m.vae_abstract, m.adapter_abstract, cfg, m.vae_config.z_channels,
                                   m.base_config.guidance_embed)
        self.step_fn = train.make_step_fn(self.spec, self.tx, mesh)
        adapter_abs = train_setup.with_shardings(m.adapter_abstract, m.adapter_sh)
        self.state_sh = train.state_shardings(m.adapter_sh, self.tx, adapter_abs, mesh)
        rep = parallel.replicated(mesh)
        self.frozen_sh = train.Frozen(base=m.base_sh, vae=m.vae_sh, txt=rep, y=rep, pe=rep, adapter_pe=rep)
        self.jitted = train.jit_step(self.step_fn, self.state_sh, self.frozen_sh, mesh)
        lat = (cfg.crop_size // 8, cfg.crop_size // 8)
        self.pe = train.rope_tables(m.base_config, m.text_len, lat)
        self.adapter_pe = train.rope_tables(m.base_config, cfg.adapter.text_len, lat)
        self._abstract_params = adapter_abs
        if not abstract:
            self.frozen = train.Frozen(base=m.base, vae=m.vae, txt=m.txt, y=m.y,
                                       pe=jax.device_put(self.pe, rep), adapter_pe=jax.device_put(self.adapter_pe, rep))
            self.state = jax.jit(lambda p: train.init_state(p, self.tx, cfg.seed), out_shardings=self.state_sh)(m.adapter)

    # -- abstract shapes ---------------------------------------------------------------------

    def abstract_args(self):
        import jax

        from fluxir_jax import train, train_setup

        m, cfg = self.models, self.cfg
        state = jax.eval_shape(lambda p: train.init_state(p, self.tx, cfg.seed), self._abstract_params)
        state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, self.state_sh)
        rep = parallel.replicated(self.mesh)
        sds = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep)  # noqa: E731
        frozen = train.Frozen(base=train_setup.with_shardings(m.base_abstract, m.base_sh),
                              vae=train_setup.with_shardings(m.vae_abstract, m.vae_sh),
                              txt=jax.ShapeDtypeStruct((m.text_len, m.base_config.context_in_dim), np.float32, sharding=rep),
                              y=jax.ShapeDtypeStruct((m.base_config.vec_in_dim,), np.float32, sharding=rep),
                              pe=sds(self.pe), adapter_pe=sds(self.adapter_pe))
        img = (cfg.batch_size, cfg.crop_size, cfg.crop_size, 3)
        bsh = parallel.batch_sharding(self.mesh, 4)
        batch = {k: jax.ShapeDtypeStruct(img, np.float32, sharding=bsh) for k in ("hq", "lq_up")}
        return state, frozen, batch

    def analytic_flops(self) -> float:
        from fluxir_jax import aot

        return aot.analytic_flops(self.step_fn, *self.abstract_args())


# ----------------------------------------------------------------------------- compile-only


def compile_only(cfg: TrainConfig, mesh, log=print) -> dict:
    """Lower + compile the step from abstract shapes (no data, no weights): memory and FLOPs."""
    import jax

    from fluxir_jax import aot

    trainer = Trainer(cfg, mesh, abstract=True, log=log)
    args = trainer.abstract_args()
    _, rep = aot.compile_report(trainer.jitted, *args)
    analytic = aot.analytic_flops(trainer.step_fn, *args)
    bc = trainer.models.base_config

    def variant(d, s):
        t = _unrolled_trainer(cfg, mesh, bc, d, s)
        return t.jitted, t.abstract_args()

    n = len(mesh.devices.flat)
    # XLA's cost analysis is per device (of the SPMD-partitioned program): times n for the step
    xla = n * aot.xla_flops_unrolled(variant, bc.depth, bc.depth_single_blocks)
    return {"per_chip_bytes": rep["per_chip_bytes"],
            "flops_per_step": {"analytic": analytic, "xla": xla, "xla_scan_body_once": n * rep["xla_flops_once"]},
            "devices": n, "device_kind": jax.devices()[0].device_kind, "mesh": dict(mesh.shape),
            "batch_size": cfg.batch_size, "crop_size": cfg.crop_size, "base": cfg.base,
            "lower_s": rep["lower_s"], "compile_s": rep["compile_s"]}


def compile_topology(cfg: TrainConfig, topology: str, log=print, memory_only: bool = False,
                     slice_knobs: list[str] | None = None) -> dict:
    """The `--compile-only --topology NAME` record: the real step compiled for a Cloud TPU slice.

    The mesh is `cfg.mesh` over the slice's chips (-1 fills); nothing is read or allocated. The
    whole-step XLA figures are read off the scanned program of one micro-batch (times
    optim.accum_steps, `_scanned_step_cost`), see `aot.topology_record`; `memory_only` skips them (one compile: memory and
    fits; the step-time estimate is then the FLOP bound). `slice_knobs`: the config's knobs for this
    slice already in `cfg` (`train_config.for_slice`), named in the record.
    """
    from fluxir_jax import aot, tpu_topology

    tpu_topology.parse_accelerator(topology)  # unknown name: one line before anything is compiled
    devices = tpu_topology.topology_devices(topology, cfg.mesh.dcn_data)
    sizes = parallel.resolve_sizes(cfg.mesh, len(devices))
    shape = (sizes["data"] * cfg.mesh.dcn_data, sizes["fsdp"], sizes["tensor"])
    mesh = tpu_topology.topology_mesh(topology, shape, parallel.AXES, cfg.mesh.dcn_data)
    check_devices(cfg, mesh)
    trainer = Trainer(cfg, mesh, abstract=True, log=log)  # eager set-up runs on this host, not under the TPU mesh
    args = trainer.abstract_args()
    analytic, model_flops, kernel_flops = step_flops(cfg, trainer, mesh)
    accum = cfg.optim.accum_steps
    what = "train step (forward, backward, AdamW update)."
    info = dict(program="train_step", base=cfg.base, batch_size=cfg.batch_size, per_chip_batch=cfg.batch_size / mesh.devices.size,
                accum_steps=accum, crop_size=cfg.crop_size, remat_policy=cfg.model.remat_policy,
                keep_gelu_grad=cfg.model.keep_gelu_grad, attention=cfg.model.attention,
                splash_fused_bwd=trainer.models.base_config.splash_fused_bwd, frozen_sharding=cfg.model.frozen_sharding,
                frozen_replicated=list(cfg.model.frozen_replicated), slice_knobs=list(slice_knobs or ()))
    try:
        compiled, seconds = aot.compile_on(trainer.jitted, args, mesh)
    except aot.OutOfHBM as e:
        return aot.out_of_hbm_record(topology, mesh, e, what, analytic, **info)
    fits = aot.tpu_topology_fits(compiled, topology)
    whole = (_scanned_step_cost(cfg, mesh, trainer.models.base_config, compiled, topology)
             if fits and not memory_only else None)  # no extra compiles
    return aot.topology_record(topology, mesh, compiled, seconds, analytic, whole, what, repeat=accum,
                               model_flops=model_flops, kernel_flops=kernel_flops,
                               not_derived="--memory-only was given" if memory_only and fits else "", **info)


def _scanned_step_cost(cfg: TrainConfig, mesh, bc, compiled, topology: str) -> dict:
    """`aot.scanned_program_cost` of one micro-batch of the step: the program as compiled when
    optim.accum_steps is 1, else the micro-batch step compiled apart at full depth, plus the
    scanned variants with aot.SCAN_DEPTH blocks of each kind."""
    import dataclasses

    from fluxir_jax import aot, tpu_topology

    accum = cfg.optim.accum_steps
    micro = dataclasses.replace(cfg, batch_size=cfg.batch_size // accum, optim=dataclasses.replace(cfg.optim, accum_steps=1))
    if accum == 1:
        main = tpu_topology.cost_details(compiled, topology)
    else:
        t = Trainer(micro, mesh, abstract=True, log=lambda *a: None)
        main = tpu_topology.cost_details(aot.compile_on(t.jitted, t.abstract_args(), mesh)[0], topology)

    def variant(group_double, group_single):
        small = dataclasses.replace(bc, depth=aot.SCAN_DEPTH, depth_single_blocks=aot.SCAN_DEPTH, scan_layers=True,
                                    scan_unroll=1, scan_unroll_single=None,
                                    scan_group=group_double, scan_group_single=group_single)
        t = Trainer(micro, mesh, abstract=True, log=lambda *a: None, base_config=small)
        return aot.compile_on(t.jitted, t.abstract_args(), mesh)[0]

    counted = (aot.counted_blocks(bc.depth, bc.scan_unroll * bc.scan_group, bc.scan_layers),
               aot.counted_blocks(bc.depth_single_blocks, bc.unroll_single * bc.group_single, bc.scan_layers))
    return aot.scanned_program_cost(main, variant, bc.depth, bc.depth_single_blocks, counted, topology)


def step_flops(cfg: TrainConfig, trainer: Trainer, mesh) -> tuple[float, float, float]:
    """(analytic, model, kernels) FLOPs of one step: the jaxpr count of the step as compiled (remat
    recompute and the work inside Pallas kernels included), the model FLOPs (`model_step_flops`, the
    MFU numerator) and the part of `analytic` inside Pallas kernels (splash attention), which XLA's
    cost analysis does not see. Traced under `jax.set_mesh(mesh)` (splash attention's shard_map sees
    the mesh), which also works over compile-only TPU devices."""
    import jax

    from fluxir_jax import aot

    with jax.set_mesh(mesh):
        analytic, kernels = aot.flop_counts(trainer.step_fn, *trainer.abstract_args())
    return analytic, (analytic if _is_model_step(cfg) else model_step_flops(cfg, mesh)), kernels


def _is_model_step(cfg: TrainConfig) -> bool:
    """Whether the step as configured does exactly the model's FLOPs (no remat, plain XLA attention)."""
    return cfg.model.remat_policy == "none" and cfg.model.attention == "xla"


def model_step_flops(cfg: TrainConfig, mesh) -> float:
    """Model FLOPs of one step (the MFU numerator): the jaxpr count of the step traced without remat
    and with XLA attention, so recomputed activations (remat, and the forward that a flash kernel's
    backward recomputes) are not counted as useful work, and attention run by cuDNN (opaque to the count) is. Traced only,
    under `jax.set_mesh(mesh)`; the abstract Trainer is built outside it (its eager set-up cannot run
    on compile-only TPU devices)."""
    import dataclasses

    import jax

    from fluxir_jax import aot

    plain = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, remat_policy="none", attention="xla"))
    t = Trainer(plain, mesh, abstract=True, log=lambda *a: None)
    with jax.set_mesh(mesh):
        return aot.analytic_flops(t.step_fn, *t.abstract_args())


def _unrolled_trainer(cfg: TrainConfig, mesh, base_config, depth: int, depth_single: int) -> Trainer:
    """An abstract Trainer whose base has `depth` / `depth_single` unrolled blocks (XLA FLOP variants)."""
    import dataclasses

    small = dataclasses.replace(base_config, depth=depth, depth_single_blocks=depth_single, scan_layers=False)
    return Trainer(cfg, mesh, abstract=True, log=lambda *a: None, base_config=small)


# ----------------------------------------------------------------------------- training


def _data_iterator(cfg: TrainConfig, mesh, start_step: int):
    """This process's rows of global batches start_step, start_step + 1, ... (one per step)."""
    from fluxir_jax.data.pipeline import PipelineConfig, make_iterator
    from fluxir_jax.data.sources import open_source

    pc = PipelineConfig(batch_size=cfg.batch_size, crop_size=cfg.crop_size, scale=cfg.scale, seed=cfg.seed,
                        shuffle=cfg.data.shuffle, flip=cfg.data.flip, on_the_fly=cfg.data.on_the_fly, lq_up=True,
                        workers=cfg.data.workers, read_threads=cfg.data.read_threads)
    return make_iterator(open_source(cfg.data.train, cfg.data.data_dir), pc, rows=parallel.host_rows(mesh, cfg.batch_size),
                         start_batch=start_step)


def _checkpoint_manager(run_dir: pathlib.Path, cfg: TrainConfig):
    import jax
    import orbax.checkpoint as ocp

    if jax.process_count() > 1:
        distributed.orbax_uses_coordination_barriers()
    opts = ocp.CheckpointManagerOptions(max_to_keep=cfg.checkpoint.keep, enable_async_checkpointing=True,
                                        create=True)
    return ocp.CheckpointManager((run_dir / "checkpoints").absolute(), options=opts)


def _state_tree(state) -> dict:
    """TrainState -> a plain dict for Orbax (optimizer state as a list of leaves)."""
    import jax

    return {"params": state.params, "opt": jax.tree.leaves(state.opt_state),
            **{k: getattr(state, k) for k in _STEP_KEYS}}


def _from_tree(tree: dict, like):
    import jax

    from fluxir_jax.train import TrainState

    opt = jax.tree.unflatten(jax.tree.structure(like.opt_state), tree["opt"])
    return TrainState(params=tree["params"], opt_state=opt, **{k: tree[k] for k in _STEP_KEYS})


def _save(mgr, step: int, state, force: bool = False) -> None:
    """Every process calls this (Orbax writes each process's shards and syncs them)."""
    import orbax.checkpoint as ocp

    mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(_state_tree(state))), force=force)


def _restore(mgr, trainer: Trainer):
    """(step, state) of the latest checkpoint, restored straight into this mesh's shardings; (None, None)."""
    import jax
    import orbax.checkpoint as ocp

    step = mgr.latest_step()
    if step is None:
        return None, None
    like = _state_tree(trainer.state)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), like)
    out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    return step, _from_tree(out["state"], trainer.state)


def _to_host(tree):
    """Whole numpy arrays of a (possibly multi-process) sharded pytree; every process must call it."""
    import jax

    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def _final_adapter(trainer: Trainer, state, run_dir: pathlib.Path, main: bool) -> None:
    from fluxir_jax.models import adapter_io
    from fluxir_jax.train import merge_pure

    m = trainer.models
    distributed.barrier("final_adapter")
    params = _to_host(state.params)
    if main:
        adapter = merge_pure(m.adapter_graphdef, m.adapter_abstract, params)
        adapter_io.save_adapter(adapter, run_dir / "adapter", overwrite=True)


def train(cfg: TrainConfig, *, log=print) -> dict:
    """Train (or resume) the run in cfg.run_dir; returns a summary dict."""
    import jax

    from fluxir_jax import train_metrics

    mesh = parallel.make_mesh(cfg.mesh)
    check_devices(cfg, mesh)
    train_config.check_data(cfg)
    run_dir = pathlib.Path(cfg.run_dir).absolute()
    _check_run_dir(cfg, run_dir)
    main = jax.process_index() == 0
    if not main:
        log = lambda *a, **k: None  # noqa: E731  (only process 0 talks)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        config_io.dump(cfg, run_dir / "config.yaml")
    with jax.set_mesh(mesh):
        trainer = Trainer(cfg, mesh, log=log)
        mgr = _checkpoint_manager(run_dir, cfg)
        start, restored = _restore(mgr, trainer)
        state = trainer.state
        if restored is not None:
            state = restored
            log(f"resumed from step {start} ({run_dir / 'checkpoints'})")
        start = int(start or 0)
        iterator = _data_iterator(cfg, mesh, start)
        validator = None
        if cfg.val.every > 0 and cfg.data.val:
            from fluxir_jax.train_val import Validator

            validator = Validator(cfg, trainer, run_dir)
        # the MFU numerator; a step that does exactly the model's FLOPs is counted from its own trace below
        flops = None if _is_model_step(cfg) else model_step_flops(cfg, mesh)
        n_dev = len(mesh.devices.flat)
        peak = train_metrics.peak_tflops(jax.devices()[0].device_kind, cfg.peak_tflops)
        logger = train_metrics.MetricsLogger(run_dir, cfg.steps, start, enabled=main)
        step = start
        stopped = None
        t_last, n_last = time.perf_counter(), step
        try:
            with _Stop() as stop:
                batch = next(iterator) if step < cfg.steps else None
                compiled = None
                while step < cfg.steps:
                    global_batch = parallel.put_global({"hq": batch["hq"], "lq_up": batch["lq_up"]}, mesh)
                    if compiled is None:  # every process compiles, then they start the step together
                        traced = trainer.jitted.trace(state, trainer.frozen, global_batch)
                        if flops is None:
                            from fluxir_jax import aot

                            flops = aot.jaxpr_flops(traced.jaxpr.jaxpr)
                        compiled = traced.lower().compile()
                        distributed.barrier("compiled")
                    state, metrics = compiled(state, trainer.frozen, global_batch)
                    step += 1
                    # read once (a SIGTERM during this iteration acts at the next), agreed by all processes
                    stopping = distributed.any_process(stop.requested, f"stop/{step}",
                                                       f"stop/{step - 1}" if step > start + 1 else None)
                    if step % cfg.checkpoint.every == 0 or step == cfg.steps or stopping:
                        _save(mgr, step, state)
                    if step < cfg.steps and not stopping:
                        batch = next(iterator)
                    metrics = jax.device_get(metrics)
                    logger.advance()
                    if not metrics["finite"]:
                        bad = int(jax.device_get(state.bad_run))
                        log(f"step {step}: non-finite loss or gradient; step skipped ({bad} in a row)")
                        if bad >= cfg.max_bad_steps:
                            stopped = f"{bad} consecutive non-finite steps (max_bad_steps={cfg.max_bad_steps})"
                            logger.write({"step": step, "skipped_steps": int(jax.device_get(state.skipped)),
                                          "stopped": stopped})
                            break
                    if step % cfg.log_every == 0 or step == cfg.steps:
                        now = time.perf_counter()
                        dt = (now - t_last) / max(step - n_last, 1)
                        t_last, n_last = now, step
                        rec = {"step": step, "loss": float(metrics["loss"]), "loss_flow": float(metrics["loss_flow"]),
                               "loss_pix": float(metrics["loss_pix"]), "lr": float(metrics["lr"]),
                               "grad_norm": float(metrics["grad_norm"]), "step_time_s": dt,
                               "images_per_s": cfg.batch_size / dt,
                               "tflops_per_device": flops / dt / n_dev / 1e12,
                               "skipped_steps": int(jax.device_get(state.skipped))}
                        if peak:
                            rec["mfu"] = rec["tflops_per_device"] / peak
                        logger.write(rec)
                    if validator is not None and step % cfg.val.every == 0:
                        logger.write({"step": step, **validator.run(state.params, step)})
                    if stopping:
                        mgr.wait_until_finished()
                        log(f"SIGTERM: saved checkpoint at step {step}; exiting")
                        return {"step": step, "stopped": "sigterm"}
            mgr.wait_until_finished()
            if stopped is not None:
                raise UserError(f"training stopped at step {step}: {stopped}")
            _final_adapter(trainer, state, run_dir, main)
            log(f"done: {step} steps, adapter in {run_dir / 'adapter'}")
            return {"step": step, "skipped": int(jax.device_get(state.skipped))}
        finally:
            logger.close()
            mgr.close()


# ----------------------------------------------------------------------------- CLI


def main(args) -> int:
    import jax

    cfg = train_config.load(args.config, list(args.overrides))
    train_config.check_static(cfg)
    if args.compile_only:
        cfg = _with_slice_knobs(cfg, args.overrides)
        mesh = parallel.make_mesh(cfg.mesh)
        check_devices(cfg, mesh)
        with jax.set_mesh(mesh):
            report = compile_only(cfg, mesh, log=lambda *a: None)
        run_dir = pathlib.Path(cfg.run_dir)
        if jax.process_index() == 0 and run_dir.is_dir():
            tmp = run_dir / "compile.json.tmp"
            tmp.write_text(json.dumps(report, indent=1))
            tmp.replace(run_dir / "compile.json")
        print(json.dumps(report), flush=True)
        return 0
    distributed.initialize(args, log=print)
    train(_with_slice_knobs(cfg, args.overrides))
    return 0


def _with_slice_knobs(cfg: TrainConfig, overrides) -> TrainConfig:
    """`cfg` with its `slice_knobs` for the slice these devices are, said in one line on process 0;
    the command line's `overrides` still win."""
    import jax

    from fluxir_jax import tpu_topology

    accelerator = tpu_topology.accelerator_of(jax.devices(), cfg.mesh.dcn_data)
    cfg, knobs = train_config.for_slice(cfg, accelerator, list(overrides))
    if knobs and jax.process_index() == 0:
        print(f"config: slice_knobs for {accelerator}: {' '.join(knobs)}", flush=True)
    return cfg


def _add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile-only", action="store_true",
                   help="lower and compile the step from abstract shapes, print a JSON memory/FLOP report, exit")
    p.add_argument("--topology", metavar="NAME",
                   help="with --compile-only: compile for this Cloud TPU slice (v5p-8, v6e-8, v5litepod-16, ...) "
                        "from this machine and report per-chip memory, fits, FLOPs, estimated step time and MFU "
                        "(docs/tpu.md); exit 2 if it does not fit")
    p.add_argument("-o", "--out", metavar="FILE", help="with --topology: write the record here (default run_dir/compile.json)")
    p.add_argument("--memory-only", action="store_true",
                   help="with --topology: compile the step once, for per-chip memory and fits; skip the unrolled "
                        "compiles behind XLA's whole-step FLOPs and time (about 2/3 of the wall time for flux-dev), "
                        "so the step-time estimate is the FLOP bound and there is no MFU")
    distributed.add_args(p)


def register(sub) -> None:
    p = sub.add_parser("train", help="train the FluxIR adapter on a frozen FLUX.1 base (sharded, resumable)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="train config YAML (e.g. configs/train/tiny.yaml)")
    # REMAINDER so that flags may also follow the overrides (argparse cannot mix them otherwise);
    # _dispatch parses the flags found among them
    p.add_argument("overrides", nargs=argparse.REMAINDER,
                   help="config overrides key.sub=value (e.g. mesh.fsdp=8 steps=100); flags may come before or after")
    _add_flags(p)
    p.set_defaults(func=_dispatch)


def _split_flags(args) -> None:
    """Move the flags that follow CONFIG (left among the REMAINDER overrides) into `args`."""
    flags = argparse.ArgumentParser(prog="fluxir train", add_help=False, allow_abbrev=False)
    _add_flags(flags)
    found, rest = flags.parse_known_args(list(args.overrides))
    for bad in rest:
        if bad.startswith("-"):
            raise UserError(f"fluxir train: unknown flag {bad} (flags: --compile-only, --topology, --out, --memory-only, "
                            "--coordinator, --num-processes, --process-id)")
    for name, value in vars(found).items():
        if value not in (None, False):
            setattr(args, name, value)
    args.overrides = rest


def _dispatch(args) -> int:
    """`--topology` (which implies --compile-only) compiles for a TPU slice; everything else is `main`."""
    _split_flags(args)
    if not args.topology:
        if args.out:
            raise UserError("--out is for --compile-only --topology NAME (plain --compile-only writes run_dir/compile.json)")
        if args.memory_only:
            raise UserError("--memory-only is for --compile-only --topology NAME")
        return main(args)
    from fluxir_jax import aot, tpu_topology

    cfg = train_config.load(args.config, list(args.overrides))
    train_config.check_static(cfg)
    tpu_topology.parse_accelerator(args.topology)  # unknown name: one line
    cfg, knobs = train_config.for_slice(cfg, args.topology, list(args.overrides))
    record = compile_topology(cfg, args.topology, log=lambda *a: None, memory_only=args.memory_only, slice_knobs=knobs)
    return aot.emit_record(record, args.out or pathlib.Path(cfg.run_dir) / "compile.json", "train")
