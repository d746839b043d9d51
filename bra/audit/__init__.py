"""bra.audit: refusal-depth scoring of an eval store from stored activations (no model)."""
