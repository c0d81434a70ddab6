"""LPIPS (AlexNet, VGG16) and DISTS against PyTorch re-statements with identical random weights,
the converters on synthetic files of the published layouts, and wrong-architecture weights.

The PyTorch references are written here from the architectures (torchvision's AlexNet/VGG16
`features` index layout, the LPIPS v0.1 heads, DISTS' L2 pooling and alpha/beta); torchvision,
lpips and DISTS_pytorch are not used."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import jax
from safetensors.torch import save_file
from skimage import data

from fluxir_convert import torch_read
from fluxir_convert.iqa import convert_iqa
from fluxir_jax import cli
from fluxir_jax.errors import UserError
from fluxir_jax.iqa import classic_weights
from fluxir_jax.iqa import dists as dists_mod
from fluxir_jax.iqa import lpips as lpips_mod
from fluxir_jax.iqa.registry import MetricUnavailable, get_metric

TOL = 1e-4   # relative error ||a - b|| / ||b|| of our float32 ("highest" matmul precision) against
             # the PyTorch reference run in float64


# ---------------------------------------------------------------- PyTorch references
def tv_alexnet() -> nn.Module:
    """torchvision-layout AlexNet: `features` indices as torchvision, a tiny stand-in classifier."""
    m = nn.Module()
    m.features = nn.Sequential(
        nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2))
    m.classifier = nn.Sequential(nn.Dropout(), nn.Linear(8, 4))
    return m


def tv_vgg16() -> nn.Module:
    layers, cin = [], 3
    for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU()]
            cin = v
    m = nn.Module()
    m.features = nn.Sequential(*layers)
    m.classifier = nn.Sequential(nn.Linear(8, 4))
    return m


TAPS = {"alex": (1, 4, 7, 9, 11), "vgg": (3, 8, 15, 22, 29)}     # ReLU outputs LPIPS reads


class TorchLPIPS(nn.Module):
    def __init__(self, net: str):
        super().__init__()
        self.net_name = net
        self.tv = tv_alexnet() if net == "alex" else tv_vgg16()
        for k, c in enumerate(lpips_mod.CHANNELS[net]):
            head = nn.Module()
            head.model = nn.Sequential(nn.Dropout(), nn.Conv2d(c, 1, 1, bias=False))
            nn.init.uniform_(head.model[1].weight, 0.0, 1.0)
            setattr(self, f"lin{k}", head)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))

    def feats(self, x):
        out, taps = [], TAPS[self.net_name]
        for i, layer in enumerate(self.tv.features[:taps[-1] + 1]):
            x = layer(x)
            if i in taps:
                out.append(x)
        return out

    def forward(self, pred, gt):        # NCHW in [0, 1]
        f0 = self.feats(((pred * 2 - 1) - self.shift) / self.scale)
        f1 = self.feats(((gt * 2 - 1) - self.shift) / self.scale)
        total = 0
        for k, (a, b) in enumerate(zip(f0, f1)):
            a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + getattr(self, f"lin{k}").model((a - b) ** 2).mean((2, 3))
        return total[:, 0]

    def heads_state_dict(self):
        return {k: v for k, v in self.state_dict().items() if k.startswith("lin")}

    def backbone_state_dict(self):
        return {k[len("tv."):]: v for k, v in self.state_dict().items() if k.startswith("tv.")}


class TorchDISTS(nn.Module):
    def __init__(self, vgg: nn.Module):
        super().__init__()
        self.tv = vgg
        self.alpha = nn.Parameter(torch.rand(1, 1475, 1, 1) * 0.2 + 0.01)
        self.beta = nn.Parameter(torch.rand(1, 1475, 1, 1) * 0.2 + 0.01)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        g = torch.tensor([0.5, 1.0, 0.5])
        self.register_buffer("filt", (g[:, None] * g[None, :] / 4.0)[None, None])

    def l2pool(self, x):
        c = x.shape[1]
        return (F.conv2d(x ** 2, self.filt.expand(c, 1, 3, 3), stride=2, padding=1, groups=c) + 1e-12).sqrt()

    def feats(self, x):
        out = [x]
        h = (x - self.mean) / self.std
        for i, layer in enumerate(self.tv.features[:30]):
            h = self.l2pool(h) if isinstance(layer, nn.MaxPool2d) else layer(h)
            if i in TAPS["vgg"]:
                out.append(h)
        return out

    def forward(self, pred, gt):
        f0, f1 = self.feats(pred), self.feats(gt)
        w = self.alpha.sum() + self.beta.sum()
        alphas = torch.split(self.alpha / w, list(dists_mod.CHANNELS), 1)
        betas = torch.split(self.beta / w, list(dists_mod.CHANNELS), 1)
        d1 = d2 = 0
        for a, b, x, y in zip(alphas, betas, f0, f1):
            mx, my = x.mean((2, 3), keepdim=True), y.mean((2, 3), keepdim=True)
            s1 = (2 * mx * my + 1e-6) / (mx ** 2 + my ** 2 + 1e-6)
            vx, vy = ((x - mx) ** 2).mean((2, 3), keepdim=True), ((y - my) ** 2).mean((2, 3), keepdim=True)
            cxy = (x * y).mean((2, 3), keepdim=True) - mx * my
            s2 = (2 * cxy + 1e-6) / (vx + vy + 1e-6)
            d1 = d1 + (a * s1).sum(1, keepdim=True)
            d2 = d2 + (b * s2).sum(1, keepdim=True)
        return 1 - (d1 + d2).flatten()

    def module_state_dict(self):
        """The DISTS_pytorch module layout: stage{s}.{i} convolutions, L2-pool filters, buffers."""
        bounds = (4, 9, 16, 23, 30)
        sd = {"alpha": self.alpha.detach(), "beta": self.beta.detach(), "mean": self.mean, "std": self.std}
        for k, v in self.tv.features.state_dict().items():
            i = int(k.split(".")[0])
            s = next(n for n, hi in enumerate(bounds, 1) if i < hi)
            sd[f"stage{s}.{k}"] = v
        for i, c in ((4, 64), (9, 128), (16, 256), (23, 512)):
            s = next(n for n, hi in enumerate(bounds, 1) if i < hi)
            sd[f"stage{s}.{i}.filter"] = self.filt.expand(c, 1, 3, 3).clone()
        return sd


def lpips_module_state_dict(ref: TorchLPIPS):
    """The `lpips.LPIPS` module layout: net.slice{s}.{i}, lin{k} and duplicate lins.{k}, scaling."""
    bounds = {"alex": (2, 5, 8, 10, 12), "vgg": (4, 9, 16, 23, 30)}[ref.net_name]
    sd = {"scaling_layer.shift": ref.shift, "scaling_layer.scale": ref.scale}
    for k, v in ref.tv.features.state_dict().items():
        i = int(k.split(".")[0])
        s = next(n for n, hi in enumerate(bounds, 1) if i < hi)
        sd[f"net.slice{s}.{k}"] = v
    for k, v in ref.heads_state_dict().items():
        sd[k] = v
        sd["lins." + k[len("lin"):]] = v
    return sd


# ---------------------------------------------------------------- fixtures
def _images(size=64):
    rng = np.random.default_rng(3)
    gt = np.stack([data.astronaut()[:size * 4:4, :size * 4:4], data.coffee()[:size * 4:4, 100:100 + size * 4:4]])
    gt = gt.astype(np.float32) / 255.0
    pred = np.clip(gt + rng.normal(0, 0.08, gt.shape).astype(np.float32), 0, 1)
    return pred, gt


def _torch_score(model, pred, gt):
    """The reference evaluated in float64 (on a copy), so the tolerance measures our float32 error."""
    import copy
    ref = copy.deepcopy(model).double()
    with torch.no_grad():
        x = torch.from_numpy(pred).double().permute(0, 3, 1, 2)
        y = torch.from_numpy(gt).double().permute(0, 3, 1, 2)
        return ref(x, y).numpy()


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Synthetic weight files in the published layouts, plus the PyTorch references."""
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("iqa_weights")
    out = {}
    for net in ("alex", "vgg"):
        ref = TorchLPIPS(net).eval()
        torch.save(ref.heads_state_dict(), d / f"{net}_heads.pth")            # lpips weights/v0.1/{net}.pth
        if net == "alex":
            torch.save(ref.backbone_state_dict(), d / "alexnet.pth")          # torchvision state dict
        else:
            save_file({k: v.contiguous() for k, v in ref.backbone_state_dict().items()}, str(d / "vgg16.safetensors"))
        torch.save(lpips_module_state_dict(ref), d / f"lpips_{net}_module.pth")
        out[f"lpips_{net}"] = ref
    dref = TorchDISTS(out["lpips_vgg"].tv).eval()                              # same VGG16 weights
    torch.save({"alpha": dref.alpha.detach(), "beta": dref.beta.detach()}, d / "dists_weights.pt")
    torch.save(dref.module_state_dict(), d / "dists_module.pth")
    out["dists"] = dref
    out["dir"] = d
    return out


