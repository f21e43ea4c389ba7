"""Ask the running RadDiag server the default 3-step question about each sample study and print
what a clinician would see: the answer, and per segment its name, role, label value and voxel count.
CT volumes are asked in whole-volume mode (every slice answered, one label volume back).

Uses RadDiagLib, the same client the Slicer module uses (a plain package in the Slicer module's folder).
Usage: PYTHONPATH=SlicerRadDiag/RadDiag .venv/bin/python scripts/demo_ask.py URL [STUDY ...] (scripts/demo.sh does).
"""

import sys

import numpy as np
import SimpleITK as sitk
from RadDiagLib.client import RadDiagClient, ServerError

# image ids in MONAILabelApp/sample-studies: CT volumes are asked in whole-volume mode (every slice, batched)
DEFAULT_STUDIES = ["ct_liver_tumour", "ct_liver_normal", "cxr_covid", "cxr_normal"]


def main(argv):
    url = argv[1] if len(argv) > 1 else "http://127.0.0.1:8000"
    wanted = argv[2:]
    client = RadDiagClient(url)
    for study in wanted or DEFAULT_STUDIES:
        try:
            result = client.infer("raddiagseg", image_id=study, params={})
        except ServerError as error:
            print(f"{study}: the server said: {error}")
            return 1
        reply = result.params
        slices = reply.get("slices") or []
        where = f" (whole volume, {len(slices)} slices, {sum(bool(s.get('detection')) for s in slices)} answered yes)" \
            if slices else ""
        print(f"\n=== {study}{where} ===")
        print(reply.get("answer", "").strip())
        counts = {}
        if result.label_path:
            data = sitk.GetArrayFromImage(sitk.ReadImage(str(result.label_path)))
            counts = {int(v): int(n) for v, n in zip(*np.unique(data, return_counts=True)) if v}
        for seg in reply.get("segments", []):
            print(f"  segment {seg['label_value']}: {seg['name']} ({seg['role']}), "
                  f"{counts.get(int(seg['label_value']), 0)} voxels, colour {tuple(seg['color'])}")
        if result.label_path:
            print(f"  label file: {result.label_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
