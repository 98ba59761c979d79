"""TEST DOUBLE of FreeSurfer's mri_synthstrip -- not FreeSurfer, never used for real data.

FreeSurfer cannot be installed on the test machines, so tests/test_freesurfer_route.py
puts this script on PATH under the name ``mri_synthstrip`` to exercise the pipeline's
FreeSurfer route end to end (nipype interface, command line, outputs). It parses its
arguments as FreeSurfer 7.3-7.4's mri_synthstrip does (-i, -o, -m, -g, -b in whole mm,
--no-csf, --model; no -t: an unknown option exits with code 2), or as FreeSurfer 8's
(adds -t/--threads, -b in any mm) when $DOUBLE_FREESURFER_MAJOR is 8, and like the real
program it exits 1 without FREESURFER_HOME. It "strips" by thresholding the input at half
its maximum (largest component, holes filled) and writes the mask (-m) and the masked
image (-o). Each call's arguments are appended, one JSON list per line, to the file named
by $DOUBLE_CALLS_LOG when set, and its OMP_NUM_THREADS (how the pipeline sets the
network's threads on every version) to $DOUBLE_THREADS_LOG when set. $DOUBLE_THRESHOLD (share of the maximum,
default 0.5) lets a test provoke an empty mask. $DOUBLE_ERROR makes it fail as the real
program does (its text on stderr, exit code 1 or $DOUBLE_ERROR_EXIT, no output written);
$DOUBLE_KILLED makes it die of SIGKILL, as the memory limit of a job kills it. $DOUBLE_MASK_REORIENTED
writes the mask flipped left-right, voxels and affine alike: the same brain on another grid
of the same shape, as a tool that reorients its output would.
"""

import argparse
import json
import os
import signal
import sys

import nibabel as nib
import numpy as np
from scipy import ndimage


def main(argv):
    if os.environ.get("DOUBLE_CALLS_LOG"):
        with open(os.environ["DOUBLE_CALLS_LOG"], "a") as handle:
            handle.write(json.dumps(["mri_synthstrip", *argv]) + "\n")
    if os.environ.get("DOUBLE_THREADS_LOG"):
        with open(os.environ["DOUBLE_THREADS_LOG"], "a") as handle:
            handle.write(json.dumps(os.environ.get("OMP_NUM_THREADS")) + "\n")
    freesurfer_8 = os.environ.get("DOUBLE_FREESURFER_MAJOR") == "8"
    parser = argparse.ArgumentParser(prog="mri_synthstrip (test double)")
    parser.add_argument("-i", "--image", required=True)
    parser.add_argument("-o", "--out")
    parser.add_argument("-m", "--mask")
    parser.add_argument("-g", "--gpu", action="store_true")
    parser.add_argument("-b", "--border", type=float if freesurfer_8 else int, default=1)
    parser.add_argument("--no-csf", action="store_true")
    parser.add_argument("--model")
    if freesurfer_8:
        parser.add_argument("-t", "--threads", type=int)
    args = parser.parse_args(argv)  # exits with code 2 on an option it does not know
    if not os.environ.get("FREESURFER_HOME"):
        print("Error: FREESURFER_HOME env variable must be set! Make sure FreeSurfer is "
              "properly sourced.", file=sys.stderr)
        return 1
    if os.environ.get("DOUBLE_ERROR"):
        print("Configuring model on the CPU")
        print(os.environ["DOUBLE_ERROR"], file=sys.stderr)
        return int(os.environ.get("DOUBLE_ERROR_EXIT", "1"))
    if os.environ.get("DOUBLE_KILLED"):
        print("Configuring model on the CPU", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    image = nib.load(args.image)
    data = np.asanyarray(image.dataobj).astype(np.float32)
    mask = data > float(os.environ.get("DOUBLE_THRESHOLD", "0.5")) * data.max()
    labels, count = ndimage.label(mask)
    if count:
        mask = ndimage.binary_fill_holes(labels == np.bincount(labels.ravel())[1:].argmax() + 1)
    if args.mask:
        written = nib.Nifti1Image(mask.astype(np.uint8), image.affine)
        if os.environ.get("DOUBLE_MASK_REORIENTED"):
            written = written.as_reoriented(np.array([[0, -1], [1, 1], [2, 1]]))
        nib.save(written, args.mask)
    if args.out:
        nib.save(nib.Nifti1Image(np.where(mask, data, 0), image.affine), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
