"""Synthetic abdominal CT volumes and chest X-rays with their masks, drawn from simple anatomy.

Why: the public datasets cannot be downloaded here, and tests, the demo model and the
benchmarks need images whose classes are visually separable yet look like the real thing.
`layouts.py` writes them in the public datasets' layouts so the converters run end to end.

CT volumes are generated in *display* layout `(z, row, col)`: z towards the head, rows from
anterior to posterior, columns from the patient's right to left (radiological convention).
Label values follow the MSD: 0 background, 1 organ, 2 tumour. X-rays are 8-bit images with a
lung mask and an infection mask, like COVID-QU-Ex.

Generator versions (`VARIATIONS`): version 1 (variation "none", the default) draws every study
with one reference acquisition; version 2 (variation "scanner") draws a `CTScan` / `XrayExposure`
per study first, so that phantoms vary the way real studies do (contrast phase, reconstruction
kernel, slice thickness with partial volume, patient position, mirrored anatomy, field of view,
exposure, polarity, collimation, smaller tumours). Version 1's files are unchanged by version 2.
Variation "mixed" draws each study as "scanner" or as version 1 (`MIXED_SCANNER_SHARE`).
"""

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

CT_TASKS = ("liver", "pancreas")
OWNER_CODES = {"kidney": 1, "spleen": 2, "pancreas": 3, "liver": 4}
XRAY_CLASSES = ("COVID-19", "Non-COVID", "Normal")
VARIATIONS = {"none": 1, "scanner": 2, "mixed": 2}  # `raddiagseg phantoms --variation` → generator version
# variation "mixed": each study is drawn as variation "scanner" with this chance, else with version 1's reference
# acquisition, so a model trained on it sees both the clean studies and the shifted ones (the demo model).
MIXED_SCANNER_SHARE = 0.5

# Generator version 2: organ, vessel and tumour-organ difference (HU ranges) per contrast phase. "portal venous" is
# version 1's single phase.
CT_PHASES = {
    "non-contrast": dict(liver=(50, 62), pancreas=(35, 45), spleen=(42, 50), vessel=(35, 50), tumour=(20, 40)),
    "arterial": dict(liver=(60, 75), pancreas=(75, 105), spleen=(70, 95), vessel=(250, 330), tumour=(35, 70)),
    "portal venous": dict(liver=(55, 70), pancreas=(35, 48), spleen=(45, 55), vessel=(130, 180), tumour=(45, 75)),
    "delayed": dict(liver=(60, 80), pancreas=(50, 65), spleen=(55, 70), vessel=(90, 130), tumour=(20, 45)),
}
CT_PHASE_SHARE = (0.2, 0.2, 0.45, 0.15)
# Reconstruction kernels: in-plane blur (px), edge enhancement, noise grain (px), noise σ range (HU).
CT_KERNELS = {"soft": (1.0, 0.0, 1.0, (6, 12)), "standard": (0.6, 0.0, 0.5, (10, 18)), "sharp": (0.4, 0.8, 0.3, (18, 32))}
# Patient positions: in-plane angle (radians) and share: supine, prone (180°), left / right decubitus.
CT_POSITIONS = ((0.0, 0.8), (np.pi, 0.1), (np.pi / 2, 0.05), (-np.pi / 2, 0.05))
TILT = np.deg2rad(25)  # in-plane rotation beyond the position, either way (CT and X-ray)
SLAB_MARGIN = 4  # half-step sub-slices drawn beyond each end of a version-2 CT slab (covers a slab of 3 steps)


@dataclass(frozen=True)
class CTScan:
    """How one version-2 CT study was acquired and who lay on the table."""

    phase: str  # a CT_PHASES key
    kernel: str  # a CT_KERNELS key
    thickness: float  # slice thickness = spacing, mm (0.6-5)
    slab: float  # slice steps each slice integrates (partial volume): 1 at 0.6 mm ... 3 at 5 mm
    contrast: float  # soft-tissue contrast factor around 40 HU (windowing, kV, phase timing)
    noise: float  # HU
    rotation: float  # in-plane, radians: patient position + tilt
    mirrored: bool  # left-right mirrored anatomy (situs inversus, or a study written with a flipped axis)
    zoom: float  # body size relative to the field of view (> 1: a large patient, body cut by the FOV)
    tumour_radius: float  # smallest tumour radius, fraction of the half FOV (version 1: 0.08)


