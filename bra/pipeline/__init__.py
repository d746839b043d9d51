"""bra.pipeline"""