# ---------------------------------------------------------------- numerics
def _convert(d, metric, *names):
    """`fluxir convert-iqa METRIC FILES... -o D/METRIC.safetensors` (once per module)."""
    out = d / f"{metric}.safetensors"
    if not out.exists():
        assert cli.main(["convert-iqa", metric, *(str(d / n) for n in names), "-o", str(out)]) == 0
    return out


LPIPS_FILES = {"alex": ("alex_heads.pth", "alexnet.pth"), "vgg": ("vgg_heads.pth", "vgg16.safetensors")}


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_matches_torch(files, net):
    d = files["dir"]
    name = "lpips" if net == "alex" else "lpips-vgg"
    weights = _convert(d, name, *LPIPS_FILES[net])
    pred, gt = _images()
    want = _torch_score(files[f"lpips_{net}"], pred, gt)
    with jax.default_matmul_precision("highest"):
        got = get_metric(name, weights=weights)(pred, gt)
        same = get_metric(name, weights=weights)(gt, gt)
    print(f"LPIPS-{net} relative error {_rel(got, want):.2e}")
    assert _rel(got, want) <= TOL, (got, want)
    assert np.all(want > 1e-3)                          # a non-trivial distance was compared
    np.testing.assert_allclose(same, 0.0, atol=1e-6)


