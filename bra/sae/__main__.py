"""`python -m bra.sae` = `bra-sae` (alias for the README's torchrun lines; the CLI is in bra.cli)."""

import runpy

# runpy, not an import: the layers below bra.cli never import it (tests/test_static.py checks the direction)
runpy.run_module("bra.cli.sae", run_name="__main__", alter_sys=True)
