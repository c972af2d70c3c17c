"""qcore-quant-pow2: an example qcore plugin written only against ``qcore.plugin``.

Per linear it moves activation outliers into the weights with power-of-two factors (exact in
floating point), kept as an online input transform saved with the checkpoint, then rounds the
weights to nearest with power-of-two scales.
"""
