#!/usr/bin/env python
"""One-slice latency through the real MONAI Label server against the compute floor, with per-stage timings.

    .venv/bin/python benchmarks/latency.py                      # demo model, 512x512 CT slices, 5 repeats
    .venv/bin/python benchmarks/latency.py --model DIR --threads 2
    .venv/bin/python benchmarks/latency.py --preset paper --no-server --force-answer   # paper preset, random, bf16

Starts `monailabel start_server` with MONAILabelApp on loopback (tests/helpers/live_server.py) on a
folder of 512x512 CT slices (phantoms) and sends requests the way the Slicer client does
(datastore id, JSON params, multipart reply with the label file):

- cold: a slice the server has not seen (image encoders, LM, mask decoder, label writing);
- warm: the same question on that slice again: cached image features, and the earlier answer given
  to the LM as a draft that it verifies in one pass (LM and mask decoder only, no decode steps when
  the draft is kept whole).

The compute floor is the same model calls timed alone in this process (same folder, dtype,
threads, question and max_new_tokens): `encode_images` + `generate` for cold, `generate` on the
cached features with the cold answer as its draft for warm. Printed: medians, the ratios
end-to-end/floor (target <= 1.25) and warm/cold (target <= 0.3), and the server's per-stage
timings plus HTTP overhead (client time minus the server's own total).

--model DIR: default MONAILabelApp/model/raddiagseg-demo when it exists, else an untrained
demo-preset model built into a temp folder (timings depend on the architecture; answers, and so
how many tokens and masks are produced, depend on the weights). --preset paper builds an
untrained paper-preset model (2.6 B parameters, built directly in bf16, nothing downloaded).
--force-answer makes the floor decode a fixed 3-step answer with two seg tokens (the LM and its
head still run every step; only the token choice is scripted), since random weights never stop
or produce seg tokens by themselves; the warm floor verifies that answer as its draft.
--no-server measures the floor only (and peak RSS). --answer-drafts recent serves with the app's
`--conf answer_drafts recent`: a cold request then gets the previous slice's answer as its draft, and
so does the floor's cold call; `off` uses no drafts anywhere (the warm floor re-decodes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from repo_paths import ROOT
from raddiagseg.model.config import PRESETS

APP = ROOT / "MONAILabelApp"
SHIPPED_MODEL = APP / "model" / "raddiagseg-demo"

QUESTION = None  # the app's default 3-step question (templates.DEFAULT_QUESTION), set in main()
FORCED_ANSWER = ("yes", "Hepatocellular carcinoma", ["liver", "liver tumour"])


def set_threads(threads):
    """Use `threads` OpenMP/torch threads in this process and in the processes it starts (None: leave as is)."""
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        import torch

        torch.set_num_threads(threads)


def median(values):
    return statistics.median(values) if values else float("nan")


def peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


def machine():
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load:.2f}"


def precision(model):
    lm = next(model.language_model.parameters()).dtype
    return f"dtype {lm}" if lm == model.dtype else f"encoders {model.dtype}, LM and mask decoder {lm}"


def write_studies(folder: Path, n: int, size: int):
    """n single-slice 512x512 CT images (HU, int16) of one liver phantom with tumours: ct0 .. ct{n-1}."""
    import SimpleITK as sitk
    from raddiagseg.data import phantoms

    folder.mkdir(parents=True, exist_ok=True)
    ct = phantoms.generate_ct(np.random.default_rng(0), "liver", size=size, slices=n + 4, tumours=2)
    ids = []
    for i in range(n):
        image = sitk.GetImageFromArray(ct.hu[i + 2].astype(np.int16))
        image.SetSpacing((float(ct.spacing[2]), float(ct.spacing[1])))
        sitk.WriteImage(image, str(folder / f"ct{i}.nii.gz"))
        ids.append(f"ct{i}")
    return ids, [ct.hu[i + 2] for i in range(n)]


def app_unit(path):
    """The [0, 1] model input the app makes from a 2D image file (its model view: read, orient, modality, window)."""
    from lib import image_io

    return image_io.model_view(image_io.read_image(str(path))).unit(0)


def model_folder(args, work: Path):
    """(folder, description) of the model to measure."""
    if args.model:
        return Path(args.model), str(args.model)
    if args.preset == "demo" and (SHIPPED_MODEL / "config.json").is_file():
        return SHIPPED_MODEL, f"shipped demo model {SHIPPED_MODEL.relative_to(ROOT)}"
    import raddiagseg

    folder = work / f"random-{args.preset}"
    t0 = time.perf_counter()
    # built and saved in a child process, so this process's peak RSS is that of loading the folder, as a server does
    subprocess.run([sys.executable, __file__, "--build-random", args.preset, str(folder)], check=True)
    print(f"built and saved the untrained {args.preset} model in {time.perf_counter() - t0:.0f} s (child process)")
    note = "" if args.preset != "demo" else " (no shipped demo model: timings depend on the architecture only; answers and so tokens/masks depend on weights)"
    print(f"model: untrained {args.preset}-preset model saved to {folder}{note}")
    return folder, f"untrained {args.preset} preset (random weights, raddiagseg {getattr(raddiagseg, '__version__', '')})"


def build_random(preset, dtype, **overrides):
    """A randomly initialised model of `preset` (config `overrides`), its parameters created directly in `dtype`."""
    import torch

    from raddiagseg import build_model

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return build_model(preset, **overrides).eval()
    finally:
        torch.set_default_dtype(previous)


def scripted_logits(model, answer_ids):
    """Wrap the LM head so greedy decoding emits `answer_ids` then eos; the real head still runs every step.
    The rows of one call are consecutive answer positions (one step, or a draft verified in one pass)."""
    import torch

    original = model.language_model.logits
    script = list(answer_ids)  # processor.answer_ids: the answer's tokens, then eos
    state = {"step": 0}

    def logits(hidden):
        real = original(hidden)
        forced = torch.full_like(real, -1e4)
        rows = forced.reshape(-1, forced.shape[-1])
        for i in range(rows.shape[0]):
            rows[i, script[min(state["step"] + i, len(script) - 1)]] = 1e4
        state["step"] += rows.shape[0]
        return forced

    def reset():
        state["step"] = 0

    model.language_model.logits = logits
    return reset


class Floor:
    """The model calls a request makes, timed alone in this process: cold (encode_images + generate) and
    warm (generate on the cached features, the cold answer as its draft), on the same model, dtype, question
    and options."""

    def __init__(self, model, question, options, force_ids=None, drafts="slice"):
        self.model, self.question, self.options, self.drafts = model, question, options, drafts
        self.last_answer = None  # the previous cold answer: the cold draft with drafts="recent", as in the app
        self.reset = scripted_logits(model, force_ids) if force_ids is not None else (lambda: None)
        self.cold, self.warm, self.results, self.warm_results = [], [], [], []

    def sync(self):
        if self.model.device.type == "cuda":
            import torch

            torch.cuda.synchronize()

    def once(self, unit, record=True):
        model = self.model
        self.reset()
        t0 = time.perf_counter()
        features = model.encode_images([unit])
        cold_draft = self.last_answer if self.drafts == "recent" else None
        result = model.generate(unit, self.question, features=features, draft=cold_draft, **self.options)
        self.sync()
        t_cold = time.perf_counter() - t0
        result.latencies = {**result.latencies, **features.latencies}  # the encoder stages ran in encode_images
        self.reset()
        t0 = time.perf_counter()
        warm_draft = result.token_ids if self.drafts != "off" else None
        warm = model.generate(unit, self.question, features=features, draft=warm_draft, **self.options)
        self.sync()
        t_warm = time.perf_counter() - t0
        if warm.token_ids != result.token_ids:
            raise SystemExit(f"the warm floor answered differently from the cold one: {warm.answer!r} vs {result.answer!r}")
        self.last_answer = result.token_ids
        if record:
            self.warm_results.append(warm)
            self.cold.append(t_cold)
            self.warm.append(t_warm)
            self.results.append(result)


def post_infer(session, url, image_id, params):
    from RadDiagLib.multipart import split_infer_response

    t0 = time.perf_counter()
    reply = session.post(f"{url}/infer/raddiagseg", params={"image": image_id}, data={"params": json.dumps(params)}, timeout=1200)
    if reply.status_code != 200:
        raise SystemExit(f"infer {image_id} failed: {reply.status_code} {reply.text[:300]}")
    out, _, label = split_infer_response(reply.headers.get("Content-Type", ""), reply.content)
    elapsed = time.perf_counter() - t0
    if label is None:
        raise SystemExit("the server sent no label file")
    return elapsed, out


def stage_line(samples, keys):
    return ", ".join(f"{k} {median([s.get(k, 0.0) for s in samples]) * 1000:.1f}" for k in keys)


def build_and_save(preset, folder):
    """Child process of model_folder: an untrained `preset` model (bf16 unless demo) saved to `folder`."""
    import torch

    torch.manual_seed(0)
    dtype = torch.bfloat16 if preset != "demo" else torch.float32
    build_random(preset, dtype).save_pretrained(str(folder), dtype=dtype)


def main():
    global QUESTION
    if len(sys.argv) == 4 and sys.argv[1] == "--build-random":
        return build_and_save(sys.argv[2], sys.argv[3])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model folder (default: the shipped demo model, else an untrained demo-preset model)")
    p.add_argument("--preset", default="demo", choices=tuple(PRESETS), help="preset of the untrained model built without --model")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "mixed"], help="served dtype (the app's --conf dtype)")
    p.add_argument("--repeats", type=int, default=5, help="cold/warm request pairs (each on a new slice)")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the app's default")
    p.add_argument("--threads", type=int, default=None, help="torch threads here and in the server (OMP_NUM_THREADS)")
    p.add_argument("--no-server", action="store_true", help="measure the compute floor only")
    p.add_argument("--device", default="cpu", help="with --no-server: cpu or cuda (the server runs on CPU here)")
    p.add_argument("--force-answer", action="store_true", help="floor decodes a fixed 3-step answer with 2 seg tokens")
    p.add_argument("--answer-drafts", default="slice", choices=["slice", "recent", "off"],
                   help="the app's --conf answer_drafts, mirrored by the floor (default: slice, the app's default)")
    p.add_argument("--compile-decode", action="store_true", help="the app's --conf compile_decode true, here and in the server")
    args = p.parse_args()
    set_threads(args.threads)
    import torch

    from raddiagseg import templates
    from lib import infer_params
    from lib.model_store import load_for_serving, serving_precision

    QUESTION = templates.DEFAULT_QUESTION
    max_new = args.max_new_tokens or infer_params.DEFAULTS["max_new_tokens"]
    options = {"max_new_tokens": max_new}
    print(f"machine: {machine()}")

    with tempfile.TemporaryDirectory(prefix="raddiag-latency-") as tmp:
        work = Path(tmp)
        if args.no_server:  # no files needed: the app's CT windowing on the phantom slices
            from raddiagseg.data import phantoms
            from raddiagseg.imaging import to_unit_range

            ct = phantoms.generate_ct(np.random.default_rng(0), "liver", size=args.size, slices=args.repeats + 6, tumours=2)
            units = [to_unit_range(ct.hu[i + 2].astype(np.float32), "ct", None) for i in range(args.repeats + 2)]
        else:
            ids, _ = write_studies(work / "studies", args.repeats + 2, args.size)
            units = [app_unit(work / "studies" / f"{i}.nii.gz") for i in ids]  # the model input exactly as the app makes it
        if args.no_server and args.device != "cpu" and not args.model:
            folder, description = None, f"untrained {args.preset} preset built on {args.device} (random weights)"
        else:
            folder, description = model_folder(args, work)

        t0 = time.perf_counter()
        device = args.device if args.no_server else None
        if folder is None:  # --no-server on a GPU: the untrained model is built there directly
            with torch.device(device):
                model = build_random(args.preset, serving_precision(args.preset, device, args.dtype)[0])
            model.language_model.compile_decode = args.compile_decode
        else:
            model = load_for_serving(folder, device, args.dtype, compile_decode=args.compile_decode)  # as the server does
        model.eval()
        print(f"model: {description}; preset {model.config.preset}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, "
              f"{precision(model)}, loaded in {time.perf_counter() - t0:.1f} s; question: the app's default 3-step question, "
              f"max_new_tokens {max_new}; answer drafts: {args.answer_drafts}")
        force_ids = None
        if args.force_answer:
            text = templates.vqaseg_answer(*FORCED_ANSWER)
            force_ids = model.processor.answer_ids(text)
            options["max_new_tokens"] = max(max_new, len(force_ids))
            print(f"floor decodes the fixed answer {text!r} ({len(force_ids) - 1} tokens + eos; max_new_tokens {options['max_new_tokens']})")
        floor = Floor(model, QUESTION, options, force_ids, args.answer_drafts)
        floor.once(units[-1], record=False)  # warm-up: one-time initialisation is not timed
        rss_floor = peak_rss_gb()

        e2e = {"cold": [], "warm": []}
        server_json = {"cold": [], "warm": []}
        if args.no_server:
            for unit in units[: args.repeats]:
                floor.once(unit)
        else:
            import requests
            from live_server import start_server

            conf = {"model_path": str(folder), "work_dir": str(work / "app-work"), "dtype": args.dtype, "answer_drafts": args.answer_drafts,
                    "compile_decode": str(args.compile_decode).lower()}
            t0 = time.perf_counter()
            with start_server(APP, work / "studies", conf) as server:
                print(f"server up in {time.perf_counter() - t0:.1f} s at {server.url}")
                session = requests.Session()
                params = {"question": QUESTION, "max_new_tokens": max_new}
                first, out = post_infer(session, server.url, ids[-1], params)  # loads the model: reported, not in the medians
                print(f"first request (loads the model): {first:.2f} s")
                # interleaved: a cold + warm request pair, then the same model calls in-process, slice by slice,
                # so drifting load on a shared machine affects the server and the floor alike
                for image_id, unit in zip(ids[: args.repeats], units):
                    for kind in ("cold", "warm"):
                        seconds, out = post_infer(session, server.url, image_id, params)
                        cache = out.get("feature_cache") or {}
                        expected = 1 if kind == "cold" else 0
                        if cache.get("encoded") != expected:
                            raise SystemExit(f"{kind} request on {image_id} encoded {cache.get('encoded')} slices, expected {expected}")
                        e2e[kind].append(seconds)
                        server_json[kind].append(out)
                    floor.once(unit)
        floor_cold, floor_warm, results = floor.cold, floor.warm, floor.results
        last = results[-1]
        print(f"floor answer: {len(last.token_ids)} tokens, {len(last.segments)} masks: {last.answer[:120]!r}")
        print("\ncompute floor (model calls alone, in-process), medians over", len(floor_cold))
        print(f"  cold (encode_images + generate): {median(floor_cold) * 1000:.0f} ms")
        def kept(results):
            return f"{sum(r.draft.get('accepted', 0) for r in results)} of {sum(r.draft.get('offered', 0) for r in results)}"

        print(f"  warm (generate on cached features{', the cold answer as draft' if args.answer_drafts != 'off' else ''}): "
              f"{median(floor_warm) * 1000:.0f} ms   (floor warm/cold {median(floor_warm) / median(floor_cold):.2f})")
        print(f"  draft tokens kept: cold {kept(floor.results)}, warm {kept(floor.warm_results)}")
        print("  model stages, last warm call [ms]: " + ", ".join(f"{k} {v * 1000:.1f}" for k, v in floor.warm_results[-1].latencies.items()))
        print("  model stages, last cold call [ms]: " + ", ".join(f"{k} {v * 1000:.1f}" for k, v in last.latencies.items()))
        print(f"  peak RSS of this process: {rss_floor:.2f} GB after loading the model and a warm-up request"
              + (f", {peak_rss_gb():.2f} GB at the end" if args.no_server else ""))
        if model.device.type == "cuda":
            print(f"  on {torch.cuda.get_device_name()}: peak GPU memory {torch.cuda.max_memory_allocated() / 1024**3:.2f} GB "
                  "(stage times inside the model are not synchronised on a GPU; the totals are)")

        if args.no_server:
            return 0
        cold, warm = median(e2e["cold"]), median(e2e["warm"])
        print(f"\nend-to-end through HTTP (client: POST /infer, multipart reply with the label), medians over {args.repeats}")
        print(f"  cold: {cold * 1000:.0f} ms   warm (cached features): {warm * 1000:.0f} ms")
        for kind in ("cold", "warm"):
            outs = server_json[kind]
            lat = [o["latencies"] for o in outs]
            stages = [o["latencies"]["model_stages"] for o in outs]
            http = [s - o["latencies"]["total"] for s, o in zip(e2e[kind], outs)]
            print(f"  {kind} stages [ms]: read {median([x['read'] for x in lat]) * 1000:.1f}, window {median([x['preprocess'] for x in lat]) * 1000:.1f}, "
                  + stage_line(stages, ("preprocess", "vision", "clip", "prefill", "decode", "mask_decoder"))
                  + f", decode per token {median([s.get('decode_per_token', 0.0) for s in stages]) * 1000:.2f}"
                  + f", postprocess {median([x['postprocess'] for x in lat]) * 1000:.1f}, write {median([x['write'] for x in lat]) * 1000:.1f}"
                  + f", server total {median([x['total'] for x in lat]) * 1000:.1f}, HTTP overhead {median(http) * 1000:.1f}")
        for kind in ("cold", "warm"):
            drafted = [o["feature_cache"] for o in server_json[kind]]
            print(f"  {kind} draft tokens kept: {sum(d['draft_tokens_kept'] for d in drafted)} of {sum(d['draft_tokens'] for d in drafted)}")
        answers = {o["answer"] for o in server_json["cold"]}
        print(f"  server answers: {len(answers)} distinct, e.g. {next(iter(answers))[:100]!r}")
        ratio_cold = cold / median(floor_cold)
        ratio_warm = warm / median(floor_warm)
        warm_cold = warm / cold
        print("\nratios (measured in this run)")
        print(f"  end-to-end / floor, cold: {ratio_cold:.2f}  (target <= 1.25: {'met' if ratio_cold <= 1.25 else 'NOT met'})")
        print(f"  end-to-end / floor, warm: {ratio_warm:.2f}")
        print(f"  warm / cold end-to-end:   {warm_cold:.2f}  (target <= 0.3: {'met' if warm_cold <= 0.3 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
