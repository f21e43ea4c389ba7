"""`raddiagseg phantoms`, `build` and `stats`: make synthetic sources, build RadDiagSeg-D, describe it."""

import json
import time
from pathlib import Path


def register(sub):
    p = sub.add_parser("phantoms", help="write synthetic CT (MSD layout), chest X-rays (COVID-QU-Ex layout) and VQA sets")
    p.add_argument("--out", required=True, help="folder to write the source layouts into")
    p.add_argument("--ct-volumes", type=int, default=8, help="CT volumes, split between the liver and pancreas tasks")
    p.add_argument("--xrays", type=int, default=60, help="chest X-rays, split between COVID-19 / Non-COVID / Normal")
    p.add_argument("--vqa-images", type=int, default=None, help="images in each VQA set (default: a third of the others, ≥ 10)")
    p.add_argument("--refseg-images", type=int, default=None, help="CT slices in the BiomedParse-style Ref-Seg folder (default: max(6, CT volumes))")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="processes drawing phantoms (default: all CPUs; the files do not depend on it)")
    p.add_argument("--ct-size", type=int, default=None, help="in-plane CT size in pixels (default random 192-320)")
    p.add_argument("--ct-slices", type=int, default=None, help="slices per CT volume (default random 24-64)")
    p.add_argument("--xray-size", type=int, default=256, help="X-ray size in pixels (COVID-QU-Ex: 256)")
    p.add_argument("--variation", choices=("none", "scanner", "mixed"), default="none",
                   help="none: generator version 1 (the shipped model's data); scanner: version 2, studies varying like "
                        "real ones (contrast phase, kernel, slice thickness, position, mirrored anatomy, FOV, exposure); "
                        "mixed: each study scanner or version 1 by chance (the demo model's training data)")
    p.set_defaults(func=run_phantoms)

    p = sub.add_parser("build", help="build RadDiagSeg-D (manifest.jsonl + 2D images and masks) from public layouts")
    p.add_argument("--msd", nargs="+", default=[], metavar="DIR", help="MSD task folders (e.g. Task03_Liver Task07_Pancreas)")
    p.add_argument("--covidqu", metavar="DIR", help="COVID-QU-Ex folder (holding 'Infection Segmentation Data')")
    p.add_argument("--vqarad", metavar="FILE", help="'VQA_RAD Dataset Public.json' (images in the sibling 'VQA_RAD Image Folder')")
    p.add_argument("--slake", metavar="DIR", help="SLAKE folder with train.json, validate.json, test.json and imgs/")
    p.add_argument("--refseg", metavar="DIR", help="BiomedParse-style Ref-Seg folder (train/, train_mask/, test/, test_mask/)")
    p.add_argument("--out", required=True, help="output folder (manifest.jsonl, images/, masks/)")
    p.add_argument("--seed", type=int, default=0, help="seed of the volume → split assignment")
    p.add_argument("--min-organ-pixels", type=int, default=None, help="CT slices need this much organ (default 100)")
    p.add_argument("--min-tumour-pixels", type=int, default=None, help="tumour pixels a CT positive needs (default: max(20, 0.15%% of the slice))")
    p.add_argument("--reasonseg", action="store_true",
                   help="also write reasonseg rows: implicit instructions (vocabulary 'implicit') for every segmented target")
    p.set_defaults(func=run_build)

    p = sub.add_parser("stats", help="counts per task, modality, diagnosis and split of a built dataset (+ PNG chart)")
    p.add_argument("dir", help="built dataset folder (with manifest.jsonl)")
    p.add_argument("--png", help="chart path (default DIR/stats.png)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run_stats)


def run_phantoms(args):
    from raddiagseg.cli import CommandError
    from raddiagseg.data.layouts import write_phantoms

    if args.ct_volumes < 0 or args.xrays < 0 or (args.ct_volumes == 0 and args.xrays == 0):
        raise CommandError("--ct-volumes and --xrays must be ≥ 0 and not both 0")
    for name in ("vqa_images", "refseg_images"):
        if (getattr(args, name) or 0) < 0:
            raise CommandError(f"--{name.replace('_', '-')} must be ≥ 0")
    if args.workers is not None and args.workers < 1:
        raise CommandError("--workers must be ≥ 1")
    if args.ct_size is not None and not 64 <= args.ct_size <= 1024:
        raise CommandError("--ct-size must be between 64 and 1024")
    if args.ct_slices is not None and not 4 <= args.ct_slices <= 512:
        raise CommandError("--ct-slices must be between 4 and 512")
    start = time.perf_counter()
    paths = write_phantoms(args.out, args.ct_volumes, args.xrays, seed=args.seed, ct_size=args.ct_size,
                           ct_slices=args.ct_slices, xray_size=args.xray_size, vqa_images=args.vqa_images,
                           refseg_images=args.refseg_images, workers=args.workers, variation=args.variation)
    print(f"wrote phantoms to {args.out} in {time.perf_counter() - start:.1f} s; build them with:")
    cmd = ["raddiagseg build", "--out OUT"]
    if paths["msd"]:
        cmd.append("--msd " + " ".join(f"'{p}'" for p in paths["msd"]))
    for key in ("covidqu", "vqarad", "slake", "refseg"):
        if paths[key]:
            cmd.append(f"--{key} '{paths[key]}'")
    print("  " + " ".join(cmd))
    return 0


def run_build(args):
    from raddiagseg.cli import CommandError
    from raddiagseg.data.builder import build_dataset
    from raddiagseg.data.msd import MIN_ORGAN_PIXELS
    from raddiagseg.data.stats import dataset_stats, format_table

    if not (args.msd or args.covidqu or args.vqarad or args.slake or args.refseg):
        raise CommandError("give at least one source: --msd, --covidqu, --vqarad, --slake or --refseg")
    for path in [*args.msd, args.covidqu, args.slake, args.refseg]:
        if path and not Path(path).is_dir():
            raise CommandError(f"{path} is not a folder")
    if args.vqarad and not Path(args.vqarad).exists():
        raise CommandError(f"{args.vqarad} does not exist")
    start = time.perf_counter()
    rows, report = build_dataset(
        args.out, msd=args.msd, covidqu=args.covidqu, vqarad=args.vqarad, slake=args.slake, refseg=args.refseg,
        seed=args.seed,
        min_organ_pixels=MIN_ORGAN_PIXELS if args.min_organ_pixels is None else args.min_organ_pixels,
        min_tumour_pixels=args.min_tumour_pixels, reasonseg=args.reasonseg)
    print(format_table(dataset_stats(rows)))
    print(report.summary())
    if not rows:
        raise CommandError(f"nothing usable was built from the given sources (see {Path(args.out) / 'build_report.json'})")
    print(f"wrote {len(rows)} samples to {Path(args.out) / 'manifest.jsonl'} in {time.perf_counter() - start:.1f} s")
    return 0


def run_stats(args):
    from raddiagseg.cli import CommandError
    from raddiagseg.data.stats import format_table, plot_stats, stats_for

    if not (Path(args.dir) / "manifest.jsonl").is_file() and not Path(args.dir).is_file():
        raise CommandError(f"no manifest.jsonl in {args.dir} (build one with `raddiagseg build`)")
    rows, stats = stats_for(args.dir)
    base = Path(args.dir) if Path(args.dir).is_dir() else Path(args.dir).parent
    png = plot_stats(rows, args.png or base / "stats.png")
    print(json.dumps(stats, indent=1) if args.json else format_table(stats))
    print(f"chart: {png}")
    return 0
