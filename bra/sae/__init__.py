"""bra.sae"""
