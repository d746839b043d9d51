"""`python -m bra.cache` = `bra-cache`."""

from bra.cache.cli import main

main()
