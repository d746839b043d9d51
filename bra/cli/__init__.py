"""bra.cli: the console scripts `bra-cache` and `bra-sae` (parse arguments, call the library)."""
