"""Where the TopoScore is lost: per homology dimension, and per kind of error, on predicted masks against labels.

TopoScore is the weighted mean of three Betti-matching F1s (dimension 0: components, 1: loops/tunnels, 2: cavities),
counted per octant (``pipeline.evaluation.score``). For each set of predictions this prints, summed over its volumes:

- per dimension: matched ``m``, predicted ``p`` and label ``g`` features, the excess ``p - m`` and the missed ``g - m``,
  and the **TopoScore lost to it**: the mean over volumes of (TopoScore with that dimension's F1 set to 1) - TopoScore;
- dimension 0 by kind, from the 6-connected components of each octant (the complex the metric counts on): **dust**
  (predicted components touching no label voxel), **splits** (a label component covered by k > 1 predicted
  components: k - 1), **merges** (a predicted component covering k > 1 label components: k - 1, the touching or
  bridged sheets) and **missed** (label components no prediction touches);
- two oracles, each scored with the exact TopoScore: **no dust** (every predicted component touching no label voxel
  removed: the most that dropping small components could gain) and **no merges** (the prediction cut along the
  mid-surfaces between label components, outside the label: the most that separating touching sheets could gain).

    PYTHONPATH=. python bench/bench_topology.py --labels DATA/train_labels \\
        --predictions default=/tmp/ens_seeds/run0/predictions tuned=/tmp/ens_folds_tuned/run3/predictions

Predictions are a folder of ``<id>.tif`` masks or a ``submission.zip`` (``pipeline.evaluation.score.prediction_pairs``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cc3d
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.evaluation.score import (  # noqa: E402
    TOPO_WEIGHTS,
    _foreground,
    _octants,
    _topo_counts,
    prediction_pairs,
    topo_score_from_counts,
)

DIM_NAMES = ("components (dim 0)", "loops (dim 1)", "cavities (dim 2)")


def _with_perfect(counts: dict, k: int) -> dict:
    """``counts`` with dimension ``k`` matched in full (F1 1), or left inactive when it was."""
    m, p, g = counts[k]
    n = max(p, g)
    return {**counts, k: (n, n, n)}


def component_errors(p: np.ndarray, g: np.ndarray) -> dict[str, int]:
    """Dimension-0 errors by kind, 6-connected, summed over the octants the metric counts on."""
    out = dict.fromkeys(("dust", "splits", "merges", "missed"), 0)
    for sl in _octants(p.shape):
        lp, n_p = cc3d.connected_components(p[sl], connectivity=6, return_N=True, out_dtype=np.uint32)
        lg, n_g = cc3d.connected_components(g[sl], connectivity=6, return_N=True, out_dtype=np.uint32)
        both = (lp > 0) & (lg > 0)
        pairs = np.unique(np.stack([lp[both], lg[both]]), axis=1) if both.any() else np.zeros((2, 0), np.uint32)
        per_p = np.bincount(pairs[0], minlength=n_p + 1)[1:]  # label components each predicted one covers
        per_g = np.bincount(pairs[1], minlength=n_g + 1)[1:]  # predicted components covering each label one
        out["dust"] += int((per_p == 0).sum())
        out["merges"] += int(np.maximum(per_p - 1, 0).sum())
        out["splits"] += int(np.maximum(per_g - 1, 0).sum())
        out["missed"] += int((per_g == 0).sum())
    return out


def without_dust(p: np.ndarray, g: np.ndarray) -> np.ndarray:
    """``p`` without its (whole-volume, 6-connected) components that touch no label voxel."""
    lp, n = cc3d.connected_components(p, connectivity=6, return_N=True, out_dtype=np.uint32)
    keep = np.zeros(n + 1, bool)
    keep[np.unique(lp[p & g])] = True
    keep[0] = False
    return keep[lp]


def without_merges(p: np.ndarray, g: np.ndarray) -> np.ndarray:
    """``p`` cut along the mid-surfaces between label components: each voxel belongs to its nearest label component
    (6-connected, whole volume), and a predicted voxel outside the label is removed where a predicted 6-neighbour
    belongs to another one. An oracle for how much separating touching or bridged sheets could gain."""
    from scipy import ndimage

    lg = cc3d.connected_components(g, connectivity=6, out_dtype=np.uint32)
    if not lg.any():
        return p
    nearest = ndimage.distance_transform_edt(lg == 0, return_distances=False, return_indices=True)
    owner = lg[tuple(nearest)]
    cut = np.zeros(p.shape, bool)
    for axis in range(3):
        a = [slice(None)] * 3
        b = [slice(None)] * 3
        a[axis], b[axis] = slice(0, -1), slice(1, None)
        a, b = tuple(a), tuple(b)
        differ = p[a] & p[b] & (owner[a] != owner[b])
        cut[a] |= differ
        cut[b] |= differ
    return p & ~(cut & ~g)


def analyse(name: str, pred_dir: Path, labels: Path) -> dict:
    rows = []
    for volume_id, pred, label in prediction_pairs(pred_dir, labels):
        p, g = _foreground(pred, label, 2)
        counts = _topo_counts(p, g)
        topo = topo_score_from_counts(counts)
        row = {"id": volume_id, "topo": topo, "counts": {k: list(v) for k, v in counts.items()}}
        row["lost"] = [topo_score_from_counts(_with_perfect(counts, k)) - topo for k in range(3)]
        row.update(component_errors(p, g))
        row["topo_no_dust"] = topo_score_from_counts(_topo_counts(without_dust(p, g), g))
        row["topo_no_merges"] = topo_score_from_counts(_topo_counts(without_merges(p, g), g))
        rows.append(row)
    n = len(rows)
    summary = {"name": name, "volumes": n, "topo": sum(r["topo"] for r in rows) / n}
    for k in range(3):
        m, pc, gc = (sum(r["counts"][k][i] for r in rows) for i in range(3))
        summary[f"dim{k}"] = {"m": m, "p": pc, "g": gc, "excess": pc - m, "missed": gc - m,
                              "lost": sum(r["lost"][k] for r in rows) / n}
    for kind in ("dust", "splits", "merges", "missed"):
        summary[kind] = sum(r[kind] for r in rows)
    for oracle in ("topo_no_dust", "topo_no_merges"):
        summary[oracle] = sum(r[oracle] for r in rows) / n
    summary["rows"] = rows
    return summary


def _print(s: dict) -> None:
    print(f"== {s['name']}: {s['volumes']} volumes, TopoScore {s['topo']:.4f} "
          f"(weights {', '.join(str(w) for w in TOPO_WEIGHTS)})")
    print(f"   {'dimension':<20} {'m':>6} {'p':>6} {'g':>6} {'p - m':>6} {'g - m':>6} {'TopoScore lost':>15}")
    for k in range(3):
        d = s[f"dim{k}"]
        print(f"   {DIM_NAMES[k]:<20} {d['m']:>6} {d['p']:>6} {d['g']:>6} {d['excess']:>6} {d['missed']:>6} "
              f"{d['lost']:>15.4f}")
    print(f"   dimension 0 by kind (per octant): dust {s['dust']}, splits {s['splits']}, merges {s['merges']}, "
          f"missed {s['missed']}")
    print(f"   oracles: no dust -> TopoScore {s['topo_no_dust']:.4f} ({s['topo_no_dust'] - s['topo']:+.4f}); "
          f"cut between label sheets -> {s['topo_no_merges']:.4f} ({s['topo_no_merges'] - s['topo']:+.4f})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", type=Path, required=True, help="folder of <id>.tif labels (train_labels)")
    parser.add_argument("--predictions", nargs="+", required=True,
                        help="NAME=DIR (or DIR): folders of <id>.tif masks or submission.zip files")
    parser.add_argument("--out", type=Path, default=None, help="write every row as JSON here")
    args = parser.parse_args()
    results = []
    for spec in args.predictions:
        name, _, where = spec.rpartition("=")
        results.append(analyse(name or where, Path(where), args.labels))
        _print(results[-1])
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