def test_dists_matches_torch(files):
    d = files["dir"]
    pred, gt = _images()
    want = _torch_score(files["dists"], pred, gt)
    with jax.default_matmul_precision("highest"):
        got = get_metric("dists", weights=_convert(d, "dists", "dists_weights.pt", "vgg16.safetensors"))(pred, gt)
    print(f"DISTS relative error {_rel(got, want):.2e}")
    assert _rel(got, want) <= TOL, (got, want)
    assert np.all(want > 1e-3)


def test_published_safetensors_are_read_without_conversion(files, tmp_path):
    """Published tensors saved as .safetensors need no convert-iqa: the same params as the converted file."""
    d = files["dir"]
    heads = tmp_path / "vgg_heads.safetensors"
    save_file({k: torch.from_numpy(v) for k, v in torch_read.read_tensors(d / "vgg_heads.pth").items()}, str(heads))
    direct = classic_weights.load_lpips_params([heads, d / "vgg16.safetensors"], "vgg")
    converted = classic_weights.load_lpips_params(_convert(d, "lpips-vgg", *LPIPS_FILES["vgg"]), "vgg")
    jax.tree.map(np.testing.assert_array_equal, direct, converted)


# ---------------------------------------------------------------- converters
def _conv_back(kernel) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(np.asarray(kernel, np.float32), (3, 2, 0, 1)))


