"""`python -m tinyserve.worker.build_step REQUEST_JSON`: build the compiled decode step's packages into
the cache, for a server that serves eagerly meanwhile (worker/compiled.py, `BackgroundCompile`).

The request carries what fixes the graphs' key: the engine's config with its measured packed/dense
crossover (so nothing is measured again, on a machine the server is loading), the context length,
and the most rows a decode step can have. The model is loaded as the server loaded it, with a KV pool
of one block (the pool's size is a dynamic dimension of the graphs). Exit status 0: the packages are
there.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings

import torch

from tinyserve.config import EngineConfig
from tinyserve.models.loader import model_config, resolve_model
from tinyserve.worker.served_model import serve_model


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s [build]: %(message)s")
    # torch.export's own pytree deprecation, once per graph, in the server's log: not ours to act on
    warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
    request = json.loads(argv[0])
    config = EngineConfig(**{**request["config"], "packed_max_rows": request["packed_max_rows"]})
    torch.set_num_threads(1)  # the server's eager steps have the cores
    src = resolve_model(config.model)
    served = serve_model(config, src, model_config(src), config.quantization, request["max_len"], 1,
                         request["max_decode_rows"], "blocking")
    return 0 if served.runner.compiled is not None else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
