"""Weight quantization written here in PyTorch: RTN, GPTQ, AWQ and NF4, calibrated layer by layer
(`pipeline.py`), saved as a self-contained model directory (`checkpoint.py`) that the engine serves on
its packed kernels without re-quantizing (layers/quant.py, `--quantization checkpoint`)."""
