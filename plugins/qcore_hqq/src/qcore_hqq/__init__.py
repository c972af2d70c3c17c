"""qcore-quant-hqq: Half-Quadratic Quantization (Badri and Shaji, 2023), calibration-free."""
__version__ = "0.1.0"
