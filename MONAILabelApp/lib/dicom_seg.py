"""Named, coded segments in the DICOM SEG that MONAI Label writes when a label is saved to DICOMweb.

MONAI Label's `nifti_to_dicom_seg` pairs `label_info[i]` with the i-th label value present in the
file and, unless an entry carries a `segmentAttribute`, codes every segment as the SNOMED CT type
"78961009" under "Anatomical Structure". A stock-plugin label whose `label_info` lists a value that
is absent therefore names the wrong segments. We hand it one entry per value present, in value
order, with the name, colour and SNOMED CT category/type from the vocabulary, so that a PACS or
OHIF viewer shows the segment as, for example, "liver tumour" coded Neoplasm.
"""

import logging

import numpy as np
import SimpleITK as sitk

from lib import label_info as label_info_lib
from lib import segments as segment_specs

logger = logging.getLogger(__name__)

# MONAI Label's own generic codes, kept for a value the label info does not name.
GENERIC_CATEGORY = ("SCT", "123037004", "Anatomical Structure")
GENERIC_TYPE = ("SCT", "85756007", "Tissue")


def _code(triplet):
    scheme, value, meaning = triplet
    return {"CodingSchemeDesignator": scheme, "CodeValue": str(value), "CodeMeaning": meaning}


def _names_by_value(info):
    """{label value: canonical name or the name as sent} from label info in any of the accepted formats."""
    try:
        parsed = label_info_lib.parse(info)
    except label_info_lib.LabelInfoError:
        return {}
    names = {value: name for name, value, _ in parsed.segments}
    names.update({value: name for name, value in parsed.unknown})
    return names


def segment_attributes(values, info):
    """dcmqi segment attributes (one per label value in `values`) for MONAI Label's DICOM SEG writer."""
    names = _names_by_value(info)
    attributes = []
    for value in values:
        name = names.get(value, f"label {value}")
        spec = segment_specs.describe(name, value)
        coded = spec["terminology"]
        attributes.append({
            "labelID": int(value),
            "SegmentLabel": name,
            "SegmentDescription": f"{spec['role']} ({name})" if coded else f"not a RadDiag target ({name})",
            "SegmentAlgorithmType": "SEMIAUTOMATIC",
            "SegmentAlgorithmName": "RadDiag correction",
            "SegmentedPropertyCategoryCodeSequence": _code(coded["category"] if coded else GENERIC_CATEGORY),
            "SegmentedPropertyTypeCodeSequence": _code(coded["type"] if coded else GENERIC_TYPE),
            "recommendedDisplayRGBValue": spec["color"],
        })
    return attributes


def coded_label_info(label_path, info):
    """`label_info` for MONAI Label's converter: one coded entry per value present in the label file."""
    values = [int(v) for v in np.unique(sitk.GetArrayViewFromImage(sitk.ReadImage(str(label_path)))) if v != 0]
    return [{"name": a["SegmentLabel"], "idx": a["labelID"], "segmentAttribute": a}
            for a in segment_attributes(values, info)]


def code_saved_labels(datastore):
    """Make a DICOMweb datastore write coded segments: wraps its `save_label` (both servers call it)."""
    save_label = datastore.save_label

    def save_coded(image_id, label_filename, label_tag, label_info, label_id=""):
        info = dict(label_info or {})
        try:
            info["label_info"] = coded_label_info(label_filename, info)
        except RuntimeError as error:  # not an image SimpleITK reads (e.g. MONAI Label's `.bin`): its own coding
            logger.warning("label %s: segments not coded (%s)", label_filename, error)
        return save_label(image_id, label_filename, label_tag, info, label_id)

    datastore.save_label = save_coded
    return datastore
