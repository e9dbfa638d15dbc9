r"""Run a trained usclip model on one image: the mask and an overlay at the image's own size, or the class.

What it shows: ``usclip.tasks.load_task`` loads a trained run (its folder or a ``.ckpt`` file) as the right task in
eval mode, and ``task.predict_image`` runs what ``usclip predict`` runs on one image: the same scan-area crop,
resize and colour handling the model was trained with (stored in the checkpoint), the forward pass, and the paste
back to the original size. It takes a path (PNG, JPEG, BMP, TIFF or DICOM), a numpy array or a PIL image, or a list
of them. A segmentation model gives a mask and an overlay; a classification model the class probabilities.

Run it after ``examples/plain_lightning.py`` (whose defaults this script's defaults point at)::

    python examples/plain_lightning.py
    python examples/predict_one_image.py                       # runs/plain_lightning/version_0, one synthetic scan
    python examples/predict_one_image.py runs/busi_seg/version_0 scan.dcm --overlay scan_overlay.png

See docs/inference.md for the whole inference API.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from usclip.tasks import Prediction, load_task


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The example's options (defaults: the run and a scan of ``examples/plain_lightning.py``)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", nargs="?", default="runs/plain_lightning/version_0", help="run folder or .ckpt file")
    p.add_argument("image", nargs="?", default="runs/data/synthetic/images/syn_00000.png", help="image or DICOM")
    p.add_argument("--overlay", help="where the overlay PNG goes (default: <image stem>_overlay.png here)")
    p.add_argument("--mask", help="also write the mask as a 0/255 PNG here (segmentation)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> Prediction:
    """Predict one image, write the overlay (and mask), print the lesion area or the class; return the prediction."""
    args = parse_args(argv)
    task = load_task(args.run)  # a run folder (checkpoints/best.ckpt) or a .ckpt file; eval mode, on the CPU
    pred = task.predict_image(args.image)

    height, width = pred.size
    print(f"{pred.id}: {width} x {height} pixels")
    if pred.mask is not None:  # segmentation: a boolean mask at the original size
        area = int(pred.mask.sum())
        print(f"lesion area: {area} pixels ({100 * area / pred.mask.size:.2f} % of the image)")
        if args.mask:
            Image.fromarray(pred.mask.astype(np.uint8) * 255).save(args.mask)
            print(f"mask: {args.mask}")
    else:  # classification: one probability per class
        probabilities = ", ".join(f"{p:.3f}" for p in pred.probabilities.tolist())
        print(f"class probabilities: [{probabilities}] -> {pred.label_name or pred.label}")
    overlay = Path(args.overlay or f"{pred.id}_overlay.png")
    Image.fromarray(pred.overlay()).save(overlay)
    print(f"overlay: {overlay}")
    return pred


if __name__ == "__main__":
    main()
