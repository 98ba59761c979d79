"""TEST DOUBLE of FreeSurfer's mri_watershed -- not FreeSurfer, never used for real data.

Put on PATH as ``mri_watershed`` by tests/test_freesurfer_route.py. Usage as the real
program's simplest form, ``mri_watershed [-T1] in_volume out_volume``: writes the input
masked by a threshold at half its maximum (largest component, holes filled). Arguments are
logged to $DOUBLE_CALLS_LOG like mri_synthstrip_double.py.
"""

import json
import os
import sys

import nibabel as nib
import numpy as np
from scipy import ndimage


def main(argv):
    if os.environ.get("DOUBLE_CALLS_LOG"):
        with open(os.environ["DOUBLE_CALLS_LOG"], "a") as handle:
            handle.write(json.dumps(["mri_watershed", *argv]) + "\n")
    paths = [a for a in argv if not a.startswith("-")]
    if len(paths) != 2:
        print("usage: mri_watershed [-T1] in_volume out_volume", file=sys.stderr)
        return 1
    image = nib.load(paths[0])
    data = np.asanyarray(image.dataobj).astype(np.float32)
    mask = data > 0.5 * data.max()
    labels, count = ndimage.label(mask)
    if count:
        mask = ndimage.binary_fill_holes(labels == np.bincount(labels.ravel())[1:].argmax() + 1)
    nib.save(nib.Nifti1Image(np.where(mask, data, 0).astype(np.float32), image.affine), paths[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
