"""TEST DOUBLE of FreeSurfer's mri_synthstrip -- not FreeSurfer, never used for real data.

FreeSurfer cannot be installed on the test machines, so tests/test_freesurfer_route.py
puts this script on PATH under the name ``mri_synthstrip`` to exercise the pipeline's
FreeSurfer route end to end (nipype interface, command line, outputs). It accepts
SynthStrip's options (-i, -o, -m, -t, -b, --no-csf), "strips" by thresholding the input
at half its maximum (largest component, holes filled) and writes the mask (-m) and the
masked image (-o). Each call's arguments are appended, one JSON list per line, to the
file named by $DOUBLE_CALLS_LOG when set. $DOUBLE_THRESHOLD (share of the maximum,
default 0.5) lets a test provoke an empty mask. $DOUBLE_ERROR makes it fail as the real
program does (its text on stderr, exit code 1, no output written). $DOUBLE_MASK_REORIENTED
writes the mask flipped left-right, voxels and affine alike: the same brain on another grid
of the same shape, as a tool that reorients its output would.
"""

import argparse
import json
import os
import sys

import nibabel as nib
import numpy as np
from scipy import ndimage


def main(argv):
    if os.environ.get("DOUBLE_CALLS_LOG"):
        with open(os.environ["DOUBLE_CALLS_LOG"], "a") as handle:
            handle.write(json.dumps(["mri_synthstrip", *argv]) + "\n")
    parser = argparse.ArgumentParser(prog="mri_synthstrip (test double)")
    parser.add_argument("-i", required=True)
    parser.add_argument("-o")
    parser.add_argument("-m")
    parser.add_argument("-t", type=int)
    parser.add_argument("-b", type=int)
    parser.add_argument("--no-csf", action="store_true")
    args = parser.parse_args(argv)
    if os.environ.get("DOUBLE_ERROR"):
        print("Configuring model on the CPU")
        print(os.environ["DOUBLE_ERROR"], file=sys.stderr)
        return 1
    image = nib.load(args.i)
    data = np.asanyarray(image.dataobj).astype(np.float32)
    mask = data > float(os.environ.get("DOUBLE_THRESHOLD", "0.5")) * data.max()
    labels, count = ndimage.label(mask)
    if count:
        mask = ndimage.binary_fill_holes(labels == np.bincount(labels.ravel())[1:].argmax() + 1)
    if args.m:
        written = nib.Nifti1Image(mask.astype(np.uint8), image.affine)
        if os.environ.get("DOUBLE_MASK_REORIENTED"):
            written = written.as_reoriented(np.array([[0, -1], [1, 1], [2, 1]]))
        nib.save(written, args.m)
    if args.o:
        nib.save(nib.Nifti1Image(np.where(mask, data, 0), image.affine), args.o)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
