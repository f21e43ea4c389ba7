"""Write the app's bundled sample studies (phantom CT volumes and chest X-rays) into a folder.

    .venv/bin/python MONAILabelApp/scripts/make_sample_studies.py MONAILabelApp/sample-studies

Phantoms come from `raddiagseg.data.phantoms` with fixed seeds (different from the demo
model's training seeds), so the folder is reproducible. CT volumes are NIfTI in HU; one is
stored with a permuted, flipped direction to show that labels come back in the file's own
geometry. X-rays are 8-bit PNG. Ground-truth masks are not written (studies are what a
clinician would open).
"""

import argparse
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from raddiagseg.data import phantoms

SEED = 20261123


def ct_image(phantom, orientation="LPS"):
    image = sitk.GetImageFromArray(phantom.hu.astype(np.int16))  # (z, row, col) = [S, P, L]
    dz, dr, dc = phantom.spacing
    image.SetSpacing((float(dc), float(dr), float(dz)))
    return sitk.DICOMOrient(image, orientation) if orientation != "LPS" else image


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--size", type=int, default=160, help="CT in-plane pixels (default 160)")
    parser.add_argument("--slices", type=int, default=16, help="CT slices (default 16)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    cases = [("ct_liver_tumour", "liver", 2, "LPS"), ("ct_pancreas_tumour", "pancreas", 1, "PRI"), ("ct_liver_normal", "liver", 0, "LPS")]
    for name, task, tumours, orientation in cases:
        phantom = phantoms.generate_ct(rng, task, size=args.size, slices=args.slices, tumours=tumours)
        sitk.WriteImage(ct_image(phantom, orientation), str(args.out / f"{name}.nii.gz"), useCompression=True)
    for name, kind in (("cxr_covid", "COVID-19"), ("cxr_non_covid", "Non-COVID"), ("cxr_normal", "Normal")):
        xray = phantoms.generate_xray(rng, kind, size=256)
        sitk.WriteImage(sitk.GetImageFromArray(xray.image), str(args.out / f"{name}.png"))
    print(f"wrote {len(cases) + 3} studies to {args.out}")


if __name__ == "__main__":
    main()
