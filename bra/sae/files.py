"""File names of SAE exports and fit run folders, in a module that imports nothing: readers of those folders
(`bra-sae compare` labels runs by them) need not load torch to know them."""

SEED_WEIGHTS = "sae_weights.pt"
"""Seed checkpoint file name."""
SAELENS_CFG = "cfg.json"
"""SAELens config file name (`sae_lens.constants.SAE_CFG_FILENAME`)."""
SAELENS_WEIGHTS = "sae_weights.safetensors"
"""SAELens weights file name (`sae_lens.constants.SAE_WEIGHTS_FILENAME`)."""
SAELENS_DIR = "sae"
"""The exported SAE in SAELens format, inside a fit run folder."""
RUN_FILE = "run.json"
"""A fit run folder's record: its configs and the store it was trained on (``store``)."""

__all__ = ["RUN_FILE", "SAELENS_CFG", "SAELENS_DIR", "SAELENS_WEIGHTS", "SEED_WEIGHTS"]
