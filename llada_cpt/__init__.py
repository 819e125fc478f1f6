"""llada-cpt: block-diffusion continual pre-training and post-training on Megatron-Core."""
import warnings

__version__ = "0.1.0"

# Megatron-Core repeats these on every import in every rank; without TE/apex the torch
# fallbacks are intended (CPU runs, tests).  The choice is logged once by the trainer instead.
for _msg in (r".*Transformer Engine and Apex are not installed.*", r".*Apex is not installed.*",
             r".*full scope is deprecated.*"):
    warnings.filterwarnings("ignore", message=_msg)
