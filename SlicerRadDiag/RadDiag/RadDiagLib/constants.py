"""Defaults shared by the module and the library.

DEFAULT_QUESTION is a copy of `raddiagseg.templates.DEFAULT_QUESTION` (Slicer does not have
the raddiagseg package); a pytest keeps the two identical.
"""

DEFAULT_SERVER_URL = "http://127.0.0.1:8000"
DEFAULT_MODEL = "raddiagseg"

DEFAULT_QUESTION = (
    "Please analyze the image and answer the following:\n"
    "1. Is there any abnormality present?\n"
    "2. If yes, what is the diagnosis?\n"
    "3. If yes, provide segmentation masks of the organ and abnormality."
)

# Seconds: (connect, read). Inference on a whole CT volume on a CPU server can take minutes.
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 600.0
QUICK_TIMEOUT = 30.0  # /info/, status and existence checks
