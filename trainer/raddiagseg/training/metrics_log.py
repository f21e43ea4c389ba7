"""Run metrics: one CSV row per step (append-only, so a resumed run continues it), TensorBoard scalars, and a loss-curve PNG."""

import csv
import logging
import math
from pathlib import Path

from raddiagseg.fileio import atomic_write

log = logging.getLogger(__name__)

FIELDS = ("step", "lr", "loss", "loss_text", "loss_bce", "loss_dice", "n_masks", "grad_norm",
          "samples_per_s", "val_metric", "wall_s")
LOSS_PARTS = ("loss", "loss_text", "loss_bce", "loss_dice")


class MetricsLog:
    """Writes metrics.csv, TensorBoard events (tb/) and loss_curves.png into the run folder (rank 0 only)."""

    def __init__(self, run_dir, resume_step=0, tensorboard=True):
        self.run_dir = Path(run_dir)
        self.csv_path = self.run_dir / "metrics.csv"
        self.png_path = self.run_dir / "loss_curves.png"
        self.rows = self._read_rows(resume_step)
        self._rewrite_csv()
        self._csv_file = open(self.csv_path, "a", newline="")
        self._csv = csv.DictWriter(self._csv_file, fieldnames=FIELDS, extrasaction="ignore")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=resume_step + 1 if resume_step else None)
            except ImportError:
                log.warning("tensorboard is not installed: metrics go to metrics.csv only")

    def _read_rows(self, resume_step):
        """Rows of a previous attempt up to the step being resumed (later ones are redone)."""
        if not self.csv_path.is_file() or not resume_step:
            return []
        with open(self.csv_path, newline="") as f:
            return [row for row in csv.DictReader(f) if row.get("step") and int(row["step"]) <= resume_step]

    def _rewrite_csv(self):
        with open(self.csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.rows)

    def log(self, row):
        row = {k: row.get(k) for k in FIELDS}
        self.rows.append(row)
        self._csv.writerow(row)
        self._csv_file.flush()
        if self.tb is not None:
            step = int(row["step"])
            for key in FIELDS[1:]:
                value = row.get(key)
                if value is not None and key not in ("wall_s",):
                    group = "val" if key == "val_metric" else "train"
                    self.tb.add_scalar(f"{group}/{key}", float(value), step)

    def plot(self):
        """Loss parts (and the validation metric) against step, as loss_curves.png."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        def series(key):
            pts = [(int(r["step"]), float(r[key])) for r in self.rows if r.get(key) not in (None, "")]
            return [p for p in pts if math.isfinite(p[1])]

        fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
        for key in LOSS_PARTS:
            pts = series(key)
            if pts:
                ax_loss.plot(*zip(*pts), label=key, linewidth=1)
        ax_loss.set_xlabel("step")
        ax_loss.set_ylabel("loss")
        ax_loss.set_yscale("log")
        ax_loss.legend()
        ax_loss.set_title("training loss")
        pts = series("val_metric")
        if pts:
            ax_val.plot(*zip(*pts), marker="o")
        ax_val.set_xlabel("step")
        ax_val.set_title("validation metric")
        fig.tight_layout()
        try:
            atomic_write(self.png_path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
        finally:
            plt.close(fig)

    def close(self):
        self._csv_file.close()
        if self.tb is not None:
            self.tb.close()