@dataclass(frozen=True)
class XrayExposure:
    """How one version-2 chest radiograph was taken and displayed."""

    rotation: float  # radians
    zoom: float  # chest size relative to the detector (field of view, body size)
    mirrored: bool  # dextrocardia / film read from the wrong side
    gamma: float  # display gamma
    gain: float  # exposure: scale and offset of the displayed intensity
    offset: float
    blur: float  # detector unsharpness (px)
    noise: float  # quantum noise, fraction of full scale
    inverted: bool  # polarity: bones dark (MONOCHROME1 shown without its LUT)
    shutters: tuple  # collimator blades (top, bottom, left, right), fraction of the side covered (0 = none)


def draw_ct_scan(rng, flips=True):
    """A random CTScan; `flips=False`: never mirrored nor turned over, supine (for images whose text names a side)."""
    phase = list(CT_PHASES)[rng.choice(len(CT_PHASES), p=CT_PHASE_SHARE)]
    kernel = list(CT_KERNELS)[int(rng.integers(len(CT_KERNELS)))]
    thickness = float(rng.uniform(0.6, 5.0))
    angles, shares = zip(*CT_POSITIONS)
    return CTScan(phase=phase, kernel=kernel, thickness=round(thickness, 2), slab=1 + 2 * (thickness - 0.6) / 4.4,
                  contrast=float(np.exp(rng.uniform(np.log(0.55), np.log(1.3)))),
                  noise=float(rng.uniform(*CT_KERNELS[kernel][3])),
                  rotation=float((angles[rng.choice(len(angles), p=shares)] if flips else 0.0) + rng.uniform(-TILT, TILT)),
                  mirrored=bool(flips and rng.random() < 0.15), zoom=float(rng.uniform(0.72, 1.15)),
                  tumour_radius=float(rng.uniform(0.045, 0.08)))


def draw_xray_exposure(rng, flips=True):
    """A random XrayExposure; `flips=False` never mirrors (for images whose text names a side)."""
    collimated = rng.random() < 0.4
    return XrayExposure(rotation=float(rng.uniform(-TILT, TILT)), zoom=float(rng.uniform(0.75, 1.2)),
                        mirrored=bool(flips and rng.random() < 0.1),
                        gamma=float(np.exp(rng.uniform(np.log(0.45), np.log(2.4)))),
                        gain=float(rng.uniform(0.6, 1.0)), offset=float(rng.uniform(0.0, 0.15)),
                        blur=float(rng.uniform(0.3, 1.8)), noise=float(rng.uniform(0.005, 0.09)),
                        inverted=bool(rng.random() < 0.15),
                        shutters=tuple(float(rng.uniform(0.02, 0.1)) if collimated and rng.random() < 0.5 else 0.0
                                       for _ in range(4)))


@dataclass
class CTPhantom:
    task: str  # "liver" | "pancreas"
    hu: np.ndarray  # (z, row, col) int16 Hounsfield units
    label: np.ndarray  # (z, row, col) uint8: 0 background, 1 organ, 2 tumour
    spacing: tuple  # (slice thickness, row spacing, col spacing) in mm
    n_tumours: int = 0
    others: dict = field(default_factory=dict)  # name → (z, row, col) uint8 mask of the other drawn organs


@dataclass
class XrayPhantom:
    kind: str  # one of XRAY_CLASSES
    image: np.ndarray  # (H, W) uint8
    lung: np.ndarray  # (H, W) uint8 0/1
    infection: np.ndarray  # (H, W) uint8 0/1 (empty unless COVID-19, as in COVID-QU-Ex)
    opacity: np.ndarray = None  # (H, W) uint8 0/1: where an opacity was drawn (Non-COVID consolidation too)


