"""hfpipe: pretrain, fine-tune, align, evaluate and publish causal language models from one YAML file."""

import logging
import os
import sys
from pathlib import Path

__version__ = "0.1.0"
# The checkout hfpipe runs from (an editable install): recipes/ and the git commit are found from here.
PROJECT_ROOT = Path(__file__).resolve().parents[2]
TELEMETRY_OPT_IN = "HFPIPE_TELEMETRY"


# Usage pings the libraries send unasked: TRL's trainers ping the Hub at construction (huggingface_hub telemetry);
# `datasets` sends a request to S3 to count a "download" whenever it loads even local files with a packaged builder.
# (environment variable, module that reads it once at import, its constant there)
PINGS = (
    ("HF_HUB_DISABLE_TELEMETRY", "1", "huggingface_hub.constants", "HF_HUB_DISABLE_TELEMETRY", True),
    ("HF_UPDATE_DOWNLOAD_COUNTS", "0", "datasets.config", "HF_UPDATE_DOWNLOAD_COUNTS", False),
)
# Set only when the user has not: gradio's usage analytics, for a user who has gradio beside trackio. trackio itself
# pings nothing when it logs locally, and gradio_client (which it imports) reports usage through huggingface_hub's
# telemetry, off above.
DEFAULTS_OFF = (("GRADIO_ANALYTICS_ENABLED", "False"),)


def turn_off_telemetry() -> None:
    """No usage pings unless the user opts in with HFPIPE_TELEMETRY=1.

    The environment covers child processes and libraries imported later; the libraries read it once at import, so
    those already imported are switched off through their constants.
    """
    if os.environ.get(TELEMETRY_OPT_IN) == "1":
        return
    for variable, value, module_name, constant, off in PINGS:
        os.environ[variable] = value
        module = sys.modules.get(module_name)
        if module is not None:
            setattr(module, constant, off)
    for variable, value in DEFAULTS_OFF:
        os.environ.setdefault(variable, value)


turn_off_telemetry()
# bitsandbytes (imported by every `import peft`) warns on CPUs with AVX512-BF16 that the optional `kernels` package,
# which would download a kernel from the Hub, is missing; its own CPU path works, so the warning only adds noise.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
