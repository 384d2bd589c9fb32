"""Randomized backprop through linear layers: sketches, layers, variance estimators, plans."""
