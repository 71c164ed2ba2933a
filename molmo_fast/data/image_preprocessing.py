"""Multi-crop image preprocessing, crop mode `overlap-and-resize-c2` (bit-exact with the HF MolmoE processor).

Stages for one image:
  1. pick a (rows, cols) tiling of overlapping crops for the image size (`select_tiling`),
  2. letterbox-resize to rows*window+margin x cols*window+margin (torch bilinear + antialias), pad with 0,
     then normalise (so letterbox pixels become -mean/std),
  3. cut the overlapping crops, prepend a letterboxed global view of the whole image, patchify (dy, dx, c),
  4. per-patch valid-pixel fractions (with the legacy one-crop misalignment, see `crop_image`),
  5. the image token block and, for every pooled cell of every crop, its index into that block.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from molmo_fast.data.tokenizer import ImageTokenIds

# image_input_idx value of pooled cells that feed no token (crop margins).
NO_TOKEN = -100


@dataclass(frozen=True)
class ImageConfig:
    """Crop settings, as in the release's `preprocessor_config.json`. Margins and windows are in patches."""

    crop_size: int = 336
    patch_size: int = 14
    max_crops: int = 12
    overlap_margins: tuple[int, int] = (4, 4)
    tokens_h: int = 12
    tokens_w: int = 12
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    use_col_tokens: bool = True

    def __post_init__(self):
        object.__setattr__(self, "overlap_margins", tuple(int(m) for m in self.overlap_margins))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if self.crop_size <= 0 or self.patch_size <= 0 or self.crop_size % self.patch_size:
            raise ValueError(f"crop_size={self.crop_size} must be a positive multiple of patch_size={self.patch_size}")
        if self.max_crops < 1:
            raise ValueError(f"max_crops must be >= 1, got {self.max_crops}")
        if len(self.overlap_margins) != 2 or min(self.overlap_margins) < 0:
            raise ValueError(f"overlap_margins must be two non-negative patch counts, got {self.overlap_margins}")
        if self.window_patches <= 0:
            raise ValueError(
                f"overlap_margins={self.overlap_margins} leave no window in a {self.crop_patches}-patch crop")
        if self.tokens_h * self.pool != self.crop_patches or self.tokens_w * self.pool != self.crop_patches:
            raise ValueError(
                f"image_token_length {self.tokens_h}x{self.tokens_w} must tile a {self.crop_patches}-patch crop "
                f"with one square pooling window size")
        if self.overlap_margins[0] % self.pool:
            raise ValueError(
                f"left overlap margin {self.overlap_margins[0]} must be a multiple of the pooling {self.pool}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"image_mean/image_std must have 3 channels, got {self.mean}, {self.std}")

    @property
    def crop_patches(self) -> int:
        return self.crop_size // self.patch_size

    @property
    def pool(self) -> int:
        return self.crop_patches // self.tokens_h

    @property
    def window_patches(self) -> int:
        return self.crop_patches - sum(self.overlap_margins)

    @property
    def window_px(self) -> int:
        return self.window_patches * self.patch_size

    @property
    def margin_px(self) -> int:
        return sum(self.overlap_margins) * self.patch_size

    @property
    def patches_per_crop(self) -> int:
        return self.crop_patches**2

    @property
    def tokens_per_crop(self) -> int:
        return self.tokens_h * self.tokens_w

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * 3

    def with_max_crops(self, max_crops: int) -> "ImageConfig":
        return dataclasses.replace(self, max_crops=max_crops)

    @classmethod
    def from_dict(cls, d: dict, source: str = "preprocessor config") -> "ImageConfig":
        crop = d.get("base_image_input_size", [336, 336])
        if len(crop) != 2 or crop[0] != crop[1]:
            raise ValueError(f"{source}: base_image_input_size must be square [s, s], got {crop}")
        mode = d.get("crop_mode", "overlap-and-resize-c2")
        if mode != "overlap-and-resize-c2":
            raise ValueError(f"{source}: crop_mode {mode!r} is not supported (only 'overlap-and-resize-c2')")
        if d.get("do_normalize", True) is not True or d.get("image_padding_mask", True) is not True:
            raise ValueError(f"{source}: only do_normalize=true and image_padding_mask=true are supported")
        return cls(
            crop_size=int(crop[0]),
            patch_size=int(d.get("image_patch_size", 14)),
            max_crops=int(d.get("max_crops", 12)),
            overlap_margins=tuple(d.get("overlap_margins", (4, 4))),
            tokens_h=int(d.get("image_token_length_h", 12)),
            tokens_w=int(d.get("image_token_length_w", 12)),
            mean=tuple(d.get("image_mean", cls.mean)),
            std=tuple(d.get("image_std", cls.std)),
            use_col_tokens=bool(d.get("use_col_tokens", True)),
        )

    @classmethod
    def from_model_config(cls, d: dict, source: str = "config.json") -> "ImageConfig":
        """Crop settings implied by a MolmoE model `config.json` (CLIP mean/std, as every MolmoE release)."""
        vision = d.get("vision_backbone") or {}
        crop, patch = vision.get("image_default_input_size", [336, 336]), int(vision.get("image_patch_size", 14))
        pool_h, pool_w = int(d.get("image_pooling_h", 2)), int(d.get("image_pooling_w", 2))
        return cls.from_dict({
            "base_image_input_size": crop,
            "image_patch_size": patch,
            "max_crops": d.get("max_crops", 12),
            "overlap_margins": d.get("overlap_margins", [4, 4]),
            "image_token_length_h": math.ceil(crop[0] // patch / pool_h),
            "image_token_length_w": math.ceil(crop[1] // patch / pool_w),
            "crop_mode": d.get("crop_mode", "overlap-and-resize-c2"),
            "use_col_tokens": d.get("use_col_tokens", True),
        }, source=source)

    @classmethod
    def from_json(cls, path: str | Path) -> "ImageConfig":
        """From `preprocessor_config.json` (a file, or a directory holding it; else the directory's model
        `config.json`)."""
        path = Path(path)
        if path.is_dir():
            if not (path / "preprocessor_config.json").is_file() and (path / "config.json").is_file():
                return cls.from_model_config(json.loads((path / "config.json").read_text()), str(path / "config.json"))
            path = path / "preprocessor_config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (needed for the image crop settings)")
        return cls.from_dict(json.loads(path.read_text()), source=str(path))


@dataclass
class ImageCrops:
    """One image, ready for the model. `input_idx` indexes into `tokens` (add the block's offset)."""

    images: np.ndarray  # [N, P, patch_dim] float32, global view first
    masks: np.ndarray  # [N, P] float32 (legacy misaligned, last row -1)
    tokens: np.ndarray  # [n_tokens] int64, the image's token block
    input_idx: np.ndarray  # [N, T] int64 position in `tokens` per pooled cell, NO_TOKEN when unused
    tiling: tuple[int, int]


def select_tiling(h: float, w: float, window_px: int, max_crops: int) -> tuple[int, int]:
    """Tiling (rows, cols) that upscales the least, or, if every tiling must downscale, downscales the least.
    `h`, `w` are the image size minus the total margin (may be <= 0). Ties go to fewer crops, then fewer rows."""
    tilings = sorted(
        ((i, j) for i in range(1, max_crops + 1) for j in range(1, max_crops + 1) if i * j <= max_crops),
        key=lambda t: (t[0] * t[1], t[0]),
    )
    resolutions = np.array(tilings, dtype=np.int32) * window_px
    size = np.array([h, w], dtype=np.float32)
    with np.errstate(divide="ignore"):
        scale = np.min(resolutions.astype(np.float32) / size, axis=-1)
    if np.all(scale < 1):
        ix = int(np.argmax(scale))
    else:
        ix = int(np.argmin(np.where(scale < 1, np.float32(1e10), scale)))
    return tilings[ix]


def resize_and_pad(image: np.ndarray, out_hw: tuple[int, int], cfg: ImageConfig) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [H, W, 3] -> (normalised float32 [h, w, 3] letterboxed, bool [h, w] valid-pixel mask)."""
    out_h, out_w = out_hw
    h, w = image.shape[:2]
    scale = min(np.float32(out_h) / np.float32(h), np.float32(out_w) / np.float32(w))
    # An extreme aspect ratio would round its short side to 0 pixels; one pixel keeps the image in one patch
    # row / column (and every size the reference produces unchanged).
    new_h, new_w = max(int(np.float32(h) * scale), 1), max(int(np.float32(w) * scale), 1)
    x = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).to(torch.float32) / 255.0
    if (new_h, new_w) != (h, w):  # torchvision's Resize returns the input untouched in this case
        x = F.interpolate(x[None], size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)[0]
    x = x.clamp(0.0, 1.0).permute(1, 2, 0).numpy()
    top, left = (out_h - new_h) // 2, (out_w - new_w) // 2
    canvas = np.zeros((out_h, out_w, 3), dtype=np.float32)
    canvas[top : top + new_h, left : left + new_w] = x
    mask = np.zeros((out_h, out_w), dtype=bool)
    mask[top : top + new_h, left : left + new_w] = True
    canvas -= np.array(cfg.mean, dtype=np.float32)
    canvas /= np.array(cfg.std, dtype=np.float32)
    return canvas, mask


def patchify(x: np.ndarray, patch: int) -> np.ndarray:
    """[N, H, W, C] -> [N, (H/p)*(W/p), p*p*C]: patches row-major, pixels (dy, dx, c) inside a patch."""
    n, h, w, c = x.shape
    y = x.reshape(n, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
    return y.reshape(n, (h // patch) * (w // patch), patch * patch * c)


def _token_grid(cfg: ImageConfig, ids: ImageTokenIds, rows: int, cols: int) -> np.ndarray:
    row = [ids.patch] * cols + ([ids.col] if cfg.use_col_tokens else [])
    return np.array([ids.start] + row * rows + [ids.end], dtype=np.int64)


def crop_image(image: np.ndarray, cfg: ImageConfig, ids: ImageTokenIds) -> ImageCrops:
    """uint8 [H, W, 3] RGB -> crops, masks, token block and pooled-cell -> token mapping (golden §5.5)."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 [H, W, 3] image, got {image.dtype} {image.shape}")
    h, w = image.shape[:2]
    lm, rm = cfg.overlap_margins
    pool, crop, win = cfg.pool, cfg.crop_size, cfg.window_px
    rows, cols = select_tiling(h - cfg.margin_px, w - cfg.margin_px, win, cfg.max_crops)
    canvas, valid = resize_and_pad(image, (rows * win + cfg.margin_px, cols * win + cfg.margin_px), cfg)

    # Pooled cells kept per tile: the window, plus the outer margin on the first/last tile of a row/column.
    def kept(n: int) -> list[tuple[int, int]]:  # (offset in the tile's pooled grid, kept pooled count)
        out = []
        for k in range(n):
            span = cfg.window_patches + (lm if k == 0 else 0) + (rm if k == n - 1 else 0)
            out.append((0 if k == 0 else lm // pool, math.ceil(span / pool)))
        return out

    kept_rows, kept_cols = kept(rows), kept(cols)
    grid_h = math.ceil((rows * cfg.window_patches + lm + rm) / pool)
    grid_w = math.ceil((cols * cfg.window_patches + lm + rm) / pool)
    # Kept cells are numbered as one raster over the whole high-res grid; number k is the k-th <im_patch>.
    kept_h, kept_w = sum(n for _, n in kept_rows), sum(n for _, n in kept_cols)
    raster = np.arange(kept_h * kept_w).reshape(kept_h, kept_w)

    crops, crop_masks, orders = [], [], []
    y_tok = 0
    for i, (y0, ph) in enumerate(kept_rows):
        x_tok = 0
        for j, (x0, pw) in enumerate(kept_cols):
            crops.append(canvas[i * win : i * win + crop, j * win : j * win + crop])
            crop_masks.append(valid[i * win : i * win + crop, j * win : j * win + crop])
            order = np.full((cfg.tokens_h, cfg.tokens_w), -1, dtype=np.int64)
            order[y0 : y0 + ph, x0 : x0 + pw] = raster[y_tok : y_tok + ph, x_tok : x_tok + pw]
            orders.append(order.reshape(-1))
            x_tok += pw
        y_tok += ph

    global_view, _ = resize_and_pad(image, (crop, crop), cfg)
    images = patchify(np.stack([global_view] + crops), cfg.patch_size)
    # Legacy off-by-one kept for checkpoint parity: the global view's own mask is dropped and a -1 row is
    # appended, so row r of `masks` belongs to image r+1 (the last crop gets all -1).
    masks = patchify(np.stack(crop_masks)[..., None].astype(np.float32), cfg.patch_size).mean(-1)
    masks = np.concatenate([masks, np.full((1, masks.shape[1]), -1, dtype=np.float32)])

    tokens = np.concatenate([_token_grid(cfg, ids, cfg.tokens_h, cfg.tokens_w), _token_grid(cfg, ids, grid_h, grid_w)])
    patch_pos = np.flatnonzero(tokens == ids.patch)
    # The global view's cells are the first tokens_per_crop <im_patch> tokens, the high-res raster follows.
    order = np.stack(orders)
    high_res = np.where(order >= 0, order + cfg.tokens_per_crop, -1)
    order = np.concatenate([np.arange(cfg.tokens_per_crop)[None], high_res])
    input_idx = np.where(order >= 0, patch_pos[np.maximum(order, 0)], NO_TOKEN)
    return ImageCrops(images=images.astype(np.float32, copy=False), masks=masks, tokens=tokens,
                      input_idx=input_idx.astype(np.int64), tiling=(rows, cols))
