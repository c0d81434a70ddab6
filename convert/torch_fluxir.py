"""The FluxIR adapter in PyTorch, driving diffusers' `FluxTransformer2DModel` and `AutoencoderKL`.

The same math as `fluxir_jax.models.adapter` (see its docstring), so a JAX-trained adapter can
be checked against, and used with, diffusers:

    adapter = load_adapter_safetensors("adapter.safetensors", transformer)   # `fluxir export-adapter`
    v = fluxir_velocity_torch(transformer, adapter, img, lq, img_ids, txt, txt_ids, t, y, guidance)
    images = restore_torch(transformer, vae, adapter, lq_images, noise, num_steps=28, guidance=3.5, txt=txt, y=y)

`TorchFluxIR` holds the adapter's own tensors only; the frozen base is the diffusers
transformer passed to every call. Its control block is a diffusers `FluxTransformerBlock`
(the module the base's double block 0 is, so it is exact by construction), loaded from the
export's `block.<BFL key>` tensors through `flux_map` (fused qkv split into to_q/to_k/to_v).
Every other parameter already has its export name as its PyTorch name (`lq_in.weight`,
`theta_p`, `se_img.double_blocks.3.down.weight`, `se_txt.single_blocks.0.gamma`, ...).

diffusers' own ControlNet keywords add residuals to the image stream only, so
`fluxir_velocity_torch` runs the transformer's submodules in its own loop (x_embedder,
time_text_embed, context_embedder, pos_embed, transformer_blocks, single_transformer_blocks,
norm_out, proj_out) and adds the residuals to both streams after every controlled block.

Layouts follow the JAX side: tokens packed [B, L, 64] (BFL order), txt tokens before img
tokens, latents NHWC [B, h, w, 16] scaled as `scaling_factor * (mean - shift_factor)`,
images NHWC in [0, 1] at the API (models see [-1, 1]). `fluxir_loss_torch` restates the
training objective with its random choices (t, noise, crop offsets) given explicitly.
"""
from __future__ import annotations

import dataclasses
import pathlib

import numpy as np
import torch
from torch import nn

from fluxir_jax import sampling
from fluxir_jax.errors import UserError
from fluxir_jax.models import adapter_io
from fluxir_jax.models.adapter import FluxIRConfig, check_compatible
from fluxir_jax.models.flux import FluxConfig

from . import flux_map

_BLOCK = "block."
_BLOCK_BFL = "double_blocks.0."
_BLOCK_DIFFUSERS = "transformer_blocks.0."


def base_config_of(transformer) -> FluxConfig:
    """The FluxConfig (BFL field names) of a diffusers `FluxTransformer2DModel`."""
    c = transformer.config
    if c.patch_size != 1:
        raise UserError(f"diffusers transformer has patch_size={c.patch_size}; FLUX uses 1")
    return FluxConfig(
        in_channels=c.in_channels, out_channels=c.out_channels or c.in_channels, vec_in_dim=c.pooled_projection_dim,
        context_in_dim=c.joint_attention_dim, hidden_size=c.num_attention_heads * c.attention_head_dim,
        num_heads=c.num_attention_heads, depth=c.num_layers, depth_single_blocks=c.num_single_layers,
        axes_dim=tuple(int(a) for a in c.axes_dims_rope), guidance_embed=bool(c.guidance_embeds),
    )


