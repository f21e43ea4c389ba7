"""Speed of phantom generation and of `build` (target: a few hundred slices in under a minute).

Writes phantoms at their default (full) sizes into a temporary folder, builds RadDiagSeg-D from
them, and prints the time of each step, the number of CT slices and samples, slices per second,
and the ratio of the measured time to the 60 s target measured in this run.

    .venv/bin/python benchmarks/data_build.py --ct-volumes 8 --xrays 60
"""

import argparse
import tempfile
import time
from pathlib import Path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ct-volumes", type=int, default=8)
    parser.add_argument("--xrays", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import nibabel as nib

    from raddiagseg.data.builder import build_dataset
    from raddiagseg.data.layouts import write_phantoms

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        paths = write_phantoms(Path(tmp) / "src", args.ct_volumes, args.xrays, seed=args.seed)
        t_phantoms = time.perf_counter() - start
        ct_slices = sum(nib.load(str(p)).shape[2] for task in paths["msd"] for p in (task / "imagesTr").glob("*.nii.gz"))
        start = time.perf_counter()
        rows, report = build_dataset(Path(tmp) / "out", msd=paths["msd"], covidqu=paths["covidqu"],
                                     vqarad=paths["vqarad"], slake=paths["slake"], seed=args.seed)
        t_build = time.perf_counter() - start
    total = t_phantoms + t_build
    print(f"phantoms: {args.ct_volumes} CT volumes ({ct_slices} slices) + {args.xrays} X-rays in {t_phantoms:.1f} s")
    print(f"build:    {len(rows)} samples in {t_build:.1f} s ({len(report.skipped)} skipped)")
    print(f"total:    {total:.1f} s, {(ct_slices + args.xrays) / total:.1f} slices/s, "
          f"{total / 60:.2f} x the 60 s target")


if __name__ == "__main__":
    main()
