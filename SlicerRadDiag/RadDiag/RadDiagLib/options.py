"""Model options of an /infer request, as the module's "Options" section sets them.

Only what differs from the server's defaults is sent, so an older server that does not know an
option still answers a plain request.

- test-time scaling: m answers x n perturbed prompts; the response's `agreement` says how much they
  agreed (`uncertainty` = 1 - mean agreement);
- RVLS2M region prompts: "model default" (as the model was trained), "on" or "off";
- chain of thought: the model reasons (modality -> finding -> diagnosis) before its answer;
  the response's `reasoning` holds that text;
- answer anyway (`force`): an image outside the model's domain gets a diagnosis and segments
  too, still flagged in the response's `domain`.
"""

RVLS2M_CHOICES = ("model default", "on", "off")
MAX_TTS = 16


def infer_options(tts=False, tts_answers=4, tts_masks=4, rvls2m="model default", cot=False, force=False):
    """The infer params for these option settings (an empty dict for the defaults)."""
    if rvls2m not in RVLS2M_CHOICES:
        raise ValueError(f"RVLS2M must be one of {', '.join(RVLS2M_CHOICES)}, got {rvls2m!r}")
    options = {}
    if tts:
        for name, value in (("answers", tts_answers), ("prompts", tts_masks)):
            if not 1 <= int(value) <= MAX_TTS:
                raise ValueError(f"test-time scaling {name} must be between 1 and {MAX_TTS}, got {value}")
        options.update(tts=True, tts_answers=int(tts_answers), tts_masks=int(tts_masks))
    if rvls2m != "model default":
        options["rvls2m"] = rvls2m == "on"
    if cot:
        options["cot"] = True
    if force:
        options["force"] = True
    return options
