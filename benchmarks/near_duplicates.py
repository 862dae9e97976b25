"""How well the audit's near-duplicate check tells a knee's copies from other knees.

    python benchmarks/near_duplicates.py --size 256 --n 600        # the default phantom, seed 0
    python benchmarks/near_duplicates.py --size 512 --n 400 --flat-share 0   # the rule before 2026-12-05

Writes the default phantom (``osteo.data.phantom.write_phantom``, seed 0) at ``--size`` px
under ``--root`` (kept for the next run), copies ``--copies`` of its knees six ways (JPEG
q70, q80, q90; 0.78x then JPEG q85; PNG at 0.6x and 1.25x), and scores each copy against
its original with the audit's own features and check (``osteo.data.scan``: 16x16
thumbnails at >= THUMB_CORR, then the (DETAIL_OUTLIERS + 1)-th lowest tile correlation of
the band-pass detail). Prints, per kind of copy, the lowest and median score and how many
fall under DETAIL_CORR (missed), and for every pair of distinct knees that passes the
thumbnails the highest score and its 99.9th percentile: a copy must score above
DETAIL_CORR and every distinct pair below it. ``--flat-share`` replaces
``scan.FLAT_SHARE`` (0: tiles count as flat under the absolute floor only).
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
from PIL import Image

from osteo.data import scan
from osteo.data.decode import decode_gray
from osteo.data.phantom import write_phantom


def features(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    return scan._gray_features(decode_gray(data, scan.audit_scale))


def copies(path: Path) -> list[tuple[str, bytes]]:
    img = Image.open(path).convert("L")
    out = []
    for q in (70, 80, 90):
        b = io.BytesIO()
        img.save(b, "JPEG", quality=q)
        out.append((f"JPEG q{q}", b.getvalue()))
    b = io.BytesIO()
    img.resize((round(img.width * 0.78), round(img.height * 0.78)), Image.Resampling.LANCZOS).save(b, "JPEG", quality=85)
    out.append(("0.78x, JPEG q85", b.getvalue()))
    for s in (0.6, 1.25):
        b = io.BytesIO()
        img.resize((round(img.width * s), round(img.height * s)), Image.Resampling.LANCZOS).save(b, "PNG")
        out.append((f"PNG {s}x", b.getvalue()))
    return out


def score(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> float:
    """The detail score of a pair that passes the thumbnails; -1 for one that does not."""
    if float(a[0] @ b[0]) < scan.THUMB_CORR:
        return -1.0
    return float(scan._detail_scores([a[1], b[1]], 0, np.array([1]))[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--n", type=int, default=600, help="phantom knees")
    ap.add_argument("--copies", type=int, default=40, help="knees copied six ways each")
    ap.add_argument("--flat-share", type=float, default=None, help=f"default scan.FLAT_SHARE ({scan.FLAT_SHARE})")
    ap.add_argument("--root", default="data/bench", help="where the phantom is written (and reused)")
    args = ap.parse_args()
    if args.flat_share is not None:
        scan.FLAT_SHARE = args.flat_share
    root = Path(args.root) / f"phantom-{args.n}-{args.size}-near"
    if not root.exists():
        write_phantom(root, n=args.n, size=args.size, seed=0)
    files = sorted(root.rglob("*.png"))
    feats = [features(f.read_bytes()) for f in files]
    by_kind: dict[str, list[float]] = {}
    for k in np.random.default_rng(1).choice(len(files), min(args.copies, len(files)), replace=False):
        for kind, data in copies(files[k]):
            by_kind.setdefault(kind, []).append(score(feats[k], features(data)))
    thumbs = np.stack([f[0] for f in feats])
    details = [f[1] for f in feats]
    close = thumbs @ thumbs.T >= scan.THUMB_CORR
    distinct = np.concatenate([scan._detail_scores(details, a, np.flatnonzero(close[a, a + 1:]) + a + 1)
                               for a in range(len(files)) if close[a, a + 1:].any()] or [np.zeros(0)])
    print(f"{args.size} px, {len(files)} knees, FLAT_SHARE {scan.FLAT_SHARE}, DETAIL_CORR {scan.DETAIL_CORR}")
    for kind, scores in by_kind.items():
        s = np.array(scores)
        print(f"  copy {kind:16s} lowest {s.min():.3f}  median {np.median(s):.3f}  missed {(s < scan.DETAIL_CORR).sum()}"
              f" of {len(s)}")
    if len(distinct):
        print(f"  distinct pairs passing the thumbnails: {len(distinct)}, highest {distinct.max():.3f}, 99.9th "
              f"percentile {np.percentile(distinct, 99.9):.3f}, at or above DETAIL_CORR {(distinct >= scan.DETAIL_CORR).sum()}")
    else:
        print("  no distinct pair passes the thumbnails")


if __name__ == "__main__":
    main()