def lpips_state_dict_from_params(params: dict, net: str) -> dict[str, np.ndarray]:
    """Our LPIPS params -> one `lpips.LPIPS` module state dict (the inverse of the key map)."""
    bounds = classic_weights._LPIPS_SLICE_BOUNDS[net]
    out = {"scaling_layer.shift": np.asarray(lpips_mod.SHIFT, np.float32).reshape(1, 3, 1, 1),
           "scaling_layer.scale": np.asarray(lpips_mod.SCALE, np.float32).reshape(1, 3, 1, 1)}
    for i in classic_weights._backbone_convs(net):
        conv = params["backbone"][f"conv{i}"]
        prefix = f"net.slice{classic_weights._slice_of(i, bounds)}.{i}"
        out[f"{prefix}.weight"] = _conv_back(conv["kernel"])
        out[f"{prefix}.bias"] = np.asarray(conv["bias"], np.float32)
    for k in range(len(lpips_mod.CHANNELS[net])):
        out[f"lin{k}.model.1.weight"] = out[f"lins.{k}.model.1.weight"] = _conv_back(params[f"lin{k}"]["kernel"])
    return out


def dists_state_dict_from_params(params: dict) -> dict[str, np.ndarray]:
    """Our DISTS params -> one DISTS module state dict with its buffers (the inverse of the key map)."""
    bounds = classic_weights._DISTS_STAGE_BOUNDS
    out = {"alpha": np.asarray(params["alpha"], np.float32).reshape(1, dists_mod.TOTAL, 1, 1),
           "beta": np.asarray(params["beta"], np.float32).reshape(1, dists_mod.TOTAL, 1, 1),
           "mean": np.asarray(dists_mod.MEAN, np.float32).reshape(1, 3, 1, 1),
           "std": np.asarray(dists_mod.STD, np.float32).reshape(1, 3, 1, 1)}
    for i, c in classic_weights._DISTS_POOL_CHANNELS.items():
        out[f"stage{classic_weights._slice_of(i, bounds)}.{i}.filter"] = classic_weights._l2pool_filter(c)
    for i in classic_weights._backbone_convs("vgg"):
        conv = params["backbone"][f"conv{i}"]
        prefix = f"stage{classic_weights._slice_of(i, bounds)}.{i}"
        out[f"{prefix}.weight"] = _conv_back(conv["kernel"])
        out[f"{prefix}.bias"] = np.asarray(conv["bias"], np.float32)
    return out


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_layouts_round_trip(files, net):
    d = files["dir"]
    split = classic_weights.lpips_params_from_state_dict(
        torch_read.read_merged([d / n for n in LPIPS_FILES[net]]), net)
    module_sd = torch_read.read_tensors(d / f"lpips_{net}_module.pth")
    module = classic_weights.lpips_params_from_state_dict(module_sd, net)
    jax.tree.map(np.testing.assert_array_equal, split, module)
    # our params -> the module layout gives back exactly the file's tensors: every key was mapped
    back = lpips_state_dict_from_params(module, net)
    assert sorted(back) == sorted(module_sd)
    for k in back:
        np.testing.assert_array_equal(back[k], module_sd[k], err_msg=k)
    # and the converted params are what the model holds (kernel HWIO = weight OIHW transposed)
    w = module_sd["lin1.model.1.weight"]
    np.testing.assert_array_equal(split["lin1"]["kernel"][0, 0, :, 0], w[0, :, 0, 0])


