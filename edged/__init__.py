"""edged: run a small medical language model on the device, next to the patient."""

import os

# onnxruntime 1.29 and later, on Linux and macOS, sends usage telemetry to Microsoft (1DS events:
# the process, sessions, models, errors, with a device id it keeps under
# ~/.cache/Microsoft/DeveloperTools) unless ORT_DISABLE_TELEMETRY=1 is set before it initializes,
# which it does when first imported. A node next to patients talks to its broker and nothing
# else, so this runs before any edged module imports onnxruntime. A value set in the environment
# is the operator's and stays; a process that imported onnxruntime before edged has initialized
# it already (edged.engine then still switches off its later events).
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

__version__ = "0.1.0"
