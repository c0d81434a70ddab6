"""`fluxir demo [--quick] [-o demo_out]`: acquire -> adapt -> restore on the `tiny` preset, on a CPU.

Runs the library functions behind the CLI commands in this process, with no downloads and no
user files (`make demo` runs it over 8 emulated CPU devices):

    acquire   `fluxir init tiny` (random base); `fluxir gen` images (generator path, scored with
              NIQE, selected); HQ photos bundled with scikit-image, cropped, scored with NIQE and
              selected by the same percentile rule; all degraded into a paired training dataset
              (`fluxir degrade`); other photos held out, degraded into the test pairs
    adapt     `fluxir train` (checkpoints, metrics.jsonl, validation grids on the held-out pairs);
              the untrained (zero-initialised) adapter is saved too
    restore   `fluxir restore` of the held-out LQ with the untrained and the trained adapter
              (parallel=pmap), plain bicubic upsampling, `fluxir eval` (PSNR/SSIM) against the HQ
    report    report.json, report.png, loss.png, report.html

Everything is built in `<out>.partial/` and renamed to `<out>` at the end.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import shutil
import time

import numpy as np

from fluxir_jax.errors import UserError

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
# scikit-image's bundled photos (no download): colour photos for training, two others held out
TRAIN_PHOTOS = ("astronaut", "rocket", "immunohistochemistry", "hubble_deep_field", "retina", "colorwheel",
                "camera", "brick")
TEST_PHOTOS = ("chelsea", "coffee")
TRAIN_CROP, TEST_CROP, SCALE = 192, 128, 4   # NIQE needs >= 192 x 96; test LQ is 32 x 32
STATEMENT = ("The base is the tiny preset with random weights, which is no generative prior: this demo proves "
             "that the machinery (init, gen, degrade, train, restore, eval) runs end to end, not restoration quality.")


@dataclasses.dataclass(frozen=True)
class Plan:
    """How much of each stage a run does."""

    gen_count: int
    train_steps: int
    restore_steps: int
    checkpoint_every: int
    val_every: int


FULL = Plan(gen_count=8, train_steps=300, restore_steps=8, checkpoint_every=100, val_every=100)
# quick: one checkpoint and one validation (at the last step); every program is still compiled once
QUICK = Plan(gen_count=8, train_steps=30, restore_steps=4, checkpoint_every=30, val_every=30)


def _config(*parts: str) -> str:
    path = CONFIGS.joinpath(*parts)
    if not path.is_file():
        raise UserError(f"demo config {path} not found (fluxir demo runs from a source checkout)")
    return str(path)


def _write_png(arr: np.ndarray, path: pathlib.Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr, np.uint8)).save(path, format="PNG", compress_level=1)


def _read_png(path: pathlib.Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def photo_crops(name: str, crop: int) -> dict[str, np.ndarray]:
    """Two `crop`-pixel squares (top-left and bottom-right) of a scikit-image photo downscaled (Lanczos)
    to a shorter side of 2 x crop, as 8-bit RGB."""
    import skimage.data
    from PIL import Image

    img = np.asarray(getattr(skimage.data, name)())
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    pil = Image.fromarray(img[..., :3].astype(np.uint8))
    r = 2 * crop / min(pil.size)
    a = np.asarray(pil.resize((round(pil.width * r), round(pil.height * r)), Image.Resampling.LANCZOS))
    h, w = a.shape[:2]
    return {f"{name}_0": a[:crop, :crop], f"{name}_1": a[h - crop:, w - crop:]}


# ----------------------------------------------------------------------------- stages


def acquire(work: pathlib.Path, plan: Plan, log) -> dict:
    """Checkpoint, generated + photo HQ images, selection, training and test pairs."""
    from fluxir_jax.data.dataset import PairedSource
    from fluxir_jax.data.degrade_folder import degrade_folder, load_configs
    from fluxir_jax.fluxgen import run_gen
    from fluxir_jax.fluxgen_config import load_config as gen_config
    from fluxir_jax.fluxgen_select import select
    from fluxir_jax.init_checkpoint import init_checkpoint
    from fluxir_jax.iqa.eval_cli import evaluate
    from fluxir_jax.train_config import load as train_config

    text_len = train_config(_config("train", "tiny.yaml")).adapter.text_len
    ckpt = work / "checkpoint"
    log("[acquire] fluxir init tiny")
    init_checkpoint("tiny", ckpt, seed=0, text_len=text_len, progress=False, log=log)

    log(f"[acquire] fluxir gen: {plan.gen_count} images from the random base, NIQE-scored and selected")
    gcfg = gen_config(_config("gen", "tiny.yaml"), [f"base={ckpt}", f"out={work / 'gen'}", f"count={plan.gen_count}",
                                                    "workers=0", "progress=false", "parallel=pmap"])
    gen = run_gen(gcfg)

    hq_train, photos_dir = work / "hq" / "train", work / "hq" / "photos"
    for ex in PairedSource(work / "gen" / "pairs"):
        (hq_train / f"gen_{ex['id']}.png").parent.mkdir(parents=True, exist_ok=True)
        (hq_train / f"gen_{ex['id']}.png").write_bytes(ex["hq_png"])
    n_gen_kept = len(list(hq_train.glob("gen_*.png")))
    for name in TRAIN_PHOTOS:
        for key, img in photo_crops(name, TRAIN_CROP).items():
            _write_png(img, photos_dir / f"{key}.png")
    log("[acquire] NIQE of the photo crops (fluxir eval --metrics niqe), percentile selection")
    scored = evaluate(photos_dir, None, ["niqe"])
    scores = {pathlib.Path(r["image"]).stem: {"niqe": r["niqe"]} for r in scored["per_image"]}
    kept, sel_report = select(scores, {"niqe": True}, percentile=gcfg.select.percentile)
    for key in kept:
        shutil.copy(photos_dir / f"{key}.png", hq_train / f"photo_{key}.png")

    log("[acquire] fluxir degrade: training pairs")
    train_ds, test_ds = work / "data" / "train", work / "data" / "test"
    dcfg, deg = load_configs(None, [f"scale={SCALE}", f"gt.crop_size={64}", "workers=1"])
    s_train = degrade_folder(hq_train, train_ds, dcfg, deg, progress=False)
    hq_test = work / "hq" / "test"
    for name in TEST_PHOTOS:
        for key, img in photo_crops(name, TEST_CROP).items():
            _write_png(img, hq_test / f"{key}.png")
    log("[acquire] fluxir degrade: held-out test pairs")
    dcfg_t, deg_t = load_configs(None, [f"scale={SCALE}", f"gt.crop_size={TEST_CROP}", "workers=1", "seed=1"])
    degrade_folder(hq_test, test_ds, dcfg_t, deg_t, progress=False)
    test_lq, test_hq = work / "test" / "lq", work / "test" / "hq"
    for ex in PairedSource(test_ds):
        stem = pathlib.PurePosixPath(ex["id"]).stem
        (test_lq / f"{stem}.png").parent.mkdir(parents=True, exist_ok=True)
        (test_lq / f"{stem}.png").write_bytes(ex["lq_png"])
        (test_hq / f"{stem}.png").parent.mkdir(parents=True, exist_ok=True)
        (test_hq / f"{stem}.png").write_bytes(ex["hq_png"])
    return {
        "checkpoint": ckpt, "train_ds": train_ds, "test_ds": test_ds, "test_lq": test_lq, "test_hq": test_hq,
        "info": {
            "gen_generated": plan.gen_count, "gen_kept": n_gen_kept,
            "gen_selection": {k: gen.get(k) for k in ("kept", "dropped", "metrics") if k in gen},
            "photos_scored": len(scores), "photos_kept": len(kept), "photo_selection": sel_report,
            "photo_niqe": {k: round(v["niqe"], 4) for k, v in sorted(scores.items())},
            "train_pairs": s_train["num_examples"], "test_images": len(list(test_lq.glob("*.png"))),
            "train_photos": list(TRAIN_PHOTOS), "test_photos": list(TEST_PHOTOS),
        },
    }


def save_untrained_adapter(cfg, path: pathlib.Path, log) -> None:
    """The adapter exactly as `fluxir train` starts it (zero-initialised gates), saved for restoration."""
    import jax

    from fluxir_jax import parallel, train_setup
    from fluxir_jax.models import adapter_io
    from fluxir_jax.train import merge_pure

    mesh = parallel.make_mesh(cfg.mesh)
    with jax.set_mesh(mesh):
        m = train_setup.build(cfg, mesh, log=log)
        adapter = merge_pure(m.adapter_graphdef, m.adapter_abstract, jax.device_get(m.adapter))
    adapter_io.save_adapter(adapter, path, overwrite=True)


def adapt(work: pathlib.Path, data: dict, plan: Plan, log) -> dict:
    from fluxir_jax import train_config, train_loop

    run_dir = work / "run"
    cfg = train_config.load(_config("train", "tiny.yaml"), [
        f"base={data['checkpoint']}", f"data.train={data['train_ds']}", f"data.val={data['test_ds']}",
        f"run_dir={run_dir}", f"steps={plan.train_steps}", f"checkpoint.every={plan.checkpoint_every}",
        f"val.every={plan.val_every}", "log_every=1"])
    train_config.check_static(cfg)
    save_untrained_adapter(cfg, work / "untrained_adapter", log)
    log(f"[adapt] fluxir train: {cfg.steps} steps, batch {cfg.batch_size}, {cfg.crop_size}-pixel crops")
    train_loop.train(cfg, log=log)
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = {r["step"]: r["loss"] for r in recs if "loss" in r}
    steps = sorted(losses)
    window = min(20, max(3, len(steps) // 5))   # "first / last few" logged steps
    first = float(np.mean([losses[s] for s in steps[:window]]))
    last = float(np.mean([losses[s] for s in steps[-window:]]))
    return {"run_dir": run_dir, "adapter": run_dir / "adapter", "untrained": work / "untrained_adapter",
            "steps": steps, "losses": [losses[s] for s in steps],
            "info": {"steps": cfg.steps, "batch_size": cfg.batch_size, "crop_size": cfg.crop_size,
                     "lr": cfg.optim.lr,
                     "loss": {"window": window, "first_mean": first, "last_mean": last, "falling": last < first,
                              "final": losses[steps[-1]]}}}


def restore_and_eval(work: pathlib.Path, data: dict, trained: dict, plan: Plan, log) -> dict:
    from fluxir_jax.iqa.eval_cli import evaluate
    from fluxir_jax.restore import as_rgb_float, load_config, output_size, to_uint8, upsample
    from fluxir_jax.restore_folder import restore_folder

    rcfg = load_config(_config("restore", "default.yaml"),
                       [f"steps={plan.restore_steps}", "parallel=pmap", f"scale={SCALE}", "allow_zero_text=true"])
    outs = {"bicubic": work / "restored" / "bicubic", "untrained": work / "restored" / "untrained",
            "trained": work / "restored" / "trained"}
    for lq_path in sorted(data["test_lq"].glob("*.png")):
        lq = as_rgb_float(_read_png(lq_path))
        _write_png(to_uint8(upsample(lq, output_size(*lq.shape[:2], rcfg))), outs["bicubic"] / lq_path.name)
    summaries = {}
    for which, adapter in (("untrained", trained["untrained"]), ("trained", trained["adapter"])):
        log(f"[restore] fluxir restore ({which} adapter, parallel=pmap, {rcfg.steps} steps)")
        summaries[which] = restore_folder(str(data["checkpoint"]), str(adapter), str(data["test_lq"]),
                                          str(outs[which]), rcfg, progress=False, log=log)
    log("[restore] fluxir eval --metrics psnr,ssim against the held-out HQ")
    evals = {k: evaluate(d, data["test_hq"], ["psnr", "ssim"]) for k, d in outs.items()}
    for k, ev in evals.items():
        (work / f"eval_{k}.json").write_text(json.dumps(ev, indent=1, default=float))
    comparison = {k: {"psnr": ev["summary"]["psnr"]["mean"], "ssim": ev["summary"]["ssim"]["mean"]}
                  for k, ev in evals.items()}
    per_image = {}
    for k, ev in evals.items():
        for r in ev["per_image"]:
            per_image.setdefault(r["image"], {})[k] = {"psnr": r["psnr"], "ssim": r["ssim"]}
    return {"steps": rcfg.steps, "outs": outs, "comparison": comparison, "per_image": per_image,
            "restore_seconds": {k: s["seconds"] for k, s in summaries.items()},
            "restore_images_per_second": {k: s["images_per_second"] for k, s in summaries.items()}}


def write_report(work: pathlib.Path, quick: bool, data: dict, trained: dict, res: dict,
                 seconds: dict, cpu_seconds: float) -> dict:
    from fluxir_jax import demo_report

    rows = []
    for name in sorted(res["per_image"]):
        m = res["per_image"][name]
        lq = _read_png(data["test_lq"] / name)
        row = [(lq, f"LQ {lq.shape[1]}x{lq.shape[0]}")]
        for k in ("bicubic", "untrained", "trained"):
            row.append((_read_png(res["outs"][k] / name), f"{m[k]['psnr']:.2f} dB\nSSIM {m[k]['ssim']:.3f}"))
        row.append((_read_png(data["test_hq"] / name), name))
        rows.append(row)
    demo_report.comparison_grid(rows, ["LQ", "bicubic", "untrained adapter", "trained adapter", "HQ"],
                                work / "report.png")
    demo_report.loss_plot(trained["steps"], trained["losses"], work / "loss.png")
    c = res["comparison"]
    loss = trained["info"]["loss"]
    measured = (f"Measured on {data['info']['test_images']} held-out images: bicubic {c['bicubic']['psnr']:.2f} dB / "
                f"SSIM {c['bicubic']['ssim']:.4f}, untrained adapter {c['untrained']['psnr']:.2f} dB / "
                f"{c['untrained']['ssim']:.4f}, trained adapter {c['trained']['psnr']:.2f} dB / "
                f"{c['trained']['ssim']:.4f}; training loss {loss['first_mean']:.4f} -> {loss['last_mean']:.4f} "
                f"(mean of the first / last {loss['window']} logged steps).")
    rel = lambda p: pathlib.Path(p).relative_to(work).as_posix()  # noqa: E731
    artifacts = {
        "report_png": "report.png", "loss_png": "loss.png", "report_html": "report.html",
        "checkpoint": rel(data["checkpoint"]), "gen": "gen", "train_dataset": rel(data["train_ds"]),
        "test_dataset": rel(data["test_ds"]), "test_lq": rel(data["test_lq"]), "test_hq": rel(data["test_hq"]),
        "run_dir": rel(trained["run_dir"]), "metrics": rel(trained["run_dir"] / "metrics.jsonl"),
        "checkpoints": rel(trained["run_dir"] / "checkpoints"), "samples": rel(trained["run_dir"] / "samples"),
        "trained_adapter": rel(trained["adapter"]), "untrained_adapter": rel(trained["untrained"]),
        **{f"restored_{k}": rel(d) for k, d in res["outs"].items()},
        **{f"eval_{k}": f"eval_{k}.json" for k in res["outs"]},
    }
    report = {
        "quick": quick, "statement": STATEMENT + " " + measured,
        "comparison": c, "per_image": res["per_image"], "train": trained["info"],
        "data": data["info"],
        "restore": {"steps": res["steps"], "parallel": "pmap", "seconds": res["restore_seconds"],
                    "images_per_second": res["restore_images_per_second"],
                    "note": "wall clock of each fluxir restore call, compilation included"},
        "seconds": seconds, "process_cpu_seconds": cpu_seconds, "artifacts": artifacts,
    }
    demo_report.write_html(report, work / "report.html")
    tmp = work / ".report.json.tmp"
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    tmp.replace(work / "report.json")
    return report


def run_demo(out: str | pathlib.Path, quick: bool = False, overwrite: bool = False, log=print) -> dict:
    """The whole demo into `out` (built in `<out>.partial`, renamed at the end); returns report.json's content."""
    import jax

    out = pathlib.Path(out).absolute()
    if out.exists() and not overwrite:
        raise UserError(f"output {out} already exists (pass --overwrite to replace it)")
    work = out.with_name(out.name + ".partial")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    plan = QUICK if quick else FULL
    log(f"fluxir demo{' --quick' if quick else ''}: tiny preset on {jax.device_count()} {jax.devices()[0].platform} "
        f"devices, building {work}")
    t0, c0 = time.perf_counter(), time.process_time()
    seconds = {}
    t = time.perf_counter()
    data = acquire(work, plan, log)
    seconds["acquire"] = time.perf_counter() - t
    t = time.perf_counter()
    trained = adapt(work, data, plan, log)
    seconds["adapt"] = time.perf_counter() - t
    t = time.perf_counter()
    res = restore_and_eval(work, data, trained, plan, log)
    seconds["restore_eval"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t0
    report = write_report(work, quick, data, trained, res, seconds, time.process_time() - c0)
    if out.exists():
        shutil.rmtree(out)
    work.rename(out)
    return report


def run(args: argparse.Namespace) -> int:
    report = run_demo(args.out, quick=args.quick, overwrite=args.overwrite)
    out = pathlib.Path(args.out).absolute()
    print(report["statement"])
    for key in ("report_html", "report_png", "loss_png"):
        print(f"{key.replace('_', '.')}: {out / report['artifacts'][key]}")
    print(f"report.json: {out / 'report.json'}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="the whole pipeline (init, gen, degrade, train, restore, eval) on the tiny preset, on a CPU",
        description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a few dozen training steps instead of a few hundred (< 2 min)")
    p.add_argument("-o", "--out", default="demo_out", help="output directory (default: demo_out)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=run)