def _blob(X, Y, cx, cy, a, b, angle=0.0, harmonics=()):
    """Normalised radius of an ellipse with a wobbly outline: < 1 inside."""
    c, s = np.cos(angle), np.sin(angle)
    u = (X - cx) * c + (Y - cy) * s
    v = -(X - cx) * s + (Y - cy) * c
    rho = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    if harmonics:
        phi = np.arctan2(v / b, u / a)
        wobble = 1.0 + sum(h * np.cos(k * phi + p) for k, h, p in harmonics)
        rho = rho / wobble
    return rho


def _harmonics(rng, strength=0.08, orders=(2, 3, 4)):
    return tuple((k, rng.uniform(0, strength) / (1 + 0.5 * i), rng.uniform(0, 2 * np.pi)) for i, k in enumerate(orders))


def _smooth_noise(rng, shape, sigma):
    field_ = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return field_ / (field_.std() + 1e-6)


def _organ_profile(t, start, end, power=0.6):
    """Cross-section scale of an organ along the body axis: 0 outside [start, end], 1 in the middle."""
    x = (t - start) / (end - start)
    return np.where((x > 0) & (x < 1), np.sin(np.pi * np.clip(x, 0, 1)) ** power, 0.0)


def generate_ct(rng, task, size=None, slices=None, tumours=None, scan=None):
    """One abdominal CT phantom for MSD task `task` ('liver' or 'pancreas').

    size: in-plane pixels (default random 192-320); slices: number of slices (default 24-64);
    tumours: number of tumours (default: none for ~15 % of volumes, else 1-3); scan: a `CTScan`
    (generator version 2) or None (version 1, the reference acquisition).
    """
    if task not in CT_TASKS:
        raise ValueError(f"unknown CT phantom task {task!r}; expected one of {CT_TASKS}")
    n = int(size or rng.integers(192, 321))
    nz = int(slices or rng.integers(24, 65))
    px = float(rng.uniform(0.6, 1.0))
    sz = float(np.round(rng.uniform(2.0, 5.0) * 2) / 2)
    if tumours is None:
        tumours = 0 if rng.random() < 0.15 else int(rng.integers(1, 4))

    # Body-axis coverage t in [0, 1] (0 = iliac crest, 1 = liver dome); the slab covers part of it.
    if task == "liver":
        t0, t1 = rng.uniform(0.30, 0.45), rng.uniform(0.93, 1.0)
    else:
        t0, t1 = rng.uniform(0.28, 0.38), rng.uniform(0.70, 0.78)
    ts = np.linspace(t0, t1, nz)
    if scan is not None:  # half-step sub-slices, averaged over each slice's slab below (partial volume)
        step = (t1 - t0) / max(nz - 1, 1)
        ts = t0 + (np.arange(2 * nz - 1 + 2 * SLAB_MARGIN) - SLAB_MARGIN) * step / 2

    coords = (np.arange(n, dtype=np.float32) - n / 2 + 0.5) / (n / 2)
    Y0, X0 = np.meshgrid(coords, coords, indexing="ij")  # Y: anterior(-) to posterior(+), X: right(-) to left(+)
    rot = rng.uniform(-0.08, 0.08)
    shift = rng.uniform(-0.05, 0.05, size=2)
    zoom = rng.uniform(0.9, 1.05)
    if scan is not None:
        rot, zoom, shift = scan.rotation, scan.zoom, rng.uniform(-0.1, 0.1, size=2)
    X = ((X0 - shift[0]) * np.cos(rot) + (Y0 - shift[1]) * np.sin(rot)) / zoom
    Y = (-(X0 - shift[0]) * np.sin(rot) + (Y0 - shift[1]) * np.cos(rot)) / zoom
    if scan is not None and scan.mirrored:
        X = -X

    body_a, body_b = rng.uniform(0.80, 0.90), rng.uniform(0.58, 0.68)
    body_h = _harmonics(rng, 0.03)
    liver_c = np.array([rng.uniform(-0.34, -0.24), rng.uniform(-0.08, 0.02)])
    liver_ab = np.array([rng.uniform(0.36, 0.44), rng.uniform(0.36, 0.44)])
    liver_h = _harmonics(rng, 0.12)
    liver_lobe = rng.uniform(0.10, 0.22)  # left lobe reaching across the midline
    spleen_c = np.array([rng.uniform(0.38, 0.48), rng.uniform(0.05, 0.18)])
    kidney_dx, kidney_y = rng.uniform(0.26, 0.33), rng.uniform(0.30, 0.40)
    stomach_c = np.array([rng.uniform(0.12, 0.28), rng.uniform(-0.32, -0.2)])
    hu_liver = rng.uniform(55, 70)
    hu_pancreas = rng.uniform(35, 48)
    hu_spleen = rng.uniform(45, 55)
    hu_fat = rng.uniform(-110, -85)
    hu_vessel = rng.uniform(130, 180)
    if scan is not None:
        phase = CT_PHASES[scan.phase]
        hu_liver, hu_pancreas, hu_spleen, hu_vessel = (rng.uniform(*phase[k]) for k in ("liver", "pancreas", "spleen", "vessel"))

    # Pancreas: a curved band from the head (near the duodenum, right) to the tail (at the spleen, left).
    p0 = np.array([rng.uniform(-0.16, -0.10), rng.uniform(0.06, 0.12)])
    p1 = np.array([rng.uniform(0.05, 0.15), rng.uniform(-0.10, -0.02)])
    p2 = np.array([rng.uniform(0.32, 0.40), rng.uniform(0.02, 0.10)])
    s = np.linspace(0, 1, 48)[:, None]
    centre = (1 - s) ** 2 * p0 + 2 * (1 - s) * s * p1 + s**2 * p2
    d2 = (X[None] - centre[:, 0, None, None]) ** 2 + (Y[None] - centre[:, 1, None, None]) ** 2
    nearest = d2.argmin(0)
    pan_dist = np.sqrt(d2.min(0))
    pan_s = s[nearest, 0]
    pan_thick = 0.095 - 0.04 * pan_s  # head thicker than the tail
    pan_zc = 0.48 + 0.10 * pan_s  # the tail lies higher than the head
    del d2

    vessels = [(rng.uniform(-0.45, -0.1), rng.uniform(-0.3, 0.2), rng.uniform(0.012, 0.025)) for _ in range(6)]

    nt = len(ts)  # slices drawn (version 2: sub-slices)
    texture = _smooth_noise(rng, (nt, max(n // 4, 8), max(n // 4, 8)), (0.7 if scan is None else 1.4, 1.5, 1.5))
    texture = ndimage.zoom(texture, (1, n / texture.shape[1], n / texture.shape[2]), order=1)[:, :n, :n]

    hu = np.empty((nt, n, n), np.float32)
    owner = np.zeros((nt, n, n), np.uint8)  # which labelled organ a voxel shows, see OWNER_CODES
    cavity = np.zeros((nt, n, n), bool)
    for z, t in enumerate(ts):
        body = _blob(X, Y, 0, 0, body_a, body_b, 0, body_h)
        sl = np.full((n, n), -1000.0, np.float32)
        sl[body < 1] = hu_fat
        sl[(body < 0.93) & (body >= 0.86)] = 45.0  # abdominal wall muscle
        cav = body < 0.86
        cavity[z] = cav
        bowel = cav & (texture[z] > 0.3)
        sl[bowel] = 25.0
        sl[cav & (texture[z] > 2.2)] = -850.0  # gas in bowel loops
        for sx in (-1, 1):  # paraspinal muscles
            sl[_blob(X, Y, sx * 0.17, 0.56, 0.12, 0.10, sx * 0.3) < 1] = 50.0
        vert = _blob(X, Y, 0, 0.38, 0.105, 0.095)
        sl[vert < 1] = 700.0
        sl[vert < 0.82] = 230.0
        arch = _blob(X, Y, 0, 0.53, 0.075, 0.065)
        sl[arch < 1] = 600.0
        sl[arch < 0.6] = 15.0  # spinal canal
        sl[_blob(X, Y, 0, 0.66, 0.025, 0.075) < 1] = 600.0
        for side in (-1, 1):
            scale = _organ_profile(t, 0.05 + 0.07 * (side < 0), 0.55 + 0.07 * (side < 0))
            if scale > 0.05:
                k = _blob(X, Y, side * kidney_dx, kidney_y, 0.085 * scale, 0.12 * scale, side * 0.5)
                sl[k < 1] = 155.0
                sl[k < 0.55] = 95.0
                owner[z][k < 1] = OWNER_CODES["kidney"]
        sl[_blob(X, Y, 0.05, 0.22, 0.04, 0.04) < 1] = hu_vessel  # aorta
        sl[_blob(X, Y, -0.11, 0.2, 0.05, 0.035) < 1] = hu_vessel - 25  # IVC
        scale = _organ_profile(t, 0.52, 0.92)
        if scale > 0.05:
            spleen = cav & (_blob(X, Y, spleen_c[0], spleen_c[1], 0.09 * scale + 0.02, 0.15 * scale + 0.02, -0.5) < 1)
            sl[spleen] = hu_spleen
            owner[z][spleen] = OWNER_CODES["spleen"]
        scale = _organ_profile(t, 0.6, 1.02)
        if scale > 0.05:
            st = _blob(X, Y, stomach_c[0], stomach_c[1], 0.15 * scale, 0.11 * scale, 0.3)
            sl[cav & (st < 1)] = 40.0
            owner[z][cav & (st < 1)] = 0
            sl[cav & (st < 0.85)] = 10.0
            sl[cav & (st < 0.85) & (Y < stomach_c[1] - 0.04 * scale)] = -900.0
        pan_scale = np.clip(1 - ((t - pan_zc) / 0.11) ** 2, 0, None)
        pancreas = cav & (pan_dist < pan_thick * np.sqrt(pan_scale))
        sl[pancreas] = hu_pancreas
        owner[z][pancreas] = OWNER_CODES["pancreas"]
        scale = _organ_profile(t, 0.42, 1.0, 0.5)
        liver = np.zeros((n, n), bool)
        if scale > 0.05:
            rho = _blob(X, Y, liver_c[0], liver_c[1], liver_ab[0] * (0.3 + 0.7 * scale), liver_ab[1] * (0.3 + 0.7 * scale), 0.2, liver_h)
            lobe = _blob(X, Y, liver_c[0] + 0.3, liver_c[1] - 0.12, 0.2 + liver_lobe * scale, 0.1 * scale + 0.02, -0.25)
            liver = cav & ((rho < 1) | (lobe < 1)) & (_blob(X, Y, 0, 0.38, 0.13, 0.12) > 1)
            sl[liver] = hu_liver
            owner[z][liver] = OWNER_CODES["liver"]
            for vx, vy, vr in vessels:
                sl[liver & (_blob(X, Y, vx, vy, vr, vr) < 1)] = hu_liver + 60
        hu[z] = sl

    label = (owner == OWNER_CODES[task]).astype(np.uint8)
    if scan is None:
        placed = _add_tumours(rng, task, tumours, hu, label, cavity, n, px, sz)
    else:
        placed = _add_tumours(rng, task, tumours, hu, label, cavity, n, px, sz / 2, smallest=scan.tumour_radius,
                              contrast=CT_PHASES[scan.phase]["tumour"])
    # Masks of the other organs as they appear in the image (painted last wins; tumours excluded).
    others = {name: ((owner == code) & (label == 0)).astype(np.uint8) for name, code in OWNER_CODES.items() if name != task}
    blur, grain = 0.6, 0.5
    if scan is not None:
        hu, label, others = _acquire(hu, label, others, nz, scan)
        blur, sharpen, grain, _ = CT_KERNELS[scan.kernel]
        sz = scan.thickness
    hu = ndimage.gaussian_filter(hu, (0, blur, blur))
    if scan is not None and sharpen:
        hu += sharpen * (hu - ndimage.gaussian_filter(hu, (0, 1.5, 1.5)))
    noise = ndimage.gaussian_filter(rng.standard_normal(hu.shape).astype(np.float32), (0, grain, grain))
    hu += noise / noise.std() * (rng.uniform(10, 16) if scan is None else scan.noise)
    hu = np.clip(np.round(hu), -1024, 3071).astype(np.int16)
    return CTPhantom(task, hu, label, (sz, px, px), placed, others)


def _acquire(hu, label, others, nz, scan):
    """Version 2: `nz` slices from the half-step sub-slices, each the mean over its slab (partial volume; the labels
    are the slice centre's), then the soft-tissue contrast factor around 40 HU."""
    offsets = (np.arange(2 * SLAB_MARGIN + 1) - SLAB_MARGIN) / 2  # sub-slice centres, in slice steps
    half = scan.slab / 2
    weights = np.clip(np.minimum(offsets + 0.25, half) - np.maximum(offsets - 0.25, -half), 0, None)
    centres = slice(SLAB_MARGIN, SLAB_MARGIN + 2 * nz - 1, 2)
    hu = ndimage.correlate1d(hu, weights / weights.sum(), axis=0, mode="nearest")[centres]
    hu = 40.0 + scan.contrast * (hu - 40.0)
    return hu, label[centres].copy(), {name: m[centres].copy() for name, m in others.items()}


def _add_tumours(rng, task, count, hu, label, cavity, n, px, sz, smallest=0.08, contrast=(45, 75)):
    """Hypodense ellipsoids centred inside the organ. They may bulge the organ's outline by half
    their radius in-plane but never float outside it (no tumour on a slice without organ).
    smallest: the smallest radius (fraction of the half image); contrast: HU range below the organ.
    Edits `hu` and `label` in place; returns how many were placed."""
    organ = label > 0
    if count == 0 or not organ.any():
        return 0
    depth = np.stack([ndimage.distance_transform_edt(o) if o.any() else np.zeros(o.shape) for o in organ])
    lo, hi = (smallest, 0.2) if task == "liver" else (smallest, 0.13)
    in_plane = np.zeros((3, 3, 3), bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    base = float(np.median(hu[organ]))
    placed = 0
    for _ in range(count):
        r = rng.uniform(lo, hi) * n / 2  # in-plane radius, pixels
        candidates = np.argwhere(depth >= max(2.0, 0.5 * r))
        if len(candidates) == 0:
            continue
        cz, cy, cx = candidates[rng.integers(len(candidates))]
        rz = max(1.5, r * px / sz * rng.uniform(0.9, 1.4))
        ry, rx = r * rng.uniform(0.8, 1.2), r * rng.uniform(0.8, 1.2)
        grow = max(1, int(0.5 * r))
        # Work in the tumour's bounding box (plus the dilation margin) only.
        z0, z1 = max(0, int(cz - rz) - 1), min(hu.shape[0], int(cz + rz) + 2)
        y0, y1 = max(0, int(cy - ry) - grow - 1), min(n, int(cy + ry) + grow + 2)
        x0, x1 = max(0, int(cx - rx) - grow - 1), min(n, int(cx + rx) + grow + 2)
        box = (slice(z0, z1), slice(y0, y1), slice(x0, x1))
        zz, yy, xx = np.ogrid[z0:z1, y0:y1, x0:x1]
        rho = np.sqrt(((zz - cz) / rz) ** 2 + ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
        allowed = cavity[box] & ndimage.binary_dilation(organ[box], in_plane, iterations=grow)
        weight = np.clip((1.0 - rho) / 0.2, 0, 1) * allowed
        # Tumour tissue: the organ's HU minus `contrast` (version 1: 45-75, a hypodense, partly necrotic
        # lesion in the portal venous phase), soft edge.
        target = base - rng.uniform(*contrast)
        hu[box] = (1 - weight) * hu[box] + weight * target
        label[box][allowed & (rho < 0.85)] = 2
        placed += 1
    return placed


def generate_xray(rng, kind, size=256, exposure=None):
    """One 8-bit chest radiograph: 'COVID-19' (bilateral peripheral patchy ground glass),
    'Non-COVID' (focal lobar consolidation in one lung) or 'Normal' (clear lungs).
    exposure: an `XrayExposure` (generator version 2) or None (version 1)."""
    if kind not in XRAY_CLASSES:
        raise ValueError(f"unknown X-ray class {kind!r}; expected one of {XRAY_CLASSES}")
    n = int(size)
    coords = (np.arange(n, dtype=np.float32) - n / 2 + 0.5) / (n / 2)
    Y0, X0 = np.meshgrid(coords, coords, indexing="ij")
    rot, zoom = rng.uniform(-0.06, 0.06), rng.uniform(0.9, 1.08)
    shift = rng.uniform(-0.06, 0.06, size=2)
    if exposure is not None:
        rot, zoom = exposure.rotation, exposure.zoom
    X = ((X0 - shift[0]) * np.cos(rot) + (Y0 - shift[1]) * np.sin(rot)) / zoom
    Y = (-(X0 - shift[0]) * np.sin(rot) + (Y0 - shift[1]) * np.cos(rot)) / zoom
    if exposure is not None and exposure.mirrored:
        X = -X

    att = np.zeros((n, n), np.float32)  # attenuation: bright = dense
    torso = _blob(X, Y, 0, 0.3, rng.uniform(0.92, 1.02), 1.35, 0, _harmonics(rng, 0.02))
    att += 0.45 * np.clip((1.05 - torso) / 0.1, 0, 1)
    att += 0.12 * np.clip((Y - 0.55) / 0.3, 0, 1)  # abdomen below the diaphragm
    att += 0.25 * np.clip(1 - np.abs(X) / 0.09, 0, 1)  # spine
    lungs = np.zeros((n, n), bool)
    lung_fields = []
    for side in (-1, 1):  # side -1: image left = patient's right lung
        cx = side * rng.uniform(0.36, 0.44)
        a, b = rng.uniform(0.24, 0.30) * (1.0 if side < 0 else 0.93), rng.uniform(0.58, 0.68)
        cy = rng.uniform(-0.08, 0.02)
        rho = _blob(X, Y, cx, cy, a, b, side * 0.08, _harmonics(rng, 0.04))
        field_ = (rho < 1) & (Y < cy + b * 0.85 - 0.15 * np.abs(X - cx) / a)  # flat-ish diaphragm
        lungs |= field_
        lung_fields.append((field_, cx, cy, a, b))
    heart = _blob(X, Y, rng.uniform(0.06, 0.14), rng.uniform(0.25, 0.35), rng.uniform(0.24, 0.3), rng.uniform(0.2, 0.26), 0.3)
    heart_mask = heart < 1
    lungs &= ~heart_mask
    mediastinum = (np.abs(X - 0.02) < 0.12) & (Y < 0.2)
    lungs &= ~mediastinum
    lung_soft = ndimage.gaussian_filter(lungs.astype(np.float32), 1.5)
    att -= 0.32 * lung_soft
    att += 0.22 * np.clip((1.1 - heart) / 0.25, 0, 1)
    att += 0.15 * ndimage.gaussian_filter(mediastinum.astype(np.float32), 2)
    # ribs: arcs across each lung, faintly brighter; clavicles near the apex
    for side in (-1, 1):
        for k in range(9):
            y0 = -0.55 + k * rng.uniform(0.12, 0.15)
            curve = y0 + 0.8 * (np.abs(X) - 0.45) ** 2 - 0.1
            band = np.abs(Y - curve) < 0.02
            att += 0.06 * (band & (np.sign(X) == side) & (np.abs(X) > 0.06) & (np.abs(X) < 0.82))
        clav = np.abs(Y - (-0.66 + 0.2 * np.abs(X - side * 0.3))) < 0.03
        att += 0.12 * (clav & (np.sign(X) == side) & (np.abs(X) > 0.1) & (np.abs(X) < 0.7))
    att += 0.06 * _smooth_noise(rng, (n, n), n / 40) * lung_soft  # vascular markings

    infection = np.zeros((n, n), bool)
    opacity = np.zeros((n, n), bool)
    if kind == "COVID-19":
        for field_, cx, cy, a, b in lung_fields:  # bilateral, peripheral, lower zones, patchy
            patches = np.zeros((n, n), np.float32)
            for _ in range(int(rng.integers(3, 6))):
                px_ = cx + np.sign(cx) * a * rng.uniform(0.35, 0.8)
                py_ = cy + b * rng.uniform(-0.2, 0.7)
                r = rng.uniform(0.11, 0.2)
                patches = np.maximum(patches, np.clip(1 - _blob(X, Y, px_, py_, r, r * 1.3, 0, _harmonics(rng, 0.2)), 0, 1))
            mottle = np.clip(0.6 + 0.5 * _smooth_noise(rng, (n, n), n / 60), 0, 1)
            patch = ndimage.gaussian_filter(patches, 2.0) * mottle * field_
            att += rng.uniform(0.28, 0.36) * np.clip(patch * 2.5, 0, 1)
            infection |= (patch > 0.12) & lungs
        opacity = infection
    elif kind == "Non-COVID":
        side = int(rng.integers(2))
        field_, cx, cy, a, b = lung_fields[side]
        lower = rng.random() < 0.7
        ly = cy + (b * 0.45 if lower else -b * 0.35)
        lobe = _blob(X, Y, cx + rng.uniform(-0.05, 0.05), ly, a * rng.uniform(0.7, 0.9), b * rng.uniform(0.3, 0.42), 0, _harmonics(rng, 0.1))
        cons = lungs & field_ & (lobe < 1)
        att += rng.uniform(0.3, 0.38) * ndimage.gaussian_filter(cons.astype(np.float32), 1.2)
        opacity = cons

    if exposure is None:
        att = ndimage.gaussian_filter(att, 0.8)
        gamma = rng.uniform(0.85, 1.2)
        img = np.clip((att - att.min()) / (np.ptp(att) + 1e-6), 0, 1) ** gamma
        img = img * rng.uniform(0.8, 0.95) + rng.uniform(0.02, 0.08)
        img += rng.normal(0, rng.uniform(0.01, 0.025), img.shape)
    else:
        img, shutter = _expose(rng, att, exposure)
        lungs, infection, opacity = (m & ~shutter for m in (lungs, infection, opacity))
    image = np.clip(img * 255, 0, 255).astype(np.uint8)
    return XrayPhantom(kind, image, lungs.astype(np.uint8), infection.astype(np.uint8), opacity.astype(np.uint8))


def _expose(rng, att, exposure):
    """Version 2: attenuation → displayed image in [0, 1] under `exposure`, and where the collimator blades
    are (unexposed: white, or black once the polarity is inverted; nothing is visible there)."""
    n = att.shape[0]
    att = ndimage.gaussian_filter(att, exposure.blur)
    img = np.clip((att - att.min()) / (np.ptp(att) + 1e-6), 0, 1) ** exposure.gamma
    img = img * exposure.gain + exposure.offset + rng.normal(0, exposure.noise, img.shape)
    shutter = np.zeros(att.shape, bool)
    top, bottom, left, right = (int(round(f * n)) for f in exposure.shutters)
    shutter[:top], shutter[n - bottom:], shutter[:, :left], shutter[:, n - right:] = True, True, True, True
    img[shutter] = 1.0
    return (1.0 - img if exposure.inverted else img), shutter


def window_to_uint8(hu_slice, window=(40.0, 400.0)):
    """Render an HU slice with a window as an 8-bit image (how VQA-RAD/SLAKE ship CT images)."""
    level, width = window
    low = level - width / 2
    return np.clip((np.asarray(hu_slice, np.float32) - low) / width * 255, 0, 255).astype(np.uint8)
