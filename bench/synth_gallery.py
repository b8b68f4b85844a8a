"""Slices of an easy and a hard synthetic scroll, one pair of panels per kind of difficulty, in one PNG.

The first row is the same axial slice of an easy and a hard volume (image, label); then, in the hard volume, the
slice where each kind of difficulty is most present, its voxels marked in red on the label (or the thickness
drawn on the sheet, or the low-pass image for the drift). Run from the repo root::

    PYTHONPATH=. python bench/synth_gallery.py OUT_DIR [--size 96] [--seed 0] [--scroll 1]

It writes ``OUT_DIR/synth_gallery.png`` (the card's copy: ``bundle/docs/synth_gallery.png``) and prints what
:meth:`pipeline.data.synth.SynthInfo.summary` measured on the hard volume.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from PIL import Image
from scipy import ndimage

from pipeline.data.synth import make_volume

LABELS = ListedColormap(["#000000", "#f2f2f2", "#3b5b92"])  # 0 background, 1 surface, 2 unlabeled


def _marked(label: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """RGB of a label slice, ``mask`` in red."""
    rgb = LABELS(label.astype(int))[..., :3]
    rgb[mask] = (0.9, 0.1, 0.1)
    return rgb


def _busiest(mask: np.ndarray) -> int:
    return int(np.argmax(mask.reshape(len(mask), -1).sum(1)))


def _background_profile(image: np.ndarray, label: np.ndarray, axis: int) -> np.ndarray:
    image, background = np.moveaxis(image, axis, 0), np.moveaxis(label == 0, axis, 0)
    return np.array([im[bg].mean() if bg.any() else np.nan for im, bg in zip(image, background)])


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="folder to write synth_gallery.png into")
    p.add_argument("--size", type=int, default=96, help="side of the cubic volumes (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="volume seed (default: %(default)s)")
    p.add_argument("--scroll", type=int, default=1, help="scroll id: contrast and noise (default: %(default)s)")
    args = p.parse_args(argv)

    shape = (args.size,) * 3
    easy, easy_label = make_volume(shape, args.seed, args.scroll)
    hard, label, info = make_volume(shape, args.seed, args.scroll, difficulty="hard", return_info=True)
    summary = info.summary(label)
    sheet = label == 1
    touching = np.zeros(shape, dtype=bool)
    for axis in range(3):  # voxels of one wrap 6-adjacent to a voxel of another: merged wraps
        w = np.where(sheet, info.wrap, 0)
        other = np.roll(w, 1, axis)
        touching |= (w > 0) & (other > 0) & (w != other)
    close = info.close & sheet
    z_mid = args.size // 2
    z_close, z_flap = _busiest(close | touching), _busiest(info.flap & info.wrap.astype(bool) & sheet)
    z_air = _busiest(info.air_gap & sheet)
    z_thick = _busiest(sheet & (info.thickness > np.percentile(info.thickness, 90)))
    blocked = np.zeros(shape, dtype=bool)
    for block in info.blocks:
        blocked[block] = True
    z_block = _busiest(info.close & blocked)
    thickness = np.where(sheet, info.thickness, np.nan)
    drift_axis = int(np.argmax(np.abs(info.drift)))
    drift_profiles = [  # mean background intensity of each slice across the axis the drift follows most
        (_background_profile(easy, easy_label, drift_axis), "easy"),
        (_background_profile(hard, label, drift_axis), "hard"),
    ]

    panels = [
        (easy[z_mid], "gray", f"easy image z={z_mid}"), (easy_label[z_mid], LABELS, "easy label"),
        (hard[z_mid], "gray", f"hard image z={z_mid}"), (label[z_mid], LABELS, "hard label"),
        (hard[z_close], "gray", f"close wraps z={z_close}"),
        (_marked(label[z_close], (close | touching)[z_close]), None,
         f"red: < 3 vox apart, min gap {summary['min_gap']}"),
        (hard[z_flap], "gray", f"crossing flap z={z_flap}"),
        (_marked(label[z_flap], info.flap[z_flap] & sheet[z_flap]), None, "red: the flap"),
        (hard[z_thick], "gray", f"thickness z={z_thick}"),
        (thickness[z_thick], "viridis", "thickness {:.1f}-{:.1f} vox".format(*summary["thickness"])),
        (hard[z_air], "gray", f"air slits z={z_air}"),
        (_marked(label[z_air], info.air_gap[z_air] & sheet[z_air]), None, "red: slit, labelled 1"),
        (drift_profiles, "profile", f"background along axis {drift_axis}: drift"),
        (ndimage.gaussian_filter(hard[z_mid].astype(np.float32), 6), "gray",
         f"hard low-pass: gain 1 +- {info.drift_amplitude:.2f}"),
        (hard[z_block], "gray", f"unlabeled blocks z={z_block}"),
        (_marked(label[z_block], (info.close & blocked)[z_block]), None, "red: close wraps under 2"),
    ]
    fig = Figure(figsize=(8, 8.6))
    for i, (data, cmap, title) in enumerate(panels):
        ax = fig.add_subplot(4, 4, i + 1)
        if cmap == "profile":
            for profile, name in data:
                ax.plot(profile, label=name)
            ax.legend(fontsize=6)
            ax.tick_params(labelsize=6)
            ax.set_title(title, fontsize=7)
            continue
        if cmap is LABELS:
            ax.imshow(data, cmap=LABELS, vmin=0, vmax=2, interpolation="nearest")
        elif cmap is None:
            ax.imshow(data, interpolation="nearest")
        else:
            ax.imshow(data, cmap=cmap, interpolation="nearest")
        ax.set_title(title, fontsize=7)
        ax.set_axis_off()
    fig.suptitle(f"synthetic scrolls, {args.size}^3, seed {args.seed}: easy (top left) and hard", fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "synth_gallery.png"
    # a 128-colour palette keeps the card's copy small (noise does not compress)
    Image.open(buffer).convert("RGB").quantize(128).save(out, optimize=True)
    print({k: v for k, v in summary.items() if k != "gaps"})
    print(out, f"{out.stat().st_size // 1024} KB")
    return out


if __name__ == "__main__":
    main()