def test_dists_layouts_round_trip(files, tmp_path):
    d = files["dir"]
    split = classic_weights.dists_params_from_state_dict(
        torch_read.read_merged([d / "dists_weights.pt", d / "vgg16.safetensors"]))
    module_sd = torch_read.read_tensors(d / "dists_module.pth")
    module = classic_weights.dists_params_from_state_dict(module_sd)
    jax.tree.map(np.testing.assert_array_equal, split, module)
    back = dists_state_dict_from_params(module)
    assert sorted(back) == sorted(module_sd)
    for k in back:
        np.testing.assert_allclose(back[k], module_sd[k], rtol=0, atol=0, err_msg=k)
    # the full-module file, converted, scores the same as the reference
    out = tmp_path / "dists_module.safetensors"
    convert_iqa("dists", [d / "dists_module.pth"], out)
    pred, gt = _images(32)
    with jax.default_matmul_precision("highest"):
        a = get_metric("dists", weights=out)(pred, gt)
    assert _rel(a, _torch_score(files["dists"], pred, gt)) <= TOL


# ---------------------------------------------------------------- wrong weights
def test_wrong_architecture_names_first_bad_key(files, tmp_path):
    d = files["dir"]
    out = tmp_path / "x.safetensors"
    with pytest.raises(UserError, match=r"first bad key 'features\.0\.weight'"):   # AlexNet for VGG
        convert_iqa("lpips-vgg", [d / "vgg_heads.pth", d / "alexnet.pth"], out)
    with pytest.raises(UserError, match=r"first bad key 'lin1\.model\.1\.weight'"):  # VGG heads for AlexNet
        convert_iqa("lpips", [d / "vgg_heads.pth", d / "alexnet.pth"], out)
    with pytest.raises(UserError, match=r"first bad key 'lin0\.model\.1\.weight'"):  # LPIPS heads for DISTS
        convert_iqa("dists", [d / "alex_heads.pth", d / "vgg16.safetensors"], out)
    with pytest.raises(UserError, match=r"missing key 'features\.0\.weight'"):       # heads only
        convert_iqa("lpips", [d / "alex_heads.pth"], out)
    with pytest.raises(UserError, match=r"missing key 'alpha'"):
        get_metric("dists", weights=d / "vgg16.safetensors")
    assert not out.exists()
    odd = tmp_path / "odd.safetensors"
    save_file({"lin0.model.1.weight": torch.ones(1, 64, 1, 1), "encoder.conv.weight": torch.ones(2)}, str(odd))
    with pytest.raises(UserError, match=r"first bad key 'encoder\.conv\.weight'"):
        get_metric("lpips", weights=odd)
    with pytest.raises(MetricUnavailable, match="needs weights"):
        get_metric("lpips")
    # a converted file of another metric, or of the other LPIPS network
    with pytest.raises(UserError, match="holds converted 'lpips' weights, not 'dists'"):
        get_metric("dists", weights=_convert(d, "lpips", *LPIPS_FILES["alex"]))
    with pytest.raises(UserError, match="holds converted 'lpips' weights, not 'lpips-vgg'"):
        get_metric("lpips-vgg", weights=_convert(d, "lpips", *LPIPS_FILES["alex"]))


@pytest.mark.parametrize("metric,files_", [("lpips", ("alex_heads.pth", "alexnet.pth")),
                                           ("dists", ("dists_weights.pt", "vgg16.safetensors"))])
def test_pytorch_files_are_refused_with_the_command_that_converts_them(files, metric, files_):
    d = files["dir"]
    with pytest.raises(UserError) as e:
        get_metric(metric, weights=[d / f for f in files_])
    msg = str(e.value)
    assert "\n" not in msg and f"fluxir convert-iqa {metric} " in msg and "-o " in msg, msg


class _NotATensor:
    pass


def test_refuses_arbitrary_pickles(tmp_path):
    bad = tmp_path / "evil.pth"
    torch.save({"lin0.model.1.weight": _NotATensor()}, bad)
    with pytest.raises(UserError, match="weights_only"):
        torch_read.read_tensors(bad)
    with pytest.raises(UserError, match="not found"):
        torch_read.read_tensors(tmp_path / "absent.pth")
