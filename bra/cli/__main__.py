"""`python -m bra.cli` lists the two console scripts."""

import sys

sys.stderr.write("usage: python -m bra.cli.cache ... (bra-cache) | python -m bra.cli.sae ... (bra-sae)\n")
sys.exit(2)
