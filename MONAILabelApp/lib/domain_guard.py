"""The domain guard in the app: which modality an image was read as (and how), per-slice verdicts from the features
the runner computes anyway, a whole volume's verdict, and the answer given instead of a diagnosis.

The score itself is `raddiagseg.domain` (statistics in the model folder). An image out of domain is not decoded
unless the request says `force: true`; then it is answered and still flagged.
"""

from raddiagseg import domain, imaging

VOLUME_SHARE = 0.5  # a volume is in domain when at least this share of its checked slices is


def modality_of(image, array, requested=None):
    """{"value": "ct" | "xray" | "mri" | another DICOM Modality in lower case ("us", "nm", "ot", ...),
    "source": "param" | "dicom" | "intensities"}."""
    if requested:
        return {"value": requested, "source": "param"}
    source = "dicom" if imaging.dicom_modality(image) else "intensities"
    return {"value": imaging.infer_modality(image, array), "source": source}


class Guards:
    """One DomainGuard per served model version (the statistics are read once per model)."""

    def __init__(self):
        self._guards = {}

    def get(self, version, folder):
        if version not in self._guards:
            self._guards = {version: domain.DomainGuard.for_model_dir(folder)}
        return self._guards[version]


class Screen:
    """The runner's `screen` for one request: keeps each checked slice's verdict (by the caller's slice index) and
    lets through what is in domain, not yet judged (no statistics) or forced."""

    def __init__(self, guard, modality, force):
        self.guard, self.modality, self.force = guard, modality, force
        self.verdicts = {}  # slice index -> verdict

    def for_slices(self, indices):
        """A screen callable for a runner call on slices `indices` (in that order)."""
        def screen(offset, images, features):
            verdicts = self.guard.check(features, images, self.modality["value"], self.modality["source"])
            for k, verdict in enumerate(verdicts):
                self.verdicts[indices[offset + k]] = verdict
            return [self.force or v["in_domain"] is not False for v in verdicts]
        screen.needs_features = self.force or self.guard.scores_modality(self.modality["value"])
        return screen

    def volume_verdict(self):
        """The volume's verdict: score = share of checked slices in domain, threshold VOLUME_SHARE."""
        verdicts = list(self.verdicts.values())
        judged = [v for v in verdicts if v["in_domain"] is not None]
        if not judged:
            return dict(verdicts[0]) if verdicts else {"in_domain": None, "score": None, "threshold": None,
                                                       "reason": "no slice was checked"}
        inside = sum(v["in_domain"] for v in judged)
        share = inside / len(judged)
        verdict = {"in_domain": share >= VOLUME_SHARE, "score": round(share, 4), "threshold": VOLUME_SHARE,
                   "slices_in_domain": inside, "slices_checked": len(judged)}
        out = [v for v in judged if not v["in_domain"]]
        reason = f"{inside} of {len(judged)} checked slices are in the model's domain"
        verdict["reason"] = reason + (f"; e.g. {out[0]['reason']}" if out else "")
        return verdict


def refusal(verdict, identity):
    """The answer given instead of a diagnosis for an image out of domain."""
    return (f"Not answered: this image is outside what the model {identity['name']} was trained on: "
            f"{identity['trained_on']}. Why: {verdict['reason']}. Send force=true to get its answer anyway.")
