"""`tinyserve quantize`: RTN, GPTQ, AWQ and NF4 written here in PyTorch, calibrated layer by layer
(`pipeline.py`) on seeded ShareGPT windows (`calib.py`), saved as a self-contained model directory
(`checkpoint.py`) or in AutoGPTQ / AutoAWQ's layouts (`hf_format.py`). The engine reads all three
(tinyserve/models/quantized.py) and serves their codes on its packed kernels without re-quantizing."""