class SqueezeExciteGate(nn.Module):
    """SE layer of one controlled block and one stream: c [B, N, D] -> gate gamma * s [B, D]."""

    def __init__(self, dim: int, reduction: int):
        super().__init__()
        hidden = max(1, dim // reduction)
        self.down = nn.Linear(dim, hidden)
        self.up = nn.Linear(hidden, dim)
        self.gamma = nn.Parameter(torch.zeros(dim))

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        f32 = lambda lin, x: nn.functional.linear(x, lin.weight.float(), lin.bias.float())  # noqa: E731  (float32, as JAX)
        s = torch.sigmoid(f32(self.up, nn.functional.silu(f32(self.down, c.float().mean(dim=1)))))
        return self.gamma.float() * s


def _se_layers(d_idx, s_idx, dim: int, reduction: int) -> nn.ModuleDict:
    make = lambda idx: nn.ModuleDict({str(k): SqueezeExciteGate(dim, reduction) for k in idx})  # noqa: E731
    return nn.ModuleDict({"double_blocks": make(d_idx), "single_blocks": make(s_idx)})


class TorchFluxIR(nn.Module):
    """The FluxIR adapter's tensors and its control-block forward; the base is passed to `features`.

    The control block runs in the adapter's parameter dtype (float32 as loaded; `.to(torch.bfloat16)`
    to follow a bf16 base), the SE gates in float32 as on the JAX side; residuals are cast to the
    base's dtype when added.
    """

    def __init__(self, config: FluxIRConfig, base_config: FluxConfig):
        super().__init__()
        from diffusers.models.transformers.transformer_flux import FluxTransformerBlock

        if base_config.mlp_ratio != 4.0 or not base_config.qkv_bias:
            raise UserError("the PyTorch FluxIR needs a FLUX-shaped base (mlp_ratio 4, qkv bias), "
                            f"got mlp_ratio={base_config.mlp_ratio}, qkv_bias={base_config.qkv_bias}")
        self.config = config
        self.base_config = base_config
        c = base_config.hidden_size
        self.lq_in = nn.Linear(base_config.in_channels, c)
        self.block = FluxTransformerBlock(dim=c, num_attention_heads=base_config.num_heads,
                                          attention_head_dim=base_config.head_dim)
        self.theta_p = nn.Parameter(torch.zeros(config.text_len, base_config.context_in_dim))
        self.theta_y = nn.Parameter(torch.zeros(base_config.vec_in_dim))
        d_idx, s_idx = config.controlled(base_config)
        self.se_img = _se_layers(d_idx, s_idx, c, config.se_reduction)
        self.se_txt = None if config.image_only else _se_layers(d_idx, s_idx, c, config.se_reduction)

    # -- export names ---------------------------------------------------------------------

    def named_tensors(self, grads: bool = False) -> dict[str, np.ndarray]:
        """Parameters (or, with `grads`, their .grad; zeros where None) under the export names."""
        def value(p):
            x = p.grad if grads else p
            return np.zeros(tuple(p.shape), np.float32) if x is None else x.detach().float().cpu().numpy()

        out, block = {}, {}
        for name, p in self.named_parameters():
            if name.startswith(_BLOCK):
                block[_BLOCK_DIFFUSERS + name[len(_BLOCK):]] = value(p)
            else:
                out[name] = value(p)
        for bfl, x in flux_map.diffusers_to_bfl(block).items():
            out[_BLOCK + bfl[len(_BLOCK_BFL):]] = np.ascontiguousarray(x)
        return out

    def load_named_tensors(self, tensors: dict[str, np.ndarray]) -> None:
        """Load export-named tensors strictly (missing / unexpected / mis-shaped -> UserError)."""
        expected = self.named_tensors()
        unexpected = sorted(set(tensors) - set(expected))
        missing = sorted(set(expected) - set(tensors))
        if unexpected:
            raise UserError(f"adapter file has an unexpected tensor {unexpected[0]}")
        if missing:
            raise UserError(f"adapter file lacks tensor {missing[0]}")
        for k, v in tensors.items():
            if tuple(v.shape) != tuple(expected[k].shape):
                raise UserError(f"adapter tensor {k} has shape {list(v.shape)}, expected {list(expected[k].shape)}")
        state = {}
        for k, v in tensors.items():
            if not k.startswith(_BLOCK):
                state[k] = torch.from_numpy(np.array(v, np.float32))
                continue
            sources = flux_map.diffusers_sources(_BLOCK_BFL + k[len(_BLOCK):])  # fused qkv: 3 equal row blocks
            for src, piece in zip(sources, np.split(np.asarray(v, np.float32), len(sources), axis=0)):
                state[_BLOCK + src[len(_BLOCK_DIFFUSERS):]] = torch.from_numpy(np.ascontiguousarray(piece))
        self.load_state_dict(state, strict=True)

    # -- forward ----------------------------------------------------------------------------

    def text(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """theta_p [B, T, ctx] and theta_y [B, vec], broadcast over the batch."""
        return (self.theta_p.unsqueeze(0).expand(batch, *self.theta_p.shape),
                self.theta_y.unsqueeze(0).expand(batch, *self.theta_y.shape))

    def features(self, transformer, img, lq, img_ids, t, guidance) -> tuple[torch.Tensor, torch.Tensor]:
        """The control block's outputs (c_img [B, L, C], c_txt [B, T, C]) for packed img / lq [B, L, 64]."""
        if lq.shape != img.shape:
            raise ValueError(f"TorchFluxIR: `lq` must have the shape of `img` {list(img.shape)}, got {list(lq.shape)}")
        b = img.shape[0]
        dt, adt = transformer.x_embedder.weight.dtype, self.lq_in.weight.dtype  # base / adapter compute dtypes
        theta_p, theta_y = self.text(b)
        txt_ids = torch.zeros(self.config.text_len, 3, dtype=img_ids.dtype, device=img_ids.device)
        temb = _temb(transformer, t, theta_y.to(dt), guidance).to(adt)
        rope = transformer.pos_embed(torch.cat([txt_ids, img_ids], dim=0))
        x = transformer.x_embedder(img.to(dt)).to(adt) + self.lq_in(lq.to(adt))
        p = transformer.context_embedder(theta_p.to(dt)).to(adt)
        c_txt, c_img = self.block(hidden_states=x, encoder_hidden_states=p, temb=temb, image_rotary_emb=rope)
        return c_img, c_txt

    def gates(self, c_img: torch.Tensor, c_txt: torch.Tensor) -> dict[tuple[str, int], tuple]:
        """{("double_blocks"|"single_blocks", k): (gate_img [B, C], gate_txt [B, C] or None)} per controlled block.

        The residual of block k is `control_scale * c * gate` (see `residual`); only the small
        gates are kept per block, never 57 full-size residuals at once.
        """
        out = {}
        for kind in ("double_blocks", "single_blocks"):
            for k, se in self.se_img[kind].items():
                out[(kind, int(k))] = (se(c_img), None if self.se_txt is None else self.se_txt[kind][k](c_txt))
        return out

    def residual(self, c: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor | None:
        """`control_scale * c * gate` broadcast over the tokens (None without a gate)."""
        if gate is None:
            return None
        return (c * self.config.control_scale) * gate[:, None, :].to(c.dtype)

def _temb(transformer, t, y, guidance):
    """diffusers' vec: time_text_embed(1000 t [, 1000 g], y), as its forward computes it."""
    dt = transformer.x_embedder.weight.dtype
    t = t.to(dt) * 1000
    if transformer.config.guidance_embeds:
        if guidance is None:
            raise ValueError("fluxir_velocity_torch: `guidance` [B] is required for a guidance-embedded base")
        return transformer.time_text_embed(t, guidance.to(dt) * 1000, y)
    return transformer.time_text_embed(t, y)


def _ids2d(ids: torch.Tensor) -> torch.Tensor:
    """diffusers takes ids as [L, 3]; a batched [B, L, 3] (the same for every example) gives its first row."""
    return ids[0] if ids.ndim == 3 else ids


def _check_base(transformer, adapter: TorchFluxIR) -> None:
    check_compatible(adapter, base_config_of(transformer))


def fluxir_velocity_torch(transformer, adapter: TorchFluxIR, img, lq, img_ids, txt, txt_ids, t, y, guidance=None,
                          *, intermediates: bool = False):
    """One FluxIR denoising step: the velocity [B, L, out_channels] (base + adapter residuals).

    img, lq [B, L, 64] packed latents; img_ids [L, 3] (or [B, L, 3], equal rows); txt [B, T, ctx]
    and y [B, vec] the base's text conditioning (replaced by theta when `base_consumes_theta`);
    txt_ids [T, 3] (or [B, T, 3]); t [B] in [0, 1]; guidance [B] or None (schnell).
    With `intermediates=True` returns (velocity, dict) with the streams after every block,
    residuals included, in the Flax `Flux.forward(intermediates=True)` layout: `double_img`
    [depth, B, L, C], `double_txt` [depth, B, T, C], `single` [depth_single, B, T+L, C].
    """
    _check_base(transformer, adapter)
    device = transformer.x_embedder.weight.device
    as_t = lambda x: None if x is None else torch.as_tensor(x, device=device)  # noqa: E731
    img, lq, txt, t, y, guidance = map(as_t, (img, lq, txt, t, y, guidance))
    img_ids, txt_ids = _ids2d(as_t(img_ids)), _ids2d(as_t(txt_ids))
    b = img.shape[0]
    dt = transformer.x_embedder.weight.dtype
    if adapter.se_txt is not None and not adapter.config.base_consumes_theta and txt.shape[1] != adapter.config.text_len:
        raise ValueError(f"fluxir_velocity_torch: `txt` has {txt.shape[1]} tokens, the adapter's text residuals "
                         f"{adapter.config.text_len}")
    c_img, c_txt = adapter.features(transformer, img, lq, img_ids, t, guidance)
    gates = adapter.gates(c_img, c_txt)
    if adapter.config.base_consumes_theta:
        txt, y = adapter.text(b)
        txt_ids = torch.zeros(adapter.config.text_len, 3, dtype=img_ids.dtype, device=img_ids.device)
    temb = _temb(transformer, t, y.to(dt), guidance)
    rope = transformer.pos_embed(torch.cat([txt_ids, img_ids], dim=0))
    hidden = transformer.x_embedder(img.to(dt))
    enc = transformer.context_embedder(txt.to(dt))
    hist = {"double_img": [], "double_txt": [], "single": []}

    def add(kind, k, hidden, enc):
        g_img, g_txt = gates.get((kind, k), (None, None))
        r_img, r_txt = adapter.residual(c_img, g_img), adapter.residual(c_txt, g_txt)
        return (hidden if r_img is None else hidden + r_img.to(hidden.dtype),
                enc if r_txt is None else enc + r_txt.to(enc.dtype))

    for k, blk in enumerate(transformer.transformer_blocks):
        enc, hidden = blk(hidden_states=hidden, encoder_hidden_states=enc, temb=temb, image_rotary_emb=rope)
        hidden, enc = add("double_blocks", k, hidden, enc)
        if intermediates:
            hist["double_img"].append(hidden)
            hist["double_txt"].append(enc)
    for k, blk in enumerate(transformer.single_transformer_blocks):
        enc, hidden = blk(hidden_states=hidden, encoder_hidden_states=enc, temb=temb, image_rotary_emb=rope)
        hidden, enc = add("single_blocks", k, hidden, enc)
        if intermediates:
            hist["single"].append(torch.cat([enc, hidden], dim=1))
    out = transformer.proj_out(transformer.norm_out(hidden, temb))
    if not intermediates:
        return out
    return out, {k: torch.stack(v) for k, v in hist.items()}


def load_adapter_safetensors(path: str | pathlib.Path, transformer=None) -> TorchFluxIR:
    """Read a `fluxir export-adapter` file (configs from its metadata) into a `TorchFluxIR`.

    With `transformer` (a diffusers `FluxTransformer2DModel`), an adapter built for a
    different base is refused with a UserError naming the differing field.
    """
    from safetensors import SafetensorError, safe_open

    path = pathlib.Path(path)
    if not path.is_file():
        raise UserError(f"adapter file not found: {path}")
    try:
        with safe_open(str(path), "np") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({e})") from None
    cfg, base_cfg = adapter_io._configs_from(meta, str(path))
    adapter = TorchFluxIR(cfg, base_cfg)
    if transformer is not None:
        _check_base(transformer, adapter)
    adapter.load_named_tensors(tensors)
    return adapter.eval()


# ----------------------------------------------------------------------------- latents and sampling


def pack_torch(latent: torch.Tensor) -> torch.Tensor:
    """NHWC latent [B, h, w, C] -> tokens [B, (h/2)(w/2), 4C] in BFL order (as `sampling.pack`)."""
    b, h, w, c = latent.shape
    if h % 2 or w % 2:
        raise ValueError(f"pack: latent height and width must be even, got {h}x{w}")
    x = latent.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_torch(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of `pack_torch` for a latent of height x width (latent pixels)."""
    b, n, d = tokens.shape
    x = tokens.reshape(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, height, width, d // 4)


def img_ids_torch(height: int, width: int) -> torch.Tensor:
    """(0, row, col) ids [(h/2)(w/2), 3] for a latent of height x width."""
    return torch.from_numpy(np.asarray(sampling.img_ids(1, height, width))[0].copy())


def vae_encode(vae, images01: torch.Tensor) -> torch.Tensor:
    """NHWC images in [0, 1] -> scaled posterior-mean latents NHWC, `scaling * (mean - shift)`."""
    x = (2.0 * images01 - 1.0).permute(0, 3, 1, 2).to(vae.dtype)
    mean = vae.encode(x).latent_dist.mean
    z = vae.config.scaling_factor * (mean.float() - vae.config.shift_factor)
    return z.permute(0, 2, 3, 1)


def vae_decode(vae, latent: torch.Tensor) -> torch.Tensor:
    """Scaled NHWC latents -> NHWC images in [-1, 1] (unclipped), float32."""
    z = latent.float() / vae.config.scaling_factor + vae.config.shift_factor
    return vae.decode(z.permute(0, 3, 1, 2).to(vae.dtype)).sample.float().permute(0, 2, 3, 1)


def upsample_lq(lq_images01: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic (torch semantics: a = -0.75, align_corners False, no antialias) to `size`, clipped to [0, 1]."""
    x = nn.functional.interpolate(lq_images01.permute(0, 3, 1, 2).float(), size=size, mode="bicubic", align_corners=False)
    return x.clamp(0.0, 1.0).permute(0, 2, 3, 1)


def _text_batch(txt, y, batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    txt, y = torch.as_tensor(txt, device=device).float(), torch.as_tensor(y, device=device).float()
    if txt.ndim == 2:
        txt = txt.unsqueeze(0).expand(batch, *txt.shape)
    if y.ndim == 1:
        y = y.unsqueeze(0).expand(batch, *y.shape)
    return txt, y


@torch.no_grad()
def restore_torch(transformer, vae, adapter: TorchFluxIR, lq_images, noise, num_steps: int, guidance: float | None,
                  txt, y, *, shift: bool = True, clip: bool = True, control_scale: float | None = None) -> torch.Tensor:
    """Restore LQ images with the same sampler as JAX: images NHWC float32 in [0, 1].

    lq_images [B, h, w, 3] in [0, 1]; noise [B, H/8, W/8, 16] NHWC (e.g. `sampling.get_noise`),
    which fixes the output size H x W (H/8, W/8 even); txt [T, ctx] / y [vec] (or batched) the
    base's text conditioning (the empty prompt); guidance None for a schnell base. The LQ is
    bicubic-upsampled to H x W and VAE-encoded (posterior mean, scaled); Euler steps on
    `sampling.get_schedule(num_steps, L, shift=shift)` from the noise; the final latent is
    decoded, mapped to [0, 1] and, with `clip`, clipped. `control_scale` overrides the
    adapter's for this call.
    """
    if control_scale is not None:
        saved = adapter.config
        adapter.config = dataclasses.replace(saved, control_scale=float(control_scale))
        try:
            return restore_torch(transformer, vae, adapter, lq_images, noise, num_steps, guidance, txt, y,
                                 shift=shift, clip=clip)
        finally:
            adapter.config = saved
    device = transformer.x_embedder.weight.device
    lq_images = torch.as_tensor(lq_images, device=device).float()
    noise = torch.as_tensor(noise, device=device).float()
    b, h, w, _ = noise.shape
    lq = pack_torch(vae_encode(vae, upsample_lq(lq_images, (8 * h, 8 * w))))
    txt, y = _text_batch(txt, y, b, device)
    ids, txt_ids = img_ids_torch(h, w).to(device), torch.zeros(txt.shape[1], 3, device=device)
    g = None if guidance is None else torch.full((b,), float(guidance), device=device)
    timesteps = torch.tensor(sampling.get_schedule(num_steps, lq.shape[1], shift=shift), dtype=torch.float32)
    img = pack_torch(noise)
    for i in range(num_steps):
        t_cur, t_next = timesteps[i], timesteps[i + 1]
        pred = fluxir_velocity_torch(transformer, adapter, img, lq, ids, txt, txt_ids,
                                     torch.full((b,), float(t_cur), device=device), y, g)
        img = img + (t_next - t_cur) * pred.float()
    images = (vae_decode(vae, unpack_torch(img, h, w)) + 1.0) / 2.0
    return images.clamp(0.0, 1.0) if clip else images



# ----------------------------------------------------------------------------- training objective


def fluxir_loss_torch(transformer, vae, adapter: TorchFluxIR, hq, lq_up, t, noise, crop_offsets, txt, y, guidance, *,
                      pixel_crop: int, pixel_weight: float = 1.0, t_min: float = 0.0, t_max: float = 1.0,
                      pixel_loss: str = "l1") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The FluxIR training loss with every random choice given explicitly; returns (loss, parts).

    hq, lq_up [B, H, W, 3] in [0, 1] (LQ already upsampled to H x W); t [B] in [0, 1];
    noise [B, H/8, W/8, 16] NHWC; crop_offsets [B, 2] integer latent offsets (oy, ox) of each
    example's pixel-loss crop; txt / y the base's text conditioning; guidance [B], a float or None.

        z0 = E(hq), zc = E(lq_up)            posterior means, scaled (frozen VAE, no gradient)
        z_t = (1 - t) z0 + t eps,  v = eps - z0
        v_hat = unpack(velocity(pack(z_t), pack(zc), ...))
        L_flow = mean((v_hat - v)^2)                                  over every element
        x0_hat = z_t - t v_hat
        dec_b = D(x0_hat_b[oy:oy+c, ox:ox+c]),  c = pixel_crop / 8    (gradient flows through D)
        e_b = mean |dec_b - x_hq_b[8oy:8oy+p, 8ox:8ox+p]|  (squared for pixel_loss="l2"), x_hq = 2 hq - 1
        L_pix = sum_b m_b e_b / max(1, sum_b m_b),   m_b = [t_min <= t_b <= t_max]
        L = L_flow + pixel_weight * L_pix

    `loss.backward()` fills .grad of whatever requires grad (freeze the base and VAE with
    `requires_grad_(False)` to get adapter gradients only). parts: "flow", "pixel" (detached).
    """
    if pixel_loss not in ("l1", "l2"):
        raise ValueError(f"pixel_loss must be 'l1' or 'l2', got {pixel_loss!r}")
    device = transformer.x_embedder.weight.device
    hq, lq_up, t, noise = (torch.as_tensor(a, device=device).float() for a in (hq, lq_up, t, noise))
    b, h, w, _ = noise.shape
    if pixel_crop % 8 or not 0 < pixel_crop <= 8 * min(h, w):
        raise ValueError(f"pixel_crop must be a positive multiple of 8 no larger than the image, got {pixel_crop}")
    c = pixel_crop // 8
    offsets = np.asarray(crop_offsets, np.int64).reshape(b, 2)
    if (offsets < 0).any() or (offsets[:, 0] + c > h).any() or (offsets[:, 1] + c > w).any():
        raise ValueError(f"crop_offsets {offsets.tolist()} put a {c}x{c} crop outside the {h}x{w} latent")
    with torch.no_grad():
        z0, zc = vae_encode(vae, hq), vae_encode(vae, lq_up)
    txt, y = _text_batch(txt, y, b, device)
    g = None if guidance is None else torch.as_tensor(guidance, dtype=torch.float32, device=device).expand(b)
    tt = t[:, None, None, None]
    z_t = (1.0 - tt) * z0 + tt * noise
    v = noise - z0
    pred = fluxir_velocity_torch(transformer, adapter, pack_torch(z_t), pack_torch(zc), img_ids_torch(h, w).to(device),
                                 txt, torch.zeros(txt.shape[1], 3, device=device), t, y, g)
    v_hat = unpack_torch(pred.float(), h, w)
    l_flow = torch.mean(torch.square(v_hat - v))
    l_pix = torch.zeros((), dtype=torch.float32)
    if pixel_weight != 0:
        x0_hat = z_t - tt * v_hat
        crops = torch.stack([x0_hat[i, oy:oy + c, ox:ox + c] for i, (oy, ox) in enumerate(offsets)])
        x_hq = 2.0 * hq - 1.0
        target = torch.stack([x_hq[i, 8 * oy:8 * oy + pixel_crop, 8 * ox:8 * ox + pixel_crop]
                              for i, (oy, ox) in enumerate(offsets)])
        diff = vae_decode(vae, crops) - target
        err = (diff.abs() if pixel_loss == "l1" else diff.square()).mean(dim=(1, 2, 3))
        mask = ((t >= t_min) & (t <= t_max)).float()
        l_pix = (err * mask).sum() / mask.sum().clamp(min=1.0)
    loss = l_flow + pixel_weight * l_pix
    return loss, {"flow": l_flow.detach(), "pixel": l_pix.detach()}
