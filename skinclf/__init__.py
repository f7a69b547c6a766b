"""skinclf: batch classification of dermoscopic skin-lesion images.

Decision support for clinicians, not a diagnosis.

Importing skinclf first switches off every report its dependencies would send or store (see
`keep_private`): the images are patient data, and nothing about their processing leaves the
machine or lingers in the user's home or temporary folder.
"""

import os
import sys

__version__ = "0.1.0"

KAGGLE_DATASET = "kmader/skin-cancer-mnist-ham10000"
HAM10000_CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")

# Usage reports, forced off whatever the environment says: the README promises that nothing
# leaves the machine, and a variable set machine-wide for another program (a cluster profile's
# RAY_USAGE_STATS_ENABLED=1) must not quietly break that promise for patient data.
NO_TELEMETRY = {
    # ONNX Runtime (1.32+, official builds) keeps 1DS telemetry on: on import it writes
    # $TMPDIR/.ses and ~/.cache/Microsoft/DeveloperTools/.onnxruntime/{deviceid,onnxruntime.db}
    # and uploads events. Only this variable, read when the library initialises, stops all of it.
    "ORT_DISABLE_TELEMETRY": "1",
    "RAY_USAGE_STATS_ENABLED": "0",  # Ray (not used by skinclf today; workers inherit this)
    "HF_HUB_DISABLE_TELEMETRY": "1",  # Hugging Face hubs (not used by skinclf today)
    "DO_NOT_TRACK": "1",  # the cross-tool convention some libraries honour
    "SE_AVOID_STATS": "true",  # Selenium Manager's usage statistics (the tests' browser)
}

# Where Keras would write ~/.keras/keras.json on import when it does not exist: a path that can
# never be created (a folder inside the null device), so Keras' own "save config if possible"
# quietly fails. A user's existing keras.json, or their KERAS_HOME, is used as it is.
_NOWHERE = os.path.join(os.devnull, "skinclf-keras-home")


def keep_private() -> None:
    """Set the switches above in this process (and so in every process it starts), before any
    dependency that reads them is imported. Called when skinclf is imported."""
    already_off = os.environ.get("ORT_DISABLE_TELEMETRY") == "1"
    os.environ.update(NO_TELEMETRY)
    if "onnxruntime" in sys.modules and not already_off:
        # Too late for this process: ONNX Runtime read the variable when it was imported.
        import warnings

        warnings.warn("onnxruntime was imported before skinclf, so its telemetry is on in this process: import "
                      "skinclf first, or set ORT_DISABLE_TELEMETRY=1 before starting Python", stacklevel=2)
    home_config = os.path.join(os.path.expanduser("~"), ".keras", "keras.json")
    if "KERAS_HOME" not in os.environ and not os.path.exists(home_config):
        os.environ["KERAS_HOME"] = _NOWHERE


keep_private()
