"""bra.cache"""
