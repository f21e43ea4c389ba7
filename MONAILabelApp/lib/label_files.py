"""Writing an infer result as a label map (values 1..N) or a Slicer `.seg.nrrd` segmentation.

A label map can hold one value per voxel, so where an abnormality lies inside its organ the
abnormality wins (painted last). The `.seg.nrrd` keeps both: slicerio puts overlapping
segments into separate layers, with names, colours and terminology tags Slicer reads.
"""

import numpy as np
import slicerio

from lib import image_io, segments as segment_specs


def label_map(shape, segment_list, masks):
    """Collapse per-segment boolean masks (file index order) into one uint8 label map."""
    labels = np.zeros(shape, dtype=np.uint8)
    for segment in segment_specs.paint_order(segment_list):
        mask = masks.get(segment["name"])
        if mask is not None:
            labels[mask] = segment["label_value"]
    return labels


def write_segmentation(path, reference, segment_list, masks):
    """Write a Slicer segmentation; every listed segment is present, also those without voxels."""
    array_shape = tuple(reversed(reference.GetSize()))  # SimpleITK array order
    spatial = tuple(reference.GetSize()) + (() if reference.GetDimension() == 3 else (1,))
    segmentation = slicerio.create_segmentation(spatial, image_io.ijk_to_lps(reference))
    segmentation["containedRepresentationNames"] = ["Binary labelmap"]
    for segment in segment_list:
        mask = masks.get(segment["name"])
        mask = np.zeros(array_shape, dtype=bool) if mask is None else mask
        ijk = np.transpose(mask).reshape(spatial)  # (K, J, I) or (H, W) → (I, J, K)
        fields = {
            "id": f"segment_{segment['label_value']}",
            "name": segment["name"],
            "color": [c / 255.0 for c in segment["color"]],
            "status": "inprogress",
        }
        if segment["terminology"]:
            fields["terminology"] = {
                "contextName": segment_specs.TERMINOLOGY_CONTEXT,
                "category": segment["terminology"]["category"],
                "type": segment["terminology"]["type"],
            }
        slicerio.add_segment(segmentation, ijk, fields)
    slicerio.write_segmentation(str(path), segmentation)
    return path


def write(path, reference, segment_list, masks):
    """Write the result file; the format follows the extension of `path`."""
    if str(path).endswith(".seg.nrrd"):
        return write_segmentation(path, reference, segment_list, masks)
    shape = tuple(reversed(reference.GetSize()))
    return image_io.write_label_map(path, label_map(shape, segment_list, masks), reference)
