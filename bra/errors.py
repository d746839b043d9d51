"""Typed errors. Each carries a one-line message the CLIs print as ``error: ...`` with exit code 2."""


class BraError(Exception):
    """Base class for user-facing errors (bad input, missing resources)."""


class ManifestError(BraError):
    """The manifest is malformed or names something invalid."""


class CorpusError(BraError):
    """A corpus cannot be read, or is empty after filtering."""


class ModelLoadError(BraError):
    """The model cannot be loaded (not found offline, bad layer, ...)."""


class StoreError(BraError):
    """A store is missing, incomplete, mismatched, corrupt or unwritable."""


class StoreMismatchError(StoreError):
    """An existing store was built from another manifest/model/layer/dtype."""


class SAEError(BraError):
    """An SAE checkpoint or training setting is invalid or does not match the store."""


class EditError(BraError):
    """A residual edit (`bra-sae intervene`) is malformed or does not fit the model, SAE or catalog."""


class OrganismError(BraError):
    """A model organism cannot be built or used: bad recipe, missing provenance, trained on audit prompts."""
