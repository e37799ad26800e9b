"""engine/nemo"""
