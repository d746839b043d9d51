"""`python -m bra.sae` = `bra-sae`."""

from bra.sae.cli import main

main()
